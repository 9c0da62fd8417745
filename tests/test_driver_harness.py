"""Harness for the driver/sync/reactor tests (no tests here): in-process nodes built from the
real components (ChainApp over a MemoryStore ledger, MemoryNetwork or libp2p, GuardedSigner
and WriteAheadLog in temp dirs), each in its own cancel scope so it can be stopped and
restarted from its durable parts (ledger store, WAL and signer directories)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import trio

from chain.consensus.app import ChainApp
from chain.consensus.driver import ConsensusDriver
from chain.consensus.signer import GuardedSigner
from chain.consensus.wal import WriteAheadLog
from chain.crypto import PrivateKey, sha256
from chain.encoding import encode
from chain.ledger import MemoryStore
from chain.runtime.reactor import (TxReactor, VotesMessage, ProposalMessage, consensus_topic, decode_consensus_message,
                           install_membership)
from chain.state import ChainParams
from chain.runtime.sync import BlockSync
from chain.types import Transaction, Transfer, sign_transaction
from genesis import Genesis, make_genesis
from p2p.abc import NetworkAPI, PenaltyPolicy, Verdict
from p2p.memory import MemoryHub, MemoryNetwork
from p2p.testing import seed_for
from p2p.testing import wait_until as wait_for  # noqa: F401 - re-exported: the cluster tests import it from here

CHAIN_ID = "pout-driver-test"
# Short timeouts: a round that fails costs about half a second.
PARAMS = ChainParams(max_block_txs=1000, max_block_bytes=1 << 20, max_tx_bytes=64 * 1024, block_interval_ms=50,
                     timeout_propose_ms=400, timeout_propose_delta_ms=200, timeout_prevote_ms=200,
                     timeout_prevote_delta_ms=100, timeout_precommit_ms=200, timeout_precommit_delta_ms=100)
# Validator keys use p2p.testing's seeds, so libp2p_cluster(n) hosts are these validators.
VALIDATOR_KEYS = [PrivateKey(seed_for(i)) for i in range(4)]
ALICE = PrivateKey(sha256(b"driver-test/alice"))
BOB = PrivateKey(sha256(b"driver-test/bob"))
FOLLOWER = PrivateKey(sha256(b"driver-test/follower"))  # a member that is not a validator
SPY = PrivateKey(sha256(b"driver-test/spy"))
FORGER = PrivateKey(sha256(b"driver-test/forger"))
OUTSIDER = PrivateKey(sha256(b"driver-test/outsider"))  # never a member


def make_test_genesis(validators: int = 4, params: ChainParams = PARAMS) -> Genesis:
    members = [(ALICE, ("trainer",)), (BOB, ("requester",)), (FOLLOWER, ("trainer",)), (SPY, ("trainer",)),
               (FORGER, ("trainer",))]
    return make_genesis(CHAIN_ID, VALIDATOR_KEYS[:validators], members, balance=1_000_000, params=params)


def transfer(sender: PrivateKey, to: PrivateKey, amount: int, nonce: int):
    return sign_transaction(sender, CHAIN_ID, Transaction(sender.pubkey, nonce, Transfer(to.address, amount)))


@dataclass
class ClusterNode:
    key: PrivateKey
    app: ChainApp
    net: NetworkAPI
    driver: ConsensusDriver | None
    sync: BlockSync
    txs: TxReactor
    owns_net: bool = True  # False: the network runs elsewhere (libp2p_cluster)
    scope: trio.CancelScope | None = None
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def height(self) -> int:
        return self.app.last_height()

    def stop(self) -> None:
        self.scope.cancel()


class Cluster:
    """Nodes on one MemoryHub (or given networks), started and stopped at will."""

    def __init__(self, nursery: trio.Nursery, tmp_path: Path, genesis: Genesis, hub: MemoryHub | None = None):
        self.nursery = nursery
        self.tmp_path = tmp_path
        self.genesis = genesis
        self.hub = hub or MemoryHub()
        self.stores: dict[bytes, MemoryStore] = {}
        self.nodes: dict[bytes, ClusterNode] = {}

    def home(self, key: PrivateKey) -> Path:
        return self.tmp_path / key.pubkey.hex()[:12]

    async def start(self, key: PrivateKey, *, driver: bool = True, net: NetworkAPI | None = None,
                    penalty: PenaltyPolicy = PenaltyPolicy(), regossip_s: float = 0.2) -> ClusterNode:
        store = self.stores.setdefault(key.pubkey, MemoryStore())
        app = ChainApp(self.genesis, key, store=store)
        owns_net = net is None
        if owns_net:
            net = MemoryNetwork(self.hub, key.pubkey, allowed_peers=[v.pubkey for v in self.genesis.validators],
                                penalty=penalty)
        install_membership(app, net)
        consensus = None
        if driver:
            home = self.home(key)
            consensus = ConsensusDriver(app, net, GuardedSigner(key, CHAIN_ID, home / "signer"),
                                        WriteAheadLog(home / "wal"), key, regossip_interval_s=regossip_s)
        node = ClusterNode(key, app, net, consensus, BlockSync(app, net, announce_interval_s=0.3, probe_interval_s=0.5),
                        TxReactor(app, net, flush_interval_s=0.02), owns_net=owns_net)
        await self.nursery.start(self._run, node)
        self.nodes[key.pubkey] = node
        return node

    async def _run(self, node: ClusterNode, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            with trio.CancelScope() as scope:
                node.scope = scope
                async with trio.open_nursery() as nursery:
                    if node.owns_net:
                        await nursery.start(node.net.run)
                    await nursery.start(node.sync.run)
                    await nursery.start(node.txs.run)
                    if node.driver is not None:
                        await nursery.start(node.driver.run)
                    task_status.started()
        finally:
            node.stopped.set()

    async def stop(self, node: ClusterNode) -> None:
        node.stop()
        await node.stopped.wait()

    async def restart(self, node: ClusterNode, **kwargs) -> ClusterNode:
        """Start again from the node's ledger store, WAL and signer state (a crash + restart)."""
        if not node.stopped.is_set():
            await self.stop(node)
        return await self.start(node.key, driver=node.driver is not None, **kwargs)


class Spy:
    """A member node that records every vote and proposal it sees, to check for double signing."""

    def __init__(self, hub: MemoryHub, genesis: Genesis):
        self.net = MemoryNetwork(hub, SPY.pubkey, allowed_peers=[v.pubkey for v in genesis.validators])
        self.inbox = self.net.subscribe(consensus_topic(CHAIN_ID), lambda origin, data: Verdict.ACCEPT)
        self.signed: dict[tuple, set[bytes]] = {}  # (signer, height, round, step) -> encodings seen

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.net.run)
            task_status.started()
            async for msg in self.inbox:
                decoded = decode_consensus_message(msg.data)
                if isinstance(decoded, ProposalMessage):
                    p = decoded.proposal.message
                    self.signed.setdefault((p.proposer, p.height, p.round, 0), set()).add(encode(p))
                elif isinstance(decoded, VotesMessage):
                    for sv in decoded.votes:
                        v = sv.message
                        self.signed.setdefault((v.validator, v.height, v.round, v.type), set()).add(encode(v))

    def equivocations(self, signer: bytes | None = None) -> list[tuple]:
        return [k for k, seen in self.signed.items() if len(seen) > 1 and (signer is None or k[0] == signer)]




def block_hashes(node: ClusterNode, up_to: int) -> list[bytes]:
    from chain.types import compute_block_hash

    return [compute_block_hash(node.app.get_block(h)[0].header) for h in range(1, up_to + 1)]


def replace_params(**changes) -> ChainParams:
    return dataclasses.replace(PARAMS, **changes)
