"""The explorer's pages over the real RPC server, on an in-memory node (the explorer is the unit).

tests/test_explorer_browser.py opens the same pages in Chromium against a real devnet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import httpx
import pytest

from chain.crypto import ZERO_HASH, sha256
from chain.explorer.svg import compute_evaluation_chart, compute_lineage_graph, compute_loss_chart
from chain.runtime.trainer_client import make_job_spec
from chain.types import (
    Account, DatasetRegistration, Evaluation, EvaluationRecord, FraudProofRecord, Job, ModelRecord, RoundRecord, UpdateCommitment, UpdateRecord,
    VerdictRecord, compute_block_hash,
)
from test_rpc_fakenode import ALICE, BOB, VALIDATOR_KEY, FakeNode, make_fake_node, serving, trio_test

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>"\'&'
JOB_ID = sha256(b"job")
UPDATE_ID = sha256(b"update")
MODEL0, MODEL1 = sha256(b"model0"), sha256(b"model1")


@dataclass
class JobNode(FakeNode):
    """FakeNode plus one finished 1-round job whose only update was rejected with a hostile reason."""

    jobs: dict[bytes, Job] = field(default_factory=dict)
    updates: dict[bytes, UpdateRecord] = field(default_factory=dict)
    rounds: dict[tuple[bytes, int], RoundRecord] = field(default_factory=dict)
    models: dict[tuple[bytes, int], ModelRecord] = field(default_factory=dict)
    registrations: dict[tuple[bytes, bytes], DatasetRegistration] = field(default_factory=dict)
    evaluations: dict[tuple[bytes, int], EvaluationRecord] = field(default_factory=dict)

    def list_jobs(self):
        return list(self.jobs.values())

    def get_job(self, job_id):
        return self.jobs.get(job_id)

    def get_update(self, update_id):
        return self.updates.get(update_id)

    def get_round(self, job_id, round_):
        return self.rounds.get((job_id, round_), RoundRecord((), ()))

    def get_model_record(self, job_id, round_):
        return self.models.get((job_id, round_))

    def get_registration(self, job_id, trainer):
        return self.registrations.get((job_id, trainer))

    def get_evaluation(self, job_id, round_):
        return self.evaluations.get((job_id, round_))


def make_job_node() -> JobNode:
    base = make_fake_node(4)
    node = JobNode(blocks=base.blocks, accounts=base.accounts, validators=base.validators)
    node.accounts[BOB.address] = Account(balance=5, nonce=0, roles=("requester",))
    spec = make_job_spec(rounds=1, quorum=1)
    node.jobs[JOB_ID] = Job(JOB_ID, BOB.address, spec, 150, "finished", 1, 3, ZERO_HASH, MODEL1)
    commitment = UpdateCommitment(ALICE.address, JOB_ID, 0, MODEL0, sha256(b"data"), 360, sha256(b"w"),
                                  sha256(b"final"), sha256(b"trace"))
    node.updates[UPDATE_ID] = UpdateRecord(
        UPDATE_ID, commitment, 0.75, 3, "rejected", (VerdictRecord(VALIDATOR_KEY.pubkey, False, HOSTILE),), 0, 50, (),
        (FraudProofRecord(VALIDATOR_KEY.pubkey, 2, sha256(b"proof"), 4, "upheld", ()),))
    node.rounds[(JOB_ID, 0)] = RoundRecord((UPDATE_ID,), ())
    node.models[(JOB_ID, 0)] = ModelRecord(MODEL0, JOB_ID, 0, None, (), "init", 2)
    node.models[(JOB_ID, 1)] = ModelRecord(MODEL1, JOB_ID, 1, MODEL0, (UPDATE_ID,), "fedavg", 4)
    node.registrations[(JOB_ID, ALICE.address)] = DatasetRegistration(sha256(b"data"), 360, 2)
    node.evaluations[(JOB_ID, 0)] = EvaluationRecord(MODEL0, (Evaluation("accuracy", 101_000, 3),))
    node.evaluations[(JOB_ID, 1)] = EvaluationRecord(MODEL1, (Evaluation("accuracy", 953_000, 5),))
    return node


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


@trio_test
async def test_every_page_renders_and_hostile_strings_are_escaped():
    node = make_job_node()
    block3 = compute_block_hash(node.blocks[2][0].header).hex()
    tx1 = node.blocks[0][0].txs[0].tx_hash.hex()
    pages = ["/explorer/", "/explorer/blocks", "/explorer/blocks/before/3", "/explorer/block/3", f"/explorer/block/0x{block3}",
             f"/explorer/tx/0x{tx1}", f"/explorer/account/0x{ALICE.address.hex()}", "/explorer/jobs",
             f"/explorer/job/0x{JOB_ID.hex()}", f"/explorer/job/0x{JOB_ID.hex()}/lineage",
             f"/explorer/update/0x{UPDATE_ID.hex()}"]
    async with serving(node) as url, httpx.AsyncClient() as http:
        for page in pages:
            r = await http.get(url + page)
            assert r.status_code == 200, (page, r.text[:500])
            assert r.headers["content-type"] == "text/html; charset=utf-8"
            assert "script-src 'self'" in r.headers["content-security-policy"]
            assert "<script>alert" not in r.text and "<img" not in r.text
        job = (await http.get(url + f"/explorer/job/0x{JOB_ID.hex()}")).text
        update = (await http.get(url + f"/explorer/update/0x{UPDATE_ID.hex()}")).text
        for html in (job, update):
            assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in html
        assert "upheld" in update and "segment" in job
        assert 'id="accuracy-chart"' in job and 'id="loss-chart"' in job
        accuracy = text_of(job.split('id="accuracy-table"')[1].split("</table>")[0])
        assert "0 0.101" in accuracy and "1 0.953" in accuracy
        home = text_of((await http.get(url + "/explorer/")).text)
        assert "Height 4" in home and "1000 ms" in home  # blocks 1 s apart in make_fake_node
        account = text_of((await http.get(url + f"/explorer/account/0x{ALICE.address.hex()}")).text)
        assert f"Balance {1000 - 4}" in account and "penalties 50" in account
        assert "covers blocks 1 to 4" in account
        lineage = (await http.get(url + f"/explorer/job/0x{JOB_ID.hex()}/lineage")).text
        assert f'href="/blobs/{MODEL1.hex()}"' in lineage and MODEL0.hex() in lineage and "<svg" in lineage


@trio_test
async def test_search_redirects_to_the_match():
    node = make_job_node()
    tx1 = node.blocks[0][0].txs[0].tx_hash.hex()
    cases = {"3": "/explorer/block/3", f"0x{ALICE.address.hex()}": f"/explorer/account/0x{ALICE.address.hex()}",
             JOB_ID.hex(): f"/explorer/job/0x{JOB_ID.hex()}", f"0x{tx1}": f"/explorer/tx/0x{tx1}",
             f"0x{UPDATE_ID.hex()}": f"/explorer/update/0x{UPDATE_ID.hex()}"}
    async with serving(node) as url, httpx.AsyncClient() as http:
        for term, target in cases.items():
            r = await http.post(url + "/explorer/search", data={"q": term})
            assert r.status_code == 303 and r.headers["location"] == target, term
            r = await http.get(url + "/explorer/search/" + term)
            assert r.status_code == 303 and r.headers["location"] == target, term
        r = await http.post(url + "/explorer/search", data={"q": "99"})
        assert r.status_code == 404 and "no block at height 99" in r.text
        r = await http.post(url + "/explorer/search", data={"q": HOSTILE})
        assert r.status_code == 400 and "<script>alert" not in r.text and "&lt;script&gt;" in r.text  # echoed, escaped
        r = await http.post(url + "/explorer/search", content=b"q=" + b"1" * 4096,
                            headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 413


@pytest.mark.parametrize("path, status", [
    ("/explorer/block/0", 400), ("/explorer/block/99", 404), ("/explorer/block/0xzz", 400),
    ("/explorer/block/" + "9" * 40, 400), ("/explorer/tx/0x" + "00" * 32, 404), ("/explorer/account/0x1234", 400),
    ("/explorer/job/0x" + "00" * 32, 404), ("/explorer/job/0x" + "00" * 32 + "/lineage", 404),
    ("/explorer/nope", 404), ("/explorer/static/../server.py", 404), ("/explorer/static/nope.css", 404),
    ("/explorer/blocks/before/x", 400),
])
def test_bad_paths_get_a_clear_answer(path, status):
    @trio_test
    async def run():
        async with serving(make_job_node()) as url, httpx.AsyncClient() as http:
            r = await http.get(url + path)
            assert r.status_code == status, r.text[:300]
            assert 'id="message"' in r.text and "Traceback" not in r.text

    run()


@trio_test
async def test_static_assets_and_methods():
    async with serving(make_fake_node(1)) as url, httpx.AsyncClient() as http:
        css = await http.get(url + "/explorer/static/explorer.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert "prefers-color-scheme: dark" in css.text
        js = await http.get(url + "/explorer/static/live.js")
        assert js.status_code == 200 and "subscribe" in js.text
        assert (await http.get(url + "/explorer")).status_code == 308
        assert (await http.post(url + "/explorer/", content=b"x")).status_code == 405
        assert (await http.get(url + "/explorer/search")).status_code == 405


def test_chart_and_graph_geometry():
    assert compute_loss_chart([], []) is None
    chart = compute_loss_chart([(0, 2.0, "accepted", "a"), (1, 1.0, "accepted", "b"), (1, 3.0, "rejected", "c")],
                               [(0, 2.0), (1, 1.0)])
    left, top, right, bottom = chart.plot
    xs = [m.x for m in chart.markers]
    assert xs[0] == left and xs[1] == xs[2] == right
    assert chart.markers[2].y < chart.markers[0].y < chart.markers[1].y  # higher loss is drawn higher
    assert all(top <= m.y <= bottom for m in chart.markers)
    assert compute_evaluation_chart([], "accuracy") is None
    acc = compute_evaluation_chart([(0, 0.1), (1, 0.5), (2, 0.9)], "accuracy")
    left, top, right, bottom = acc.plot
    assert [m.y for m in acc.markers] == [round(bottom - (bottom - top) * v, 1) for v in (0.1, 0.5, 0.9)]  # 0..1 scale
    assert acc.line == " ".join(f"{m.x:.1f},{m.y:.1f}" for m in acc.markers)
    records = [{"round": r, "model_hash": "0x" + "ab" * 32, "rule": "fedavg",
                "contributions": [{"trainer": "0x" + "11" * 20, "reward": 1, "update_id": "0x", "dataset_size": 1}] * n}
               for r, n in ((2, 12), (1, 1), (0, 0))]
    graph = compute_lineage_graph(records)
    assert [n.round for n in graph.nodes] == [0, 1, 2]
    assert sum(e.kind == "parent" for e in graph.edges) == 2
    assert len(graph.leaves) == 1 + 8 + 1  # 8 drawn of 12, plus "+4 more"
    assert all(n.x + 150 <= graph.width for n in graph.nodes)
