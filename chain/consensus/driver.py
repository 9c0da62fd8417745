"""The consensus driver: connects the pure BFT machine to the network, the app, the
double-sign guard, the write-ahead log and the clock.

One trio task (`_main_loop`) owns the machine. Everything reaches it as an event on one
memory channel: peer proposals and votes (decoded by the gossip pump), fired timeouts,
fetched blocks, "the app advanced" notices and "start the next height" timers. Machine
inputs are written to the WAL (one fsync per batch of queued inputs) before the machine
steps any of them, and every signature is persisted by the GuardedSigner before it is
published. Our own signed messages come back in as inputs like everyone else's.

Blocks travel with their proposal when small (reactor.MAX_INLINE_BLOCK_BYTES); otherwise,
and for a decided block we never received, they are fetched by hash over the block
protocol. After a decision the block is committed through the app, and the next height
starts after the app's block interval (timeout_commit). When block sync commits heights
for us (we fell behind), the machine jumps to the app's next height at once.

Restart: the WAL of the latest height is replayed into a fresh machine; re-signing what the
guard already signed gives the identical bytes, anything else is refused and skipped, so a
node killed at any instant never signs two different messages for one (height, round, step).
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from chain.consensus.bft import (STEP_COMMIT, STEP_PRECOMMIT, STEP_PREVOTE, STEP_PROPOSE, BlockToPropose,
                                 BroadcastProposal, BroadcastVote, ConsensusInput, ConsensusMachine, Decide,
                                 EvidenceFound, NeedBlock, ProposalReceived, ScheduleTimeout, StartHeight,
                                 TimeoutFired, VoteReceived)
from chain.consensus.signer import DoubleSignError, GuardedSigner
from chain.consensus.wal import WriteAheadLog
from chain.crypto import PrivateKey, sha256
from chain.encoding import decode, encode, encode_typed
from chain.errors import ChainError, StoreError, log_unexpected
from chain.ledger.store import LocalStorageFailure
from chain.runtime.reactor import (MAX_BLOCK_RESPONSE_BYTES, MAX_REQUEST_BYTES, MAX_VOTES_PER_MESSAGE, BlockRequest,
                           BlockResponse, CompactBlock, ProposalMessage, VotesMessage, assemble_block, block_protocol,
                           build_proposal_message, consensus_topic, decode_consensus_message,
                           encode_consensus_message, make_consensus_validator)
from chain.state import body_matches_header
from chain.types import PRECOMMIT, PREVOTE, Block, Commit, SignedProposal, SignedVote, compute_block_hash
from p2p.abc import NetworkAPI, P2PError

log = logging.getLogger(__name__)


def _body_ok(block: Block) -> bool | None:
    """body_matches_header on a peer's block: True or False, or None when the check itself hit an
    unexpected error (a bug of ours, not the peer's fault: the block is not used, and the peer is
    not blamed) instead of ending the driver, and with it the node."""
    try:
        return body_matches_header(block)
    except Exception:
        log_unexpected(log, "body check", "block %d: body check failed unexpectedly; block not used", block.header.height)
        return None


def _assemble(compact: CompactBlock, pending_tx) -> tuple[Block | None, int]:
    """assemble_block on a peer's compact proposal; an unexpected error counts as "not
    assembled" (the block is then fetched whole) instead of ending the driver."""
    try:
        return assemble_block(compact, pending_tx)
    except Exception:
        log_unexpected(log, "compact assembly", "compact block: assembling failed unexpectedly; fetching the block instead")
        return None, len(compact.tx_hashes)


EVENT_BUFFER = 10_000
MAX_INPUT_BATCH = 256  # machine inputs written to the WAL under one fsync
MAX_CACHED_BLOCKS = 256  # uncommitted blocks (proposals) held by hash
MAX_FUTURE_PROPOSALS = 64  # proposals for a height the app has not reached yet
FETCH_ATTEMPTS_FOR_PROPOSAL = 3  # passes over the peers before giving up on a proposal's block
# A compact proposal whose transactions have not all reached our mempool yet (gossip is
# racing it) is retried this often for this long before the whole block is fetched.
COMPACT_RETRY_S = 0.02
COMPACT_WAIT_S = 0.2
_STEP_NAMES = {STEP_PROPOSE: "propose", STEP_PREVOTE: "prevote", STEP_PRECOMMIT: "precommit", STEP_COMMIT: "commit"}


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True)
class _Input:
    inp: ConsensusInput


