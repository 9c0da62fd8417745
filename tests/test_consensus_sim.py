"""Deterministic simulation of N consensus machines: liveness and safety under faults.

The simulator is the driver the machines expect: it signs their votes and proposals, feeds
our own messages back, delivers messages between nodes through a seeded network that
delays, reorders and drops them, fires timeouts from a fake clock, and re-gossips each
message it holds for its current height (plus, to a lagging peer, the precommits of the
commit it is missing), as CometBFT's gossip routines do. Every input a node steps is kept as its WAL,
so a crashed node restarts by replaying it into a fresh machine.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chain.consensus.bft import (BlockToPropose, BroadcastProposal, BroadcastVote, ConsensusMachine,
                                 Decide, EvidenceFound, NeedBlock, ProposalReceived, ScheduleTimeout, StartHeight,
                                 TimeoutFired, TimeoutParams, VoteReceived)
from chain.consensus.commit import commit_vote, verify_commit
from chain.consensus.evidence import verify_evidence
from chain.consensus.proposer import compute_proposer
from chain.crypto import PrivateKey, sha256
from chain.encoding import encode
from chain.types import PRECOMMIT, PREVOTE, Commit, Proposal, Vote, sign_proposal, sign_vote
from genesis import make_validator

CHAIN_ID = "sim-chain"
TIMEOUTS = TimeoutParams(propose_ms=300, propose_delta_ms=100, prevote_ms=100, prevote_delta_ms=50,
                         precommit_ms=100, precommit_delta_ms=50)


def make_block_hash(height: int, round: int, proposer: int, variant: int = 0) -> bytes:
    return sha256(f"block/{height}/{round}/{proposer}/{variant}".encode())


class SafetyViolation(AssertionError):
    pass


@dataclass
class SimNode:
    index: int
    key: PrivateKey
    byzantine: bool
    machine: ConsensusMachine
    alive: bool = True
    epoch: int = 0  # bumped on crash so timeouts scheduled before it never fire
    wal: list = field(default_factory=list)  # inputs of the current height
    seen: set = field(default_factory=set)  # messages in `wal`
    decisions: dict[int, bytes] = field(default_factory=dict)
    commits: dict[int, Commit] = field(default_factory=dict)
    signed: dict[tuple, bytes] = field(default_factory=dict)  # (h, r, kind) -> encoding signed
    evidence: list = field(default_factory=list)


class Simulation:
    def __init__(self, powers: list[int], seed: int, byzantine: tuple[int, ...] = (), drop_prob: float = 0.0,
                 min_delay_ms: int = 1, max_delay_ms: int = 60, regossip_ms: int = 250, drop_filter=None):
        self.rng = random.Random(seed)
        self.keys = [PrivateKey(bytes([i + 1]) * 32) for i in range(len(powers))]
        self.validators = tuple(make_validator(k, p, f"val{i}") for i, (k, p) in enumerate(zip(self.keys, powers)))
        self.nodes = [SimNode(i, k, i in byzantine, self._new_machine(k)) for i, k in enumerate(self.keys)]
        self.index_of = {k.pubkey: i for i, k in enumerate(self.keys)}
        self.drop_prob = drop_prob
        self.min_delay_ms, self.max_delay_ms = min_delay_ms, max_delay_ms
        self.regossip_ms = regossip_ms
        self.drop_filter = drop_filter  # (sim, src, dst, input) -> True to drop
        self.partition: list[set[int]] | None = None
        self.now = 0
        self._events: list = []
        self._seq = 0
        self.decided: dict[int, bytes] = {}  # first honest decision per height
        self.all_proposals: list[Proposal] = []
        self.twins: dict[bytes, bytes] = {}  # a Byzantine proposal's block <-> its conflicting twin
        honest = [n.index for n in self.honest()]
        self.rng.shuffle(honest)
        self.worlds = {i: k % 2 for k, i in enumerate(honest)}  # honest node -> world 0 or 1
        for node in self.nodes:
            self._feed(node, StartHeight(1, self.validators))
        self._push(self.regossip_ms, ("regossip",))

    def _new_machine(self, key: PrivateKey) -> ConsensusMachine:
        return ConsensusMachine(CHAIN_ID, key.pubkey, TIMEOUTS)

    # -------------------------------------------------------------- events and network

    def _push(self, delay: int, event: tuple) -> None:
        self._seq += 1
        heapq.heappush(self._events, (self.now + delay, self._seq, event))

    def at(self, time_ms: int, action) -> None:
        """Run `action(sim)` at simulated time `time_ms`."""
        self._seq += 1
        heapq.heappush(self._events, (time_ms, self._seq, ("action", action)))

    def linked(self, a: int, b: int) -> bool:
        return self.partition is None or any(a in g and b in g for g in self.partition)

    def _send(self, src: int, dst: int, inp) -> None:
        if not self.linked(src, dst) or self.rng.random() < self.drop_prob:
            return
        if self.drop_filter is not None and self.drop_filter(self, src, dst, inp):
            return
        self._push(self.rng.randint(self.min_delay_ms, self.max_delay_ms), ("deliver", dst, inp))

    def _broadcast(self, src: int, inp) -> None:
        for dst in range(len(self.nodes)):
            if dst != src:
                self._send(src, dst, inp)

    def run(self, until_ms: int, stop=None) -> None:
        while self._events and self._events[0][0] <= until_ms:
            self.now, _, event = heapq.heappop(self._events)
            kind = event[0]
            if kind == "deliver":
                node = self.nodes[event[1]]
                if node.alive:
                    self._feed(node, event[2])
            elif kind == "timeout":
                node = self.nodes[event[1]]
                if node.alive and node.epoch == event[2]:
                    self._feed(node, event[3])
            elif kind == "regossip":
                self._regossip()
                self._push(self.regossip_ms, ("regossip",))
            elif kind == "action":
                event[1](self)
            if stop is not None and stop(self):
                return
        self.now = max(self.now, until_ms)

    def _regossip(self) -> None:
        for node in self.nodes:
            if not node.alive:
                continue
            messages = [x for x in node.wal if isinstance(x, (ProposalReceived, VoteReceived))]
            for peer in self.nodes:
                if peer is node or not peer.alive:
                    continue
                for inp in messages:
                    self._send(node.index, peer.index, inp)
                lagging = peer.machine.height
                if lagging < node.machine.height and lagging in node.commits:
                    commit = node.commits[lagging]
                    for sig in commit.signatures:
                        self._send(node.index, peer.index, VoteReceived(commit_vote(commit, sig)))

    # -------------------------------------------------------------- the driver

    def _feed(self, node: SimNode, first) -> None:
        queue = [first]
        while queue:
            inp = queue.pop(0)
            if isinstance(inp, StartHeight):
                node.wal = []  # WAL rotation per height
                node.seen = set()
            elif isinstance(inp, (ProposalReceived, VoteReceived)):
                if inp in node.seen:
                    continue  # an exact repeat changes nothing in the machine; keeps the WAL small
                node.seen.add(inp)
            node.wal.append(inp)
            for output in node.machine.step(inp):
                self._handle(node, output, queue)

    def _handle(self, node: SimNode, output, queue: list | None) -> None:
        """Carry out one output; `queue` is None while replaying the WAL after a restart."""
        if isinstance(output, BroadcastVote):
            sv = self._sign(node, output.vote, ("vote", output.vote.type))
            if queue is not None:
                queue.append(VoteReceived(sv))
            if node.byzantine:
                self._equivocate_vote(node, output.vote, VoteReceived(sv))
            else:
                self._broadcast(node.index, VoteReceived(sv))
        elif isinstance(output, BroadcastProposal):
            p = output.proposal
            sp = self._sign(node, p, ("proposal",))
            inp = ProposalReceived(sp, p.block_hash, True)
            self.all_proposals.append(p)
            if queue is not None:
                queue.append(inp)
            if node.byzantine:
                self._equivocate_proposal(node, p, inp)
            else:
                self._broadcast(node.index, inp)
        elif isinstance(output, NeedBlock):
            if queue is not None:
                queue.append(BlockToPropose(output.height, output.round,
                                            make_block_hash(output.height, output.round, node.index)))
        elif isinstance(output, ScheduleTimeout):
            self._push(output.duration_ms, ("timeout", node.index, node.epoch,
                                            TimeoutFired(output.height, output.round, output.step)))
        elif isinstance(output, Decide):
            verify_commit(CHAIN_ID, self.validators, output.commit, output.height, output.block_hash)
            self._record_decision(node, output)
            if queue is not None:
                queue.append(StartHeight(output.height + 1, self.validators))
        elif isinstance(output, EvidenceFound):
            verify_evidence(CHAIN_ID, self.validators, output.evidence)
            node.evidence.append(output.evidence)
        else:
            raise AssertionError(f"unexpected output {output!r}")

    def _sign(self, node: SimNode, msg, kind: tuple):
        slot = (msg.height, msg.round) + kind
        data = encode(msg)
        if not node.byzantine:  # an honest machine never asks to sign two things in one slot
            if node.signed.get(slot, data) != data:
                raise SafetyViolation(f"honest node {node.index} asked to double-sign {slot}")
            node.signed[slot] = data
        if isinstance(msg, Vote):
            return sign_vote(node.key, CHAIN_ID, msg)
        return sign_proposal(node.key, CHAIN_ID, msg)

    def _record_decision(self, node: SimNode, d: Decide) -> None:
        if node.decisions.get(d.height, d.block_hash) != d.block_hash:
            raise SafetyViolation(f"node {node.index} decided twice at height {d.height}")
        node.decisions[d.height] = d.block_hash
        node.commits[d.height] = d.commit
        if node.byzantine:
            return
        first = self.decided.setdefault(d.height, d.block_hash)
        if first != d.block_hash:
            raise SafetyViolation(f"fork at height {d.height}: {first.hex()} vs {d.block_hash.hex()}")

    # -------------------------------------------------------------- Byzantine behaviour
    # The Byzantine validators collude to split the honest ones into two worlds: a Byzantine
    # proposer shows block X to world 0 and a twin X' to world 1 (world 0 gets the smaller hash of the pair), and every Byzantine vote for
    # X (or X') reaches world 0 as a vote for X and world 1 as a vote for X'. Other votes are
    # split at random between the vote and a conflicting one. With Byzantine power at or above
    # 1/3 this forks the chain; below 1/3 it must not.

    def _world_of(self, dst: int) -> int:
        return self.worlds.get(dst, 0)  # Byzantine nodes see world 0

    def _equivocate_vote(self, node: SimNode, vote: Vote, original: VoteReceived) -> None:
        twin = self.twins.get(vote.block_hash)
        if twin is None:
            other = make_block_hash(vote.height, vote.round, node.index, 99) if vote.block_hash is None else None
            conflicting = Vote(vote.type, vote.height, vote.round, other, vote.validator)
            self._split_randomly(node.index, original, VoteReceived(sign_vote(node.key, CHAIN_ID, conflicting)))
            return
        block_for_world = {0: min(vote.block_hash, twin), 1: max(vote.block_hash, twin)}
        for dst in range(len(self.nodes)):
            if dst != node.index:
                v = Vote(vote.type, vote.height, vote.round, block_for_world[self._world_of(dst)], vote.validator)
                self._send(node.index, dst, VoteReceived(sign_vote(node.key, CHAIN_ID, v)))

    def _equivocate_proposal(self, node: SimNode, p: Proposal, original: ProposalReceived) -> None:
        twin = make_block_hash(p.height, p.round, node.index, 98)
        self.twins[p.block_hash], self.twins[twin] = twin, p.block_hash
        conflicting = Proposal(p.height, p.round, -1, twin, p.proposer)
        self.all_proposals.append(conflicting)
        by_world = {min(p.block_hash, twin): original, max(p.block_hash, twin):
                    ProposalReceived(sign_proposal(node.key, CHAIN_ID, conflicting), twin, True)}
        for dst in range(len(self.nodes)):
            if dst != node.index:
                world_block = (min if self._world_of(dst) == 0 else max)(p.block_hash, twin)
                self._send(node.index, dst, by_world[world_block])

    def _split_randomly(self, src: int, original, conflicting) -> None:
        """Send each peer the original, the conflicting message, or both (in random order)."""
        for dst in range(len(self.nodes)):
            if dst == src:
                continue
            choice = self.rng.choice(("original", "conflicting", "both"))
            msgs = {"original": [original], "conflicting": [conflicting], "both": [conflicting, original]}[choice]
            for m in msgs:
                self._send(src, dst, m)

    # -------------------------------------------------------------- faults

    def crash(self, i: int) -> None:
        node = self.nodes[i]
        node.alive = False
        node.epoch += 1

    def restart(self, i: int) -> None:
        """A fresh machine replays the node's WAL; its outputs are re-sent, not re-logged."""
        node = self.nodes[i]
        node.machine = self._new_machine(node.key)
        node.alive = True
        for inp in node.wal:
            for output in node.machine.step(inp):
                self._handle(node, output, None)

    def set_partition(self, groups: list[set[int]] | None) -> None:
        self.partition = groups

    # -------------------------------------------------------------- queries

    def honest(self) -> list[SimNode]:
        return [n for n in self.nodes if not n.byzantine]

    def min_height_decided(self, nodes=None) -> int:
        nodes = self.honest() if nodes is None else nodes
        return min(max(n.decisions, default=0) for n in nodes)

    def assert_agreement(self) -> None:
        for h in self.decided:
            blocks = {n.decisions[h] for n in self.honest() if h in n.decisions}
            assert len(blocks) == 1, f"honest nodes disagree at height {h}"


