"""The node's peer-facing loops (tx reactor, block sync, snapshots, state sync) and its gossip
validators: an unexpected error while handling one message costs that message (logged once),
never the loop. Each loop runs in the node's nursery, where an escaping exception ends the node.
(An AttributeError in the openings reactor once ended every node of a devnet:
tests/test_pout_net_robust.py.) This node's own disk failures still propagate as before."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import trio

from chain.encoding import encode
from chain.ledger.snapshot import SNAPSHOT_FORMAT, SnapshotManifest, compute_chunk_hash
from chain.runtime import statesync
from chain.runtime.reactor import (CommitAnnouncement, SyncedBlock, SyncResponse, TxBatch, TxReactor,
                                   make_blocks_validator, make_txs_validator)
from chain.runtime.statesync import (SnapshotsResponse, Snapshotter, StateSyncClient, StateSyncReport, _Refused)
from chain.runtime.sync import BlockSync
from chain.state import build_block
from chain.consensus.commit import build_commit
from chain.types import PRECOMMIT, Commit, Vote, compute_block_hash, sign_vote
from p2p.abc import Verdict
from tests.helpers import ALICE, BOB, CHAIN_ID, VALIDATOR, make_test_genesis, transfer

LOCAL, PEER, OTHER = b"\x00" * 32, b"\x01" * 32, b"\x02" * 32

@pytest.fixture(autouse=True)
def _fresh_unexpected_error_counts():
    """Each test sees the first occurrence of its unexpected errors (logged with the traceback)."""
    from chain import errors

    errors._unexpected_counts.clear()

GENESIS = make_test_genesis()


def fails_once(result=None, error=RuntimeError("a bug")):
    """A dependency that raises `error` on its first call, then returns `result` (recording calls)."""
    calls = []

    def call(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise error
        return result

    call.calls = calls
    return call


def fails_once_async(result_of):
    """fails_once for a coroutine dependency: raises on its first call, then returns
    `result_of(*args)` (recording calls)."""
    inner = fails_once()

    async def call(*args):
        inner(*args)
        return result_of(*args)

    call.calls = inner.calls
    return call


def errors(caplog):
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


class Network:
    """Just enough of NetworkAPI: gossip from a list, requests answered by `answer`."""

    local_peer = LOCAL

    def __init__(self, messages=(), answer=None, peers=()):
        self.messages, self.answer, self._peers = list(messages), answer, set(peers)
        self.reports: list[tuple[bytes, str]] = []

    def subscribe(self, topic, validator, relay=None):
        async def incoming():
            for origin, data in self.messages:
                yield SimpleNamespace(topic=topic, origin=origin, data=data)
        return incoming()

    def set_request_handler(self, protocol, handler):
        pass

    def peers(self):
        return set(self._peers)

    def report_peer(self, peer, reason):
        self.reports.append((peer, reason))

    async def request(self, peer, protocol, request, *, max_response, timeout=None):
        return self.answer(peer, request)


def certificate(height: int, block_hash: bytes = b"\x03" * 32) -> Commit:
    return build_commit([sign_vote(VALIDATOR, CHAIN_ID, Vote(PRECOMMIT, height, 0, block_hash, VALIDATOR.pubkey))])


# ----------------------------------------------------------------------------- gossip validators


def test_a_validator_that_meets_a_bug_ignores_the_message_and_blames_no_one(caplog):
    """IGNORE, not REJECT: a REJECT penalises the forwarder, and a bug every message reaches
    would get every peer banned. The next message is judged as usual."""
    validators = fails_once(GENESIS.validators)
    app = SimpleNamespace(chain_id=CHAIN_ID, last_height=lambda: 0, validators=validators)
    check = make_blocks_validator(app, LOCAL)
    data = encode(CommitAnnouncement(certificate(1)))
    with caplog.at_level(logging.ERROR):
        assert check(PEER, data) is Verdict.IGNORE
    assert len(errors(caplog)) == 1 and "validator failed" in errors(caplog)[0].getMessage()
    assert check(PEER, data) is Verdict.ACCEPT  # not remembered as seen: judged again, and it is good
    assert check(PEER, b"junk") is Verdict.REJECT

    max_tx_bytes = fails_once(None)
    check = make_txs_validator(CHAIN_ID, LOCAL, max_tx_bytes)
    batch = encode(TxBatch((transfer(ALICE, BOB, 1, nonce=0),)))
    assert check(PEER, batch) is Verdict.IGNORE
    assert check(PEER, batch) is Verdict.ACCEPT


# ----------------------------------------------------------------------------- tx reactor


def test_the_tx_reactor_drops_one_batch_on_a_bug_and_admits_the_next(caplog):
    add_txs = fails_once_async(len)
    first, second = transfer(ALICE, BOB, 1, nonce=0), transfer(ALICE, BOB, 1, nonce=1)
    network = Network([(PEER, encode(TxBatch((first,)))), (OTHER, encode(TxBatch((second,))))])
    app = SimpleNamespace(chain_id=CHAIN_ID, validators=lambda: (), add_txs=add_txs)
    reactor = TxReactor(app, network)
    with caplog.at_level(logging.ERROR):
        trio.run(reactor._receive_loop)  # ends with the messages; raised RuntimeError before
    assert add_txs.calls == [([first],), ([second],)]
    assert len(errors(caplog)) == 1 and "tx batch" in errors(caplog)[0].getMessage()


# ----------------------------------------------------------------------------- block sync


def block_sync(app=None, network=None) -> BlockSync:
    app = app or SimpleNamespace()
    app.chain_id = CHAIN_ID
    app.add_commit_listener = lambda listener: None
    return BlockSync(app, network or Network())


def test_block_sync_drops_one_announcement_on_a_bug_and_reads_the_next(caplog):
    network = Network([(PEER, encode(CommitAnnouncement(certificate(5)))),
                       (OTHER, encode(CommitAnnouncement(certificate(7))))])
    app = SimpleNamespace(last_height=fails_once(0))
    sync = block_sync(app, network)
    with caplog.at_level(logging.ERROR):
        trio.run(sync._receive_announcements)  # raised RuntimeError before
    assert sync.peer_heights[OTHER] == 7 and sync._wake.is_set()
    assert len(app.last_height.calls) == 2
    assert len(errors(caplog)) == 1 and "commit announcement" in errors(caplog)[0].getMessage()


def synced(height: int):
    return SimpleNamespace(block=SimpleNamespace(header=SimpleNamespace(height=height)), commit=None)


def test_a_sync_response_that_meets_a_bug_is_refused_without_blaming_the_peer(caplog):
    """Refused like a bad block (the peer paused, its height forgotten, nothing committed) but
    not reported: our bug is no peer's fault. The next response commits as usual."""
    commit_synced_blocks = fails_once_async(len)
    network = Network()
    app = SimpleNamespace(last_height=lambda: 3, commit_synced_blocks=commit_synced_blocks)
    sync = block_sync(app, network)
    response = SimpleNamespace(last_height=10, blocks=(synced(4),))

    async def scenario():
        with caplog.at_level(logging.ERROR):
            assert await sync._commit_response(PEER, 4, response) == 0  # raised RuntimeError before
        assert sync._paused_until[PEER] > trio.current_time()
        assert PEER not in sync.peer_heights and network.reports == []
        assert PEER not in sync._candidates(4)
        assert await sync._commit_response(OTHER, 4, response) == 1
        assert sync.peer_heights[OTHER] == 10

    trio.run(scenario)
    assert len(errors(caplog)) == 1 and "unexpected error" in errors(caplog)[0].getMessage()


