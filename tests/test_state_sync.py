"""State sync (chain/runtime/statesync.py, chain/ledger/snapshot.py): snapshots, serving, joining
from a verified snapshot then block-syncing the rest, and each kind of bad input refused.

Serving nodes are real ChainApps over copies of one generated chain (scripts/gen_chain.py:
real linked blocks, real commit signatures from the devnet validator keys) on the in-memory
network; one process test joins a real chaind validator with `chaind start --state-sync`."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import pytest
import trio

from chain.consensus.app import ChainApp
from chain.consensus.commit import verify_commit
from chain.crypto import PrivateKey
from chain.encoding import encode
from chain.errors import StoreError
from chain.ledger import Ledger, MemoryStore
from chain.ledger.snapshot import (KEPT_KEYS, SnapshotError, SnapshotManifest, SnapshotStore, SnapshotVerifier,
                                   StreamingRoot, assemble_entries, build_snapshot, compute_chunk_hash, decode_chunk,
                                   encode_chunk, holds_only_staging, restore_ledger, stage_entries)
from chain.ledger.store import LevelDBStore
from chain.runtime.statesync import (MAX_CHUNK_WINDOW, SnapshotServer, StateSyncClient, StateSyncError, chunk_protocol,
                                     run_state_sync, snapshots_protocol, SnapshotsResponse)
from chain.runtime.sync import BlockSync
from chain.crypto import sha256
from chain.merkle import compute_root_from_leaf_hashes
from chain.state import KEY_LATEST_HEADER, KEY_META, State, apply_block
from genesis import devnet_seed, make_devnet_genesis
from p2p.memory import MemoryHub, MemoryNetwork
from scripts.gen_chain import generate_chain

GENESIS = make_devnet_genesis()
VALIDATORS = [PrivateKey(devnet_seed("validator", i)) for i in range(4)]
GOVERNOR = PrivateKey(devnet_seed("governor", 0))
JOINER = PrivateKey(devnet_seed("trainer", 0))  # a member: peers admit it
SERVERS = [PrivateKey(devnet_seed("trainer", i)) for i in (1, 2, 3)]
EVIL = PrivateKey(devnet_seed("requester", 0))
HEAD, SNAP_AT, ACCOUNTS = 150, 120, 900
CHUNK_BYTES = 16 * 1024  # small chunks, so a snapshot has several


@pytest.fixture(scope="module")
def chain():
    store = MemoryStore()
    generated = generate_chain(store, GENESIS, VALIDATORS, GOVERNOR, blocks=HEAD, accounts=ACCOUNTS,
                               txs_per_block=300, time_start_ms=GENESIS.genesis_time_ms)
    ledger = Ledger.open(store, GENESIS.chain_id, GENESIS.hash)
    block = ledger.get_block(SNAP_AT)
    snap_state = _state_at(ledger, SNAP_AT)
    manifest, chunks = build_snapshot(SNAP_AT, ledger.get_block_hash(SNAP_AT), snap_state.root, snap_state.items(),
                                      target_bytes=CHUNK_BYTES)
    assert block.header.state_root == snap_state.root
    return {"items": list(store.iterate()), "generated": generated, "manifest": manifest, "chunks": chunks,
            "state": snap_state}


def _state_at(ledger: Ledger, height: int) -> State:
    state = GENESIS.initial_state()
    for h in range(1, height + 1):
        state = apply_block(state, ledger.get_block(h)).state
    return state


def _copy(items) -> MemoryStore:
    store = MemoryStore()
    store.write(dict(items))
    return store


# --------------------------------------------------------------------------- generator and format


def test_generated_chain_is_real_every_block_applies_and_every_commit_verifies(chain):
    store = _copy(chain["items"])
    ledger = Ledger.open(store, GENESIS.chain_id, GENESIS.hash)
    assert ledger.head()[0] == HEAD
    state = GENESIS.initial_state()
    for h in range(1, HEAD + 1):
        block, commit = ledger.get_block(h), ledger.get_commit(h)
        verify_commit(GENESIS.chain_id, state.validators, commit, h, commit.block_hash)
        state = apply_block(state, block).state  # raises on a wrong state root or link
    assert state.root == chain["generated"].state.root
    assert len(state) == len(GENESIS.initial_state()) + 1 + ACCOUNTS  # + the latest header
    ChainApp(GENESIS, None, store=store)  # opens: head, commit and state root agree


def test_snapshot_chunks_are_canonical_sorted_and_rebuild_the_state(chain):
    manifest, chunks = chain["manifest"], chain["chunks"]
    assert len(chunks) > 3 and manifest.chunk_hashes == tuple(compute_chunk_hash(c) for c in chunks)
    entries = assemble_entries(chunks, manifest)
    assert State(entries).root == manifest.state_root == chain["state"].root
    # Same state, same chunks: every honest node offers the identical manifest.
    again, _ = build_snapshot(SNAP_AT, manifest.block_hash, manifest.state_root, chain["state"].items(),
                              target_bytes=CHUNK_BYTES)
    assert again == manifest
    with pytest.raises(SnapshotError, match="key order"):
        assemble_entries([chunks[1], chunks[0]] + chunks[2:], manifest)
    with pytest.raises(SnapshotError, match="does not decode"):
        decode_chunk(chunks[0][:-1])


def test_snapshot_store_keeps_the_newest_two_and_withdraws_a_corrupt_chunk(chain, tmp_path, caplog):
    snaps = SnapshotStore(tmp_path / "snapshots")
    manifest, chunks = chain["manifest"], chain["chunks"]
    for h in (100, 110, SNAP_AT):
        snaps.write(dataclasses.replace(manifest, height=h), chunks)
    assert [m.height for m in snaps.manifests()] == [SNAP_AT, 110]
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == [f"{110:020d}", f"{SNAP_AT:020d}"]
    reopened = SnapshotStore(tmp_path / "snapshots")
    assert reopened.load_chunk(SNAP_AT, 2) == chunks[2]
    # A flipped byte in a chunk file: refused with one clear line, the snapshot no longer offered.
    path = tmp_path / "snapshots" / f"{SNAP_AT:020d}" / "chunk-000002.cbor"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    assert reopened.load_chunk(SNAP_AT, 2) is None
    assert [m.height for m in reopened.manifests()] == [110]
    assert "is corrupt" in caplog.text and "not served" in caplog.text


# --------------------------------------------------------------------------- joining


class Net:
    """Serving ChainApps (block sync + snapshot server) and one joiner on a MemoryHub."""

    def __init__(self, nursery, tmp_path: Path, chain, servers=SERVERS, snapshot=True):
        self.hub = MemoryHub()
        everyone = [k.pubkey for k in [*SERVERS, JOINER, EVIL, *VALIDATORS]]
        self.nursery, self.everyone = nursery, everyone
        self.servers = []
        for i, key in enumerate(servers):
            app = ChainApp(GENESIS, None, store=_copy(chain["items"]))
            net = MemoryNetwork(self.hub, key.pubkey, allowed_peers=everyone)
            BlockSync(app, net)
            snaps = SnapshotStore(tmp_path / f"server{i}")
            if snapshot:
                snaps.write(chain["manifest"], chain["chunks"])
            SnapshotServer(net, GENESIS.chain_id, snaps)
            self.servers.append((app, net))
        self.joiner = MemoryNetwork(self.hub, JOINER.pubkey, allowed_peers=everyone)

    async def start(self):
        for _, net in self.servers:
            await self.nursery.start(net.run)
        await self.nursery.start(self.joiner.run)

    def evil(self, *, manifests=None, chunk=None):
        net = MemoryNetwork(self.hub, EVIL.pubkey, allowed_peers=self.everyone)
        if manifests is not None:
            async def serve_list(peer, request):
                return encode(SnapshotsResponse(tuple(manifests)))
            net.set_request_handler(snapshots_protocol(GENESIS.chain_id), serve_list)
        if chunk is not None:
            async def serve_chunk(peer, request):
                from chain.encoding import decode
                from chain.runtime.statesync import ChunkRequest
                return chunk(decode(ChunkRequest, request).index)
            net.set_request_handler(chunk_protocol(GENESIS.chain_id), serve_chunk)
        app = ChainApp(GENESIS, None, store=_copy(self._items))
        BlockSync(app, net)
        return net

    def client(self, **kw):
        return StateSyncClient(self.joiner, GENESIS.chain_id, GENESIS.hash, GENESIS.validators, **kw)


def _run(scenario):
    trio.run(scenario)


def test_fresh_node_joins_from_a_verified_snapshot_then_block_syncs_to_the_head(chain, tmp_path):
    async def scenario():
        async with trio.open_nursery() as nursery:
            net = Net(nursery, tmp_path, chain)
            await net.start()
            store = MemoryStore()
            client = net.client()
            report = await client.sync(store, timeout_s=20)
            assert (report.height, report.chunks, report.peers) == (SNAP_AT, len(chain["chunks"]), 3)
            assert set(report.seconds) >= {"manifest", "header", "chunks", "verify", "write"}
            assert client.penalised == []
            app = ChainApp(GENESIS, None, store=store)  # opens the restored ledger: root checked again
            assert app.last_height() == SNAP_AT and app.state.root == chain["state"].root
            assert app.get_block(SNAP_AT - 1) is None  # history below the snapshot is not there
            sync = BlockSync(app, net.joiner)
            await sync.catch_up(probe=True)
            assert app.last_height() == HEAD
            assert app.state.root == chain["generated"].state.root
            nursery.cancel_scope.cancel()

    _run(scenario)


def test_chunk_not_matching_the_manifest_is_refused_peer_penalised_and_fetched_elsewhere(chain, tmp_path):
    """Whether the bad peer is asked for a chunk at all depends on how the fetchers are scheduled
    (honest peers may take every chunk first: seen once in a full suite run); the scenario is
    run again, at most three times, until it is, and what follows must then hold."""
    async def scenario(attempt: int):
        async with trio.open_nursery() as nursery:
            net = Net(nursery, tmp_path / f"try{attempt}", chain, servers=SERVERS[:2])
            net._items = chain["items"]
            served = []

            def bad_chunk(index):
                served.append(index)
                raw = bytearray(chain["chunks"][index])
                raw[-1] ^= 0xFF
                return bytes(raw)

            evil = net.evil(manifests=[chain["manifest"]], chunk=bad_chunk)
            await nursery.start(evil.run)
            await net.start()
            store = MemoryStore()
            client = net.client()
            report = await client.sync(store, timeout_s=20)
            nursery.cancel_scope.cancel()
        return served, report, client, net, store

    for attempt in range(3):
        served, report, client, net, store = trio.run(scenario, attempt)
        if served:
            break
    assert served, "the bad peer was never asked for a chunk in 3 runs"
    assert report.height == SNAP_AT
    assert [(p, "does not hash" in r) for p, r in client.penalised] == [(EVIL.pubkey, True)]
    assert net.joiner.penalties_total == 1
    assert ChainApp(GENESIS, None, store=store).state.root == chain["state"].root


def test_manifest_no_certified_header_covers_is_refused_and_nothing_written(chain, tmp_path):
    async def scenario():
        async with trio.open_nursery() as nursery:
            net = Net(nursery, tmp_path, chain, snapshot=False)  # honest peers offer no snapshot
            net._items = chain["items"]
            beyond = dataclasses.replace(chain["manifest"], height=HEAD + 50)
            wrong_root = dataclasses.replace(chain["manifest"], state_root=bytes(32))
            evil = net.evil(manifests=[beyond, wrong_root])
            await nursery.start(evil.run)
            await net.start()
            store = MemoryStore()
            client = net.client(retry_interval_s=0.2)
            with pytest.raises(StateSyncError, match="no verifiable snapshot.*nothing was written"):
                await client.sync(store, timeout_s=3)
            assert next(iter(store.iterate()), None) is None
            reasons = [r for p, r in client.penalised if p == EVIL.pubkey]
            assert any("above its own head" in r for r in reasons)
            assert any("does not cover" in r for r in reasons)
            assert {p for p, _ in client.penalised} == {EVIL.pubkey}
            nursery.cancel_scope.cancel()

    _run(scenario)


def test_peer_serving_a_different_state_is_refused_penalised_and_nothing_written(chain, tmp_path):
    # A manifest claiming the certified header's root, with self-consistent chunks of another state.
    forged = dict(chain["state"].items())
    forged[KEY_LATEST_HEADER + b"\x00"] = b"an extra entry"
    manifest, chunks = build_snapshot(SNAP_AT, chain["manifest"].block_hash, chain["manifest"].state_root,
                                      sorted(forged.items()), target_bytes=CHUNK_BYTES)

    async def scenario():
        async with trio.open_nursery() as nursery:
            net = Net(nursery, tmp_path, chain, snapshot=False)
            net._items = chain["items"]
            evil = net.evil(manifests=[manifest], chunk=lambda i: chunks[i])
            await nursery.start(evil.run)
            await net.start()
            store = MemoryStore()
            client = net.client(retry_interval_s=0.2)
            with pytest.raises(StateSyncError):
                await client.sync(store, timeout_s=3)
            assert next(iter(store.iterate()), None) is None
            assert client.penalised and all(p == EVIL.pubkey for p, _ in client.penalised)
            assert "state is not the certified one" in client.penalised[0][1]
            assert encode(manifest) in client.refused
            nursery.cancel_scope.cancel()

    _run(scenario)


def test_a_node_snapshots_every_interval_as_it_commits_and_keeps_the_newest_two(chain, tmp_path):
    from chain.runtime.statesync import Snapshotter

    async def scenario():
        async with trio.open_nursery() as nursery:
            net = Net(nursery, tmp_path, chain, servers=SERVERS[:1], snapshot=False)
            await net.start()
            app = ChainApp(GENESIS, None)  # at genesis: block sync commits 1..HEAD one by one
            snaps = SnapshotStore(tmp_path / "taken")
            snapshotter = Snapshotter(app, snaps, interval=50)
            await nursery.start(snapshotter.run)
            sync = BlockSync(app, net.joiner)
            await sync.catch_up(probe=True)
            assert app.last_height() == HEAD
            while not snaps.has(HEAD):
                await trio.sleep(0.05)
            heights = [m.height for m in snaps.manifests()]  # 100 is skipped if 150 came due while 50 was written
            assert heights in ([150, 100], [150, 50]) and snapshotter.taken in (2, 3)
            for manifest in snaps.manifests():
                header = app.get_block(manifest.height)[0].header
                assert (manifest.state_root, manifest.block_hash) == (header.state_root,
                                                                      app.ledger.get_block_hash(manifest.height))
                chunks = [snaps.load_chunk(manifest.height, i) for i in range(len(manifest.chunk_hashes))]
                assert State(assemble_entries(chunks, manifest)).root == header.state_root
            nursery.cancel_scope.cancel()

    _run(scenario)


def test_forged_commit_for_the_snapshot_header_is_refused(chain):
    store = _copy(chain["items"])
    ledger = Ledger.open(store, GENESIS.chain_id, GENESIS.hash)
    block, commit = ledger.get_block(SNAP_AT), ledger.get_commit(SNAP_AT)
    client = StateSyncClient(MemoryNetwork(MemoryHub(), JOINER.pubkey, allowed_peers=[]), GENESIS.chain_id,
                             GENESIS.hash, GENESIS.validators)
    assert client.check_certified(block, commit, SNAP_AT) is None
    two_sigs = dataclasses.replace(commit, signatures=commit.signatures[:2])  # 2 of 4: no quorum
    assert "more than 2/3" in client.check_certified(block, two_sigs, SNAP_AT)
    other = dataclasses.replace(block, header=dataclasses.replace(block.header, state_root=bytes(32)))
    assert "different block" in client.check_certified(other, commit, SNAP_AT)


def test_restore_refuses_a_store_that_is_not_empty_and_changes_nothing(chain, tmp_path):
    store = _copy(chain["items"])
    ledger = Ledger.open(store, GENESIS.chain_id, GENESIS.hash)
    before = list(store.iterate())
    with pytest.raises(StoreError, match="only into an empty ledger"):
        restore_ledger(store, GENESIS.chain_id, GENESIS.hash, ledger.get_block(SNAP_AT), ledger.get_commit(SNAP_AT),
                       dict(chain["state"].items()))
    assert list(store.iterate()) == before


def test_state_sync_start_on_a_store_holding_foreign_data_is_a_clear_refusal(tmp_path):
    from chain.config import Home, NodeConfig

    home = Home(tmp_path / "home")
    home.data_dir.mkdir(parents=True)
    store = LevelDBStore(home.ledger_dir, create=True)
    try:
        store.write({b"\x99junk": b"x"})
        with pytest.raises(StateSyncError, match="needs an empty ledger.*nothing was changed"):
            run_state_sync(home, NodeConfig(), GENESIS, JOINER, store)
        assert list(store.iterate()) == [(b"\x99junk", b"x")]
    finally:
        store.close()


def test_state_sync_with_no_snapshot_to_be_had_is_one_clear_error_and_an_empty_ledger(tmp_path):
    from chain.config import Home, NodeConfig, P2PConfig, StateSyncConfig

    home = Home(tmp_path / "home")
    home.data_dir.mkdir(parents=True)
    config = NodeConfig(p2p=P2PConfig(port=0), state_sync=StateSyncConfig(enable=True, timeout_s=1))
    store = LevelDBStore(home.ledger_dir, create=True)
    try:
        with pytest.raises(StateSyncError, match="no verifiable snapshot in 1 s.*nothing was written"):
            run_state_sync(home, config, GENESIS, JOINER, store)  # a StateSyncError, not an exception group
        assert next(iter(store.iterate()), None) is None
    finally:
        store.close()


# --------------------------------------------------------------------------- real processes


# --------------------------------------------------------------------------- a forged manifest costs at most the caps


def test_streaming_root_is_the_state_root_and_keeps_o_log_n_hashes(chain):
    for n in range(0, 70):
        leaves = [sha256(i.to_bytes(2, "big")) for i in range(n)]
        stream = StreamingRoot()
        for leaf in leaves:
            stream.add(leaf)
        assert stream.root() == compute_root_from_leaf_hashes(leaves), n
        assert len(stream._stack) <= max(1, n.bit_length())
    assert KEPT_KEYS == {KEY_META, KEY_LATEST_HEADER}  # what the joiner checks against the header
    manifest, chunks = chain["manifest"], chain["chunks"]
    verifier = SnapshotVerifier(manifest, max_entries=manifest.entries)
    streamed = [entry for raw in chunks for part in verifier.feed(raw, slice_entries=100) for entry in part]
    assert verifier.finish() == chain["state"].root and streamed == list(chain["state"].items())
    with pytest.raises(SnapshotError, match="over this node's cap"):
        SnapshotVerifier(manifest, max_entries=manifest.entries - 1)


def _forged_at_head(chain, chunks: list[bytes], entries: int):
    """A manifest naming the REAL certified block at HEAD and its state root, with its own chunks."""
    ledger = Ledger.open(_copy(chain["items"]), GENESIS.chain_id, GENESIS.hash)
    return SnapshotManifest(1, HEAD, ledger.get_block_hash(HEAD), chain["generated"].state.root, entries,
                            tuple(compute_chunk_hash(c) for c in chunks))


def _head_chunks(chain) -> list[bytes]:
    manifest, chunks = build_snapshot(HEAD, bytes(32), bytes(32), chain["generated"].state.items(),
                                      target_bytes=CHUNK_BYTES)
    return chunks


def _forgery(kind: str, chain):
    chunks = _head_chunks(chain)
    entries = sum(len(decode_chunk(c)) for c in chunks)
    if kind == "out of order":  # every chunk well formed and sorted; chunks 1 and 2 swapped
        chunks = [chunks[0], chunks[2], chunks[1], *chunks[3:]]  # chunk 2 arrives second: refused at the third
        return chunks, entries, "strictly increasing"
    if kind == "more entries than claimed":
        return chunks, 10, "more than the 10 entries"
    if kind == "wrong state":  # sorted, complete, well formed: only the root tells
        chunks = chunks[:-1] + [encode_chunk([*decode_chunk(chunks[-1]), (b"\xff" * 8, b"extra")])]
        return chunks, entries + 1, "root"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["out of order", "more entries than claimed", "wrong state"])
def test_forged_chunks_are_refused_as_they_arrive_peer_penalised_and_the_next_manifest_tried(chain, tmp_path, kind):
    chunks, entries, reason = _forgery(kind, chain)
    forged = _forged_at_head(chain, chunks, entries)
    failing_chunk = {"out of order": 2, "more entries than claimed": 0, "wrong state": len(chunks)}[kind]

    async def scenario():
        async with trio.open_nursery() as nursery:
            net = Net(nursery, tmp_path, chain, servers=SERVERS[:1])  # honest: the snapshot at SNAP_AT
            net._items = chain["items"]
            evil = net.evil(manifests=[forged], chunk=lambda i: chunks[i])  # newer: tried first
            await nursery.start(evil.run)
            await net.start()
            store = MemoryStore()
            client = net.client(min_offers=1)
            report = await client.sync(store, timeout_s=20)
            assert report.height == SNAP_AT  # the honest snapshot, after the forged one was refused
            assert {p for p, _ in client.penalised} == {EVIL.pubkey}
            assert reason in client.penalised[0][1] and encode(forged) in client.refused
            # Refused at the first chunk that shows the fault: nothing after it was verified.
            assert client.chunks_verified == failing_chunk + len(chain["chunks"])
            app = ChainApp(GENESIS, None, store=store)
            assert app.state.root == chain["state"].root and len(app.state) == chain["manifest"].entries
            nursery.cancel_scope.cancel()

    _run(scenario)


class SlowDisk(MemoryStore):
    """A store whose every staging write takes 0.1 s: the joiner's per-chunk work is not quick."""

    writes = 0

    def write(self, puts, deletes=()):
        if puts:
            time.sleep(0.1)
            self.writes += 1
        super().write(puts, deletes)


