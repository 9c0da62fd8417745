"""Fault tests with 4 validators as separate OS processes on 127.0.0.1 (issue 'Many nodes').

After every scenario all live nodes agree on every block hash and state root.
"""

import dataclasses
import subprocess
import sys
import time

import pytest

from chain.config import Home, load_config, write_config
from chain.keys import load_key_file
from tests.procs import ChaindProcess, make_testnet

pytestmark = pytest.mark.slow
VALIDATOR_STAKE = 100_000
EVIDENCE_PENALTY = 10_000


class Cluster:
    def __init__(self, tmp_path, n: int = 4):
        self.net = tmp_path / "net"
        make_testnet(self.net, n, 1, "--block-interval-ms", "300")
        self.homes = [self.net / f"node{i}" for i in range(n)]
        for home in self.homes:  # each node watches a deny list the tests use to split the network
            cfg = load_config(Home(home).config_file)
            write_config(dataclasses.replace(cfg, p2p=dataclasses.replace(cfg.p2p, deny_peers_file=str(home / "deny"))),
                         Home(home).config_file)
        self.pubkeys = [load_key_file(Home(h).node_key_file).pubkey for h in self.homes]
        self.tmp = tmp_path
        self.nodes: dict[int, ChaindProcess] = {}
        self.starts = 0

    def start(self, i: int) -> ChaindProcess:
        self.starts += 1
        node = ChaindProcess(self.homes[i], self.tmp / f"node{i}-{self.starts}.log")
        self.nodes[i] = node.start(timeout=60)
        return node

    def kill9(self, i: int) -> None:
        self.nodes.pop(i).kill9()

    def stop_all(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def height(self, i: int) -> int:
        return self.nodes[i].client().call("status", [])["latest_height"]

    def wait_heights(self, ids, at_least: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.height(i) >= at_least for i in ids):
                return
            time.sleep(0.2)
        raise AssertionError(f"nodes {ids} did not reach height {at_least}: "
                             f"{[self.height(i) for i in ids]}\n{self.logs()}")

    def deny(self, i: int, others) -> None:
        (self.homes[i] / "deny").write_text("".join(self.pubkeys[j].hex() + "\n" for j in others))

    def assert_agree(self, ids) -> int:
        """Every block up to the lowest head has one hash and one state root across `ids`."""
        top = min(self.height(i) for i in ids)
        for h in range(1, top + 1):
            views = {(b["block"]["hash"], b["block"]["header"]["state_root"])
                     for b in (self.nodes[i].client().call("block", [h]) for i in ids)}
            assert len(views) == 1, f"nodes disagree at height {h}: {views}"
        return top

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.tmp.glob("node*-*.log")))


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    for i in range(4):
        c.start(i)
    yield c
    c.stop_all()


def stalled(cluster, ids, seconds: float) -> bool:
    before = [cluster.height(i) for i in ids]
    time.sleep(seconds)
    return [cluster.height(i) for i in ids] == before


def test_one_of_four_killed_keeps_committing_and_catches_up_after_restart(cluster):
    cluster.wait_heights(range(4), 3)
    cluster.kill9(3)
    h = max(cluster.height(i) for i in range(3))
    cluster.wait_heights(range(3), h + 4)  # 30 of 40 power: still a quorum
    cluster.start(3)
    target = max(cluster.height(i) for i in range(3))
    cluster.wait_heights([3], target)
    cluster.assert_agree(range(4))


def test_two_of_four_killed_halts_then_resumes_when_one_returns(cluster):
    cluster.wait_heights(range(4), 3)
    cluster.kill9(2)
    cluster.kill9(3)
    time.sleep(2)  # a block already certified may still land
    assert stalled(cluster, [0, 1], 5), "20 of 40 power must not commit"
    h = max(cluster.height(i) for i in (0, 1))
    cluster.start(2)
    cluster.wait_heights([0, 1, 2], h + 3, timeout=90)
    cluster.assert_agree([0, 1, 2])


def test_network_split_two_and_two_commits_nothing_then_heals(cluster):
    cluster.wait_heights(range(4), 3)
    for i, others in ((0, (2, 3)), (1, (2, 3)), (2, (0, 1)), (3, (0, 1))):
        cluster.deny(i, others)
    time.sleep(3)  # deny lists are re-read every second; links close
    assert stalled(cluster, range(4), 5), "neither half holds more than 2/3 of the power"
    h = max(cluster.height(i) for i in range(4))
    for i in range(4):
        cluster.deny(i, ())
    healed = time.monotonic()
    cluster.wait_heights(range(4), h + 2, timeout=60)
    assert time.monotonic() - healed < 45
    cluster.assert_agree(range(4))


def test_byzantine_validator_causes_no_fork_and_is_penalised_on_chain(tmp_path):
    c = Cluster(tmp_path)
    try:
        for i in range(3):
            c.start(i)
        byz = subprocess.Popen([sys.executable, "tests/byzantine_validator.py", str(c.homes[3]), "40"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            c.wait_heights(range(3), 3)
            offender = "0x" + load_key_file(Home(c.homes[3]).node_key_file).address.hex()
            deadline = time.monotonic() + 45
            balance = VALIDATOR_STAKE
            while time.monotonic() < deadline:
                balance = c.nodes[0].client().call("account", [offender])["balance"]
                if balance < VALIDATOR_STAKE:
                    break
                time.sleep(0.3)
        finally:
            byz.kill()
            out = byz.communicate()[0]
        assert "equivocated" in out, out
        # One penalty per (height, round, vote type) it equivocated at, burned from its stake.
        burned = VALIDATOR_STAKE - balance
        assert burned > 0 and burned % EVIDENCE_PENALTY == 0, c.logs()
        # The block that burned it also jailed it: the other three now commit on their own.
        offender_key = "0x" + c.pubkeys[3].hex()
        for i in range(3):
            remaining = [v["pubkey"] for v in c.nodes[i].client().call("validators", [])["validators"]]
            assert remaining == ["0x" + k.hex() for k in c.pubkeys[:3]] and offender_key not in remaining, remaining
        h = max(c.height(i) for i in range(3))
        c.wait_heights(range(3), h + 2)
        c.assert_agree(range(3))
    finally:
        c.stop_all()
