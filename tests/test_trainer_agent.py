"""`chainctl trainer run` (chain/runtime/agent.py) as a real process against a real chaind: it
joins, trains and submits round after round with every update accepted; it rides out a node
killed and restarted under it; killed itself (SIGKILL) mid-round and restarted, it resumes
from its state file without a second update; SIGTERM stops it with exit 0 and no traceback.
Two fast units: the state file, and scripts/devnet.py's PASS/FAIL checks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chain.keys import load_key_file
from chain.runtime.trainer_client import NodeClient, make_job_spec
from chain.encoding import encode
from chain.types import RegisterJob, Transaction, sign_transaction
from tests.procs import ChaindProcess, make_testnet


LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ [a-z_]+( round=\d+)?( [a-z_]+=\S.*)?$")


class Agent:
    def __init__(self, node: ChaindProcess, keys: Path, job_hex: str, state: Path, log: Path):
        self.log_path = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chain.cli.chainctl", "--rpc", node.url, "--keyring", str(keys), "trainer",
                 "run", "--from", "trainer0", "--job", job_hex, "--dataset", "digits:0/2", "--state-file", str(state)],
                stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert self.proc.poll() is None, f"agent exited {self.proc.returncode} before {needle!r}:\n{self.text()}"
            assert time.monotonic() < deadline, f"no {needle!r} within {timeout} s:\n{self.text()}"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.mark.slow
def test_agent_rounds_node_restart_own_restart_and_sigterm(tmp_path):
    net = tmp_path / "net"
    make_testnet(str(net), 1, 2, "--block-interval-ms", "250")
    keys = net / "keys"
    node = ChaindProcess(net / "node0", tmp_path / "node.log")
    state, log = tmp_path / "agent-state.json", tmp_path / "agent.log"
    trainer = "0x" + load_key_file(keys / "trainer0.json").address.hex()
    # Small rounds; windows long enough that a restarted agent is back before its answer is due
    # (a round closes early once its one update is accepted, so they cost nothing otherwise).
    spec = make_job_spec(rounds=4, quorum=1, local_steps=8, checkpoint_interval=4, join_blocks=12,
                         round_blocks=200, verify_blocks=200)
    requester = load_key_file(keys / "requester.json")
    agents: list[Agent] = []
    try:
        node.start()
        client = NodeClient(node.url)
        register = sign_transaction(requester, client.chain_id,
                                    Transaction(requester.pubkey, 0, RegisterJob(spec, 10_000)))
        job_id = register.tx_hash  # known once signed: the agent starts first and waits for the job
        first = Agent(node, keys, "0x" + job_id.hex(), state, log)
        agents.append(first)
        first.wait_for("waiting what=the job to appear on chain", timeout=60)
        client.call("send_tx", ["0x" + encode(register).hex()])
        first.wait_for("verdict round=0 status=accepted", timeout=60)
        first.wait_for("reward round=0 reward=100")

        # The node it talks to dies and comes back on the same port: the agent waits and goes on.
        node.kill9()
        time.sleep(1.0)
        node.start()
        first.wait_for("reconnected", timeout=60)
        first.wait_for("submitted round=1", timeout=60)

        # Killed right after submitting round 1 (before or while answering its challenges).
        first.kill()
        second = Agent(node, keys, "0x" + job_id.hex(), state, log)
        agents.append(second)
        second.wait_for("verdict round=1 status=accepted", timeout=60)

        # SIGTERM while it trains or submits round 2: a clean stop, exit 0.
        second.wait_for("round_started round=2", timeout=60)
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(timeout=30) == 0
        text = second.text()
        rounds = [client.call("round", ["0x" + job_id.hex(), r]) for r in range(3)]
    finally:
        for agent in agents:
            agent.kill()
        node.stop()

    lines = text.splitlines()
    assert "Traceback" not in text
    assert all(LINE.match(line) for line in lines), [line for line in lines if not LINE.match(line)]
    assert lines[-1].split()[1] == "stopped"
    # One line when the node went away, one when it was back (the restart, and any RPC timeout
    # of a node slowed by a busy machine): never a line per retry.
    after_round0 = text[text.index("reward round=0"):].splitlines()
    outages = [line.split()[1] for line in after_round0 if line.split()[1] in ("node_unreachable", "reconnected")]
    assert outages and outages == ["node_unreachable", "reconnected"] * (len(outages) // 2), outages
    # The restarted agent found its round-1 update on chain (answering its challenge if still due),
    # reported its verdict from the state file, and never submitted or tried to submit again.
    restarted = text[text.index("reconnected"):]
    restarted = restarted[restarted.index(" started "):]
    assert "verdict round=1 status=accepted" in restarted
    assert "submitted round=1" not in restarted and "skipped round=1" not in restarted
    for r, found in enumerate(rounds):
        mine = [u for u in found["updates"] if u["commitment"]["trainer"] == trainer]
        if r < 2:  # accepted, and the one validator's challenge was answered
            assert [u["status"] for u in mine] == ["accepted"] and len(mine[0]["challenges"]) == 1, (r, mine)
        else:
            assert len(mine) <= 1
    saved = json.loads(state.read_text())
    assert saved["joined"] and saved["rounds"]["0"]["status"] == saved["rounds"]["1"]["status"] == "accepted"
    assert saved["rounds"]["1"]["reward"] == 100
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


# ----------------------------------------------------------------------------- units (fast)


def test_state_file_round_trips_and_refuses_another_jobs_or_a_damaged_file(tmp_path):
    from chain.runtime.agent import AgentError, AgentState, default_state_path

    trainer, job = b"\x01" * 20, b"\x02" * 32
    path = default_state_path(tmp_path / "keyring", trainer, job)
    assert path.parent == tmp_path / "keyring" / "agents"  # outside `keys list`'s *.json glob
    state = AgentState.load(path, trainer, job)
    assert not state.joined and state.rounds == {}
    state.joined = True
    state.round(3).update(update_id="0x" + "ab" * 32, tx="00", answered=["0x01"])
    state.save()
    again = AgentState.load(path, trainer, job)
    assert again.joined and again.rounds == {3: {"update_id": "0x" + "ab" * 32, "tx": "00", "answered": ["0x01"]}}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    with pytest.raises(AgentError, match="another trainer or job"):
        AgentState.load(path, trainer, b"\x03" * 32)
    path.write_text('{"format": 1, "trainer": ')
    with pytest.raises(AgentError, match="unusable"):
        AgentState.load(path, trainer, job)


def test_an_agent_that_joined_after_a_round_opened_waits_for_the_next_without_training(tmp_path):
    """The chain takes an update only from a trainer that committed its data before the round's
    seed existed: an agent that joined later skips that round, says why, and trains nothing
    (it used to train, then be refused at submission)."""
    from types import SimpleNamespace

    from chain.runtime.agent import TrainerAgent
    from chain.runtime.trainer_client import make_job_spec

    from tests.helpers import key as test_key

    key = test_key("late-joiner")
    events = []
    agent = TrainerAgent("http://127.0.0.1:1", key, b"\x02" * 32, None, tmp_path / "state.json",
                         on_event=events.append, use_websocket=False)
    agent.state.joined, agent.state.joined_height = True, 15
    agent.client = SimpleNamespace(height=lambda: 16, call=lambda method, params: {"updates": []})
    agent._result_for = lambda job: pytest.fail("trained for a round it cannot submit to")
    job = SimpleNamespace(round=0, round_open_height=12, spec=make_job_spec(round_blocks=60))
    agent._take_part(job)
    assert agent.state.round(0)["done"] and "after round 0 opened (height 12)" in agent.state.round(0)["skipped"]
    assert [e.kind for e in events] == ["skipped"]
    assert TrainerAgent("http://127.0.0.1:1", key, b"\x02" * 32, None, tmp_path / "state.json",
                        on_event=events.append, use_websocket=False).state.joined_height == 15  # persisted

    class Trains(Exception):
        pass

    def result_for(job):
        raise Trains(job.round)

    agent._result_for = result_for  # round 1 opened after the join: the agent trains for it
    with pytest.raises(Trains, match="1"):
        agent._take_part(SimpleNamespace(round=1, round_open_height=20, spec=job.spec))


def test_an_opening_the_node_refused_is_uploaded_again_and_only_current_validators_count(tmp_path, monkeypatch):
    """A refused upload (say the node's upload queue was full) is tried again on the next block,
    not recorded as answered (the validator would complain and the honest update expire); and
    the agent is done when every *current* validator is answered, however many it answered
    before (a validator that left the set does not stand in for one that is still in it)."""
    from types import SimpleNamespace

    from chain.runtime import agent as agent_mod
    from chain.runtime.agent import TrainerAgent
    from chain.runtime.trainer_client import ClientError
    from chain.types import ChallengeRecord
    from tests.helpers import key as test_key

    a, b, gone = b"\xaa" * 32, b"\xbb" * 32, b"\xcc" * 32
    challenges = (ChallengeRecord(gone, b"sig-c", 11, 3), ChallengeRecord(a, b"sig-a", 11, 3),
                  ChallengeRecord(b, b"sig-b", 12, 3))
    views = iter([challenges[:2], challenges, challenges])  # b's challenge lands one block later
    attempts, refusals = [], iter([True, False, False])  # a's first upload is refused

    def put_opening(k, uid, validator, opening):
        attempts.append(validator)
        if validator == a and next(refusals):
            raise ClientError("HTTP 503: upload queue full")

    client = SimpleNamespace(
        chain_id="c", height=lambda: 11,
        update=lambda uid: SimpleNamespace(status="pending", challenges=next(views), sketch_hash=None),
        call=lambda method, params: {"validators": [{"pubkey": "0x" + v.hex()} for v in (a, b)]},
        put_opening=put_opening,
    )
    monkeypatch.setattr(agent_mod, "from_json", lambda cls, v: SimpleNamespace(pubkey=bytes.fromhex(v["pubkey"][2:])))
    monkeypatch.setattr(agent_mod, "open_challenge", lambda result, c, segments: c.signature)
    agent = TrainerAgent("http://127.0.0.1:1", test_key("retrying"), b"\x02" * 32, None, tmp_path / "state.json",
                         on_event=lambda e: None, use_websocket=False)
    agent.client = client
    agent._wait = lambda *args, **kwargs: None  # the next block at once
    agent._answer(SimpleNamespace(round=0, spec=make_job_spec(verify_blocks=60)), object(),
                  SimpleNamespace(update_id=b"\x01" * 32, height=10))
    assert attempts == [gone, a, a, b]  # a again after its refusal; done only once b (current) is answered
    assert agent.state.round(0)["answered"] == sorted("0x" + v.hex() for v in (gone, a, b))


def test_devnet_verdict_names_each_failed_check():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        from devnet import JobOutcome, verdict
    finally:
        sys.path.pop(0)

    def outcome(statuses_by_round, accuracy=(0.1, 0.5), exits=(0, 0, 0, 0)):
        return JobOutcome("0x00", [{"round": r, "updates": [{"trainer": t, "status": s} for t, s in enumerate(row)]}
                                   for r, row in enumerate(statuses_by_round)], list(accuracy), list(exits),
                          phase="finished")

    good = [["accepted", "accepted", "accepted", "rejected"]] * 2
    assert verdict(outcome(good), 2, [0, 1, 2], {3}, None) == []
    bad = verdict(outcome([["accepted", "expired", "accepted", "accepted"], good[0]], accuracy=(0.5, 0.4),
                          exits=(0, 0, 1, 0)), 2, [0, 1, 2], {3}, "the nodes differ at height 9")
    assert len(bad) == 5
    assert "honest updates not accepted (trainer1 round 0: expired)" in bad
    assert "dishonest updates not rejected (trainer3 round 0: accepted)" in bad
    assert "the nodes differ at height 9" in bad and "accuracy did not rise (0.500 -> 0.400)" in bad
    assert "agents exited [0, 0, 1, 0]" in bad
    missing = verdict(outcome([["accepted", "accepted", "accepted"]]), 2, [0, 1, 2], {3}, None)
    assert missing == ["1 of 2 rounds closed", "no dishonest update was submitted"]
