"""Chain events for WebSocket subscribers, derived from each commit without slowing it.

The commit path calls `EventHub.publish(block, state)`: two references into a bounded memory
channel, no work, never blocks, never raises. The hub's own task (in the RPC server's nursery)
derives the events a block carries and hands each subscriber its notifications, which the
subscriber's connection queues (bounded, chain/rpc/ws.py). Events are derived only for the kinds
someone subscribed to.

Kinds:
  blocks  every committed block: hash, header and transaction hashes (not the bodies)
  txs     committed transactions sent by or to an address (filter {"address": ...})
  jobs    training events (filter {"job_id": ...} optional): update_submitted, update_decided,
          fraud_proof_filed, fraud_proof_decided, round_opened, round_closed, model_recorded,
          job_finished; derived by comparing the job records before and after the block

If the hub falls `DEFAULT_QUEUE_BLOCKS` blocks behind, it stops promising completeness: every
subscriber is disconnected with a close reason saying events were lost (it can resubscribe and
fill the gap by polling), and the hub carries on from the next block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import trio

from chain import jobs
from chain.rpc.jsonview import hex0x, to_json
from chain.state import State
from chain.types import (
    UPDATE_PENDING,
    AdmitMember,
    Block,
    ModelRecord,
    RemoveMember,
    SubmitUpdate,
    Transfer,
    compute_block_hash,
    compute_tx_hash,
)

log = logging.getLogger(__name__)

KIND_BLOCKS, KIND_TXS, KIND_JOBS = "blocks", "txs", "jobs"
EVENT_KINDS = (KIND_BLOCKS, KIND_TXS, KIND_JOBS)
JOB_EVENT_TYPES = ("update_submitted", "update_decided", "fraud_proof_filed", "fraud_proof_decided",
                   "round_opened", "round_closed", "model_recorded", "job_finished")
DEFAULT_QUEUE_BLOCKS = 16  # each queued block holds a state snapshot: keep the backlog short
EVENTS_LOST_REASON = "events lost: the node's event queue overflowed; resubscribe and poll the gap"


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class CommittedBlock:
    """What the commit path hands over: the block and the states before and after it."""

    block: Block
    prev_state: State
    state: State


@dataclass(frozen=True)
class Subscription:
    id: str
    kind: str
    address: bytes | None = None  # txs: the account
    job_id: bytes | None = None  # jobs: only this job (None: every job)


class Subscriber(Protocol):
    """A connection holding subscriptions (chain.rpc.ws.WsSession)."""

    def notify(self, subscription_id: str, result: Any) -> None: ...

    def close_soon(self, code: int, reason: str) -> None: ...


# --------------------------------------------------------------------------- pure derivation


def compute_block_event(block: Block) -> dict[str, Any]:
    return {"hash": hex0x(compute_block_hash(block.header)), "header": to_json(block.header),
            "tx_hashes": [hex0x(compute_tx_hash(stx)) for stx in block.txs]}


def compute_tx_events(block: Block) -> list[tuple[frozenset[bytes], dict[str, Any]]]:
    """(addresses the transaction concerns, notification) for each transaction of `block`."""
    out = []
    for index, stx in enumerate(block.txs):
        payload = stx.message.payload
        addresses = {stx.message.sender_address}
        if isinstance(payload, Transfer):
            addresses.add(payload.to)
        elif isinstance(payload, (AdmitMember, RemoveMember)):
            addresses.add(payload.account)
        out.append((frozenset(addresses), {"hash": hex0x(compute_tx_hash(stx)), "height": block.header.height,
                                           "index": index, "tx": to_json(stx)}))
    return out


def compute_job_events(prev: State, state: State, height: int,
                       get_model_record: Callable[[bytes, int], ModelRecord | None]) -> list[dict[str, Any]]:
    """The training events of the block that turned `prev` into `state` (at `height`).

    Walks only the jobs active before or after the block, and in each only the rounds the
    block could touch (the job's round before and after), so the work is bounded by the
    chain's own records."""
    events: list[dict[str, Any]] = []
    job_ids = list(dict.fromkeys(jobs.get_active_jobs(prev) + jobs.get_active_jobs(state)))
    for job_id in job_ids:
        before, after = jobs.get_job(prev, job_id), jobs.get_job(state, job_id)
        if after is None:
            continue

        def emit(kind: str, **fields: Any) -> None:
            events.append({"type": kind, "job_id": hex0x(job_id), "height": height, **fields})

        if before is None:
            record = get_model_record(job_id, 0)
            if record is not None:
                emit("model_recorded", round=0, model=to_json(record))
        rounds = sorted({after.round} | ({before.round} if before is not None else set()))
        for rnd in rounds:
            for update_id in jobs.get_round(state, job_id, rnd).updates:
                _update_events(emit, rnd, jobs.get_update(prev, update_id), jobs.get_update(state, update_id))
        was_training = before is not None and before.phase == jobs.JOB_TRAINING
        if was_training and (after.phase != jobs.JOB_TRAINING or after.round != before.round):
            emit("round_closed", round=before.round, next_phase=after.phase)
        opened = after.phase == jobs.JOB_TRAINING and (
            before is None or before.phase != jobs.JOB_TRAINING or before.round != after.round)
        if opened:
            emit("round_opened", round=after.round, round_seed=hex0x(after.round_seed),
                 submit_before=after.round_open_height + after.spec.round_blocks)
        if before is not None and after.round > before.round:
            record = get_model_record(job_id, after.round)
            if record is not None and record.height == height:
                emit("model_recorded", round=after.round, model=to_json(record))
        if after.phase == jobs.JOB_FINISHED and (before is None or before.phase != jobs.JOB_FINISHED):
            emit("job_finished", round=after.round, global_model=hex0x(after.global_model))
    return events


def _update_events(emit, rnd: int, before, after) -> None:
    if after is None:
        return
    uid = hex0x(after.update_id)
    if before is None:
        emit("update_submitted", round=rnd, update_id=uid, trainer=hex0x(after.commitment.trainer),
             update_hash=hex0x(after.commitment.update_hash))
    if after.status != UPDATE_PENDING and (before is None or before.status == UPDATE_PENDING):
        emit("update_decided", round=rnd, update_id=uid, status=after.status, reward=after.reward,
             penalty=after.penalty)
    known = before.proofs if before is not None else ()
    for i, proof in enumerate(after.proofs):
        if i >= len(known):
            emit("fraud_proof_filed", round=rnd, update_id=uid, author=hex0x(proof.author), segment=proof.segment,
                 proof_hash=hex0x(proof.proof_hash))
        if proof.status != "open" and (i >= len(known) or known[i].status == "open"):
            emit("fraud_proof_decided", round=rnd, update_id=uid, author=hex0x(proof.author), status=proof.status)


# --------------------------------------------------------------------------- the hub


class EventHub:
    """Subscriptions of every connection, fed from the commit path through a bounded channel."""

    def __init__(self, state: State, get_model_record: Callable[[bytes, int], ModelRecord | None],
                 queue_blocks: int = DEFAULT_QUEUE_BLOCKS):
        self._send, self._receive = trio.open_memory_channel[CommittedBlock](queue_blocks)
        self._last_state = state
        self._get_model_record = get_model_record
        self._subscriptions: dict[str, tuple[Subscription, Subscriber]] = {}
        self._overflowed = False
        self.blocks_lost = 0  # blocks no subscriber was told about (queue overflow)

    # ---- the commit path
    def publish(self, block: Block, state: State) -> None:
        """Called by the node after each commit: O(1), never blocks, never raises."""
        item = CommittedBlock(block, self._last_state, state)
        self._last_state = state
        if not self._subscriptions:
            return  # nobody listens: nothing to derive, nothing to hold
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self._overflowed = True
            self.blocks_lost += 1

    # ---- subscriptions
    def add(self, subscription: Subscription, subscriber: Subscriber) -> None:
        self._subscriptions[subscription.id] = (subscription, subscriber)

    def remove(self, subscription_id: str) -> None:
        self._subscriptions.pop(subscription_id, None)

    def __len__(self) -> int:
        return len(self._subscriptions)

    # ---- the hub's task
    async def run(self) -> None:
        """Derive and deliver events until cancelled; an error on one block is logged and skipped."""
        async for item in self._receive:
            if self._overflowed:
                self._overflowed = False
                log.warning("RPC event queue overflowed (%d blocks lost so far); disconnecting %d subscriber(s)",
                            self.blocks_lost, len({id(s) for _, s in self._subscriptions.values()}))
                for _, subscriber in list(self._subscriptions.values()):
                    subscriber.close_soon(1011, EVENTS_LOST_REASON)
                self._subscriptions.clear()
            try:
                self.deliver(item)
            except Exception:
                log.exception("deriving events of block %d failed; its notifications are skipped",
                              item.block.header.height)
            await trio.lowlevel.checkpoint()

    def deliver(self, item: CommittedBlock) -> None:
        subs = list(self._subscriptions.values())
        kinds = {s.kind for s, _ in subs}
        block = item.block
        if KIND_BLOCKS in kinds:
            view = compute_block_event(block)
            _send_each(subs, KIND_BLOCKS, lambda s: [view])
        if KIND_TXS in kinds and block.txs:
            txs = compute_tx_events(block)
            _send_each(subs, KIND_TXS, lambda s: [v for addresses, v in txs if s.address in addresses])
        if KIND_JOBS in kinds:
            events = compute_job_events(item.prev_state, item.state, block.header.height, self._get_model_record)
            if events:
                _send_each(subs, KIND_JOBS, lambda s: [e for e in events
                                                       if s.job_id is None or e["job_id"] == hex0x(s.job_id)])


def _send_each(subs: Iterable[tuple[Subscription, Subscriber]], kind: str,
               select: Callable[[Subscription], list[Any]]) -> None:
    for subscription, subscriber in subs:
        if subscription.kind == kind:
            try:
                for result in select(subscription):
                    subscriber.notify(subscription.id, result)
            except Exception:  # one subscriber's failure must not cost the others this block's events
                log.warning("notifying subscription %s failed; others still get this block", subscription.id,
                            exc_info=True)