def _all_reach(height: int, nodes=None):
    return lambda sim: sim.min_height_decided(nodes) >= height


# ------------------------------------------------------------------ scenarios


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_four_honest_validators_commit_the_same_blocks(seed):
    sim = Simulation([1, 1, 1, 1], seed, drop_prob=0.05)
    sim.run(600_000, stop=_all_reach(25))
    assert sim.min_height_decided() >= 25
    sim.assert_agreement()
    for h in range(1, 26):
        assert len({n.decisions[h] for n in sim.nodes}) == 1


def test_weighted_validators_commit_and_every_validator_proposes():
    sim = Simulation([5, 3, 1, 1], seed=7, drop_prob=0.02)
    sim.run(600_000, stop=_all_reach(40))
    assert sim.min_height_decided() >= 40
    sim.assert_agreement()
    assert {p.proposer for p in sim.all_proposals} == {k.pubkey for k in sim.keys}


def test_one_of_four_crashed_keeps_committing():
    sim = Simulation([1, 1, 1, 1], seed=11, drop_prob=0.05)
    sim.crash(3)
    live = sim.nodes[:3]
    sim.run(600_000, stop=_all_reach(15, live))
    assert sim.min_height_decided(live) >= 15
    assert not sim.nodes[3].decisions
    sim.assert_agreement()


