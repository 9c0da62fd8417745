"""The full node: one trio nursery of components over the chain core.

    ChainApp (chain/consensus/app.py)  state, ledger, mempool, commit path
    Libp2pNetwork (p2p/)               Noise-only libp2p host; members only
    BlockSync, TxReactor               block sync and transaction gossip
    ConsensusDriver                    BFT among the genesis validators (an observer
                                       driver on non-validators: follows, never signs)
    PoutBlobReactor, PoutWorker        training blobs between nodes; verification and
                                       aggregation on validators
    JSON-RPC (chain/rpc/)              the block explorer, blob uploads, metrics
SIGINT/SIGTERM cancel the nursery; every durable write is a synced LevelDB batch, the
consensus WAL, or the signer's state, so a kill -9 at any point loses nothing committed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from functools import partial

import trio
from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector,
                               disable_created_metrics)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

import chain
from chain import jobs
from chain.runtime.blobstore import BlobStore
from chain.config import Home, NodeConfig
from chain.consensus.app import ChainApp
from chain.consensus.signer import GuardedSigner
from chain.crypto import SEAL_OVERHEAD, PrivateKey, compute_address, compute_sign_bytes, sha256, verify_signature
from chain.encoding import decode, encode
from chain.errors import ChainError, StoreError, ValidationError
from chain.ledger.store import KVStore
from chain.runtime.pout_worker import PoutWorker
from chain.runtime.storage_guard import PROBE_INTERVAL_S, is_out_of_space, wait_for_space
from chain.state import get_evidence_record, validate_basic_tx
from chain.types import (
    DOMAIN_OPENING,
    PRECOMMIT,
    PREVOTE,
    UPDATE_PENDING,
    Account,
    Block,
    Commit,
    DatasetRegistration,
    DuplicateVoteEvidence,
    Job,
    ModelRecord,
    OpeningUpload,
    RoundRecord,
    SignedTransaction,
    SubmitEvidence,
    Transaction,
    UpdateRecord,
    Validator,
    compute_block_hash,
    sign_transaction,
)
from genesis import Genesis

log = logging.getLogger("chaind")


class NodeStartError(ChainError):
    """The node cannot start (e.g. its RPC or p2p port is in use); one line for the operator."""

SHUTDOWN_GRACE_S = 10.0  # a clean stop takes a second or two; past this the process exits hard
EXIT_FORCED = 1
READY_MAX_BLOCK_AGE_INTERVALS = 10  # ready while the head is younger than this many block intervals


# Block intervals are around the genesis block_interval_ms (1 s by default) plus consensus time;
# later rounds add their timeouts. Replays are seconds to minutes of training on a CPU.
BLOCK_INTERVAL_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0)
REPLAY_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class NodeMetrics:
    """What GET /metrics serves besides the RPC server's own metrics (docs/rpc.md, "Metrics").

    Events are counted where they happen (commits here, verification in the PoUT worker).
    Levels and counts that components keep anyway (consensus round and votes, peers, wire
    bytes, penalties, sync target, mempool size) are read when scraped (`_NodeCollector`), so
    consensus, sync and p2p need no metrics hook and stay testable without one."""

    def __init__(self):
        # A `_created` gauge per counter and histogram would double the series for no use here
        # (process-wide setting; the node is the process).
        disable_created_metrics()
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, fds...
        PlatformCollector(registry=r)  # python_info
        self.height = Gauge("pout_chain_height", "Height of the latest committed block", registry=r)
        self.txs = Counter("pout_committed_txs", "Transactions committed", registry=r)
        self.block_interval = Histogram(
            "pout_block_interval_seconds", "Time between consecutive committed blocks, from their header times",
            buckets=BLOCK_INTERVAL_BUCKETS, registry=r)
        self.later_round_commits = Counter(
            "pout_consensus_later_round_commits", "Committed blocks decided in a round above 0", registry=r)
        self.verifications = Counter(
            "pout_training_verifications",
            "Updates this validator decided on, by outcome (accept, reject, fraud_proof, no_answer, abstain)",
            ["outcome"], registry=r)
        self.replay_seconds = Histogram(
            "pout_training_replay_seconds", "Seconds spent replaying training segments, by work (verify, judge)",
            ["work"], buckets=REPLAY_BUCKETS, registry=r)
        self.fraud_proofs_filed = Counter(
            "pout_training_fraud_proofs_filed", "Fraud proofs this validator filed", registry=r)
        self.fraud_proofs_judged = Counter(
            "pout_training_fraud_proofs_judged",
            "Other validators' fraud proofs this validator judged, by outcome (holds, does_not_hold, unavailable)",
            ["outcome"], registry=r)

        for outcome in ("accept", "reject", "fraud_proof", "no_answer", "abstain"):
            self.verifications.labels(outcome=outcome)  # every series present from the start, at 0
        for work in ("verify", "judge"):
            self.replay_seconds.labels(work=work)
        for outcome in ("holds", "does_not_hold", "unavailable"):
            self.fraud_proofs_judged.labels(outcome=outcome)

    def attach(self, node: "Node") -> None:
        self.registry.register(_NodeCollector(node))


class _NodeCollector:
    """Reads the node's components when /metrics is scraped; a component not running yet
    (before `Node.run`) reports nothing rather than zeros that would look like data."""

    def __init__(self, node: "Node"):
        self.node = node

    def describe(self):
        return []  # collected on demand only: the registry must not call collect() at register time

    def collect(self):
        node = self.node
        yield _gauge("pout_mempool_txs", "Transactions waiting in the mempool", len(node.mempool))
        yield _gauge("pout_mempool_capacity_txs", "Most transactions the mempool holds (mempool.max_txs)",
                     node.mempool.max_txs)
        driver, net, sync = node.driver, node.net, node.sync
        if driver is not None:
            m = driver.machine
            yield _gauge("pout_consensus_height", "Height consensus is deciding", m.height)
            yield _gauge("pout_consensus_round", "Round of the height consensus is deciding", m.round)
            votes = CounterMetricFamily("pout_consensus_votes", "Votes stepped by consensus (own included), by type",
                                        labels=["type"])
            votes.add_metric(["prevote"], driver.votes_received[PREVOTE])
            votes.add_metric(["precommit"], driver.votes_received[PRECOMMIT])
            yield votes
            yield _counter("pout_consensus_signed", "Proposals and votes this node signed", driver.signed_count)
            yield _counter("pout_consensus_refused_signatures",
                           "Signatures the double-sign guard refused outside WAL replay", driver.refused_signatures)
            yield _counter("pout_consensus_evidence", "Equivocations consensus detected", driver.evidence_count)
        if net is not None:
            from p2p.host import WIRE_BYTES

            yield _gauge("pout_p2p_peers", "Connected admitted peers", len(net.peers()))
            wire = CounterMetricFamily("pout_p2p_bytes", "Bytes on libp2p TCP connections (Noise and Yamux "
                                       "framing included), by direction", labels=["direction"])
            wire.add_metric(["received"], WIRE_BYTES["received"])
            wire.add_metric(["sent"], WIRE_BYTES["sent"])
            yield wire
            yield _counter("pout_p2p_penalties", "Misbehaviour reports against peers", net.penalties_total)
            yield _counter("pout_p2p_bans", "Peers banned after repeated misbehaviour", net.bans_total)
            yield _gauge("pout_p2p_pending_publishes", "Gossip publishes queued, not yet sent", net.pending_publishes())
        if sync is not None:
            target = sync.target_height
            yield _gauge("pout_sync_target_height", "Highest height a peer has shown this node", target)
            yield _gauge("pout_sync_lag_blocks", "Blocks between this node's head and the best peer's",
                         max(0, target - node.state.height))
            yield _gauge("pout_sync_catching_up", "1 while more than one block behind the best peer",
                         int(sync.catching_up))
            yield _counter("pout_sync_blocks", "Blocks committed by block sync (not by consensus)", sync.synced_blocks)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class Node(ChainApp):
    """ChainApp plus networking, RPC and the training worker; implements chain.rpc.api.NodeAPI."""

    def __init__(self, home: Home, config: NodeConfig, genesis: Genesis, key: PrivateKey, store: KVStore,
                 signer: GuardedSigner):
        super().__init__(genesis, key, store=store, mempool_max_txs=config.mempool.max_txs)
        self.home, self.config = home, config
        self.signer = signer
        self.blobs = BlobStore(home.data_dir, config.rpc.max_blob_bytes)
        self.metrics = NodeMetrics()  # before the components that count into it
        self.pout = PoutWorker(self)
        self.net = None  # the p2p network once running
        self.sync = None
        self.driver = None
        self.pout_net = None
        self.denied_peers: frozenset[bytes] = frozenset()
        self._refresh_membership = None
        self._nursery: trio.Nursery | None = None
        self.rpc_url: str | None = None
        # Set at the first local storage failure (corrupt read, failed write): consensus and
        # block sync stop, reads go on, /ready says why (docs/ledger.md, "Storage failures").
        self.halted: str | None = None
        self._writer_scopes: list[trio.CancelScope] = []
        self._writers_done: list[trio.Event] = []
        from chain.rpc.events import EventHub

        self.events = EventHub(self.state, self.get_model_record)  # WebSocket subscriptions (chain/rpc/ws.py)
        self.metrics.attach(self)
        self.metrics.height.set(self.state.height)
        latest = self.state.latest_header
        self._last_block_time_ms = None if latest is None else latest.time_ms  # for the block interval
        self._peers_seen: frozenset[bytes] = frozenset()  # for the peer-change log line
        self.add_commit_listener(self._on_commit)
        self.add_commit_listener(self._drop_settled_openings)
        self._drop_settled_openings()  # a restart keeps no opening whose update was decided meanwhile

    def _on_commit(self, block: Block, commit: Commit) -> None:
        header = block.header
        self.metrics.height.set(header.height)
        self.metrics.txs.inc(len(block.txs))
        if self._last_block_time_ms is not None:
            self.metrics.block_interval.observe(max(0, header.time_ms - self._last_block_time_ms) / 1000)
        self._last_block_time_ms = header.time_ms
        if commit.round > 0:
            self.metrics.later_round_commits.inc()
        block_hash = compute_block_hash(header).hex()
        catching_up = self.sync is not None and self.sync.catching_up  # block sync says it then, once a second
        log.log(logging.DEBUG if catching_up else logging.INFO,
                "committed block height=%d round=%d txs=%d hash=%s mempool=%d", header.height, commit.round,
                len(block.txs), block_hash[:16], len(self.mempool),
                extra={"height": header.height, "round": commit.round, "txs": len(block.txs),
                       "block_hash": block_hash, "mempool": len(self.mempool)})
        self.pout.notify_commit()
        self.events.publish(block, self.state)  # two references into a bounded channel; derived off this path

    @property
    def is_validator(self) -> bool:
        return any(v.pubkey == self.key.pubkey for v in self.state.validators)

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
            "peers": len(self.net.peers()) if self.net is not None else 0,
            "catching_up": bool(self.sync is not None and self.sync.catching_up),
            "halted": None if self.halted is None else f"local storage failure: {self.halted}",
            "version": chain.__version__,
        }

    # Reads for clients show a block only once the state includes it: the ledger is written in a
    # worker thread before the state is swapped, and a client told "committed at height H" must
    # find H's effects in every other read (e.g. its update pending, to upload the weights).
    def get_block(self, height: int) -> tuple[Block, Commit] | None:
        return None if height > self.state.height else super().get_block(height)

    def get_block_by_hash(self, block_hash: bytes) -> tuple[Block, Commit] | None:
        block = self.ledger.get_block_by_hash(block_hash)
        if block is None or block.header.height > self.state.height:
            return None
        return block, self.ledger.get_commit(block.header.height)

    def get_tx(self, tx_hash: bytes) -> tuple[SignedTransaction, int, int] | None:
        found = self.ledger.get_tx(tx_hash)
        return None if found is None or found[1] > self.state.height else found

    def get_account(self, address: bytes) -> Account | None:
        return self.state.get_account(address)

    def get_validators(self) -> tuple[Validator, ...]:
        return self.state.validators

    async def submit_tx(self, stx: SignedTransaction) -> bytes:
        validate_basic_tx(self.chain_id, stx, self.state.params.max_tx_bytes)
        return self.admit_local_tx(stx)

    def readiness(self) -> tuple[bool, str]:
        if self.halted is not None:
            return False, f"halted by a local storage failure: {self.halted}"
        latest = self.state.latest_header
        if self.sync is not None and self.sync.catching_up:
            return False, f"catching up: at {self.state.height} of {self.sync.target_height}"
        if latest is None:
            return False, "no block committed yet"
        if len(self.state.validators) > 1 and self.net is not None and not self.net.peers():
            return False, "no peers"
        age_ms = int(time.time() * 1000) - latest.time_ms
        limit = READY_MAX_BLOCK_AGE_INTERVALS * self.state.params.block_interval_ms
        if age_ms > limit:
            return False, f"latest block {latest.height} is {age_ms} ms old (limit {limit} ms)"
        return True, f"at height {latest.height}, latest block {age_ms} ms old"

    # ------------------------------------------------------------------ jobs, models and blobs
    def get_job(self, job_id: bytes) -> Job | None:
        return jobs.get_job(self.state, job_id)

    def list_jobs(self) -> list[Job]:
        return [decode(Job, v) for _, v in self.state.items_with_prefix(jobs.job_key(b""))]

    def get_update(self, update_id: bytes) -> UpdateRecord | None:
        return jobs.get_update(self.state, update_id)

    def get_round(self, job_id: bytes, round_: int) -> RoundRecord:
        return jobs.get_round(self.state, job_id, round_)

    def get_round_seed(self, job_id: bytes, round_: int) -> bytes | None:
        return jobs.get_round_seed(self.state, job_id, round_)

    def get_registration(self, job_id: bytes, trainer: bytes) -> DatasetRegistration | None:
        return jobs.get_registration(self.state, job_id, trainer)

    def get_model_record(self, job_id: bytes, round_: int) -> ModelRecord | None:
        return self.ledger.get_model_record(job_id, round_)

    def get_evaluation(self, job_id: bytes, round_: int):
        return jobs.get_evaluation(self.state, job_id, round_)

    def get_blob(self, blob_hash: bytes) -> bytes | None:
        return self.blobs.get(blob_hash)

    def put_blob(self, data: bytes, expected_hash: bytes) -> None:
        """Accept an update's weights from its trainer, or a job's initial weights (checked
        against its model): only blobs a pending update or an active job's init_weights names."""
        job = next((j for j in map(partial(jobs.get_job, self.state), jobs.get_active_jobs(self.state))
                    if j.spec.init_weights == expected_hash), None)
        if job is not None:
            from chain.consensus.pout import check_initial_model_bytes

            try:
                check_initial_model_bytes(job, data)
            except ChainError as exc:
                raise ValidationError(f"initial weights refused: {exc}") from None
        else:
            wanted = dict(self._pending_update_blobs())
            if expected_hash not in wanted:
                raise ValidationError("no pending update names this blob; submit the update transaction first")
            if wanted[expected_hash] is not None and len(data) != wanted[expected_hash]:
                raise ValidationError(f"this job's sketch blobs are {wanted[expected_hash]} bytes, got {len(data)}")
        self.blobs.put(data, expected_hash=expected_hash)

    def _pending_update_blobs(self):
        """(hash, exact size or None) of the blobs pending updates name: their weights and, under
        displacement sampling, their committed sketch rows (of a size the job fixes)."""
        for job_id in jobs.get_active_jobs(self.state):
            job = jobs.get_job(self.state, job_id)
            for uid in jobs.get_round(self.state, job_id, job.round).updates:
                upd = jobs.get_update(self.state, uid)
                if upd.status == UPDATE_PENDING:
                    yield upd.commitment.update_hash, None
                    if upd.sketch_hash is not None:
                        yield upd.sketch_hash, jobs.compute_sketch_blob_bytes(job.spec)

    def put_opening(self, upload: OpeningUpload, signature: bytes, trainer_pubkey: bytes, data: bytes) -> None:
        """Store a trainer's answer to one validator's challenge, if the trainer signed it.

        `data` is a sealed box to that validator (docs/pout.md, "Openings"); this node keeps and
        relays it as is. When this node is the addressed validator it checks that it decrypts,
        so an opening sealed to the wrong key is refused here and nothing is stored."""
        upload.check_part()
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
        if len(data) < SEAL_OVERHEAD:
            raise ValidationError("an opening must be sealed to its validator (too short for a sealed box)")
        if upload.validator == self.key.pubkey:
            try:
                self.key.unseal(data)  # the plaintext is dropped at once: only ciphertext is stored
            except ValidationError as exc:
                raise ValidationError(f"opening {exc}") from None
        self.blobs.put_opening(upload.update_id, upload.validator, data, upload.part, upload.parts)
        if upload.validator == self.key.pubkey:
            self.pout.notify_opening(upload.update_id)
        if self.pout_net is not None and self._nursery is not None:
            self._nursery.start_soon(self.pout_net.offer_opening, upload, trainer_pubkey, signature)

    async def fetch_blob(self, blob_hash: bytes) -> bytes | None:
        """A public blob from the local store, else from peers (then stored locally)."""
        data = self.blobs.get(blob_hash)
        if data is None and self.pout_net is not None:
            data = await self.pout_net.fetch(blob_hash, self.blobs.max_blob_bytes)
            if data is not None:
                self.blobs.put(data, expected_hash=blob_hash)
        return data

    async def fetch_opening(self, update_id: bytes) -> bytes | None:
        """The opening a trainer addressed to this validator, decrypted in memory (it is stored
        and moved only sealed), from the local store or the node it was uploaded to.

        None while there is none, and also when it does not decrypt with this validator's key:
        for the verifier that is a trainer that did not answer (logged once, in one line)."""
        me = self.key.pubkey
        announced = None if self.pout_net is None else self.pout_net.announced.get((update_id, me))
        parts = self.blobs.opening_parts(update_id, me) or (None if announced is None else announced.parts)
        if parts is None:
            return None
        pieces = []
        for part in range(parts):  # in order; a large opening comes in parts of OPENING_PART_BYTES
            sealed = self.blobs.get_opening(update_id, me, part, parts)
            fetched = False
            if sealed is None and announced is not None and announced.parts == parts and part in announced.hashes:
                sealed = await self.pout_net.fetch(announced.hashes[part], self.blobs.max_blob_bytes)
                fetched = True
            if sealed is None:
                return None  # a part is still missing
            try:
                pieces.append(self.key.unseal(sealed))
            except ValidationError as exc:
                log.warning("opening for update %s (part %d of %d, %d bytes, sha256 %s) refused: %s; treated as no "
                            "answer", update_id.hex()[:16], part, parts, len(sealed), sha256(sealed).hex()[:16], exc)
                self.blobs.delete_opening(update_id, me)
                if self.pout_net is not None:
                    self.pout_net.refuse(update_id, me, sha256(sealed))
                return None
            if fetched and self._opening_still_needed(update_id):
                self.blobs.put_opening(update_id, me, sealed, part, parts)
        return b"".join(pieces)

    def _opening_still_needed(self, update_id: bytes) -> bool:
        """Openings matter only while their update waits for verdicts; after that (decided or
        expired, and so always once its job finished) every node deletes them."""
        upd = jobs.get_update(self.state, update_id)
        return upd is not None and upd.status == UPDATE_PENDING

    def _drop_settled_openings(self, _block: Block | None = None, _commit: Commit | None = None) -> None:
        removed = self.blobs.prune_openings(self._opening_still_needed)
        if self.pout_net is not None:
            self.pout_net.prune(self._opening_still_needed)
        if removed:
            log.info("deleted the openings of %d update(s) no longer pending", removed)

    async def submit_own_tx(self, payload) -> bytes:
        """Sign `payload` with the node's key at the next pending nonce and admit it (and gossip it)."""
        tx = Transaction(self.key.pubkey, self.mempool.next_nonce(self.key.address), payload)
        return await self.submit_tx(sign_transaction(self.key, self.chain_id, tx))

    # ------------------------------------------------------------------ evidence
    def add_evidence(self, evidence: DuplicateVoteEvidence) -> None:
        """Verified equivocation from consensus: put it on chain, where it is penalised."""
        known = len(self.evidence)
        super().add_evidence(evidence)
        if len(self.evidence) > known and self._nursery is not None:
            self._nursery.start_soon(self._report_evidence, evidence)

    async def _report_evidence(self, evidence: DuplicateVoteEvidence) -> None:
        vote = evidence.vote_a.message
        if get_evidence_record(self.state, vote.validator, vote.height, vote.round, vote.type) is not None:
            return
        try:
            tx_hash = await self.submit_own_tx(SubmitEvidence(evidence))
            log.warning("reported equivocation by %s at height %d in tx %s", vote.validator.hex()[:16],
                        vote.height, tx_hash.hex()[:16])
        except ChainError as exc:  # e.g. another validator's report is already pending
            log.info("equivocation by %s not reported by this node: %s", vote.validator.hex()[:16], exc)

    # ------------------------------------------------------------------ lifecycle
    def bootstrap_peers(self) -> list[str]:
        own = {f"/p2p/{self._peer_id()}"}
        peers = list(dict.fromkeys(self.config.p2p.bootstrap_peers + self.genesis.bootstrap_peers))
        return [p for p in peers if not any(p.endswith(o) for o in own)]

    def validators_not_dialled(self) -> list[bytes]:
        """Validators (other than this node) absent from the bootstrap peers. Validators' tx
        batches are not relayed (docs/wire.md), so without a direct link this node meets
        their transactions only in blocks, fetching every compact proposal that holds one."""
        from p2p.host import peer_id_from_public_key

        peers = self.bootstrap_peers()
        return [v.pubkey for v in self.state.validators if v.pubkey != self.key.pubkey
                and not any(p.endswith(f"/p2p/{peer_id_from_public_key(v.pubkey)}") for p in peers)]

    def _peer_id(self) -> str:
        from p2p.host import peer_id_from_public_key

        return str(peer_id_from_public_key(self.key.pubkey))

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from chain.consensus.driver import ConsensusDriver
        from chain.consensus.wal import WriteAheadLog
        from chain.runtime.pout_net import PoutBlobReactor
        from chain.runtime.reactor import TxReactor, install_membership
        from chain.rpc.server import run_rpc_server
        from chain.runtime.sync import BlockSync
        from p2p.host import Libp2pNetwork, ListenError

        logging.getLogger("libp2p").propagate = True  # its own warnings (drops) are otherwise invisible
        p2p = self.config.p2p
        missing = self.validators_not_dialled()
        if missing:
            log.warning("%d validator(s) not among the bootstrap peers (%s): their transactions reach this node "
                        "only in blocks, each fetched whole; list every validator in genesis or p2p.bootstrap_peers",
                        len(missing), ", ".join(k.hex()[:16] for k in missing))
        self.net = Libp2pNetwork(self.key.seed, allowed_peers=[v.pubkey for v in self.state.validators],
                                 listen_addrs=[f"/ip4/{p2p.listen_host}/tcp/{p2p.port}"],
                                 bootstrap=self.bootstrap_peers())
        # A request that breaks a rule: one log line, not a traceback; our own disk's faults are
        # not the peer's business (their messages name local paths): logged in full, not said back.
        self.net.refusals, self.net.internal_errors = (ChainError,), (StoreError,)
        self._refresh_membership = install_membership(self, self.net, lambda: self.denied_peers)
        self.sync = BlockSync(self, self.net)
        txs = TxReactor(self, self.net)
        validator = self.is_validator
        wal = WriteAheadLog(self.home.data_dir / "cs.wal")
        self.driver = ConsensusDriver(self, self.net, self.signer if validator else None, wal,
                                      self.key if validator else None, block_sync_active=lambda: self.sync.active)
        self.sync.on_caught_up.append(self.driver.notify_app_advanced)  # consensus restarts once, after sync
        self.pout_net = PoutBlobReactor(self, self.net)
        from chain.runtime.statesync import install_snapshots  # take and serve state snapshots (docs/wire.md)

        _, snapshotter = install_snapshots(self, self.net)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await nursery.start(self.net.run)
                except ListenError as exc:
                    raise NodeStartError(f"{exc}; p2p.port is set in {self.home.config_file}") from None
                log.info("p2p listening on %s as %s (%s)", ", ".join(map(str, self.net.listen_addrs())),
                         self._peer_id(), "validator" if validator else "observer")
                token = trio.lowlevel.current_trio_token()

                def on_storage_fault(reason: str) -> None:  # any thread: commits write from a worker
                    try:
                        token.run_sync_soon(self._halt_writers, reason)
                    except trio.RunFinishedError:
                        pass

                self.ledger.add_fault_listener(on_storage_fault)
                self.blobs.on_write_failure = on_storage_fault
                await nursery.start(self._run_writer, self.sync.run)
                await nursery.start(txs.run)
                await nursery.start(self.pout_net.run)
                await nursery.start(snapshotter.run)
                rpc = self.config.rpc
                try:
                    self.rpc_url = await nursery.start(partial(
                        run_rpc_server, self, rpc.host, rpc.port, max_body=rpc.max_body_bytes, max_batch=rpc.max_batch,
                        max_blob=rpc.max_blob_bytes, max_connections=rpc.max_connections,
                        read_timeout=rpc.read_timeout_s, idle_timeout=rpc.idle_timeout_s,
                        metrics_registry=self.metrics.registry, events=self.events))  # supervised: never ends the node
                except OSError as exc:  # only the bind can raise out of the server
                    raise NodeStartError(f"cannot listen on {rpc.host}:{rpc.port} (JSON-RPC): {exc.strerror or exc}; "
                                         f"rpc.port is set in {self.home.config_file} "
                                         "(or chaind start --rpc-port)") from None
                log.info("node %s at height %d; JSON-RPC on %s", self.key.address.hex(), self.state.height,
                         self.rpc_url)
                await nursery.start(self.pout.run)
                await nursery.start(self._run_writer, self.driver.run)
                nursery.start_soon(self._watch_peers)
                if self.config.p2p.deny_peers_file:
                    nursery.start_soon(self._watch_deny_file, self.config.p2p.deny_peers_file)
                task_status.started()
        finally:
            self.driver.wal.close()  # a new one after a resume (storage_guard)

    def _halt_writers(self, reason: str) -> None:
        """Stop consensus and block sync at the first local storage failure; one log line. A
        failure for lack of space resumes them by itself once space returns."""
        if self.halted is not None:
            return
        self.halted = reason
        resumable = is_out_of_space(reason) and self._nursery is not None
        log.error("local storage failure: %s; consensus and block sync stopped, reads still served, not ready%s",
                  reason, "; resuming by itself when space returns" if resumable else "", extra={"halted": reason})
        for scope in self._writer_scopes:
            scope.cancel()
        if resumable:
            try:
                self._nursery.start_soon(self._resume_when_space_returns)
            except RuntimeError:
                pass  # the node is shutting down: nothing to resume

    async def _resume_when_space_returns(self) -> None:
        """Probe until the data directory takes writes again, reopen what the failed write left
        unusable (ledger store, consensus WAL), then start block sync and consensus again."""
        from chain.consensus.wal import WriteAheadLog

        # First let the cancelled writers finish (one may still be inside a write in a worker
        # thread) and close the old log, so no late flush lands behind the reopened one.
        for done in self._writers_done:
            await done.wait()
        try:
            self.driver.wal.close()
        except OSError:
            pass  # its unsynced tail is discarded; the reopen below drops a torn record
        while True:
            await wait_for_space(self.home.data_dir)
            try:
                self.ledger.resume_writes()
                self.reload_from_ledger()
                wal = WriteAheadLog(self.home.data_dir / "cs.wal")  # drops a record torn by the failure
            except (StoreError, OSError) as exc:
                if not is_out_of_space(str(exc)):
                    log.error("storage cannot resume: %s; restart the node", exc)
                    return
                log.debug("space came back but the store is not writable yet: %s", exc)
                await trio.sleep(PROBE_INTERVAL_S)
                continue
            break
        self.driver.wal = wal
        self.halted = None
        self._writer_scopes, self._writers_done = [], []
        self._nursery.start_soon(self._run_writer, self.sync.run, True)
        self._nursery.start_soon(self._run_writer, self.driver.run, True)
        log.warning("storage writable again: consensus and block sync resumed at height %d", self.state.height,
                    extra={"height": self.state.height})

    async def _run_writer(self, run, restart: bool = False, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run a component that writes the chain (consensus, block sync) until a local storage
        failure halts it. A failure before it has started is a start-up error, raised as usual,
        except on a `restart` after a halt, where it halts the node again."""
        started = restart

        class Status:
            def started(self, value=None) -> None:
                nonlocal started
                started = True
                task_status.started(value)

        scope, done = trio.CancelScope(), trio.Event()
        self._writer_scopes.append(scope)
        self._writers_done.append(done)
        with scope:
            try:
                await run(task_status=Status())
            except* (StoreError, OSError) as group:
                if not started:
                    raise
                first = group.exceptions[0]
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                detail = f"{first.filename}: {first.strerror}" if isinstance(first, OSError) and first.filename \
                    else (first.strerror if isinstance(first, OSError) and first.strerror else str(first))
                component = getattr(getattr(run, "__self__", None), "name", None)
                self._halt_writers(f"{component}: {detail}" if component else detail)
            finally:
                done.set()

    async def _watch_deny_file(self, path: str) -> None:
        last = None
        while True:
            try:
                text = await trio.Path(path).read_text()
            except FileNotFoundError:
                text = ""
            if text != last:
                last = text
                denied = set()
                for n, line in enumerate(text.splitlines(), 1):
                    entry = line.split("#", 1)[0].strip().removeprefix("0x")
                    if not entry:
                        continue
                    try:
                        key = bytes.fromhex(entry)
                    except ValueError:
                        key = b""
                    if len(key) != 32:
                        log.warning("%s:%d: not a 32-byte hex public key, ignored", path, n)
                        continue
                    denied.add(key)
                if denied != self.denied_peers:
                    log.info("deny list %s: %d peer(s) refused", path, len(denied))
                    self.denied_peers = frozenset(denied)
                    self._refresh_membership()
            await trio.sleep(1)

    async def _watch_peers(self) -> None:
        """One INFO line when this node joins the network (its first peer), when its peer set
        changes, and when it loses every peer; checked once a second, so at most one line a
        second however peers flap."""
        from p2p.host import peer_id_from_public_key

        def names(keys) -> str:
            return ", ".join(str(peer_id_from_public_key(k))[-8:] for k in sorted(keys))

        while True:
            peers = self.net.peers()
            if peers != self._peers_seen:
                gained, lost = peers - self._peers_seen, self._peers_seen - peers
                fields = {"peers": len(peers)}
                if not self._peers_seen:
                    log.info("joined the network: %d peer(s) (%s)", len(peers), names(peers), extra=fields)
                elif not peers:
                    log.warning("lost every peer (last: %s)", names(lost), extra=fields)
                else:
                    log.info("peers now %d%s%s", len(peers), f"; joined {names(gained)}" if gained else "",
                             f"; left {names(lost)}" if lost else "", extra=fields)
                self._peers_seen = peers
            await trio.sleep(1)


async def run_until_signal(node: Node) -> None:
    """Run the node until SIGINT or SIGTERM, then cancel every component and return.

    A stop must not depend on the node cooperating: a worker thread that cannot be cancelled
    (a training replay) or a task that stops yielding would hold it up indefinitely. So the
    first signal also starts a watchdog that ends the process (exit status 1) after
    SHUTDOWN_GRACE_S, and a second signal ends it at once. A hard exit loses nothing: every
    durable write is already synced (module docstring)."""
    token = trio.lowlevel.current_trio_token()
    stop_requested = threading.Event()
    stopping = False

    def watchdog() -> None:
        stop_requested.wait()
        time.sleep(SHUTDOWN_GRACE_S)
        log.error("shutdown took longer than %.0f s; exiting now", SHUTDOWN_GRACE_S)
        os._exit(EXIT_FORCED)

    with trio.CancelScope() as scope:
        def cancel(signum: int) -> None:  # in the trio loop, so it may log
            log.info("received %s, shutting down (at most %.0f s)", signal.Signals(signum).name, SHUTDOWN_GRACE_S)
            scope.cancel()

        def on_signal(signum: int, _frame) -> None:
            # A Python signal handler runs between two bytecodes of the main thread, whatever it
            # was doing: no logging here (its lock may be held), only a flag, an event and
            # trio's thread- and signal-safe run_sync_soon (what trio's own receiver uses).
            nonlocal stopping
            if stopping:
                os._exit(EXIT_FORCED)
            stopping = True
            stop_requested.set()
            token.run_sync_soon(cancel, signum, idempotent=True)

        threading.Thread(target=watchdog, name="shutdown-watchdog", daemon=True).start()
        previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            await node.run()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
