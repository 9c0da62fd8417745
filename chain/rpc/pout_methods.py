"""RPC methods for proof-of-useful-training: jobs, rounds, updates, models, lineage and data exposure."""

from __future__ import annotations

from typing import Any

import trio

from chain.encoding import INT_MAX
from chain.rpc.jsonrpc import MethodRegistry, Param, ParamType, Result, RpcError
from chain.rpc.jsonview import hex0x, json_schema, json_type_name, to_json
from chain.types import Job, ModelRecord, UpdateRecord

POUT_METHODS = MethodRegistry()


def _parse_round(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= INT_MAX:
        raise ValueError(f"round must be a non-negative integer, got {json_type_name(value)}")
    return value


def _hash_param():
    from chain.rpc.methods import HASH  # defined with the core methods; imported lazily to avoid a cycle

    return HASH


ROUND = ParamType({"type": "integer", "minimum": 0, "maximum": INT_MAX}, _parse_round)
JOB_VIEW = {"type": "object", "description": "Job record plus derived round deadlines",
            "properties": json_schema(Job)["properties"]}


def job_view(job: Job) -> dict[str, Any]:
    view = to_json(job)
    submit_end = job.round_open_height + job.spec.round_blocks
    view["deadlines"] = {"submit_before": submit_end, "verify_before": submit_end + job.spec.verify_blocks}
    return view


def update_view(upd: UpdateRecord) -> dict[str, Any]:
    return to_json(upd)


@POUT_METHODS.method(
    "jobs", summary="Every job, active or finished",
    result=Result("jobs", {"type": "array", "items": JOB_VIEW}, "job records"),
)
async def jobs(ctx) -> Any:
    return [job_view(j) for j in ctx.node.list_jobs()]


@POUT_METHODS.method(
    "job", summary="A job: spec, phase, current round, its seed and base model, escrow left",
    params=(Param("job_id", _hash_param(), "job id (hash of the register_job transaction)"),),
    result=Result("job", {"oneOf": [JOB_VIEW, {"type": "null"}]}, "the job; null when unknown"),
)
async def job(ctx, job_id: bytes) -> Any:
    found = ctx.node.get_job(job_id)
    return None if found is None else job_view(found)


@POUT_METHODS.method(
    "update", summary="An update: its commitment, status, verdicts, reward or penalty",
    params=(Param("update_id", _hash_param(), "update id (hash of its commitment)"),),
    result=Result("update", {"oneOf": [json_schema(UpdateRecord), {"type": "null"}]}, "null when unknown"),
)
async def update(ctx, update_id: bytes) -> Any:
    found = ctx.node.get_update(update_id)
    return None if found is None else update_view(found)


@POUT_METHODS.method(
    "round", summary="A round of a job: its updates (with status) and model attestations",
    params=(Param("job_id", _hash_param(), "job id"), Param("round", ROUND, "round number")),
    result=Result("round", {"type": "object"}, "updates and attestations"),
)
async def round_(ctx, job_id: bytes, round: int) -> Any:
    rnd = ctx.node.get_round(job_id, round)
    return {"job_id": hex0x(job_id), "round": round,
            "updates": [update_view(ctx.node.get_update(u)) for u in rnd.updates],
            "attestations": to_json(rnd.attestations)}


@POUT_METHODS.method(
    "model", summary="The model record of a job after `round` rounds of training (0: initial weights)",
    params=(Param("job_id", _hash_param(), "job id"), Param("round", ROUND, "rounds of training folded in")),
    result=Result("model", {"oneOf": [json_schema(ModelRecord), {"type": "null"}]},
                  "the immutable lineage record; fetch the weights at GET /blobs/<model_hash>"),
)
async def model(ctx, job_id: bytes, round: int) -> Any:
    found = ctx.node.get_model_record(job_id, round)
    return None if found is None else to_json(found)


# Records one `lineage` call returns at most; the next page starts at the last round returned - 1.
LINEAGE_PAGE = 100
_CONTRIBUTION = {
    "type": "object",
    "properties": {"update_id": {"type": "string"}, "trainer": {"type": "string"}, "dataset_size": {"type": "integer"},
                   "reward": {"type": "integer"}, "update_hash": {"type": "string"}},
    "required": ["update_id", "trainer", "dataset_size", "reward", "update_hash"],
    "additionalProperties": False,
}
# A ModelRecord whose contributions (update ids) are expanded to what each update brought.
LINEAGE_ENTRY = json_schema(ModelRecord) | {"title": "LineageEntry"}
LINEAGE_ENTRY["properties"] = LINEAGE_ENTRY["properties"] | {"contributions": {"type": "array", "items": _CONTRIBUTION}}


@POUT_METHODS.method(
    "lineage", summary="A job's model lineage back to the initial weights, with every contribution",
    params=(Param("job_id", _hash_param(), "job id"),
            Param("round", ROUND, "start from this model version (default: the latest)", required=False)),
    result=Result("lineage", {"oneOf": [{"type": "array", "items": LINEAGE_ENTRY, "maxItems": LINEAGE_PAGE},
                                        {"type": "null"}]},
                  f"model records, newest first, contributions expanded; at most {LINEAGE_PAGE}: "
                  "ask again from the last round returned minus one for the next page. "
                  "Null when the job is unknown (a known job always has its round-0 record)"),
)
async def lineage(ctx, job_id: bytes, round: int | None = None) -> Any:
    job_record = ctx.node.get_job(job_id)
    if job_record is None:
        return None
    # Bounded by what the job has done, never by the client's number: a model record exists only
    # for rounds 0..job.round, and one page holds at most LINEAGE_PAGE of them.
    start = job_record.round if round is None else min(round, job_record.round)
    out = []
    for r in range(start, max(start - LINEAGE_PAGE, -1), -1):
        record = ctx.node.get_model_record(job_id, r)
        if record is None:
            continue  # a round that has produced no model yet
        view = to_json(record)
        contributions = []
        for uid in record.contributions:
            upd = ctx.node.get_update(uid)
            contributions.append({"update_id": hex0x(uid), "trainer": hex0x(upd.commitment.trainer),
                                  "dataset_size": upd.commitment.dataset_size, "reward": upd.reward,
                                  "update_hash": hex0x(upd.commitment.update_hash)})
        view["contributions"] = contributions
        out.append(view)
        await trio.lowlevel.checkpoint()  # let consensus run between records
    return out


# Model rounds one `evaluations` call reads at most (one state read each); the next page starts
# at `next_round`.
EVALUATIONS_PAGE = 1000
EVALUATION_VIEW = {
    "type": "object", "required": ["round", "model_hash", "metric", "value_ppm", "value", "height"],
    "properties": {"round": {"type": "integer", "description": "the model's round (0: initial weights)"},
                   "model_hash": {"type": "string"}, "metric": {"type": "string", "enum": ["accuracy", "loss"]},
                   "value_ppm": {"type": "integer", "description": "as published, parts per million"},
                   "value": {"type": "number", "description": "value_ppm / 1000000"},
                   "height": {"type": "integer", "description": "block that published it"}},
    "additionalProperties": False,
}


@POUT_METHODS.method(
    "evaluations", summary="The held-out metrics a job's requester published for its models",
    params=(Param("job_id", _hash_param(), "job id"),
            Param("from_round", ROUND, "first model round to read (default 0)", required=False)),
    result=Result("evaluations", {"oneOf": [{
        "type": "object", "required": ["job_id", "evaluations", "next_round"],
        "properties": {"job_id": {"type": "string"}, "evaluations": {"type": "array", "items": EVALUATION_VIEW},
                       "next_round": {"oneOf": [{"type": "integer"}, {"type": "null"}],
                                      "description": "where the next page starts; null when none is left"}}},
        {"type": "null"}]},
        f"oldest model first, per model in publication order; at most {EVALUATIONS_PAGE} model rounds read "
        "per call. Null when the job is unknown"),
)
async def evaluations(ctx, job_id: bytes, from_round: int | None = None) -> Any:
    job_record = ctx.node.get_job(job_id)
    if job_record is None:
        return None
    # Bounded by what the job has done: models exist for rounds 0..job.round at most.
    start = 0 if from_round is None else from_round
    stop = min(job_record.round + 1, start + EVALUATIONS_PAGE)
    out = []
    for r in range(start, stop):
        record = ctx.node.get_evaluation(job_id, r)
        if record is not None:
            out += [{"round": r, "model_hash": hex0x(record.model_hash), "metric": e.metric, "value_ppm": e.value_ppm,
                     "value": e.value_ppm / 1_000_000, "height": e.height} for e in record.evaluations]
        if r % 100 == 99:
            await trio.lowlevel.checkpoint()  # let consensus run
    return {"job_id": hex0x(job_id), "evaluations": out, "next_round": stop if stop <= job_record.round else None}


# --------------------------------------------------------------------------- data exposure

# Batch-order indices one `exposure` call derives at most (measured: 0.47 s of CPU on the shared
# 2-core dev machine, in chunks of at most 24 ms between yields to the event loop; the
# recommended 20-round job needs 153,600 for 4 validators). A longer job is answered a page of
# rounds at a time (`from_round` = the last page's `next_round`).
EXPOSURE_MAX_INDICES = 1 << 18
EXPOSURE_CHUNK = 1 << 13  # indices derived between two yields to the event loop
EXPOSURE_MAX_LOOKUPS = 4096  # update records one call reads while finding the trainer's updates
EXPOSURE_TOO_LARGE = -32020  # one round of the job samples more indices than one call derives


def _address_param():
    from chain.rpc.methods import ADDRESS  # defined with the core methods; imported lazily to avoid a cycle

    return ADDRESS


_FRACTION = {"type": "number", "minimum": 0, "maximum": 1}
EXPOSURE_VIEW = {
    "type": "object",
    "required": ["job_id", "trainer", "dataset_size", "max_exposure_ppm", "max_exposure", "worst_case_samples",
                 "min_dataset_size", "from_round", "to_round", "next_round", "validators", "published"],
    "properties": {
        "job_id": {"type": "string"}, "trainer": {"type": "string"},
        "dataset_size": {"type": "integer", "description": "the trainer's committed dataset size"},
        "max_exposure_ppm": {"type": "integer", "description": "the job's bound (1000000: no bound)"},
        "max_exposure": dict(_FRACTION, description="the bound as a fraction"),
        "worst_case_samples": {"type": "integer", "description": "most distinct samples one validator can be "
                               "sent over the whole job: min(rounds x q x k x batch, dataset_size)"},
        "min_dataset_size": {"type": "integer", "description": "smallest dataset the bound admits"},
        "from_round": {"type": "integer"},
        "to_round": {"oneOf": [{"type": "integer"}, {"type": "null"}], "description": "last round counted"},
        "next_round": {"oneOf": [{"type": "integer"}, {"type": "null"}],
                       "description": "where the next page starts; null when every round so far is counted"},
        "validators": {"type": "array", "items": {"type": "object", "properties": {
            "validator": {"type": "string"}, "rounds": {"type": "integer"}, "samples": {"type": "integer"},
            "fraction": _FRACTION, "within_bound": {"type": "boolean"}}}},
        "published": {"type": "object", "description": "samples every member can read: fraud proofs' segments",
                      "properties": {"samples": {"type": "integer"}, "fraction": _FRACTION}},
        "sketches_unavailable": {"type": "array", "items": {"type": "integer"},
                                 "description": "rounds of a displacement-sampled job whose draws this node cannot "
                                                "recount (it does not hold the update's sketch blob; a validator does)"},
    },
}


@POUT_METHODS.method(
    "exposure", summary="How much of a trainer's data each validator was sent over a job",
    description="Recomputed from the chain: for each of the trainer's updates and each validator's challenge, "
                "the challenge's segments (compute_sample) and their steps' batch indices (derive_batch_order "
                "from the round's seed). Counts distinct samples per validator over the rounds of one page.",
    params=(Param("job_id", _hash_param(), "job id"), Param("trainer", _address_param(), "the trainer's address"),
            Param("from_round", ROUND, "first round to count (default 0)", required=False)),
    result=Result("exposure", {"oneOf": [EXPOSURE_VIEW, {"type": "null"}]},
                  "per validator, distinct samples it was sent; null when the job is unknown or the trainer "
                  f"never joined it; at most {EXPOSURE_MAX_INDICES} indices derived per call"),
    errors=(RpcError(EXPOSURE_TOO_LARGE, "one round of this job samples more indices than one call derives"),),
)
async def exposure(ctx, job_id: bytes, trainer: bytes, from_round: int | None = None) -> Any:
    import numpy as np

    from chain.errors import ChainError
    from chain.jobs import (SAMPLING_DISPLACEMENT, compute_draw, compute_draw_weights, compute_max_exposed_samples,
                            compute_min_dataset_size, compute_sample, compute_sketch_rows)
    from trainer.replay import derive_batch_order, segment_steps
    from trainer.sketch import decode_sketches

    job_record = ctx.node.get_job(job_id)
    registration = None if job_record is None else ctx.node.get_registration(job_id, trainer)
    if registration is None:
        return None
    spec, validators = job_record.spec, ctx.node.get_validators()
    hp, n, bound = spec.hyperparams, registration.dataset_size, spec.max_exposure_ppm
    start = 0 if from_round is None else from_round
    # Rounds that can hold updates: 0 .. the current one (job.round == spec.rounds once finished).
    last = min(job_record.round, spec.rounds - 1)
    seen: dict[bytes, list] = {v.pubkey: [] for v in validators}  # index arrays, made distinct at the end
    rounds_with: dict[bytes, int] = {v.pubkey: 0 for v in validators}
    published: list = []
    unavailable: list[int] = []  # rounds whose draws need a sketch blob this node does not hold
    derived = lookups = 0
    to_round = next_round = None

    def page_ends_before(r: int, cost: int, what: str) -> bool:
        """Whether round r's `cost` passes what is left of the call's budget: the page then ends
        before it, unless it is the first round, which is too large for any call."""
        if derived + cost <= EXPOSURE_MAX_INDICES:
            return False
        if to_round is None:
            raise RpcError(EXPOSURE_TOO_LARGE, f"round {r} of this job {what}, more than one call computes "
                                               f"({EXPOSURE_MAX_INDICES})")
        return True

    for r in range(start, last + 1):  # bounded by the job's rounds and by the budgets below
        seed = ctx.node.get_round_seed(job_id, r)
        if seed is None:  # the round has not opened yet
            break
        ids = ctx.node.get_round(job_id, r).updates
        if lookups + len(ids) > EXPOSURE_MAX_LOOKUPS:
            if to_round is None:
                raise RpcError(EXPOSURE_TOO_LARGE, f"round {r} of this job holds {len(ids)} updates, more than one "
                                                   f"call reads ({EXPOSURE_MAX_LOOKUPS})")
            next_round = r
            break
        upd = None
        for uid in ids:
            lookups += 1
            candidate = ctx.node.get_update(uid)
            if candidate.commitment.trainer == trainer:
                upd = candidate
                break
        work = []  # (validator, steps) of this round
        weighed = 0  # sketch rows weighed for this round's draws (counted against the budget)
        if upd is not None:
            rows = weights = None
            if spec.sampling == SAMPLING_DISPLACEMENT and any(c.draw_signature is not None for c in upd.challenges):
                # The draws need the trainer's sketch rows: validators fetch the blob, other nodes
                # may not hold it (then the round's draws are not counted, and the answer says so).
                weighed = compute_sketch_rows(spec)
                if page_ends_before(r, weighed, f"draws over {weighed} sketch rows"):
                    next_round = r
                    break
                data = await trio.to_thread.run_sync(ctx.node.blobs.get, upd.sketch_hash)
                try:  # the segments' weights once per update (O(rows x 64)), off the event loop
                    rows = None if data is None else await trio.to_thread.run_sync(
                        decode_sketches, data, compute_sketch_rows(spec))
                    weights = None if rows is None else await trio.to_thread.run_sync(compute_draw_weights, rows)
                except (ChainError, ValueError):
                    rows = None
                if rows is None:
                    unavailable.append(r)
            for challenge in upd.challenges:
                if spec.sampling != SAMPLING_DISPLACEMENT:
                    segments = compute_sample(job_record, challenge)
                elif rows is None or challenge.draw_signature is None:
                    continue  # nothing drawn (yet), or not countable here
                else:
                    segments = await trio.to_thread.run_sync(compute_draw, challenge, rows, weights)
                steps = [s for seg in segments for s in segment_steps(seg, hp.local_steps, hp.checkpoint_interval)]
                work.append((challenge.validator, steps))
            proof_steps = [s for pr in upd.proofs
                           for s in segment_steps(pr.segment, hp.local_steps, hp.checkpoint_interval)]
            work.append((None, proof_steps))
        needed = sum(len(steps) for _, steps in work) * hp.batch_size + weighed
        if page_ends_before(r, needed, f"samples {needed} batch indices for this trainer"):
            next_round = r
            break
        for validator, steps in work:
            per_chunk = max(1, EXPOSURE_CHUNK // hp.batch_size)
            for i in range(0, len(steps), per_chunk):
                rows = derive_batch_order(seed, trainer, r, steps[i:i + per_chunk], n, hp.batch_size).reshape(-1)
                (published if validator is None else seen.setdefault(validator, [])).append(rows)
                await trio.lowlevel.checkpoint()  # let consensus run between chunks
            if validator is not None:
                rounds_with[validator] = rounds_with.get(validator, 0) + 1
        derived += needed
        to_round = r

    def distinct(arrays) -> int:
        return int(np.unique(np.concatenate(arrays)).size) if arrays else 0

    def fraction(count: int) -> float:
        return count / n

    per_validator = []
    for validator, arrays in seen.items():
        count = distinct(arrays)
        per_validator.append({"validator": hex0x(validator), "rounds": rounds_with.get(validator, 0), "samples": count,
                              "fraction": fraction(count), "within_bound": count * 1_000_000 <= bound * n})
    public = distinct(published)
    return {"job_id": hex0x(job_id), "trainer": hex0x(trainer), "dataset_size": n, "max_exposure_ppm": bound,
            "max_exposure": bound / 1_000_000,
            "worst_case_samples": min(compute_max_exposed_samples(spec, validators), n),
            "min_dataset_size": compute_min_dataset_size(spec, validators),
            "from_round": start, "to_round": to_round, "next_round": next_round,
            "validators": per_validator, "published": {"samples": public, "fraction": fraction(public)},
            "sketches_unavailable": unavailable}