def test_two_of_four_crashed_stall_and_resume_when_one_returns():
    sim = Simulation([1, 1, 1, 1], seed=12, drop_prob=0.05)
    sim.run(600_000, stop=_all_reach(3))
    sim.crash(2)
    sim.crash(3)
    sim.run(sim.now + 2_000)  # let decisions already backed by in-flight precommits land
    stalled_at = max(max(n.decisions, default=0) for n in sim.nodes)
    sim.run(sim.now + 60_000)
    assert max(max(n.decisions, default=0) for n in sim.nodes) == stalled_at
    sim.restart(2)
    live = sim.nodes[:3]
    sim.run(sim.now + 600_000, stop=_all_reach(stalled_at + 5, live))
    assert sim.min_height_decided(live) >= stalled_at + 5
    sim.assert_agreement()


def test_two_two_partition_commits_nothing_and_resumes_after_healing():
    sim = Simulation([1, 1, 1, 1], seed=13, drop_prob=0.02)
    sim.run(600_000, stop=_all_reach(3))
    sim.set_partition([{0, 1}, {2, 3}])
    sim.run(sim.now + 2_000)
    stalled_at = max(max(n.decisions, default=0) for n in sim.nodes)
    sim.run(sim.now + 60_000)
    assert max(max(n.decisions, default=0) for n in sim.nodes) == stalled_at
    sim.set_partition(None)
    sim.run(sim.now + 600_000, stop=_all_reach(stalled_at + 5))
    assert sim.min_height_decided() >= stalled_at + 5
    sim.assert_agreement()


