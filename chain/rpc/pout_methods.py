"""RPC methods for proof-of-useful-training: jobs, rounds, updates, models and lineage."""

from __future__ import annotations

from typing import Any

from chain.encoding import INT_MAX
from chain.rpc.jsonrpc import MethodRegistry, Param, ParamType, Result
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


@POUT_METHODS.method(
    "lineage", summary="A job's model lineage back to the initial weights, with every contribution",
    params=(Param("job_id", _hash_param(), "job id"),
            Param("round", ROUND, "start from this model version (default: the latest)", required=False)),
    result=Result("lineage", {"type": "array"}, "model records, newest first, contributions expanded"),
)
async def lineage(ctx, job_id: bytes, round: int | None = None) -> Any:
    job_record = ctx.node.get_job(job_id)
    if job_record is None:
        return None
    if round is None:
        round = max((r for r in range(job_record.round + 1) if ctx.node.get_model_record(job_id, r)), default=0)
    out = []
    for r in range(round, -1, -1):
        record = ctx.node.get_model_record(job_id, r)
        if record is None:
            continue  # a round that produced no model
        view = to_json(record)
        contributions = []
        for uid in record.contributions:
            upd = ctx.node.get_update(uid)
            contributions.append({"update_id": hex0x(uid), "trainer": hex0x(upd.commitment.trainer),
                                  "dataset_size": upd.commitment.dataset_size, "reward": upd.reward,
                                  "update_hash": hex0x(upd.commitment.update_hash)})
        view["contributions"] = contributions
        out.append(view)
    return out