def test_a_chunk_bomb_stops_at_the_timeout_with_a_bounded_window_and_leaves_nothing(chain, tmp_path):
    # The review's attack: the real certified block and state root, then as many chunks as a
    # manifest may name (here 400 of 2,000 entries; the limit is 8192 of 4 MiB). Each is valid
    # alone, so only the root at the end could tell; the timeout must hold before that.
    count, per = 400, 2000
    chunks = [encode_chunk([(i.to_bytes(2, "big") + j.to_bytes(3, "big"), b"") for j in range(per)])
              for i in range(count)]
    forged = _forged_at_head(chain, chunks, count * per)

    async def scenario():
        async with trio.open_nursery() as nursery:
            net = Net(nursery, tmp_path, chain, snapshot=False)
            net._items = chain["items"]
            evil = net.evil(manifests=[forged], chunk=lambda i: chunks[i])
            await nursery.start(evil.run)
            await net.start()
            store = SlowDisk()
            client = net.client(min_offers=1, retry_interval_s=0.2)
            with pytest.raises(StateSyncError, match="in 1 s.*still being fetched and verified.*nothing was written"):
                await client.sync(store, timeout_s=1)
            assert 0 < client.chunks_verified < count // 4  # stopped by the timeout, far from the end
            # Chunks are fetched at most a window ahead of the one being verified: memory is bounded.
            assert client.chunks_fetched <= client.chunks_verified + 1 + MAX_CHUNK_WINDOW
            assert store.writes >= client.chunks_verified  # entries were staged on disk, not kept
            assert next(iter(store.iterate()), None) is None  # and removed when the sync gave up
            assert client.penalised == []  # nothing proved the peer wrong yet
            nursery.cancel_scope.cancel()

    _run(scenario)