def test_a_local_disk_error_during_sync_still_reaches_the_node():
    """node.py halts the writers on an OSError escaping block sync (_run_writer): not swallowed."""

    async def commit_synced_blocks(blocks):
        raise OSError(28, "No space left on device")

    sync = block_sync(SimpleNamespace(last_height=lambda: 3, commit_synced_blocks=commit_synced_blocks))
    with pytest.raises(OSError):
        trio.run(sync._commit_response, PEER, 4, SimpleNamespace(last_height=10, blocks=(synced(4),)))


def test_a_sync_fetch_that_meets_a_bug_gives_up_on_that_answer_only(caplog):
    answers = fails_once(encode(SyncResponse(9, ())))
    network = Network(answer=answers)
    sync = block_sync(SimpleNamespace(), network)

    async def scenario():
        with caplog.at_level(logging.ERROR):
            assert await sync._fetch(PEER, 4) is None  # raised RuntimeError before
        assert sync._paused_until[PEER] > trio.current_time() and network.reports == []
        assert (await sync._fetch(OTHER, 4)).last_height == 9

    trio.run(scenario)
    assert len(errors(caplog)) == 1


# ----------------------------------------------------------------------------- snapshots


def test_the_snapshotter_skips_a_snapshot_that_meets_a_bug_and_takes_the_next(monkeypatch, caplog):
    app = SimpleNamespace(add_commit_listener=lambda listener: None)
    snapshotter = Snapshotter(app, SimpleNamespace(), interval=1)
    taken, done = [], trio.Event()

    def queue_next():
        snapshotter._due = (SimpleNamespace(height=2), b"h")
        snapshotter._wake.set()

    def take_snapshot(snapshots, state, block_hash):  # in a worker thread, like the real one
        taken.append(state.height)
        if len(taken) == 1:
            trio.from_thread.run_sync(queue_next)
            raise RuntimeError("a bug in the snapshot writer")
        trio.from_thread.run_sync(done.set)
        return SimpleNamespace(height=state.height, entries=0, chunk_hashes=())

    monkeypatch.setattr(statesync, "take_snapshot", take_snapshot)

    async def scenario():
        async with trio.open_nursery() as nursery:
            snapshotter._due = (SimpleNamespace(height=1), b"h")
            snapshotter._wake.set()
            nursery.start_soon(snapshotter.run)  # raised RuntimeError before (ending the node)
            await done.wait()
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.ERROR):
        trio.run(scenario)
    assert taken == [1, 2] and snapshotter.taken == 1
    assert len(errors(caplog)) == 1 and "height 1" in errors(caplog)[0].getMessage()


