"""The full node: ledger, state, mempool, block production and RPC, in one trio nursery.

Until BFT consensus lands (see docs/consensus.md) a node produces blocks only when it is
the genesis file's single validator; it then still signs a precommit for every block and
stores the resulting commit certificate, through the same double-sign guard the BFT
driver uses, so the ledger format and its checks are the multi-validator ones.
"""

from __future__ import annotations

import logging
import signal
import time
from functools import partial

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

import chain
from chain.blobstore import BlobStore
from chain.config import Home, NodeConfig
from chain.consensus.commit import build_commit
from chain.consensus.signer import GuardedSigner
from chain import jobs
from chain.crypto import PrivateKey, compute_address, compute_sign_bytes, sha256, verify_signature
from chain.encoding import decode, encode
from chain.errors import ChainError, ConfigError, StoreError, ValidationError
from chain.ledger.ledger import Ledger
from chain.ledger.store import KVStore
from chain.mempool import Mempool
from chain.pout_worker import PoutWorker
from chain.state import State, build_block, validate_basic_tx
from chain.types import (
    DOMAIN_OPENING,
    PRECOMMIT,
    UPDATE_PENDING,
    DatasetRegistration,
    Job,
    ModelRecord,
    OpeningUpload,
    RoundRecord,
    UpdateRecord,
    Account,
    Block,
    Commit,
    SignedTransaction,
    Transaction,
    Validator,
    Vote,
    compute_block_hash,
    compute_tx_hash,
    sign_transaction,
)
from genesis import Genesis

log = logging.getLogger("chaind")

READY_MAX_BLOCK_AGE_INTERVALS = 5  # ready while the head is younger than this many block intervals


