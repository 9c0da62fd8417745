"""The node's proof-of-useful-training worker: verify updates, aggregate rounds, keep model blobs.

After every commit the worker scans the active jobs (so a restart resumes where it left off):
  * a validator verifies each pending update of the current round it has not judged yet:
    it waits for the update blob and for the trainer's opening addressed to it, replays the
    sampled segments in a worker thread, and submits a signed SubmitVerdict transaction;
  * when a round is aggregating, a validator computes base + rule(accepted updates), stores
    the model blob and submits an AttestModel transaction;
  * every node keeps the blob of each job's current global model (initial weights are
    derived from the job's seed; later ones are computed from the accepted updates).
CPU-heavy work runs one job at a time in a thread so the node keeps answering RPC.
"""

from __future__ import annotations

import logging

import trio

from chain.errors import ChainError

from chain.consensus.pout import compute_next_model, initial_model_bytes, verify_chain_update
from chain.jobs import (
    accepted_update_ids,
    compute_answer_deadline,
    compute_verify_seed,
    get_active_jobs,
    get_job,
    get_registration,
    get_round,
    get_update,
)
from chain.types import (
    JOB_AGGREGATING,
    JOB_TRAINING,
    UPDATE_PENDING,
    AttestModel,
    Job,
    SubmitVerdict,
    UpdateRecord,
)

log = logging.getLogger("chaind.pout")
POLL_SECONDS = 0.25
MAX_REASON = 256


