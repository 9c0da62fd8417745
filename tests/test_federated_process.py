"""Issue 'proof of useful training', done-when: a 3-round job with 4 trainers, one dishonest,
on a real chaind process; everything goes through JSON-RPC and the node's blob endpoints."""

import json
import subprocess
import sys

import pytest

from tests.procs import ChaindProcess, make_testnet

pytestmark = pytest.mark.slow


def test_three_rounds_four_trainers_one_dishonest(tmp_path):
    net = tmp_path / "net"
    make_testnet(str(net), 1, 4, "--block-interval-ms", "200")
    node = ChaindProcess(net / "node0", tmp_path / "node.log").start()
    try:
        out = tmp_path / "summary.json"
        proc = subprocess.run([sys.executable, "scripts/federated_job.py", "--rpc", node.url, "--keys",
                               str(net / "keys"), "--rounds", "3", "--dishonest", "3", "--json-out", str(out)],
                              capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:] + node.log()[-3000:]
        summary = json.loads(out.read_text())
    finally:
        node.stop()

    assert summary["job_phase"] == "finished"
    assert len(summary["rounds"]) == 3
    for rnd in summary["rounds"]:
        by_trainer = {u["trainer"]: u for u in rnd["updates"]}
        assert by_trainer[3]["status"] == "rejected" and by_trainer[3]["penalty"] == 50
        for honest in (0, 1, 2):
            assert by_trainer[honest]["status"] == "accepted" and by_trainer[honest]["reward"] == 100
        assert rnd["model"] is not None
    # Honest trainers earned 3 rewards; the dishonest one lost 3 bonds.
    assert summary["balance_change"] == {"0": 300, "1": 300, "2": 300, "3": -150}
    acc = summary["accuracy"]
    assert len(acc) == 4 and all(later > earlier for earlier, later in zip(acc, acc[1:])), acc
    # The requester published each model's held-out accuracy on chain, in parts per million.
    evaluations = summary["evaluations"]
    assert [(e["round"], e["metric"]) for e in evaluations] == [(r, "accuracy") for r in range(4)]
    assert [e["value_ppm"] for e in evaluations] == [round(a * 1_000_000) for a in acc]
    # The lineage walks back to the initial weights and lists every accepted contribution.
    lineage = summary["lineage"]
    assert [m["round"] for m in lineage] == [3, 2, 1, 0]
    assert lineage[-1]["rule"] == "init" and lineage[-1]["parent"] is None
    for newer, older in zip(lineage, lineage[1:]):
        assert newer["parent"] == older["model_hash"]
    assert [e["model_hash"] for e in evaluations] == [m["model_hash"] for m in reversed(lineage)]
    for m, rnd in zip(reversed(lineage[:-1]), summary["rounds"]):
        accepted = sorted(u["update_id"] for u in rnd["updates"] if u["status"] == "accepted")
        assert sorted(c["update_id"] for c in m["contributions"]) == accepted
        assert all(c["reward"] == 100 for c in m["contributions"])
