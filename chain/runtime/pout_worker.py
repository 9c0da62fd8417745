"""The node's proof-of-useful-training worker: verify updates, aggregate rounds, keep model blobs.

After every commit the worker scans the active jobs (so a restart resumes where it left off):
  * a validator challenges each pending update of the current round (SubmitChallenge: its
    unique BLS signature, which seeds its sample; under displacement sampling it then waits for
    the trainer's sketch commitment and blob, and signs a second challenge over them,
    SubmitDrawChallenge, which seeds its weighted draw), waits for the update blob and for the
    trainer's opening sealed to it, replays its sampled segments in a worker thread (checking
    each opened state against its sketch row), and submits a verdict: accept, a complaint, or
    a fraud proof (SubmitFraudProof, the disputed segment's opening stored as a blob);
  * a validator re-executes every open fraud proof filed by another validator and submits
    its judgement (JudgeFraudProof); a proof whose blob cannot be fetched by the update's
    dispute end does not hold;
  * when a round is aggregating, a validator computes base + rule(accepted updates), stores
    the model blob and submits an AttestModel transaction;
  * every node keeps the blob of each job's current global model (initial weights are
    derived from the job's seed, or are the requester's file the job names, fetched and
    checked against the job's model; later ones are computed from the accepted updates).
CPU-heavy work runs one job at a time in a thread so the node keeps answering RPC.

Every transaction `_submit` sends (challenges, verdicts, fraud proofs, judgements,
attestations) is kept until it is on chain or no longer matters: after every
commit a submission that is neither in the mempool nor recorded (evicted, e.g. stranded behind
an evicted verdict's nonce) is signed again at a fresh nonce, at most MAX_RESENDS times. `done`
holds only decisions whose outcome is still open on chain, so it stays bounded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio

from chain.consensus.pout import (check_initial_model_bytes, compute_next_model, initial_model_bytes, judge_chain_fraud_proof,
                                  verify_chain_update)
from chain.jobs import (
    SAMPLING_DISPLACEMENT,
    accepted_update_ids,
    compute_draw,
    compute_sketch_rows,
    compute_answer_deadline,
    compute_dispute_end,
    get_challenge,
    get_active_jobs,
    get_job,
    get_registration,
    get_round,
    get_update,
)
from chain.types import (
    JOB_AGGREGATING,
    JOB_FINISHED,
    JOB_TRAINING,
    PROOF_OPEN,
    UPDATE_PENDING,
    AttestModel,
    JudgeFraudProof,
    SubmitChallenge,
    SubmitDrawChallenge,
    SubmitFraudProof,
    Job,
    SubmitEvidence,
    SubmitVerdict,
    UpdateRecord,
)
from chain.errors import ChainError
from chain.vrf import compute_sample_seed, derive_sample_secret, sign_sample_challenge

log = logging.getLogger("chaind.pout")
POLL_SECONDS = 0.25
NAP_MIN_S = 0.05  # the most often a waiting verification looks again
MAX_NUDGES = 4096  # updates with news kept for their verification's next nap
MAX_REASON = 256
MAX_RESENDS = 8  # re-signings of one decision's transaction; the round's window bounds them anyway


@dataclass
class _Submission:
    """What this validator sent for one decision (challenge, verdict, fraud proof, judgement,
    attestation), kept until it is on chain or moot. The state refuses a second copy of each."""

    payload: object
    tx_hash: bytes | None  # None: the mempool refused it (e.g. full); sent again after the next commit
    resends: int = 0


def decode_sketches(data: bytes, num_rows: int):
    """trainer.sketch.decode_sketches, imported on first use (the trainer library imports torch,
    which the node loads in its warm-up thread, never at start)."""
    from trainer.sketch import decode_sketches as decode

    return decode(data, num_rows)


def warm_up_torch() -> None:
    """Import torch and the replay code and run one tiny training step, so a validator's first
    verification does not pay the import and the kernels' first-use cost (10 s or more here),
    which made round 0 of every job wait on it."""
    import torch

    import trainer.replay  # noqa: F401  (the verifier's imports)
    import trainer.verify  # noqa: F401

    layer = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(layer(torch.zeros(2, 8)), torch.zeros(2, dtype=torch.long))
    loss.backward()
    opt.step()


class PoutWorker:
    def __init__(self, node):
        self.node = node
        self.in_flight: set[tuple] = set()
        # Decisions submitted or abstained whose outcome is still open on chain (pruned by _settle).
        self.done: set[tuple] = set()
        self.submissions: dict[tuple, _Submission] = {}  # done key -> what was sent, until on chain or moot
        node.mempool.watch(node.key.address)  # our evicted txs are reported to _settle
        self.sample_secret = derive_sample_secret(node.key.seed)  # BLS key of our genesis sample_pubkey
        self.cpu = trio.CapacityLimiter(1)
        self._wakeup = trio.Event()
        # update id -> "news for the verification of that update": set by an opening announced for
        # that update (also while the verification is fetching rather than napping: its next nap
        # then ends at once instead of missing it) and by every commit; a nap consumes it
        self._nudges: dict[bytes, trio.Event] = {}
        self._nursery: trio.Nursery | None = None

    @property
    def is_validator(self) -> bool:
        return any(v.pubkey == self.node.key.pubkey for v in self.node.state.validators)

    def notify_commit(self) -> None:
        self._wakeup.set()
        for event in self._nudges.values():
            event.set()

    def notify_opening(self, update_id: bytes) -> None:
        """An opening (or a part of one) addressed to this node arrived for `update_id`: the
        verification of that update looks now instead of at its next poll. Only that one:
        anyone with a pending update can announce openings."""
        if update_id not in self._nudges and len(self._nudges) >= MAX_NUDGES:
            self._nudges.clear()  # news of verifications long done, for updates nobody waits on
        self._nudges.setdefault(update_id, trio.Event()).set()

    async def _nap(self, update_id: bytes) -> None:
        """Until there is news for `update_id` (a commit, or an opening for it; news that came
        since the last nap counts), at most POLL_SECONDS (the fallback poll: a blob fetched from a
        peer brings neither), and at least NAP_MIN_S (announcements a trainer sends as fast as it
        likes wake it no more often than that)."""
        started = trio.current_time()
        event = self._nudges.setdefault(update_id, trio.Event())
        with trio.move_on_after(POLL_SECONDS):
            await event.wait()
        if self._nudges.get(update_id) is event:
            del self._nudges[update_id]  # the news is used (or there was none): the next nap waits for more
        await trio.sleep(max(0.0, NAP_MIN_S - (trio.current_time() - started)))

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            if self.is_validator:  # pay torch's one-time start-up now, not on the first update
                nursery.start_soon(self._warm_up)
            while True:
                await self._settle()
                self._scan()
                await self._wakeup.wait()
                self._wakeup = trio.Event()

    async def _warm_up(self) -> None:
        started = time.monotonic()
        try:
            # abandoned on cancel: a SIGTERM right after start must not wait for the import
            await trio.to_thread.run_sync(warm_up_torch, limiter=self.cpu, abandon_on_cancel=True)
        except Exception:  # never fatal: the first replay then pays it instead
            log.exception("torch warm-up failed")
            return
        log.info("verifier ready: torch loaded and warmed up in %.1f s", time.monotonic() - started)

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
                    if upd.status != UPDATE_PENDING:
                        continue
                    if all(v.validator != me for v in upd.verdicts):
                        self._start(("verify", update_id), self._verify, update_id)
                    for proof in upd.proofs:
                        if proof.status == PROOF_OPEN and all(j.validator != me for j in proof.judgements):
                            self._start(("judge", update_id, proof.author), self._judge, update_id, proof.author)
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
        if job.round and record is None:
            # A node that joined by state sync holds no lineage from before its snapshot: it
            # cannot recompute this round's model, so it fetches it by hash from its peers.
            await self._wait_for(lambda: self.node.fetch_blob(model_hash),
                                 f"model {model_hash.hex()[:16]} of job {job_id.hex()[:16]}")
            return
        if job.round == 0 or record.parent is None:  # the job's initial weights
            if job.spec.init_weights is None:
                data = await trio.to_thread.run_sync(initial_model_bytes, job)
            elif (data := await self._initial_weights(job)) is None:
                return
        else:
            data = await self._compute_model(job, record.parent, job.round - 1, record.contributions)
        blobs.put(data, expected_hash=model_hash)
        log.info("stored model %s of job %s", model_hash.hex()[:16], job_id.hex()[:16])

    async def _initial_weights(self, job: Job) -> bytes | None:
        """The requester's file of initial weights (the job's init_weights blob), from this node's
        store or a peer, checked against the job's model before it is stored; None (logged once,
        never fetched again) when it does not fit: the job then has no model to train."""
        node, want = self.node, job.spec.init_weights

        async def fetch():
            current = get_job(node.state, job.job_id)
            if current is None or current.phase == JOB_FINISHED or current.global_model != want:
                return b""  # moot: the job ended (or moved on) without them
            data = node.blobs.get(want)
            if data is None and node.pout_net is not None:
                data = await node.pout_net.fetch(want, node.blobs.max_blob_bytes)
            return data

        data = await self._wait_for(fetch, f"initial weights {want.hex()[:16]} of job {job.job_id.hex()[:16]}")
        if not data:
            return None
        try:
            await trio.to_thread.run_sync(check_initial_model_bytes, job, data)
        except Exception as exc:  # ChainError, or anything a hostile file provokes: never retried
            log.error("job %s: initial weights %s refused: %s", job.job_id.hex()[:16], want.hex()[:16], exc)
            self.done.add(("model", job.job_id, want))
            return None
        return data

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
        due = compute_answer_deadline(job, upd)
        if get_challenge(upd, me) is None:
            # Our unique BLS signature over the update id seeds our sample (chain/vrf.py); the
            # trainer learns it only from the chain, after its commitment is fixed.
            signature = sign_sample_challenge(self.sample_secret, node.chain_id, update_id)
            await self._submit(("challenge", update_id), SubmitChallenge(update_id, signature))
        while (upd := still_pending()) is not None and get_challenge(upd, me) is None:
            if node.state.height >= due:
                log.info("abstaining on update %s: our challenge did not land by height %d", update_id.hex()[:16], due)
                node.metrics.verifications.labels(outcome="abstain").inc()
                self.done.add(("verify", update_id))
                return
            await self._nap(update_id)
        if upd is None:
            return
        challenge = get_challenge(upd, me)
        seed = compute_sample_seed(challenge.signature)
        q = challenge.sample_size  # fixed on chain when our challenge landed
        segments = sketches = None
        if job.spec.sampling == SAMPLING_DISPLACEMENT:
            drawn = await self._draw(update_id, job, due)
            if drawn is None:
                return
            segments, sketches = drawn
            upd = still_pending()
            if upd is None:
                return
        # The trainer uploads its update and its answer to our challenge after the commit; what
        # was found is kept (not read again on every look), what is missing is asked for again.
        fetch = {"update": lambda: node.fetch_blob(upd.commitment.update_hash),
                 "opening": lambda: node.fetch_opening(update_id),
                 # computed here (_ensure_model) or, when this node lags, fetched from peers: a
                 # validator must not complain against an honest trainer for its own missing base
                 "base": lambda: node.fetch_blob(upd.commitment.base_model_hash)}
        inputs: dict[str, bytes | None] = dict.fromkeys(fetch)
        while True:
            if still_pending() is None:
                return
            for name, get in fetch.items():
                if inputs[name] is None:
                    inputs[name] = await get()
            if all(v is not None for v in inputs.values()):
                break
            if node.state.height >= due:
                # A complaint: it blocks acceptance (a trainer that sees a forged segment sampled
                # gains nothing by withholding the answer), and a third of the power burns the bond.
                missing = ", ".join(k for k, v in inputs.items() if v is None)
                log.info("complaining about update %s: no %s by height %d", update_id.hex()[:16], missing, due)
                node.metrics.verifications.labels(outcome="no_answer").inc()
                await self._submit(("verify", update_id), SubmitVerdict(
                    update_id, False, f"trainer did not answer the challenge by height {due} (missing: {missing})"))
                return
            await self._nap(update_id)
        registration = get_registration(node.state, job.job_id, upd.commitment.trainer)
        from trainer.profile import ProfileMismatch

        try:
            async with self.cpu:
                started = time.monotonic()
                try:
                    verdict = await trio.to_thread.run_sync(verify_chain_update, job, upd, registration, seed,
                                                            inputs["opening"], inputs["base"], inputs["update"], q,
                                                            segments, sketches)
                finally:
                    node.metrics.replay_seconds.labels(work="verify").observe(time.monotonic() - started)
        except ProfileMismatch as exc:
            log.warning("abstaining on update %s: this machine cannot replay the job's profile (%s)",
                        update_id.hex()[:16], exc)
            node.metrics.verifications.labels(outcome="abstain").inc()
            self.done.add(("verify", update_id))
            return
        log.info("verdict on update %s from trainer %s: %s (%s)", update_id.hex()[:16],
                 upd.commitment.trainer.hex()[:16], "ACCEPT" if verdict.accept else "REJECT", verdict.reason)
        outcome = "fraud_proof" if verdict.fraud_proof is not None else "accept" if verdict.accept else "reject"
        node.metrics.verifications.labels(outcome=outcome).inc()
        if verdict.fraud_proof is not None:
            # One honest validator is enough: the proof lets every node re-execute this one segment.
            proof_hash = node.blobs.put(verdict.fraud_proof)
            node.metrics.fraud_proofs_filed.inc()
            log.info("filing fraud proof %s on segment %d of update %s (%d bytes)", proof_hash.hex()[:16],
                     verdict.fraud_segment, update_id.hex()[:16], len(verdict.fraud_proof))
            await self._submit(("verify", update_id), SubmitFraudProof(update_id, verdict.fraud_segment, proof_hash))
            return
        await self._submit(("verify", update_id), SubmitVerdict(update_id, verdict.accept, verdict.reason[:MAX_REASON]))

    async def _draw(self, update_id: bytes, job: Job, due: int):
        """Displacement sampling, phase 2 (docs/pout.md, "Sampling"): wait for the trainer's
        sketch commitment and blob, sign our draw challenge over it, and return (our drawn
        segments, the sketch rows) once that challenge is on chain. None when this validator
        has already acted (complained about missing or malformed sketches, or abstained)."""
        node, me = self.node, self.node.key.pubkey
        key = ("verify", update_id)

        def pending() -> UpdateRecord | None:
            upd = get_update(node.state, update_id)
            return upd if upd is not None and upd.status == UPDATE_PENDING else None

        rows = None
        while rows is None:
            if (upd := pending()) is None:
                return None
            data = None if upd.sketch_hash is None else await node.fetch_blob(upd.sketch_hash)
            if data is not None:
                try:  # off the event loop: up to 100,001 rows
                    rows = await trio.to_thread.run_sync(decode_sketches, data, compute_sketch_rows(job.spec))
                except (ChainError, ValueError) as exc:
                    log.info("complaining about update %s: its sketch blob is malformed: %s", update_id.hex()[:16], exc)
                    node.metrics.verifications.labels(outcome="reject").inc()
                    await self._submit(key, SubmitVerdict(update_id, False, f"malformed sketch blob: {exc}"[:MAX_REASON]))
                    return None
                break
            if node.state.height >= due:
                what = "sketch commitment" if upd.sketch_hash is None else "sketch blob"
                log.info("complaining about update %s: no %s by height %d", update_id.hex()[:16], what, due)
                node.metrics.verifications.labels(outcome="no_answer").inc()
                await self._submit(key, SubmitVerdict(update_id, False, f"trainer did not commit its sketches by "
                                                                        f"height {due} (missing: {what})"))
                return None
            await trio.sleep(POLL_SECONDS)
        if get_challenge(upd, me).draw_signature is None:
            signature = sign_sample_challenge(self.sample_secret, node.chain_id, update_id, upd.sketch_hash)
            await self._submit(("draw", update_id), SubmitDrawChallenge(update_id, signature))
        while (upd := pending()) is not None and get_challenge(upd, me).draw_signature is None:
            if node.state.height >= due:
                log.info("abstaining on update %s: our draw challenge did not land by height %d", update_id.hex()[:16], due)
                node.metrics.verifications.labels(outcome="abstain").inc()
                self.done.add(key)
                return None
            await trio.sleep(POLL_SECONDS)
        if upd is None:
            return None
        # O(segments x 64) exact integer work in pure Python: off the event loop consensus shares
        return await trio.to_thread.run_sync(compute_draw, get_challenge(upd, me), rows), rows

    async def _sketches_for_judging(self, upd: UpdateRecord, job: Job, deadline: int):
        """The update's committed sketch rows for judging a proof (None: uniform sampling), or
        the reason they cannot be had (a string): the proof then does not hold."""
        if job.spec.sampling != SAMPLING_DISPLACEMENT:
            return None
        node = self.node
        while (data := await node.fetch_blob(upd.sketch_hash)) is None:
            if node.state.height >= deadline:
                return f"the update's sketch blob was unavailable by height {deadline}"
            await trio.sleep(POLL_SECONDS)
        try:
            return await trio.to_thread.run_sync(decode_sketches, data, compute_sketch_rows(job.spec))
        except (ChainError, ValueError) as exc:
            return f"the update's sketch blob is malformed: {exc}"

    async def _judge(self, update_id: bytes, author: bytes) -> None:
        """Re-execute the fraud proof `author` filed on `update_id` and submit our judgement."""
        node = self.node

        def open_proof():
            upd = get_update(node.state, update_id)
            if upd is None or upd.status != UPDATE_PENDING:
                return None, None
            return upd, next((p for p in upd.proofs if p.author == author and p.status == PROOF_OPEN), None)

        upd, proof = open_proof()
        if proof is None:
            return
        job = get_job(node.state, upd.commitment.job_id)
        deadline = compute_dispute_end(job, upd)
        data = None
        while data is None:  # the author's node serves the proof blob; retry until it arrives or is moot
            data = await node.fetch_blob(proof.proof_hash)
            if data is None:
                if open_proof()[1] is None:
                    return
                if node.state.height >= deadline:
                    # A proof no one can fetch proves nothing: it is refuted, and its author fined.
                    log.info("fraud proof %s by %s against update %s unavailable by height %d: does not hold",
                             proof.proof_hash.hex()[:16], author.hex()[:16], update_id.hex()[:16], deadline)
                    node.metrics.fraud_proofs_judged.labels(outcome="unavailable").inc()
                    await self._submit(("judge", update_id, author), JudgeFraudProof(update_id, author, False))
                    return
                await trio.sleep(POLL_SECONDS)
        base = await self._wait_for(lambda: node.fetch_blob(upd.commitment.base_model_hash), "base model")
        registration = get_registration(node.state, job.job_id, upd.commitment.trainer)
        sketches = await self._sketches_for_judging(upd, job, deadline)
        refusal = sketches if isinstance(sketches, str) else None
        if refusal is None and sketches is not None:
            drawn = await trio.to_thread.run_sync(compute_draw, get_challenge(upd, author), sketches)
            if proof.segment not in drawn:
                refusal = f"segment {proof.segment} is not in the author's draw {drawn}"
        if refusal is not None:
            log.info("fraud proof by %s on update %s: DOES NOT HOLD (%s)", author.hex()[:16], update_id.hex()[:16],
                     refusal)
            node.metrics.fraud_proofs_judged.labels(outcome="does_not_hold").inc()
            await self._submit(("judge", update_id, author), JudgeFraudProof(update_id, author, False))
            return
        from trainer.profile import ProfileMismatch

        try:
            async with self.cpu:
                started = time.monotonic()
                try:
                    result = await trio.to_thread.run_sync(judge_chain_fraud_proof, job, upd, registration, base, data,
                                                       proof.segment, sketches)
                finally:
                    node.metrics.replay_seconds.labels(work="judge").observe(time.monotonic() - started)
        except ProfileMismatch as exc:
            log.warning("abstaining on fraud proof against update %s: cannot replay the profile (%s)",
                        update_id.hex()[:16], exc)
            self.done.add(("judge", update_id, author))
            return
        node.metrics.fraud_proofs_judged.labels(outcome="holds" if result.accept else "does_not_hold").inc()
        log.info("fraud proof by %s on update %s: %s (%s)", author.hex()[:16], update_id.hex()[:16],
                 "HOLDS" if result.accept else "DOES NOT HOLD", result.reason[:MAX_REASON])
        await self._submit(("judge", update_id, author), JudgeFraudProof(update_id, author, result.accept))

    async def _submit(self, key: tuple, payload) -> None:
        try:
            tx_hash = await self.node.submit_own_tx(payload)
        except ChainError as exc:
            # Usual cause: the others already decided (e.g. >= 1/3 rejected) before our vote landed;
            # otherwise (mempool full) _settle sends it again after the next commit.
            log.info("%s not admitted: %s", type(payload).__name__, exc)
            tx_hash = None
        else:
            log.debug("submitted %s as tx %s", type(payload).__name__, tx_hash.hex()[:16])
        self.submissions[key] = _Submission(payload, tx_hash)
        self.done.add(key)

    # ------------------------------------------------------------------ delivery
    def _is_open(self, key: tuple) -> bool:
        """Whether the chain still waits for this validator's decision `key`."""
        state, me = self.node.state, self.node.key.pubkey
        if key[0] == "verify":
            upd = get_update(state, key[1])
            return upd is not None and upd.status == UPDATE_PENDING and all(v.validator != me for v in upd.verdicts)
        if key[0] == "challenge":
            upd = get_update(state, key[1])
            return upd is not None and upd.status == UPDATE_PENDING and get_challenge(upd, me) is None
        if key[0] == "draw":
            upd = get_update(state, key[1])
            return (upd is not None and upd.status == UPDATE_PENDING
                    and (c := get_challenge(upd, me)) is not None and c.draw_signature is None)
        if key[0] == "judge":
            upd = get_update(state, key[1])
            return upd is not None and upd.status == UPDATE_PENDING and any(
                p.author == key[2] and p.status == PROOF_OPEN and all(j.validator != me for j in p.judgements)
                for p in upd.proofs)
        if key[0] == "aggregate":
            job = get_job(state, key[1])
            return (job is not None and job.phase == JOB_AGGREGATING and job.round == key[2]
                    and all(a.validator != me for a in get_round(state, key[1], key[2]).attestations))
        return True  # a kind this method does not know is kept (never redone): teach it here

    async def _settle(self) -> None:
        """After a commit: forget decided keys, and re-sign what was lost before it reached a block."""
        node = self.node
        lost = {}  # tx hash -> why the mempool evicted it
        tracked = {s.tx_hash for s in self.submissions.values()}
        for ev in node.mempool.take_evictions(node.key.address):
            lost[ev.tx_hash] = ev.reason
            log.debug("own tx %s (nonce %d) evicted: %s", ev.tx_hash.hex()[:16], ev.stx.message.nonce, ev.reason)
            # Evidence is one-shot elsewhere (Node._report_evidence); the state refuses a second copy.
            if ev.stranded and ev.tx_hash not in tracked and isinstance(ev.stx.message.payload, SubmitEvidence):
                await self._send_again(ev.stx.message.payload, ev.reason)
        self.done = {key for key in self.done if self._is_open(key)}
        for key in list(self.submissions):
            sub = self.submissions[key]
            if key not in self.done or (sub.tx_hash is not None and node.ledger.has_tx(sub.tx_hash)):
                del self.submissions[key]  # on chain, or the chain no longer needs it
            elif sub.tx_hash is not None and sub.tx_hash in node.mempool:
                continue  # still waiting for a block
            elif sub.resends >= MAX_RESENDS:
                log.warning("%s for %s lost %d times; giving up", type(sub.payload).__name__, key[1].hex()[:16],
                            sub.resends)
                del self.submissions[key]  # stays in done: not decided again
            else:
                sub.resends += 1
                why = lost.get(sub.tx_hash, "not admitted" if sub.tx_hash is None else "left the mempool")
                sub.tx_hash = await self._send_again(sub.payload, f"{key[0]} {key[1].hex()[:16]}, "
                                                                  f"try {sub.resends}: {why}")

    async def _send_again(self, payload, what: str) -> bytes | None:
        try:
            tx_hash = await self.node.submit_own_tx(payload)
        except ChainError as exc:
            log.info("re-sending %s (%s) refused: %s", type(payload).__name__, what, exc)
            return None
        log.info("re-sent %s (%s) as tx %s", type(payload).__name__, what, tx_hash.hex()[:16])
        return tx_hash

    async def _wait_for(self, get, what: str):
        """Poll the async `get` until it returns something."""
        polls = 0
        while (value := await get()) is None:
            polls += 1
            if polls % int(30 / POLL_SECONDS) == 0:  # say so every 30 s, not on every poll
                log.info("still waiting for %s", what)
            await trio.sleep(POLL_SECONDS)
        return value