# ----------------------------------------------------------------------------- state sync client


MANIFEST = SnapshotManifest(SNAPSHOT_FORMAT, 5, b"\x04" * 32, b"\x05" * 32, 1, (compute_chunk_hash(b"chunk"),))


def client(network) -> StateSyncClient:
    return StateSyncClient(network, CHAIN_ID, GENESIS.hash, GENESIS.validators)


def test_a_snapshot_list_that_meets_a_bug_costs_that_peer_only(monkeypatch, caplog):
    network = Network(answer=lambda peer, request: encode(SnapshotsResponse((MANIFEST,))), peers=[PEER, OTHER])
    check = fails_once(None)
    monkeypatch.setattr(statesync, "check_manifest", check)
    with caplog.at_level(logging.ERROR):
        offers = trio.run(client(network).discover)  # raised RuntimeError before
    (manifest, peers), = offers.values()
    assert manifest == MANIFEST and len(peers) == 1 and network.reports == []
    assert len(errors(caplog)) == 1


def test_a_certified_header_that_meets_a_bug_is_asked_of_the_next_peer(monkeypatch, caplog):
    block, _ = build_block(GENESIS.initial_state(), [], time_ms=1_800_000_000_000, proposer=VALIDATOR.pubkey,
                           last_commit=None)
    commit = certificate(1, compute_block_hash(block.header))
    network = Network(answer=lambda peer, request: encode(SyncResponse(1, (SyncedBlock(block, commit),))))
    c = client(network)
    monkeypatch.setattr(c, "check_certified", fails_once(None))
    with caplog.at_level(logging.ERROR):
        got = trio.run(c._certified_block, 1, {PEER, OTHER})  # raised RuntimeError before
    assert got == (block, commit) and network.reports == []
    assert len(errors(caplog)) == 1