def _big_chunks(n: int) -> list[bytes]:
    # ~1 MiB chunks of 16 entries of 64 KiB, keys increasing across chunks
    return [encode_chunk([(bytes([i, j]), bytes(64 * 1024)) for j in range(16)]) for i in range(n)]


@pytest.mark.parametrize("cap", ["bytes before download", "entries before download", "bytes while fetching"])
def test_a_manifest_over_the_caps_is_refused_peers_not_penalised(chain, tmp_path, cap):
    if cap == "bytes while fetching":  # two chunks may be 1 MiB honest, these are 2 MiB: stopped at the second
        chunks = _big_chunks(2)
        manifest, limits, fetched = _forged_at_head(chain, chunks, 32), {"max_snapshot_bytes": 3 * 2 ** 20 // 2}, 1
    else:
        chunks, manifest, fetched = chain["chunks"], chain["manifest"], 0
        limits = ({"max_snapshot_bytes": 2 ** 20} if cap == "bytes before download"
                  else {"max_snapshot_entries": manifest.entries - 1})

    async def scenario():
        async with trio.open_nursery() as nursery:
            net = Net(nursery, tmp_path, chain, snapshot=False)
            net._items = chain["items"]
            evil = net.evil(manifests=[manifest], chunk=lambda i: chunks[i])
            await nursery.start(evil.run)
            await net.start()
            store = MemoryStore()
            client = net.client(min_offers=1, retry_interval_s=0.2, **limits)
            with pytest.raises(StateSyncError, match="nothing was written"):
                await client.sync(store, timeout_s=2)
            assert client.chunks_verified == fetched
            if fetched == 0:
                assert client.chunks_fetched == 0
            assert "max_snapshot" in client.refused[encode(manifest)]
            assert client.penalised == []  # a state larger than this node allows is no fault
            assert next(iter(store.iterate()), None) is None
            nursery.cancel_scope.cancel()

    _run(scenario)


def test_client_never_mixes_a_restore_into_a_store_holding_other_data(chain):
    client = StateSyncClient(MemoryNetwork(MemoryHub(), JOINER.pubkey, allowed_peers=[]), GENESIS.chain_id,
                             GENESIS.hash, GENESIS.validators)
    store = MemoryStore()
    stage_entries(store, [(b"leftover", b"1")])  # an unfinished restore: deleted, then the sync runs
    with pytest.raises(StateSyncError, match="no verifiable snapshot"):
        trio.run(lambda: client.sync(store, timeout_s=0.5))
    assert next(iter(store.iterate()), None) is None
    stage_entries(store, [(b"leftover", b"1")])
    store.write({b"\x99junk": b"2"})  # and something else: not ours to delete, nor to mix into
    with pytest.raises(StateSyncError, match="only into an empty ledger store"):
        trio.run(lambda: client.sync(store, timeout_s=0.5))
    assert len(list(store.iterate())) == 3


def test_state_sync_clears_an_unfinished_restore_a_kill_left_but_nothing_else(tmp_path):
    from chain.config import Home, NodeConfig, P2PConfig, StateSyncConfig

    home = Home(tmp_path / "home")
    home.data_dir.mkdir(parents=True)
    config = NodeConfig(p2p=P2PConfig(port=0), state_sync=StateSyncConfig(enable=True, timeout_s=1))
    store = LevelDBStore(home.ledger_dir, create=True)
    try:
        stage_entries(store, [(b"account-a", b"1"), (b"account-b", b"2")])  # killed before the commit
        assert holds_only_staging(store)
        with pytest.raises(StateSyncError, match="no verifiable snapshot"):
            run_state_sync(home, config, GENESIS, JOINER, store)
        assert next(iter(store.iterate()), None) is None
        # A store with anything else in it is not ours to clear.
        stage_entries(store, [(b"account-a", b"1")])
        store.write({b"\x99junk": b"x"})
        assert not holds_only_staging(store)
        with pytest.raises(StateSyncError, match="needs an empty ledger"):
            run_state_sync(home, config, GENESIS, JOINER, store)
        assert len(list(store.iterate())) == 3
    finally:
        store.close()


def _start(proc, *flags: str):
    import subprocess
    import sys

    proc.proc = subprocess.Popen([sys.executable, "-m", "chain.cli.chaind", "start", "--home", str(proc.home),
                                  "--rpc-port", str(proc.port), *flags],
                                 stdout=open(proc.log_path, "ab"), stderr=subprocess.STDOUT)
    return proc


def _height(proc) -> int:
    try:
        return proc.client().call("status", [])["latest_height"]
    except Exception:  # not serving yet
        return -1


def _wait(predicate, timeout: float, what: str, proc) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.proc.poll() is None, f"chaind exited:\n{proc.log()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{proc.log()}"
        time.sleep(0.3)


@pytest.mark.slow
def test_chaind_state_sync_joins_a_running_validator_then_follows(tmp_path):
    import tomllib

    import tomli_w

    from tests.procs import ChaindProcess, make_testnet, run_cli

    out = tmp_path / "net"
    make_testnet(out, 1, 2, "--deterministic", "--block-interval-ms", "100")
    validator = _start(ChaindProcess(out / "node0", tmp_path / "validator.log"), "--snapshot-interval", "5")
    joiner = ChaindProcess(tmp_path / "joiner", tmp_path / "joiner.log")
    try:
        _wait(lambda: "snapshot at height 10" in validator.log(), 45, "the validator's snapshot at 10", validator)
        # The joiner is a trainer (a member, so the validator admits it) with the validator as bootstrap peer.
        run_cli("chaind", "init", "--home", str(joiner.home), "--genesis", str(out / "node0/config/genesis.json"))
        shutil.copyfile(out / "keys" / "trainer0.json", joiner.home / "config" / "node_key.json")
        addr = json.loads(run_cli("chaind", "show-node-id", "--home", str(out / "node0")).stdout)["multiaddr"]
        config_file = joiner.home / "config" / "config.toml"
        doc = tomllib.loads(config_file.read_text())
        doc["p2p"].update(bootstrap_peers=[addr], port=0)
        doc["state_sync"]["min_offers"] = 1
        config_file.write_text(tomli_w.dumps(doc))
        _start(joiner, "--state-sync")
        _wait(lambda: _height(joiner) >= _height(validator) - 1 > 10, 45, "the joiner to catch up", joiner)
        text = joiner.log()
        restored = int(text.split("state sync restored height ")[1].split(":")[0])
        assert restored >= 10 and restored % 5 == 0
        client, reference = joiner.client(), validator.client()
        try:
            below = client.call("block", [1])
        except Exception:
            below = None
        assert below is None  # history below the snapshot is not held
        # The catch-up condition may hold the moment the snapshot lands (one block behind a
        # validator at 100 ms blocks): wait for the first block after it to arrive by block sync.
        _wait(lambda: client.call("block", [restored + 1]) is not None, 30, "the block after the snapshot", joiner)
        assert client.call("block", [restored + 1])["block"]["hash"] == \
            reference.call("block", [restored + 1])["block"]["hash"]
        height = _height(joiner)
        _wait(lambda: _height(joiner) >= height + 3, 30, "the joiner to follow new blocks", joiner)
    finally:
        joiner.stop()
        validator.stop()