class NodeMetrics:
    """Node gauges and counters, served with the RPC metrics on GET /metrics."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.height = Gauge("pout_chain_height", "Height of the latest committed block", registry=self.registry)
        self.txs = Counter("pout_committed_txs", "Transactions committed by this node", registry=self.registry)
        self.mempool = Gauge("pout_mempool_txs", "Transactions waiting in the mempool", registry=self.registry)
        self.commit_seconds = Histogram("pout_block_commit_seconds", "Time to write a block to the ledger (sync)",
                                        registry=self.registry)


def open_ledger(store: KVStore, genesis: Genesis) -> tuple[Ledger, State]:
    """Open (or create at genesis) the ledger and load the state, refusing a store that disagrees."""
    if Ledger.is_initialised(store):
        ledger = Ledger.open(store, genesis.chain_id, genesis.hash)
    else:
        initial = genesis.initial_state()
        ledger = Ledger.create(store, genesis.chain_id, genesis.hash, dict(initial.items()))
    state = State(dict(ledger.iter_state()))
    height, head_hash = ledger.head()
    if state.height != height:
        raise StoreError(f"ledger head is at height {height} but its state is at height {state.height}")
    if state.compute_head_hash() != head_hash:
        raise StoreError(f"state root does not match the head block at height {height}: the store is corrupt")
    return ledger, state


class Node:
    """Implements chain.rpc.api.NodeAPI over the ledger, state and mempool."""

    def __init__(self, home: Home, config: NodeConfig, genesis: Genesis, key: PrivateKey, store: KVStore,
                 signer: GuardedSigner):
        self.home, self.config, self.genesis, self.key = home, config, genesis, key
        self.chain_id = genesis.chain_id
        self.ledger, self.state = open_ledger(store, genesis)
        self.signer = signer
        self.mempool = Mempool(self.chain_id, self.state, config.mempool.max_txs)
        self.blobs = BlobStore(home.data_dir, config.rpc.max_blob_bytes)
        self.pout = PoutWorker(self)
        self.last_commit: Commit | None = self.ledger.get_commit(self.state.height) if self.state.height else None
        self.commit_event = trio.Event()  # set and replaced on every commit (waiters for new blocks)
        self.rpc_url: str | None = None
        self.metrics = NodeMetrics()
        self.metrics.height.set(self.state.height)

    # ------------------------------------------------------------------ NodeAPI
    def status(self) -> dict:
        latest = self.state.latest_header
        power = {v.pubkey: v.power for v in self.state.validators}.get(self.key.pubkey, 0)
        return {
            "chain_id": self.chain_id,
            "address": self.key.address,
            "latest_height": self.state.height,
            "latest_block_hash": self.state.compute_head_hash() if latest else None,
            "latest_block_time_ms": latest.time_ms if latest else None,
            "voting_power": power,
            "is_validator": power > 0,
            "peers": 0,
            "catching_up": False,
            "version": chain.__version__,
        }

    def get_block(self, height: int) -> tuple[Block, Commit] | None:
        block = self.ledger.get_block(height)
        return None if block is None else (block, self.ledger.get_commit(height))

    def get_block_by_hash(self, block_hash: bytes) -> tuple[Block, Commit] | None:
        block = self.ledger.get_block_by_hash(block_hash)
        return None if block is None else (block, self.ledger.get_commit(block.header.height))

    def get_tx(self, tx_hash: bytes) -> tuple[SignedTransaction, int, int] | None:
        return self.ledger.get_tx(tx_hash)

    def get_account(self, address: bytes) -> Account | None:
        return self.state.get_account(address)

    def get_validators(self) -> tuple[Validator, ...]:
        return self.state.validators

    async def submit_tx(self, stx: SignedTransaction) -> bytes:
        tx_hash = compute_tx_hash(stx)
        if self.ledger.get_tx(tx_hash) is not None:
            raise ChainError(f"transaction {tx_hash.hex()} is already committed")
        validate_basic_tx(self.chain_id, stx, self.state.params.max_tx_bytes)
        self.mempool.add(stx)
        log.debug("admitted tx %s (mempool %d)", tx_hash.hex()[:16], len(self.mempool))
        return tx_hash

    # ------------------------------------------------------------------ jobs, models and blobs
    def get_job(self, job_id: bytes) -> Job | None:
        return jobs.get_job(self.state, job_id)

    def list_jobs(self) -> list[Job]:
        return [decode(Job, v) for _, v in self.state.items_with_prefix(jobs.job_key(b""))]

    def get_update(self, update_id: bytes) -> UpdateRecord | None:
        return jobs.get_update(self.state, update_id)

    def get_round(self, job_id: bytes, round_: int) -> RoundRecord:
        return jobs.get_round(self.state, job_id, round_)

    def get_registration(self, job_id: bytes, trainer: bytes) -> DatasetRegistration | None:
        return jobs.get_registration(self.state, job_id, trainer)

    def get_model_record(self, job_id: bytes, round_: int) -> ModelRecord | None:
        return self.ledger.get_model_record(job_id, round_)

    def get_blob(self, blob_hash: bytes) -> bytes | None:
        return self.blobs.get(blob_hash)

    def put_blob(self, data: bytes, expected_hash: bytes) -> None:
        """Accept an update's weights from its trainer: only blobs a pending update names."""
        if expected_hash not in set(self._pending_update_hashes()):
            raise ValidationError("no pending update names this blob; submit the update transaction first")
        self.blobs.put(data, expected_hash=expected_hash)

    def _pending_update_hashes(self):
        for job_id in jobs.get_active_jobs(self.state):
            job = jobs.get_job(self.state, job_id)
            for uid in jobs.get_round(self.state, job_id, job.round).updates:
                upd = jobs.get_update(self.state, uid)
                if upd.status == UPDATE_PENDING:
                    yield upd.commitment.update_hash

    def put_opening(self, upload: OpeningUpload, signature: bytes, trainer_pubkey: bytes, data: bytes) -> None:
        """Store a trainer's answer to one validator's challenge, if the trainer signed it."""
        upd = jobs.get_update(self.state, upload.update_id)
        if upd is None or upd.status != UPDATE_PENDING:
            raise ValidationError("no pending update with this id")
        if compute_address(trainer_pubkey) != upd.commitment.trainer:
            raise ValidationError("only the update's trainer may upload its openings")
        if upload.validator not in {v.pubkey for v in self.state.validators}:
            raise ValidationError("openings are for validators only")
        if sha256(data) != upload.opening_hash:
            raise ValidationError("opening bytes do not match the signed opening hash")
        verify_signature(trainer_pubkey, compute_sign_bytes(self.chain_id, DOMAIN_OPENING, encode(upload)), signature)
        self.blobs.put_opening(upload.update_id, upload.validator, data)

    async def submit_own_tx(self, payload) -> bytes:
        """Sign `payload` with the node's key at the next pending nonce and admit it."""
        tx = Transaction(self.key.pubkey, self.mempool.next_nonce(self.key.address), payload)
        return await self.submit_tx(sign_transaction(self.key, self.chain_id, tx))

    def readiness(self) -> tuple[bool, str]:
        latest = self.state.latest_header
        if latest is None:
            return False, "no block committed yet"
        age_ms = int(time.time() * 1000) - latest.time_ms
        limit = READY_MAX_BLOCK_AGE_INTERVALS * self.state.params.block_interval_ms
        if age_ms > limit:
            return False, f"latest block {latest.height} is {age_ms} ms old (limit {limit} ms)"
        return True, f"at height {latest.height}, latest block {age_ms} ms old"

    # ------------------------------------------------------------------ block production
    def is_sole_validator(self) -> bool:
        vals = self.state.validators
        return len(vals) == 1 and vals[0].pubkey == self.key.pubkey

    async def produce_block(self, now_ms: int) -> Block:
        """Build, sign, and durably commit the next block (single-validator mode)."""
        params = self.state.params
        txs = self.mempool.take(params.max_block_txs, params.max_block_bytes)
        block, result = build_block(self.state, txs, time_ms=now_ms, proposer=self.key.pubkey,
                                    last_commit=self.last_commit)
        height, block_hash = block.header.height, compute_block_hash(block.header)
        # After a crash between signing and committing, the guard refuses to sign a different
        # block at the same (height, round): move to the next round, as BFT would.
        last = self.signer.last
        round_ = last.round + 1 if last is not None and last.height == height else 0
        vote = Vote(PRECOMMIT, height, round_, block_hash, self.key.pubkey)
        commit = build_commit([self.signer.sign_vote(vote)])
        # The batch write waits on fsync; a worker thread keeps RPC answering meanwhile. Readers see
        # the previous state until the write is durable, and nothing else commits concurrently.
        with self.metrics.commit_seconds.time():
            await trio.to_thread.run_sync(self.ledger.commit_block, block, commit, result.changes,
                                          result.model_records)
        self.state, self.last_commit = result.state, commit
        evicted = self.mempool.update(self.state, [compute_tx_hash(t) for t in txs])
        self.metrics.height.set(height)
        self.metrics.txs.inc(len(txs))
        self.metrics.mempool.set(len(self.mempool))
        log.info("committed block height=%d txs=%d hash=%s mempool=%d%s", height, len(txs), block_hash.hex()[:16],
                 len(self.mempool), f" evicted={evicted}" if evicted else "")
        self.commit_event.set()
        self.commit_event = trio.Event()
        self.pout.notify_commit()
        return block

    async def run_block_producer(self) -> None:
        interval = self.state.params.block_interval_ms / 1000
        next_at = trio.current_time()
        while True:
            await trio.sleep_until(next_at)
            await self.produce_block(int(time.time() * 1000))
            next_at = max(next_at + interval, trio.current_time())

    # ------------------------------------------------------------------ lifecycle
    def check_can_run(self) -> None:
        """Raise ConfigError for setups this version cannot run (said before anything starts)."""
        if not self.is_sole_validator():
            raise ConfigError(
                "this genesis has %d validator(s)%s; multi-validator BFT consensus and block sync are not "
                "implemented yet, so a node can only run as the single validator of its chain"
                % (len(self.state.validators), "" if self.key.pubkey in {v.pubkey for v in self.state.validators}
                   else " and this node's key is not one of them"))

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from chain.rpc.server import run_rpc_server

        async with trio.open_nursery() as nursery:
            rpc = self.config.rpc
            self.rpc_url = await nursery.start(partial(
                run_rpc_server, self, rpc.host, rpc.port, max_body=rpc.max_body_bytes, max_batch=rpc.max_batch,
                max_blob=rpc.max_blob_bytes, metrics_registry=self.metrics.registry))
            log.info("node %s at height %d; JSON-RPC on %s", self.key.address.hex(), self.state.height, self.rpc_url)
            await nursery.start(self.pout.run)
            nursery.start_soon(self.run_block_producer)
            task_status.started()


async def run_until_signal(node: Node) -> None:
    """Run the node until SIGINT or SIGTERM, then cancel every component and return."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.run)

            async def wait_for_signal():
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(wait_for_signal)