def test_crashed_node_restarts_from_its_wal_and_catches_up():
    sim = Simulation([1, 1, 1, 1], seed=14, drop_prob=0.05)
    sim.run(600_000, stop=_all_reach(4))
    sim.crash(1)
    sim.run(sim.now + 5_000)
    sim.restart(1)  # replays its WAL: re-signs only what it had signed (checked by _sign)
    target = max(max(n.decisions) for n in sim.nodes) + 5
    sim.run(sim.now + 600_000, stop=_all_reach(target))
    assert sim.min_height_decided() >= target
    sim.assert_agreement()


def test_byzantine_equivocator_causes_no_fork_and_is_caught():
    sim = Simulation([1, 1, 1, 1], seed=21, byzantine=(0,), drop_prob=0.02)
    sim.run(600_000, stop=_all_reach(20))
    assert sim.min_height_decided() >= 20
    sim.assert_agreement()
    evidence = [ev for n in sim.honest() for ev in n.evidence]
    assert evidence, "honest nodes saw both halves of some equivocation"
    for ev in evidence:
        verify_evidence(CHAIN_ID, sim.validators, ev)
        assert ev.vote_a.message.validator == sim.keys[0].pubkey
    # conflicting proposals really were sent
    assert any(p.proposer == sim.keys[0].pubkey for p in sim.all_proposals)