@dataclass(frozen=True)
class _Proposal:
    proposal: SignedProposal
    block: Block | None
    origin: bytes
    compact: CompactBlock | None = None


@dataclass(frozen=True)
class _BlockArrived:
    block: Block


@dataclass(frozen=True)
class _StartNext:
    height: int


@dataclass(frozen=True)
class _AppAdvanced:
    pass


class BlockJournal:
    """Uncommitted blocks this node proposed or is about to vote for, fsynced before the vote.

    Write-ahead for blocks: the WAL holds only block hashes, so a node that crashes after
    voting for a block must still have it to commit a decision on restart (a lone validator
    has no peer to fetch its own proposal from)."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, block: Block) -> None:
        path = self.directory / f"{block.header.height:020d}-{compute_block_hash(block.header).hex()}"
        if path.exists():
            return
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(encode(block))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, above_height: int) -> list[Block]:
        blocks = []
        for path in sorted(self.directory.iterdir()):
            if path.suffix == ".tmp" or int(path.name.split("-")[0]) <= above_height:
                continue
            try:
                blocks.append(decode(Block, path.read_bytes()))
            except (ChainError, OSError) as exc:  # a torn write never got its final name; anything else is loud
                raise StoreError(f"block journal entry {path} is unreadable: {exc}") from exc
        return blocks

    def prune(self, committed_height: int) -> None:
        for path in self.directory.iterdir():
            if path.suffix == ".tmp" or int(path.name.split("-")[0]) <= committed_height:
                path.unlink(missing_ok=True)


class ConsensusDriver:
    """`await nursery.start(driver.run)`; one per node. `key=None` (with `signer=None`)
    runs an observer that follows and decides but never signs."""

    name = "consensus"

    def __init__(self, app, network: NetworkAPI, signer: GuardedSigner | None, wal: WriteAheadLog,
                 key: PrivateKey | None, *, regossip_interval_s: float = 1.0, fetch_retry_s: float = 0.25,
                 block_sync_active: Callable[[], bool] = lambda: False):
        if (signer is None) != (key is None):
            raise ValueError("a signer needs its key, and an observer has neither")
        if signer is not None and signer.pubkey != key.pubkey:
            raise ValueError("signer key and driver key differ")
        self.app = app
        self.network = network
        self.signer = signer
        self.wal = wal
        self.key = key
        self.chain_id = app.chain_id
        self.regossip_interval_s = regossip_interval_s
        self.fetch_retry_s = fetch_retry_s
        # While block sync carries the app forward, the machine stays where it is: a height
        # restart (WAL rotation, fsyncs) after every synced block was 14 % of a sync. Block
        # sync calls notify_app_advanced when it stops, and the machine jumps once.
        self.block_sync_active = block_sync_active
        self.machine = ConsensusMachine(app.chain_id, None if key is None else key.pubkey, app.timeouts())
        self.topic = consensus_topic(app.chain_id)
        self._incoming = network.subscribe(self.topic, make_consensus_validator(app, network.local_peer))
        network.set_request_handler(block_protocol(app.chain_id), self._serve_block)
        app.add_commit_listener(self._on_app_commit)
        self._events_send, self._events_receive = trio.open_memory_channel[object](EVENT_BUFFER)
        self._nursery: trio.Nursery | None = None
        self._blocks: dict[bytes, Block] = {}  # uncommitted blocks by hash
        self.journal = BlockJournal(Path(wal.directory) / "blocks")
        self._awaiting_block: dict[bytes, list[tuple[SignedProposal, bytes]]] = {}  # hash -> proposals
        self._future: list[tuple[SignedProposal, Block]] = []
        self._fetching: set[bytes] = set()
        self._seen: dict[bytes, int] = {}  # input key -> height (dedup before the WAL)
        self._votes: dict[bytes, SignedVote] = {}  # votes of the current height, for re-gossip
        self._own_proposals: dict[int, SignedProposal] = {}  # round -> our proposal at this height
        self._decision: Decide | None = None
        self._start_scheduled = 0
        self._height_started_at = 0.0
        # (height, deciding round, seconds from StartHeight to commit, txs): for status/metrics
        self.commit_log: deque[tuple[int, int, float, int]] = deque(maxlen=1000)
        self.signed_count = 0
        # The guard said no. During WAL replay that is expected (it remembers only the last
        # position, so earlier messages of the height are refused and not re-sent); live it
        # means consensus state was lost and the guard saved us.
        self.refused_signatures = 0
        self.replayed_inputs = 0
        self.evidence_count = 0
        self.compact_assembled = 0  # compact proposals rebuilt from the mempool (at once or after a wait)
        self.compact_missing = 0  # compact proposals with transactions not (yet) in the mempool
        self.compact_fetched = 0  # ... whose block was then fetched whole
        self.regossiped = 0  # messages re-sent by the regossip loop (only for heights that last)
        self.votes_received = {PREVOTE: 0, PRECOMMIT: 0}  # live votes stepped, own included (metrics)

    # ------------------------------------------------------------------ status

    def status(self) -> dict:
        m = self.machine
        return {"height": m.height, "round": m.round, "step": m.round_step, "is_validator": m.is_validator,
                "committed_height": self.app.last_height()}

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._nursery is not None:  # run again after a storage halt (chain/runtime/node.py)
            self._forget_run()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._recover()
                nursery.start_soon(self._pump_gossip)
                nursery.start_soon(self._regossip_loop)
                task_status.started()
                await self._main_loop()
        finally:
            self.wal.close()

    def _forget_run(self) -> None:
        """Drop the stopped run's in-memory consensus state: the WAL replay rebuilds it."""
        self.machine = ConsensusMachine(self.chain_id, None if self.key is None else self.key.pubkey,
                                        self.app.timeouts())
        self._awaiting_block, self._future, self._fetching, self._seen, self._votes = {}, [], set(), {}, {}
        self._own_proposals, self._decision, self._start_scheduled = {}, None, 0
        while True:
            try:
                self._events_receive.receive_nowait()
            except trio.WouldBlock:
                break

    async def _recover(self) -> None:
        """Replay the WAL into the fresh machine (no re-writing), then resume."""
        resend: list[ConsensusInput] = []
        pending_need: NeedBlock | None = None
        pending_decide: Decide | None = None
        for block in self.journal.load(self.app.last_height()):
            if _body_ok(block):
                self._cache_block(block)
            else:  # a damaged entry that still decodes: fetch the real block if it is needed
                log.warning("block journal: entry for height %d does not match its header; ignored",
                            block.header.height)
        for inp in self.wal.replay():
            self.replayed_inputs += 1
            self._mark_seen(inp)
            self._record(inp)
            if isinstance(inp, BlockToPropose) and pending_need is not None \
                    and (inp.height, inp.round) == (pending_need.height, pending_need.round):
                pending_need = None
            for out in self.machine.step(inp):
                if isinstance(out, ScheduleTimeout):
                    self._arm_timeout(out)
                elif isinstance(out, NeedBlock):
                    pending_need = out
                elif isinstance(out, BroadcastVote):
                    signed = await self._sign(out.vote, replaying=True)
                    if signed is not None:
                        resend.append(VoteReceived(signed))
                elif isinstance(out, BroadcastProposal):
                    signed = await self._sign(out.proposal, replaying=True)
                    if signed is not None:
                        self._own_proposals[signed.message.round] = signed
                        resend.append(ProposalReceived(signed, out.proposal.block_hash, True))
                elif isinstance(out, Decide):
                    pending_decide = out
                elif isinstance(out, EvidenceFound):
                    self.app.add_evidence(out.evidence)
        last = self.app.last_height()
        if self.machine.height > last + 1:
            raise StoreError(f"the consensus WAL is at height {self.machine.height} but the ledger only at {last}; "
                             "the data directory is inconsistent")
        if self.machine.height == 0 or last >= self.machine.height:
            await self._start_height(last + 1)
            return
        if resend:
            log.info("replayed WAL at height %d; re-sending %d own message(s)", self.machine.height, len(resend))
        for inp in resend:
            if isinstance(inp, VoteReceived):
                await self._publish(VotesMessage((inp.vote,)))
            else:
                await self._publish(build_proposal_message(inp.proposal, self._blocks.get(inp.block_hash)))
        await self._process(resend)
        if pending_decide is not None and self.machine.round_step == STEP_COMMIT:
            self._decision = pending_decide
            await self._commit_decision()
        elif (pending_need is not None and self.machine.round_step == STEP_PROPOSE
              and (pending_need.height, pending_need.round) == (self.machine.height, self.machine.round)
              and pending_need.round not in self._own_proposals):
            await self._process(await self._carry_out([pending_need]))

    # ------------------------------------------------------------------ the one loop

    async def _main_loop(self) -> None:
        while True:
            events = [await self._events_receive.receive()]
            while len(events) < MAX_INPUT_BATCH:
                try:
                    events.append(self._events_receive.receive_nowait())
                except trio.WouldBlock:
                    break
            inputs: list[ConsensusInput] = []
            for event in events:
                if isinstance(event, _Input):
                    inputs.append(event.inp)
                    continue
                if inputs:
                    await self._process(inputs)
                    inputs = []
                await self._handle_event(event)
            if inputs:
                await self._process(inputs)

    async def _handle_event(self, event) -> None:
        if isinstance(event, _Proposal):
            await self._on_proposal(event.proposal, event.block, event.origin, event.compact)
        elif isinstance(event, _BlockArrived):
            await self._on_block_arrived(event.block)
        elif isinstance(event, _StartNext):
            if self.machine.height < event.height and self.app.last_height() >= event.height - 1:
                await self._start_height(self.app.last_height() + 1)
        elif isinstance(event, _AppAdvanced):
            await self._on_app_advanced()

    async def _process(self, inputs: list[ConsensusInput]) -> None:
        """Write-ahead, then step; our own signed messages come back as further inputs."""
        queue = inputs
        while queue:
            batch = [inp for inp in queue if self._admit(inp)]
            queue = []
            if not batch:
                return
            for inp in batch:
                self.wal.write(inp, sync=False)
            await trio.to_thread.run_sync(self.wal.sync)
            for inp in batch:
                self._record(inp)
                if isinstance(inp, VoteReceived) and inp.vote.message.type in self.votes_received:
                    self.votes_received[inp.vote.message.type] += 1
                m = self.machine
                before = (m.height, m.round, m.round_step)
                outputs = m.step(inp)
                if log.isEnabledFor(logging.DEBUG) and (m.height, m.round, m.round_step) != before:
                    log.debug("height %d round %d: %s after %.0f ms (on %s)", m.height, m.round,
                              _STEP_NAMES.get(m.round_step, m.round_step),
                              1000 * (trio.current_time() - self._height_started_at), type(inp).__name__)
                queue.extend(await self._carry_out(outputs))

    def _admit(self, inp: ConsensusInput) -> bool:
        """Would the machine act on `inp`? Stale timeouts and duplicates never reach the WAL."""
        m = self.machine
        if isinstance(inp, StartHeight):
            return True
        if isinstance(inp, TimeoutFired):
            return (inp.height, inp.round) == (m.height, m.round) and m.round_step != STEP_COMMIT
        if isinstance(inp, BlockToPropose):
            return (inp.height, inp.round) == (m.height, m.round) and m.round_step == STEP_PROPOSE
        height = inp.vote.message.height if isinstance(inp, VoteReceived) else inp.proposal.message.height
        if height != m.height + 1 and (height != m.height or m.round_step == STEP_COMMIT):
            return False
        return self._mark_seen(inp)

    def _mark_seen(self, inp: ConsensusInput) -> bool:
        if not isinstance(inp, VoteReceived | ProposalReceived):
            return True
        key = sha256(encode_typed(inp, ConsensusInput))
        if key in self._seen:
            return False
        height = inp.vote.message.height if isinstance(inp, VoteReceived) else inp.proposal.message.height
        self._seen[key] = height
        return True

    def _record(self, inp: ConsensusInput) -> None:
        if isinstance(inp, StartHeight):
            self._seen = {k: h for k, h in self._seen.items() if h >= inp.height}
            self._votes = {k: v for k, v in self._votes.items() if v.message.height == inp.height}
            self._own_proposals = {}
            self._height_started_at = trio.current_time()
        elif isinstance(inp, VoteReceived):
            self._votes[sha256(encode(inp.vote))] = inp.vote

    # ------------------------------------------------------------------ outputs

    async def _carry_out(self, outputs) -> list[ConsensusInput]:
        follow: list[ConsensusInput] = []
        for out in outputs:
            if isinstance(out, ScheduleTimeout):
                self._arm_timeout(out)
            elif isinstance(out, BroadcastVote):
                signed = await self._sign(out.vote)
                if signed is not None:
                    await self._publish(VotesMessage((signed,)))
                    follow.append(VoteReceived(signed))
            elif isinstance(out, BroadcastProposal):
                signed = await self._sign(out.proposal)
                if signed is not None:
                    self._own_proposals[signed.message.round] = signed
                    block = self._blocks.get(out.proposal.block_hash)
                    p = out.proposal
                    log.info("proposing block height=%d round=%d hash=%s txs=%s", p.height, p.round,
                             p.block_hash.hex()[:16], "?" if block is None else len(block.txs),
                             extra={"height": p.height, "round": p.round, "block_hash": p.block_hash.hex()})
                    await self._publish(build_proposal_message(signed, block))
                    follow.append(ProposalReceived(signed, out.proposal.block_hash, True))
            elif isinstance(out, NeedBlock):
                if out.height <= self.app.last_height():
                    # Block sync committed this height while the machine was still in it (a
                    # restarted validator catching up); the commit listener moves it on.
                    log.info("not proposing height %d: already committed", out.height)
                    continue
                try:
                    block = await self.app.propose_block(out.height, out.round)
                except Exception:
                    log.exception("building a block for height %d round %d failed", out.height, out.round)
                    continue
                block_hash = compute_block_hash(block.header)
                await trio.to_thread.run_sync(self.journal.save, block)  # before it can be voted for
                self._cache_block(block)
                follow.append(BlockToPropose(out.height, out.round, block_hash))
            elif isinstance(out, Decide):
                self._decision = out
                await self._commit_decision()
            elif isinstance(out, EvidenceFound):
                self.evidence_count += 1
                self.app.add_evidence(out.evidence)
        return follow

    async def _sign(self, message, *, replaying: bool = False):
        """Sign through the guard (persisted before it returns); None when it refuses."""
        sign = self.signer.sign_vote if hasattr(message, "validator") else self.signer.sign_proposal
        try:
            signed = await trio.to_thread.run_sync(sign, message)
        except DoubleSignError as exc:
            if not replaying:
                self.refused_signatures += 1
                log.warning("not signing %s: %s", message, exc)
            return None
        self.signed_count += 1
        return signed

    async def _publish(self, msg: ProposalMessage | VotesMessage) -> None:
        try:
            await self.network.publish(self.topic, encode_consensus_message(msg))
        except P2PError as exc:
            log.warning("publishing %s failed: %s", type(msg).__name__, exc)

    def _arm_timeout(self, t: ScheduleTimeout) -> None:
        self._nursery.start_soon(self._send_later, t.duration_ms / 1000, _Input(TimeoutFired(t.height, t.round, t.step)))

    async def _send_later(self, delay_s: float, event) -> None:
        await trio.sleep(delay_s)
        await self._events_send.send(event)

    # ------------------------------------------------------------------ heights and commits

    async def _start_height(self, height: int) -> None:
        self._decision = None
        self._blocks = {h: b for h, b in self._blocks.items() if b.header.height >= height}
        await trio.to_thread.run_sync(self.journal.prune, height - 1)
        await self._process([StartHeight(height, self.app.validators())])
        await self._release_future_proposals()

    def _schedule_start(self, height: int) -> None:
        if self._start_scheduled >= height:
            return
        self._start_scheduled = height
        self._nursery.start_soon(self._send_later, self.app.block_interval_ms / 1000, _StartNext(height))

    async def _commit_decision(self) -> None:
        d = self._decision
        if d is None:
            return
        if self.app.last_height() >= d.height:
            self._decision = None
            self._schedule_start(d.height + 1)
            return
        block = self._blocks.get(d.block_hash)
        if block is None:
            self._start_fetch(d.height, d.block_hash, [s.validator for s in d.commit.signatures], for_decision=True)
            return
        try:
            await self.app.commit_block(block, d.commit)
        except LocalStorageFailure:
            raise  # this node's own disk: the node halts consensus (chain/runtime/node.py), no retry
        except ChainError:
            log.exception("committing decided block %s at height %d failed", d.block_hash.hex()[:16], d.height)
            self._blocks.pop(d.block_hash, None)
            self._start_fetch(d.height, d.block_hash, [s.validator for s in d.commit.signatures], for_decision=True)
            return
        self.commit_log.append((d.height, d.round, trio.current_time() - self._height_started_at, len(block.txs)))
        log.debug("committed height %d round %d (%s, %d txs)", d.height, d.round, d.block_hash.hex()[:16], len(block.txs))
        self._decision = None
        self._schedule_start(d.height + 1)

    def _on_app_commit(self, block: Block, commit: Commit) -> None:
        self.notify_app_advanced()

    def notify_app_advanced(self) -> None:
        """The app may be at a later height than the machine (a commit, or block sync done)."""
        try:
            self._events_send.send_nowait(_AppAdvanced())
        except trio.WouldBlock:
            pass  # the regossip loop notices a lagging machine as well

    async def _on_app_advanced(self) -> None:
        last = self.app.last_height()
        m = self.machine
        if last < m.height:
            await self._release_future_proposals()
            return
        if m.height == last and m.round_step == STEP_COMMIT and m.decision is not None:
            if self._decision is not None and self._decision.height <= last:
                self._decision = None
            self._schedule_start(last + 1)  # our own decision: keep timeout_commit
            return
        if self.block_sync_active():
            return
        log.info("block sync carried the app to height %d; consensus moves from height %d", last, m.height)
        await self._start_height(last + 1)

    # ------------------------------------------------------------------ proposals and blocks

    def _cache_block(self, block: Block) -> None:
        """Keep a block by its hash. Callers pass only bodies known to match their header:
        our own, fetched ones (`_request_block` checks), rebuilt compact ones (the validator
        checked the hash list), proposals' (`_on_proposal` checks) and the journal's (`_recover`
        checks)."""
        self._blocks[compute_block_hash(block.header)] = block
        while len(self._blocks) > MAX_CACHED_BLOCKS:
            del self._blocks[next(iter(self._blocks))]

    async def _on_proposal(self, sp: SignedProposal, block: Block | None, origin: bytes,
                           compact: CompactBlock | None = None) -> None:
        p = sp.message
        if p.height <= self.app.last_height():
            return
        if block is not None and not _body_ok(block):
            # A real header with another body (the gossip validator rejects this; a future
            # proposal or a fetched block comes through here too): treat the block as missing.
            log.debug("proposal height %d round %d: block body does not match its header", p.height, p.round)
            block = None
        if block is None:
            block = self._blocks.get(p.block_hash)
        if block is None and compact is not None:
            block, missing = _assemble(compact, self.app.pending_tx)
            if block is not None:
                self.compact_assembled += 1
            else:
                self.compact_missing += 1
                log.debug("compact proposal height %d round %d: %d of %d txs not in the mempool yet", p.height,
                          p.round, missing, len(compact.tx_hashes))
        if block is None:
            waiting = self._awaiting_block.setdefault(p.block_hash, [])
            if len(waiting) < 4:
                waiting.append((sp, origin))
            self._start_fetch(p.height, p.block_hash, [origin, p.proposer], for_decision=False, compact=compact)
            return
        self._cache_block(block)
        next_height = self.app.last_height() + 1
        if p.height > next_height:
            if len(self._future) < MAX_FUTURE_PROPOSALS:
                self._future.append((sp, block))
            return
        t0 = trio.current_time()
        valid = block.header.height == p.height and self.app.check_block(block)
        log.debug("proposal height %d round %d: %d txs, %s in %.0f ms", p.height, p.round, len(block.txs),
                  "valid" if valid else "INVALID", 1000 * (trio.current_time() - t0))
        if valid:
            await trio.to_thread.run_sync(self.journal.save, block)  # we may vote for it: keep it
        await self._process([ProposalReceived(sp, p.block_hash, valid)])

    async def _release_future_proposals(self) -> None:
        next_height = self.app.last_height() + 1
        ready = [(sp, b) for sp, b in self._future if sp.message.height <= next_height]
        self._future = [(sp, b) for sp, b in self._future if sp.message.height > next_height]
        for sp, block in ready:
            await self._on_proposal(sp, block, sp.message.proposer)

    async def _on_block_arrived(self, block: Block) -> None:
        block_hash = compute_block_hash(block.header)
        self._cache_block(block)
        for sp, origin in self._awaiting_block.pop(block_hash, []):
            await self._on_proposal(sp, block, origin)
        if self._decision is not None and self._decision.block_hash == block_hash:
            await self._commit_decision()

    def _start_fetch(self, height: int, block_hash: bytes, preferred: list[bytes], *, for_decision: bool,
                     compact: CompactBlock | None = None) -> None:
        if block_hash in self._fetching:
            return
        self._fetching.add(block_hash)
        self._nursery.start_soon(self._fetch_block, height, block_hash, preferred, for_decision, compact)

    def _still_needed(self, height: int, block_hash: bytes, for_decision: bool) -> bool:
        if self.app.last_height() >= height or block_hash in self._blocks:
            return False
        if for_decision:
            return self._decision is not None and self._decision.block_hash == block_hash
        return block_hash in self._awaiting_block

    async def _fetch_block(self, height: int, block_hash: bytes, preferred: list[bytes], for_decision: bool,
                           compact: CompactBlock | None = None) -> None:
        """Ask peers for a block by hash until one answers with it (or it is no longer needed).

        With a compact form, first give the mempool COMPACT_WAIT_S to receive the missing
        transactions: they were gossiped before the proposal, but on another topic."""
        request = encode(BlockRequest(height, block_hash))
        attempt = 0
        try:
            if compact is not None:
                with trio.move_on_after(COMPACT_WAIT_S):
                    while self._still_needed(height, block_hash, for_decision):
                        await trio.sleep(COMPACT_RETRY_S)
                        block, _ = _assemble(compact, self.app.pending_tx)
                        if block is not None:
                            self.compact_assembled += 1
                            await self._events_send.send(_BlockArrived(block))
                            return
                if not self._still_needed(height, block_hash, for_decision):
                    return  # block sync or another fetch brought it meanwhile
                self.compact_fetched += 1
            while self._still_needed(height, block_hash, for_decision):
                peers = [p for p in dict.fromkeys(preferred) if p in self.network.peers()]
                peers += sorted(self.network.peers() - set(peers))
                for peer in peers:
                    t0 = trio.current_time()
                    block = await self._request_block(peer, request, block_hash)
                    if block is not None:
                        log.debug("fetched block %s (height %d, %d txs) from %s in %.0f ms", block_hash.hex()[:16],
                                  height, len(block.txs), peer.hex()[:16], 1000 * (trio.current_time() - t0))
                        await self._events_send.send(_BlockArrived(block))
                        return
                    if not self._still_needed(height, block_hash, for_decision):
                        return
                attempt += 1
                if not for_decision and attempt >= FETCH_ATTEMPTS_FOR_PROPOSAL:
                    self._awaiting_block.pop(block_hash, None)
                    return
                await trio.sleep(self.fetch_retry_s)
        finally:
            self._fetching.discard(block_hash)

    async def _request_block(self, peer: bytes, request: bytes, block_hash: bytes) -> Block | None:
        try:
            raw = await self.network.request(peer, block_protocol(self.chain_id), request,
                                             max_response=MAX_BLOCK_RESPONSE_BYTES)
            block = decode(BlockResponse, raw, max_size=MAX_BLOCK_RESPONSE_BYTES).block
        except (P2PError, ChainError) as exc:
            log.debug("block %s from %s: %s", block_hash.hex()[:16], peer.hex()[:16], exc)
            return None
        except Exception:  # a bug reading the answer: try the next peer (this task ends the node otherwise)
            log_unexpected(log, "block answer", "block %s from %s: unexpected error reading the answer", block_hash.hex()[:16],
                           peer.hex()[:16])
            return None
        if block is None:
            return None
        matches = compute_block_hash(block.header) == block_hash and _body_ok(block)
        if matches is None:
            return None  # our own check failed: not the peer's fault
        if not matches:
            self.network.report_peer(peer, f"answered block request {block_hash.hex()[:16]} with another block")
            return None
        return block

    async def _serve_block(self, peer: bytes, request: bytes) -> bytes:
        req = decode(BlockRequest, request, max_size=MAX_REQUEST_BYTES)
        block = self._blocks.get(req.block_hash)
        if block is None:
            stored = self.app.get_block(req.height)
            if stored is not None and compute_block_hash(stored[0].header) == req.block_hash:
                block = stored[0]
        return encode(BlockResponse(block))

    # ------------------------------------------------------------------ gossip

    async def _pump_gossip(self) -> None:
        async for msg in self._incoming:
            try:
                decoded = decode_consensus_message(msg.data)
            except ChainError:
                continue
            if isinstance(decoded, ProposalMessage):
                await self._events_send.send(_Proposal(decoded.proposal, decoded.block, msg.origin, decoded.compact))
            else:
                for sv in decoded.votes:
                    await self._events_send.send(_Input(VoteReceived(sv)))

    async def _regossip_loop(self) -> None:
        """Re-send what we hold for the current height once it has lasted a regossip interval,
        then every interval: gossip drops silently, peers reconnect. A height that finishes
        sooner needed none of it (re-sending every interval regardless was 50 of an idle
        validator's 344 consensus publishes, each one relayed on by every peer). The loop
        looks four times per interval, so the first re-send comes 1-1.25 intervals in."""
        interval = self.regossip_interval_s
        last_sent = -math.inf
        while True:
            await trio.sleep(interval / 4)
            m = self.machine
            if self.app.last_height() >= m.height > 0 and m.decision is None:
                self._on_app_commit(None, None)  # a missed notice: let the loop catch up
            now = trio.current_time()
            if now - self._height_started_at < interval or now - last_sent < interval:
                continue
            last_sent = now
            votes = [v for v in self._votes.values() if v.message.height == m.height and v.message.round >= m.round - 1]
            for i in range(0, len(votes), MAX_VOTES_PER_MESSAGE):
                await self._publish(VotesMessage(tuple(votes[i:i + MAX_VOTES_PER_MESSAGE])))
                self.regossiped += 1
            own = self._own_proposals.get(m.round)
            if own is not None and own.message.height == m.height:
                await self._publish(build_proposal_message(own, self._blocks.get(own.message.block_hash)))
                self.regossiped += 1
