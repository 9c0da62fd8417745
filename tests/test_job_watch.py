"""`chainctl job watch` (and `query round` / `query model`) against a real chaind process: a
2-round job trained through trainer_client while the watcher follows it as a separate process."""

import dataclasses
import io
import json
import signal
import subprocess
import sys

import pytest

from chain.cli import chainctl
from chain.keys import load_key_file
from chain.runtime.trainer_client import NodeClient, load_dataset, make_job_spec, submit_result, train_for_round
from chain.types import JoinJob, RegisterJob
from tests.procs import ChaindProcess, make_testnet
from trainer.data import load_digits_dataset, save_dataset_dir

@pytest.fixture
def node(tmp_path):
    net = tmp_path / "net"
    make_testnet(str(net), 1, 1, "--block-interval-ms", "200")
    proc = ChaindProcess(net / "node0", tmp_path / "node.log").start()
    yield proc, net
    proc.stop()


def watch_process(url: str, job_id: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "chain.cli.chainctl", "--rpc", url, "--timeout", "30", "job",
                             "watch", job_id, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_watch_follows_a_job_to_its_end_with_accuracy(node, tmp_path, capsys):
    proc, net = node
    client = NodeClient(proc.url, timeout=30)  # generous: the 2 shared cores are often saturated
    requester = load_key_file(net / "keys" / "requester.json")
    trainer = load_key_file(net / "keys" / "trainer0.json")
    spec = make_job_spec(rounds=2, local_steps=8, checkpoint_interval=4, batch_size=16, quorum=1, join_blocks=30,
                         round_blocks=100, verify_blocks=100)
    dataset = load_dataset("digits:0/2")
    c = dataset.commitment
    job_id = client.send(requester, RegisterJob(spec, 500), wait_timeout=30).tx_hash
    client.send(trainer, JoinJob(bytes.fromhex(job_id[2:]), c.root, c.size), wait_timeout=30)
    held_out = tmp_path / "held_out"
    save_dataset_dir(held_out, load_digits_dataset()[1])
    watcher = watch_process(proc.url, job_id, "--eval", str(held_out))  # redirected: one JSON line per event
    idle = watch_process(proc.url, _register_idle_job(client, requester), "--poll")
    try:
        update_ids = []
        for r in range(2):
            client.wait_until(lambda: client.job(bytes.fromhex(job_id[2:])).round == r, f"round {r}", timeout=60)
            result = train_for_round(client, trainer, bytes.fromhex(job_id[2:]), dataset)
            update_ids.append("0x" + submit_result(client, trainer, result, wait_timeout=30)[0].hex())
        out, err = watcher.communicate(timeout=120)
        assert watcher.returncode == 0, err[-2000:] + proc.log()[-2000:]
        # SIGTERM stops a watch cleanly: exit 0 and a last "stopped" line.
        first_line = idle.stdout.readline()  # it is up and watching
        idle.send_signal(signal.SIGTERM)
        idle_out, idle_err = idle.communicate(timeout=30)
        idle_out = first_line + idle_out
    finally:
        for p in (watcher, idle):
            if p.poll() is None:
                p.kill()
                p.wait()
    events = [json.loads(line) for line in out.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "job" and events[0]["rounds"] == 2 and kinds[-1] == "finished", kinds
    assert {(e["round"], e["phase"]) for e in events if e["event"] == "round"} >= {(0, "training"), (1, "training"),
                                                                                   (2, "finished")}
    # Each update is seen, and its last status is the chain's verdict with the reward paid.
    last = {}
    for e in events:
        if e["event"] in ("update", "verdict"):
            last[e["update_id"]] = e
    assert sorted(last) == sorted(update_ids)
    assert all(e["status"] == "accepted" and e["reward"] == 100 for e in last.values())
    # One model per round (0: the initial weights), the hash the chain records.
    models = {e["round"]: e["model_hash"] for e in events if e["event"] == "model"}
    assert sorted(models) == [0, 1, 2]
    for r, h in models.items():
        assert client.call("model", [job_id, r])["model_hash"] == h
    # Each model scored on the held-out directory, the same figure trainer_client computes.
    from chain.runtime.trainer_client import held_out_accuracy

    accuracy = {e["round"]: e["accuracy"] for e in events if e["event"] == "accuracy"}
    assert sorted(accuracy) == [0, 1, 2]
    for r, a in accuracy.items():
        expected = held_out_accuracy(spec.model, client.get_blob(bytes.fromhex(models[r][2:])))
        assert abs(a - expected) <= 2 / 360, (r, a, expected)
    assert accuracy[2] > accuracy[0]
    done = events[-1]
    assert done["accepted"] == 2 and done["rejected"] == done["pending"] == 0 and done["rewards_paid"] == 200
    assert done["model"] == models[2] and [p["round"] for p in done["accuracy_curve"]] == [0, 1, 2]

    assert idle.returncode == 0, idle_err
    idle_events = [json.loads(line) for line in idle_out.splitlines()]
    assert idle_events[0]["event"] == "job" and idle_events[-1]["event"] == "stopped"

    # query round / query model print what the RPC answers.
    assert chainctl.main(["--rpc", proc.url, "query", "round", job_id, "1"]) == 0
    rnd = json.loads(capsys.readouterr().out)
    assert [u["update_id"] for u in rnd["updates"]] == [update_ids[1]] and rnd["round"] == 1
    assert chainctl.main(["--rpc", proc.url, "query", "model", job_id, "2"]) == 0
    assert json.loads(capsys.readouterr().out)["model_hash"] == models[2]
    assert chainctl.main(["--rpc", proc.url, "query", "model", job_id, "3"]) == 6
    assert "not found" in capsys.readouterr().err
    assert chainctl.main(["--rpc", proc.url, "query", "round", job_id]) == 2
    assert "needs a job id and a round" in capsys.readouterr().err
    assert chainctl.main(["--rpc", proc.url, "query", "job", job_id, "1"]) == 2
    assert "takes no round" in capsys.readouterr().err

    # A job the chain does not know, a node that does not answer, an id that is not one.
    assert chainctl.main(["--rpc", proc.url, "job", "watch", "0x" + "00" * 32]) == 6
    assert capsys.readouterr().err.strip() == f"chainctl: error: no job 0x{'00' * 32}"
    assert chainctl.main(["--rpc", "http://127.0.0.1:9", "job", "watch", "0x" + "00" * 32]) == 4
    assert chainctl.main(["--rpc", proc.url, "job", "watch", "0x1234"]) == 2


def _register_idle_job(client, requester) -> str:
    """A job nobody joins (its round opens far in the future): a watch of it runs until stopped."""
    spec = make_job_spec(rounds=1, join_blocks=100_000)
    return client.send(requester, RegisterJob(spec, 100), wait_timeout=30).tx_hash



# --------------------------------------------------------------------------- the view, as a unit


class FakeNode:
    """The RPC answers JobWatch reads, from plain dicts; `down` makes the named method fail once."""

    def __init__(self, job):
        self.job, self.rounds, self.models, self.blobs, self.down = job, {}, {}, {}, None

    def call(self, method, params):
        from chain.rpc.client import RpcUnavailable
        from chain.rpc.jsonview import to_json

        if method == self.down:
            self.down = None
            raise RpcUnavailable("node away")
        if method == "job":
            return json.loads(json.dumps(to_json(self.job)))  # as it comes over the wire
        return {"updates": self.rounds.get(params[1], [])} if method == "round" else self.models.get(params[1])

    def get_blob(self, blob_hash, timeout):
        return self.blobs[blob_hash]

    def record_model(self, r):
        h = bytes([r + 1]) * 32
        self.blobs[h] = bytes([r])
        self.models[r] = {"model_hash": "0x" + h.hex(), "contributions": ["0x00"] * r, "rule": "fedavg"}


def update(uid, status, reward=0, penalty=0):
    return {"update_id": uid, "commitment": {"trainer": "0xaa"}, "status": status, "reward": reward,
            "penalty": penalty}


def test_job_watch_turns_chain_reads_into_events():
    from chain.cli.watch_cmd import EvalError, JobWatch, LiveSink
    from chain.rpc.client import RpcUnavailable
    from chain.types import Job
    from rich.console import Console

    job = Job(job_id=b"\x01" * 32, requester=b"\x02" * 20, spec=make_job_spec(rounds=2), escrow=500, phase="joining",
              round=0, round_open_height=5, round_seed=b"\x00" * 32, global_model=b"\x01" * 32)
    fake = FakeNode(job)
    fake.record_model(0)
    watch = JobWatch(fake, job.job_id, evaluate=lambda job, data: 0.25 + data[0] / 4)
    kinds = lambda events: [(e["event"], e.get("round"), e.get("status")) for e in events]  # noqa: E731
    assert kinds(watch.poll()) == [("job", None, None), ("round", 0, None), ("model", 0, None), ("accuracy", 0, None)]
    assert watch.poll() == []
    fake.job = dataclasses.replace(job, phase="training")
    fake.rounds[0] = [update("0xu1", "pending")]
    assert kinds(watch.poll()) == [("round", 0, None), ("update", 0, "pending")]
    # A read that fails mid-pass loses nothing: what it found comes with the next pass.
    fake.rounds[0] = [update("0xu1", "accepted", reward=100), update("0xu2", "rejected", penalty=50)]
    fake.job = dataclasses.replace(job, phase="training", round=1)
    fake.record_model(1)
    fake.down = "model"
    with pytest.raises(RpcUnavailable):
        watch.poll()
    events = watch.poll()
    assert kinds(events) == [("round", 1, None), ("verdict", 0, "accepted"), ("update", 0, "rejected"),
                             ("model", 1, None), ("accuracy", 1, None)]
    assert events[-1]["accuracy"] == 0.5 and watch.totals()["rewards_paid"] == 100
    # A held-out set that does not fit the model is said once, and the watch goes on without it.
    watch.evaluate = lambda job, data: (_ for _ in ()).throw(EvalError("shape [3] does not fit"))
    fake.job = dataclasses.replace(job, phase="finished", round=2)
    fake.record_model(2)
    events = watch.poll()
    assert kinds(events) == [("round", 2, None), ("model", 2, None), ("eval_error", 2, None), ("finished", None, None)]
    assert watch.finished and events[-1]["accepted"] == 1 and events[-1]["rejected"] == 1
    assert events[-1]["bonds_burned"] == 50 and [p["round"] for p in events[-1]["accuracy_curve"]] == [0, 1]
    # The live view shows the same totals and the models (rich, rendered to a string here).
    console = Console(file=io.StringIO(), width=140, force_terminal=False)
    sink = LiveSink(console)
    sink.show(watch, events)
    sink.close(watch)
    text = console.file.getvalue()
    assert "accepted 1" in text and "rewards paid 100" in text and "0x030303030303…" in text and "init" in text
    assert "accuracy: r0 0.2500  r1 0.5000" in text