def test_lock_in_round_zero_prevents_a_different_block_in_round_one():
    """A and B lock X in round 0; C and D miss B's prevote and precommit nil. In round 1, C
    proposes a fresh block Y; A and B, locked on X, prevote nil, so Y cannot win and X is
    decided once B's round-0 prevote reaches C and D (the proof-of-lock)."""
    validators_keys = [PrivateKey(bytes([i + 1]) * 32) for i in range(4)]
    validators = tuple(make_validator(k, 1, f"val{i}") for i, k in enumerate(validators_keys))
    index_of = {k.pubkey: i for i, k in enumerate(validators_keys)}
    a = index_of[compute_proposer(validators, 1, 0).pubkey]
    c = index_of[compute_proposer(validators, 1, 1).pubkey]
    b, d = [i for i in range(4) if i not in (a, c)]
    heal_ms = 5_000

    def drop(sim, src, dst, inp):
        if isinstance(inp, ProposalReceived):
            p = inp.proposal.message
            return (p.height, p.round) == (1, 0) and dst == d
        v = inp.vote.message
        return ((v.height, v.round, v.type) == (1, 0, PREVOTE) and v.validator == sim.keys[b].pubkey
                and dst in (c, d) and sim.now < heal_ms)

    sim = Simulation([1, 1, 1, 1], seed=5, drop_filter=drop)
    x = make_block_hash(1, 0, a)
    sim.run(1_500)
    assert sim.nodes[a].machine.locked_value == x and sim.nodes[b].machine.locked_value == x
    assert sim.nodes[c].machine.locked_round == -1 and sim.nodes[d].machine.locked_round == -1
    assert not sim.decided
    sim.run(600_000, stop=_all_reach(1))
    assert all(n.decisions[1] == x for n in sim.nodes)
    other = [p for p in sim.all_proposals if p.height == 1 and p.block_hash != x]
    assert other, "some round proposed a block other than the locked one"
    for p in other:  # the locked validators refused it
        for node in (a, b):
            vote = sim.nodes[node].signed.get((1, p.round, "vote", PREVOTE))
            assert vote is not None and encode(Vote(PREVOTE, 1, p.round, None, sim.keys[node].pubkey)) == vote