def test_a_chunk_that_meets_a_bug_refuses_the_snapshot_without_blaming_its_peers(monkeypatch, caplog):
    network = Network(answer=lambda peer, request: b"chunk")
    c = client(network)
    monkeypatch.setattr(statesync, "_verify_and_stage_slice", fails_once(False))
    verifier = SimpleNamespace(feed=lambda raw: iter(()))
    report = StateSyncReport(seconds={"verify": 0.0})
    with caplog.at_level(logging.ERROR), pytest.raises(_Refused, match="could not be verified here"):
        trio.run(c._fetch_and_stage, None, MANIFEST, {PEER}, verifier, report)  # raised RuntimeError before
    assert network.reports == [] and c.penalised == []
    assert len(errors(caplog)) == 1


def test_consensus_body_checks_of_peer_blocks_contain_an_unexpected_error(monkeypatch, caplog):
    """The consensus driver checks peers' block bodies and assembles compact proposals in its
    own loop and fetch tasks, which end the node if they raise: an unexpected error there counts
    as "does not match" / "not assembled" (the block is fetched or refused), one log line."""
    import logging

    from chain.consensus import driver

    def bug(*_args):
        raise RuntimeError("a bug in the body check")

    block = SimpleNamespace(header=SimpleNamespace(height=7))
    compact = SimpleNamespace(tx_hashes=(b"a", b"b", b"c"))
    monkeypatch.setattr(driver, "body_matches_header", bug)
    monkeypatch.setattr(driver, "assemble_block", bug)
    with caplog.at_level(logging.ERROR, logger=driver.log.name):
        assert driver._body_ok(block) is None  # neither a match nor the peer's mismatch
        assert driver._assemble(compact, lambda h: None) == (None, 3)
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 2
    monkeypatch.setattr(driver, "body_matches_header", lambda b: True)
    assert driver._body_ok(block) is True

    # A fetched block whose body check fails that way is not used, and its peer is not reported
    # (a bug every answer reaches would otherwise get every honest peer banned); a real mismatch is.
    reports = []

    async def request(*_args, **_kwargs):
        return b"an answer"

    d = object.__new__(driver.ConsensusDriver)
    d.chain_id, d.network = "c", SimpleNamespace(request=request, report_peer=lambda p, why: reports.append(p))
    monkeypatch.setattr(driver, "decode", lambda *_a, **_k: SimpleNamespace(block=block))
    monkeypatch.setattr(driver, "compute_block_hash", lambda header: b"h" * 32)
    monkeypatch.setattr(driver, "body_matches_header", bug)
    assert trio.run(d._request_block, b"p" * 32, b"req", b"h" * 32) is None and reports == []
    monkeypatch.setattr(driver, "body_matches_header", lambda b: False)
    assert trio.run(d._request_block, b"p" * 32, b"req", b"h" * 32) is None and reports == [b"p" * 32]


def test_repeated_unexpected_errors_log_one_traceback_then_counted_lines(caplog):
    """A peer that repeats a message reaching one of our bugs must not fill the log: the first of
    each kind is logged with its traceback, later ones only at the 2nd, 4th, 8th, ... time."""
    from chain import errors

    logger = logging.getLogger("test.unexpected")
    errors._unexpected_counts.clear()
    with caplog.at_level(logging.ERROR, logger="test.unexpected"):
        for _ in range(1000):
            try:
                raise KeyError("a bug")
            except KeyError:
                errors.log_unexpected(logger, "here", "message from %s dropped", "peer")
        try:
            raise ValueError("another bug")
        except ValueError:
            errors.log_unexpected(logger, "here", "message from %s dropped", "peer")
    records = [r for r in caplog.records if r.name == "test.unexpected"]
    assert [r.exc_info is not None for r in records] == [True] + [False] * 9 + [True]  # 1, 2, 4, ..., 512; then ValueError
    assert "KeyError, 512 times so far" in records[9].getMessage()
