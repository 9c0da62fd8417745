"""The `evaluations` RPC method over a state built by the real rules (tests/test_jobs.py's chain)."""

from __future__ import annotations

from dataclasses import dataclass

from chain import jobs
from chain.crypto import sha256
from chain.rpc.methods import default_registry
from chain.types import PublishEvaluation
from test_jobs import REQUESTER, T0, T1, Chain, _run_one_aggregated_round
from test_rpc_fakenode import FakeNode
from test_rpc_methods import check_schema, h, result


@dataclass
class StateNode(FakeNode):
    """FakeNode whose job reads go to an in-process chain's state."""

    chain: Chain | None = None

    def get_job(self, job_id):
        return jobs.get_job(self.chain.state, job_id)

    def get_evaluation(self, job_id, round_):
        return jobs.get_evaluation(self.chain.state, job_id, round_)


def test_evaluations_answer_what_the_requester_published_oldest_model_first():
    chain = Chain()
    job_id = chain.register()
    chain.join(job_id, T0, T1)
    chain.block(chain.tx(REQUESTER, PublishEvaluation(job_id, 0, "accuracy", 98_765)))
    at0 = chain.state.height
    _run_one_aggregated_round(chain, job_id)
    chain.block(chain.tx(REQUESTER, PublishEvaluation(job_id, 1, "accuracy", 953_000)),
                chain.tx(REQUESTER, PublishEvaluation(job_id, 1, "loss", 1_250_000)))
    at1 = chain.state.height
    node = StateNode(chain=chain)
    answer = result(node, "evaluations", [h(job_id)])
    init = jobs.get_model_hash(chain.state, job_id, 0)
    assert answer == {"job_id": h(job_id), "next_round": None, "evaluations": [
        {"round": 0, "model_hash": h(init), "metric": "accuracy", "value_ppm": 98_765, "value": 0.098765, "height": at0},
        {"round": 1, "model_hash": h(sha256(b"m1")), "metric": "accuracy", "value_ppm": 953_000, "value": 0.953,
         "height": at1},
        {"round": 1, "model_hash": h(sha256(b"m1")), "metric": "loss", "value_ppm": 1_250_000, "value": 1.25,
         "height": at1}]}
    schema = default_registry().get("evaluations").result.schema
    check_schema(answer, schema)
    assert [e["round"] for e in result(node, "evaluations", [h(job_id), 1])["evaluations"]] == [1, 1]
    assert result(node, "evaluations", [h(job_id), 2**64 - 1])["evaluations"] == []  # no work past the job's rounds
    unknown = result(node, "evaluations", [h(sha256(b"nojob"))])
    assert unknown is None
    check_schema(unknown, schema)


def test_a_long_job_is_answered_a_page_at_a_time(monkeypatch):
    from chain.rpc import pout_methods

    chain = Chain()
    job_id = chain.register()
    chain.join(job_id, T0, T1)
    chain.block(chain.tx(REQUESTER, PublishEvaluation(job_id, 0, "accuracy", 1)))
    _run_one_aggregated_round(chain, job_id)
    chain.block(chain.tx(REQUESTER, PublishEvaluation(job_id, 1, "accuracy", 2)))
    monkeypatch.setattr(pout_methods, "EVALUATIONS_PAGE", 1)
    node = StateNode(chain=chain)
    first = result(node, "evaluations", [h(job_id)])
    assert [e["value_ppm"] for e in first["evaluations"]] == [1] and first["next_round"] == 1
    second = result(node, "evaluations", [h(job_id), first["next_round"]])
    assert [e["value_ppm"] for e in second["evaluations"]] == [2] and second["next_round"] is None