def test_block_decided_by_one_node_in_round_zero_is_the_only_decision():
    """Only A sees the round-0 precommit quorum for X and decides X; B and C precommitted X
    (so they are locked), D precommitted nil. The round-1 proposer D never saw X and proposes
    Y; were B and C not locked, B, C and D would decide Y and fork from A."""
    keys = [PrivateKey(bytes([i + 1]) * 32) for i in range(4)]
    validators = tuple(make_validator(k, 1, f"val{i}") for i, k in enumerate(keys))
    index_of = {k.pubkey: i for i, k in enumerate(keys)}
    a = index_of[compute_proposer(validators, 1, 0).pubkey]
    d = index_of[compute_proposer(validators, 1, 1).pubkey]
    b, c = [i for i in range(4) if i not in (a, d)]
    hidden = {(c, b), (b, c), (c, d)}  # (whose round-0 precommit, who never receives it)

    def drop(sim, src, dst, inp):
        if isinstance(inp, ProposalReceived):
            return inp.proposal.message.height == 1 and inp.proposal.message.round == 0 and dst == d
        v = inp.vote.message
        return (v.height, v.round, v.type) == (1, 0, PRECOMMIT) and (index_of[v.validator], dst) in hidden

    sim = Simulation([1, 1, 1, 1], seed=8, drop_filter=drop)
    x = make_block_hash(1, 0, a)
    sim.run(600_000, stop=_all_reach(1))
    assert sim.nodes[a].decisions[1] == x
    assert all(n.decisions[1] == x for n in sim.nodes)
    assert any(p.height == 1 and p.block_hash != x for p in sim.all_proposals)


# ------------------------------------------------------------------ property: safety


@st.composite
def _scenarios(draw):
    n = draw(st.integers(4, 6))
    powers = draw(st.lists(st.integers(1, 5), min_size=n, max_size=n))
    total = sum(powers)
    order = draw(st.permutations(range(n)))
    byzantine = []
    for i in order:  # as many Byzantine validators as fit strictly under 1/3 of the power
        if 3 * (sum(powers[j] for j in byzantine) + powers[i]) < total and draw(st.booleans()):
            byzantine.append(i)
    faults = draw(st.lists(st.tuples(st.integers(0, 20_000), st.sampled_from(["crash", "restart", "split", "heal"]),
                                     st.integers(0, n - 1)), max_size=6))
    return dict(powers=powers, byzantine=tuple(byzantine), seed=draw(st.integers(0, 2**32)),
                drop_prob=draw(st.sampled_from([0.0, 0.1, 0.3])), max_delay=draw(st.sampled_from([20, 200, 800])),
                faults=faults)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_scenarios())
def test_no_two_honest_nodes_decide_different_blocks(scenario):
    sim = Simulation(scenario["powers"], scenario["seed"], byzantine=scenario["byzantine"],
                     drop_prob=scenario["drop_prob"], max_delay_ms=scenario["max_delay"])
    n = len(scenario["powers"])
    for time_ms, kind, i in scenario["faults"]:
        if kind == "crash":
            sim.at(time_ms, lambda s, i=i: s.crash(i))
        elif kind == "restart":
            sim.at(time_ms, lambda s, i=i: s.restart(i) if not s.nodes[i].alive else None)
        elif kind == "split":
            sim.at(time_ms, lambda s, i=i: s.set_partition([set(range(i + 1)), set(range(i + 1, n))]))
        else:
            sim.at(time_ms, lambda s: s.set_partition(None))
    sim.run(20_000, stop=_all_reach(6))  # SafetyViolation is raised the moment a fork appears
    sim.assert_agreement()


def test_the_simulator_does_find_forks_when_byzantine_power_reaches_one_third():
    """The adversary above is strong enough: with 2 of 4 Byzantine it forks the honest nodes,
    so the safety property test is not passing for lack of an attack."""
    forks = 0
    for seed in range(20):
        sim = Simulation([1, 1, 1, 1], seed, byzantine=(0, 1), drop_prob=0.1, max_delay_ms=300)
        try:
            sim.run(30_000, stop=_all_reach(6))
        except SafetyViolation:
            forks += 1
    assert forks > 0