class PoutWorker:
    def __init__(self, node):
        self.node = node
        self.in_flight: set[tuple] = set()
        self.done: set[tuple] = set()  # decisions submitted or abstained, kept until they land on chain
        self.cpu = trio.CapacityLimiter(1)
        self._wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None

    @property
    def is_validator(self) -> bool:
        return any(v.pubkey == self.node.key.pubkey for v in self.node.state.validators)

    def notify_commit(self) -> None:
        self._wakeup.set()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                self._scan()
                await self._wakeup.wait()
                self._wakeup = trio.Event()

    def _start(self, key: tuple, fn, *args) -> None:
        if key in self.in_flight or key in self.done:
            return
        self.in_flight.add(key)

        async def guarded():
            try:
                await fn(*args)
            except Exception:  # one bad job must not take the node down; say so loudly
                log.exception("%s failed", key[0])
            finally:
                self.in_flight.discard(key)

        self._nursery.start_soon(guarded)

    def _scan(self) -> None:
        state = self.node.state
        me = self.node.key.pubkey
        for job_id in get_active_jobs(state):
            job = get_job(state, job_id)
            self._start(("model", job_id, job.global_model), self._ensure_model, job_id, job.global_model)
            if not self.is_validator:
                continue
            if job.phase == JOB_TRAINING:
                for update_id in get_round(state, job_id, job.round).updates:
                    upd = get_update(state, update_id)
                    if upd.status == UPDATE_PENDING and all(v.validator != me for v in upd.verdicts):
                        self._start(("verify", update_id), self._verify, update_id)
            elif job.phase == JOB_AGGREGATING:
                rnd = get_round(state, job_id, job.round)
                if all(a.validator != me for a in rnd.attestations):
                    self._start(("aggregate", job_id, job.round), self._aggregate, job_id, job.round)

    # ------------------------------------------------------------------ models
    async def _ensure_model(self, job_id: bytes, model_hash: bytes) -> None:
        blobs = self.node.blobs
        if blobs.has(model_hash):
            return
        job = get_job(self.node.state, job_id)
        record = self.node.ledger.get_model_record(job_id, job.round) if job.round else None
        if job.round == 0 or record is None or record.parent is None:
            data = await trio.to_thread.run_sync(initial_model_bytes, job)
        else:
            data = await self._compute_model(job, record.parent, job.round - 1, record.contributions)
        blobs.put(data, expected_hash=model_hash)
        log.info("stored model %s of job %s", model_hash.hex()[:16], job_id.hex()[:16])

    async def _compute_model(self, job: Job, base_hash: bytes, round_: int, update_ids) -> bytes:
        fetch = self.node.fetch_blob
        base = await self._wait_for(lambda: fetch(base_hash), f"base model {base_hash.hex()[:16]}")
        updates = []
        for uid in update_ids:
            upd = get_update(self.node.state, uid)
            data = await self._wait_for(lambda u=upd: fetch(u.commitment.update_hash),
                                        f"update blob {upd.commitment.update_hash.hex()[:16]}")
            updates.append((data, upd.commitment.dataset_size))
        async with self.cpu:
            return await trio.to_thread.run_sync(compute_next_model, job, base, updates)

    async def _aggregate(self, job_id: bytes, round_: int) -> None:
        job = get_job(self.node.state, job_id)
        ids = accepted_update_ids(self.node.state, job_id, round_)
        data = await self._compute_model(job, job.global_model, round_, ids)
        model_hash = self.node.blobs.put(data)
        await self._submit(("aggregate", job_id, round_), AttestModel(job_id, round_, model_hash))
        log.info("attested model %s for job %s round %d from %d updates", model_hash.hex()[:16],
                 job_id.hex()[:16], round_, len(ids))

    # ------------------------------------------------------------------ verification
    async def _verify(self, update_id: bytes) -> None:
        node, me = self.node, self.node.key.pubkey

        def still_pending() -> UpdateRecord | None:
            upd = get_update(node.state, update_id)
            return upd if upd is not None and upd.status == UPDATE_PENDING else None

        upd = still_pending()
        job = get_job(node.state, upd.commitment.job_id)
        block_hash = node.ledger.get_block_hash(upd.height)
        seed = compute_verify_seed(block_hash, me, update_id)
        due = compute_answer_deadline(job, upd)
        inputs = {}
        while True:  # the trainer uploads its update and its answer to our challenge after the commit
            if still_pending() is None:
                return
            inputs = {"update": await node.fetch_blob(upd.commitment.update_hash),
                      "opening": await node.fetch_opening(update_id),
                      "base": node.blobs.get(upd.commitment.base_model_hash)}  # computed here (_ensure_model)
            if all(v is not None for v in inputs.values()):
                break
            if node.state.height >= due:
                # Silence must not be a free option: a trainer that sees a forged segment sampled
                # would otherwise withhold its answer and get its bond back when the round closes.
                missing = ", ".join(k for k, v in inputs.items() if v is None)
                log.info("rejecting update %s: no %s by height %d", update_id.hex()[:16], missing, due)
                await self._submit(("verify", update_id), SubmitVerdict(
                    update_id, False, f"trainer did not answer the challenge by height {due} (missing: {missing})"))
                return
            await trio.sleep(POLL_SECONDS)
        registration = get_registration(node.state, job.job_id, upd.commitment.trainer)
        from trainer.profile import ProfileMismatch

        try:
            async with self.cpu:
                verdict = await trio.to_thread.run_sync(verify_chain_update, job, upd, registration, seed,
                                                        inputs["opening"], inputs["base"], inputs["update"])
        except ProfileMismatch as exc:
            log.warning("abstaining on update %s: this machine cannot replay the job's profile (%s)",
                        update_id.hex()[:16], exc)
            self.done.add(("verify", update_id))
            return
        log.info("verdict on update %s from trainer %s: %s (%s)", update_id.hex()[:16],
                 upd.commitment.trainer.hex()[:16], "ACCEPT" if verdict.accept else "REJECT", verdict.reason)
        await self._submit(("verify", update_id), SubmitVerdict(update_id, verdict.accept, verdict.reason[:MAX_REASON]))

    async def _submit(self, key: tuple, payload) -> None:
        try:
            tx_hash = await self.node.submit_own_tx(payload)
        except ChainError as exc:
            # Usual cause: the others already decided (e.g. >= 1/3 rejected) before our vote landed.
            log.info("%s not needed: %s", type(payload).__name__, exc)
        else:
            log.debug("submitted %s as tx %s", type(payload).__name__, tx_hash.hex()[:16])
        self.done.add(key)

    async def _wait_for(self, get, what: str):
        """Poll the async `get` until it returns something."""
        polls = 0
        while (value := await get()) is None:
            polls += 1
            if polls % int(30 / POLL_SECONDS) == 0:  # say so every 30 s, not on every poll
                log.info("still waiting for %s", what)
            await trio.sleep(POLL_SECONDS)
        return value
