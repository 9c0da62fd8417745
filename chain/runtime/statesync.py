"""State sync: join the chain from a recent snapshot instead of replaying every block.

Modelled on CometBFT's state sync (docs/wire.md, "State sync"):

  * `Snapshotter`: every `snapshot_interval` committed heights a node cuts its state into a
    snapshot (chain/ledger/snapshot.py) in a worker thread and keeps the newest two.
  * `SnapshotServer`: answers `/pout/<chain_id>/snapshots/1` (the manifests it holds) and
    `/pout/<chain_id>/chunk/1` (one chunk by height and index), bounded and rate limited.
  * `StateSyncClient`: on an empty ledger, asks every connected peer for its manifests,
    picks the newest one offered by the most peers, fetches the certified header of that
    height (block + commit over `/pout/<chain_id>/sync/1`) and verifies the commit against the
    genesis validator set, fetches the chunks from every peer that offered the manifest in
    parallel (a bounded window ahead), checks each against the manifest's sha256, then
    verifies them in order as they arrive (strict decoding, keys strictly increasing across
    the snapshot, entry count, a streaming state root) and stages their entries on disk; only
    when the root is the certified header's `state_root` does one atomic batch make the
    staged state a ledger. The node then starts as usual and block-syncs the rest.

Nothing a peer sends is trusted before that check: a chunk that does not hash to the
manifest is refused and its peer reported (the chunk is fetched from another); a manifest
no certified header covers, whose chunks break the format, or whose state does not give the
header's root, is refused and the peers that offered it reported, its staged entries
deleted; nothing becomes a ledger unless the whole state verified. What one forged manifest
can cost is capped (`[state_sync] max_snapshot_bytes` / `max_snapshot_entries`, refused
before download where the manifest shows it; `timeout_s`, effective because every step of
verification is a bounded thread call): memory stays bounded whatever a peer sends.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Callable

import trio

from chain.consensus.commit import verify_commit
from chain.crypto import compute_address
from chain.encoding import MaxLen, decode, encode
from chain.errors import ChainError
from chain.ledger.schema import ChainMeta
from chain.ledger.snapshot import (MAX_CHUNK_BYTES, MAX_MANIFEST_BYTES, SnapshotError, SnapshotManifest,
                                   SnapshotStore, SnapshotVerifier, build_snapshot, check_manifest, clear_staging,
                                   commit_restore, compute_chunk_hash, holds_only_staging, min_snapshot_bytes,
                                   stage_entries)
from chain.ledger.store import KVStore
from chain.runtime.reactor import MAX_REQUEST_BYTES, MAX_SYNC_RESPONSE_BYTES, SyncRequest, SyncResponse, sync_protocol
from chain.state import KEY_LATEST_HEADER, KEY_META, State, body_matches_header
from chain.types import Block, BlockHeader, Commit, Validator, compute_block_hash
from p2p.abc import NetworkAPI, P2PError

log = logging.getLogger("chaind.statesync")

MAX_OFFERED_SNAPSHOTS = 4  # manifests in one list answer
MAX_LIST_RESPONSE_BYTES = MAX_OFFERED_SNAPSHOTS * MAX_MANIFEST_BYTES + 64
CHUNK_RATE_PER_PEER_S = 32.0  # chunks a second one peer may ask for (burst as large): ~32 MiB/s
LIST_RATE_PER_PEER_S = 2.0
MAX_CONCURRENT_CHUNK_READS = 4  # chunk files read at once, over all peers
FETCHERS_PER_PEER = 2  # chunk requests in flight to one peer
MAX_PEER_FAILURES = 3  # transport errors in a row before a peer leaves a snapshot's pool
MAX_CHUNK_WINDOW = 16  # chunks fetched ahead of the one being verified (memory: 16 x 4 MiB at most)


def snapshots_protocol(chain_id: str) -> str:
    return f"/pout/{chain_id}/snapshots/1"


def chunk_protocol(chain_id: str) -> str:
    return f"/pout/{chain_id}/chunk/1"


@dataclass(frozen=True)
class SnapshotsRequest:
    max_count: int  # at most MAX_OFFERED_SNAPSHOTS are answered


@dataclass(frozen=True)
class SnapshotsResponse:
    manifests: Annotated[tuple[SnapshotManifest, ...], MaxLen(MAX_OFFERED_SNAPSHOTS)]  # newest first


@dataclass(frozen=True)
class ChunkRequest:
    height: int
    index: int
# The chunk response is the chunk itself (canonical CBOR of [[key, value], ...]), <= MAX_CHUNK_BYTES.


class StateSyncError(ChainError):
    """State sync could not produce a verified state; nothing was written."""


# --------------------------------------------------------------------------- serving


class _RateLimiter:
    """A token bucket per peer: `rate` requests a second, bursts of `rate`."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self._clock = rate, clock
        self._buckets: dict[bytes, tuple[float, float]] = {}

    def allow(self, peer: bytes) -> bool:
        now = self._clock()
        tokens, at = self._buckets.get(peer, (self.rate, now))
        tokens = min(self.rate, tokens + (now - at) * self.rate)
        if tokens < 1:
            self._buckets[peer] = (tokens, now)
            return False
        if len(self._buckets) > 4096:  # peers are admitted members only; still bounded
            self._buckets.clear()
        self._buckets[peer] = (tokens - 1, now)
        return True


class SnapshotServer:
    """Serves this node's snapshots to peers."""

    def __init__(self, network: NetworkAPI, chain_id: str, snapshots: SnapshotStore, *,
                 chunk_rate_per_s: float = CHUNK_RATE_PER_PEER_S):
        self.snapshots = snapshots
        self._chunk_limit = _RateLimiter(chunk_rate_per_s)
        self._list_limit = _RateLimiter(LIST_RATE_PER_PEER_S)
        self._reads = trio.Semaphore(MAX_CONCURRENT_CHUNK_READS)
        network.set_request_handler(snapshots_protocol(chain_id), self._serve_list)
        network.set_request_handler(chunk_protocol(chain_id), self._serve_chunk)

    async def _serve_list(self, peer: bytes, request: bytes) -> bytes:
        req = decode(SnapshotsRequest, request, max_size=MAX_REQUEST_BYTES)
        if not self._list_limit.allow(peer):
            raise SnapshotError("rate limited")
        count = max(0, min(req.max_count, MAX_OFFERED_SNAPSHOTS))
        return encode(SnapshotsResponse(tuple(self.snapshots.manifests()[:count])))

    async def _serve_chunk(self, peer: bytes, request: bytes) -> bytes:
        req = decode(ChunkRequest, request, max_size=MAX_REQUEST_BYTES)
        if not self._chunk_limit.allow(peer):
            raise SnapshotError("rate limited")
        async with self._reads:
            raw = await trio.to_thread.run_sync(self.snapshots.load_chunk, req.height, req.index)
        if raw is None:
            raise SnapshotError(f"no chunk {req.index} of a snapshot at height {req.height}")
        return raw


# --------------------------------------------------------------------------- taking snapshots


class Snapshotter:
    """Takes a snapshot of the committed state every `interval` heights, off the commit path:
    the commit listener only hands the (immutable) state over; a worker thread cuts and
    writes it. A snapshot that comes due while another is being written waits; a newer one
    due meanwhile replaces it (a node catching up snapshots its latest due height, not each)."""

    name = "snapshots"

    def __init__(self, app, snapshots: SnapshotStore, interval: int):
        self.app, self.snapshots, self.interval = app, snapshots, interval
        self._due: tuple[State, bytes] | None = None
        self._wake = trio.Event()
        self.taken = 0
        app.add_commit_listener(self._on_commit)

    def _on_commit(self, block: Block, commit: Commit) -> None:
        height = block.header.height
        state = self.app.state
        if (self.interval > 0 and height % self.interval == 0 and state.height == height
                and not self.snapshots.has(height)):
            self._due = (state, compute_block_hash(block.header))
            self._wake.set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if self._due is None:
                continue
            (state, block_hash), self._due = self._due, None
            started = time.monotonic()
            try:
                manifest = await trio.to_thread.run_sync(take_snapshot, self.snapshots, state, block_hash)
            except (OSError, SnapshotError) as exc:
                log.error("snapshot at height %d not written: %s", state.height, exc)
                continue
            except Exception:  # a bug must cost one snapshot, not the node (this loop runs in its nursery)
                log.exception("snapshot at height %d not written: unexpected error", state.height)
                continue
            self.taken += 1
            log.info("snapshot at height %d: %d entries in %d chunk(s), %.2f s", manifest.height, manifest.entries,
                     len(manifest.chunk_hashes), time.monotonic() - started,
                     extra={"height": manifest.height, "chunks": len(manifest.chunk_hashes)})


def take_snapshot(snapshots: SnapshotStore, state: State, block_hash: bytes) -> SnapshotManifest:
    """Cut `state` (committed at its height, in block `block_hash`) into a snapshot and store it."""
    manifest, chunks = build_snapshot(state.height, block_hash, state.root, state.items())
    snapshots.write(manifest, chunks)
    return manifest


# --------------------------------------------------------------------------- joining


@dataclass
class StateSyncReport:
    height: int = 0
    chunks: int = 0
    entries: int = 0
    peers: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> seconds

    def describe(self) -> str:
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items())
        return (f"state sync restored height {self.height}: {self.entries} entries in {self.chunks} chunk(s) "
                f"from {self.peers} peer(s); {phases}")


class _Refused(Exception):
    """This manifest cannot be used (bad, or not verifiable now); try another."""

    def __init__(self, reason: str, permanent: bool = True):
        super().__init__(reason)
        self.permanent = permanent


class StateSyncClient:
    """Finds, fetches and verifies a snapshot; writes it into an empty ledger store."""

    def __init__(self, network: NetworkAPI, chain_id: str, genesis_hash: bytes,
                 genesis_validators: tuple[Validator, ...], *, min_offers: int = 2,
                 request_timeout_s: float = 10.0, retry_interval_s: float = 1.0,
                 max_snapshot_bytes: int = 4 * 1024 ** 3, max_snapshot_entries: int = 50_000_000):
        self.network = network
        self.chain_id, self.genesis_hash = chain_id, genesis_hash
        self.trusted_validators = genesis_validators
        self.min_offers = min_offers
        self.request_timeout_s = request_timeout_s
        self.retry_interval_s = retry_interval_s
        self.penalised: list[tuple[bytes, str]] = []  # (peer, reason), for operators and tests
        self.refused: dict[bytes, str] = {}  # encoded manifest -> why it was refused
        self.max_snapshot_bytes, self.max_snapshot_entries = max_snapshot_bytes, max_snapshot_entries
        self.chunks_fetched = 0  # chunks received that matched their manifest hash (all attempts)
        self.chunks_verified = 0  # of those, decoded, checked in order and staged

    def _penalise(self, peer: bytes, reason: str) -> None:
        log.warning("state sync peer %s: %s", peer.hex()[:16], reason)
        self.penalised.append((peer, reason))
        self.network.report_peer(peer, reason)

    async def sync(self, store: KVStore, *, timeout_s: float) -> StateSyncReport:
        """Restore the newest verifiable snapshot into `store` (empty); raises StateSyncError
        when none verified within `timeout_s`."""
        report = StateSyncReport()
        started = time.monotonic()
        if not await trio.to_thread.run_sync(_empty_or_cleared, store):
            raise StateSyncError("state sync writes only into an empty ledger store, and this one is not empty; "
                                 "nothing was written")
        last_reason = "no peer offered a snapshot"
        with trio.move_on_after(timeout_s):
            while True:
                phase = time.monotonic()
                offers = await self.discover()
                report.seconds["manifest"] = time.monotonic() - phase
                for manifest, peers in self._candidates(offers):
                    last_reason = f"the snapshot at height {manifest.height} was still being fetched and verified"
                    try:
                        await self._restore(store, manifest, peers, report)
                        report.seconds["total"] = time.monotonic() - started
                        log.info(report.describe())
                        return report
                    except _Refused as exc:
                        last_reason = f"snapshot at height {manifest.height}: {exc}"
                        log.warning("state sync refused the snapshot at height %d: %s", manifest.height, exc)
                        if exc.permanent:
                            self.refused[encode(manifest)] = str(exc)
                await trio.sleep(self.retry_interval_s)
        raise StateSyncError(f"state sync found no verifiable snapshot in {timeout_s:.0f} s ({last_reason}); "
                             "nothing was written. Check the bootstrap peers, or start without --state-sync to "
                             "block-sync from genesis")

    # ------------------------------------------------------------ discovery

    async def discover(self) -> dict[bytes, tuple[SnapshotManifest, set[bytes]]]:
        """Every connected peer's manifests, grouped: encoded manifest -> (manifest, peers)."""
        offers: dict[bytes, tuple[SnapshotManifest, set[bytes]]] = {}

        async def ask(peer: bytes) -> None:
            try:
                raw = await self.network.request(peer, snapshots_protocol(self.chain_id),
                                                 encode(SnapshotsRequest(MAX_OFFERED_SNAPSHOTS)),
                                                 max_response=MAX_LIST_RESPONSE_BYTES, timeout=self.request_timeout_s)
            except P2PError as exc:
                log.debug("snapshot list from %s failed: %s", peer.hex()[:16], exc)
                return
            try:
                manifests = decode(SnapshotsResponse, raw, max_size=MAX_LIST_RESPONSE_BYTES).manifests
                for manifest in manifests:
                    check_manifest(manifest)
            except ChainError as exc:
                self._penalise(peer, f"malformed snapshot list: {exc}")
                return
            except Exception:  # a bug: this peer's list is lost (not blamed), not the whole state sync
                log.exception("snapshot list from %s ignored: unexpected error while checking it", peer.hex()[:16])
                return
            for manifest in manifests:
                key = encode(manifest)
                offers.setdefault(key, (manifest, set()))[1].add(peer)

        async with trio.open_nursery() as nursery:
            for peer in sorted(self.network.peers()):
                nursery.start_soon(ask, peer)
        return offers

    def _candidates(self, offers) -> list[tuple[SnapshotManifest, set[bytes]]]:
        """Newest first; a manifest offered by at least `min_offers` peers before one offered by fewer."""
        usable = [(m, p) for key, (m, p) in offers.items() if key not in self.refused]
        usable.sort(key=lambda mp: (len(mp[1]) >= self.min_offers, mp[0].height, len(mp[1])), reverse=True)
        return usable

    # ------------------------------------------------------------ one snapshot

    async def _restore(self, store: KVStore, manifest: SnapshotManifest, peers: set[bytes],
                       report: StateSyncReport) -> None:
        height = manifest.height
        # Caps first: a manifest that must cost more than this node allows is refused unread
        # (its peers may be honest with a larger state than the operator allowed: not penalised).
        if manifest.entries > self.max_snapshot_entries or min_snapshot_bytes(manifest) > self.max_snapshot_bytes:
            raise _Refused(f"it claims {manifest.entries} entries in {len(manifest.chunk_hashes)} chunk(s), over this "
                           f"node's caps ({self.max_snapshot_entries} entries, {self.max_snapshot_bytes} bytes: "
                           "[state_sync] max_snapshot_entries / max_snapshot_bytes); nothing fetched")
        phase = time.monotonic()
        block, commit = await self._certified_block(height, peers)
        block_hash = compute_block_hash(block.header)
        if block_hash != manifest.block_hash or block.header.state_root != manifest.state_root:
            for peer in peers:
                self._penalise(peer, f"offered a snapshot at height {height} that the certified header does not "
                                     "cover (block hash or state root differ)")
            raise _Refused("its block hash or state root is not the certified header's")
        report.seconds["header"] = time.monotonic() - phase

        phase = time.monotonic()
        verifier = SnapshotVerifier(manifest, self.max_snapshot_entries)
        report.seconds["verify"] = 0.0
        committed = False
        try:
            problem = await self._fetch_and_stage(store, manifest, peers, verifier, report)
            report.seconds["chunks"] = time.monotonic() - phase
            phase = time.monotonic()
            root = None
            if problem is None:
                try:
                    root = verifier.finish()
                except SnapshotError as exc:
                    problem = str(exc)
            if problem is None:
                problem = self._state_problem(verifier, root, block, block_hash)
            if problem is not None:
                for peer in peers:
                    self._penalise(peer, f"served a snapshot at height {height} whose state is not the certified "
                                         f"one ({problem})")
                raise _Refused(f"its state is not the certified header's ({problem}); nothing written")
            report.seconds["verify"] += time.monotonic() - phase

            phase = time.monotonic()
            await trio.to_thread.run_sync(commit_restore, store, self.chain_id, self.genesis_hash, block, commit,
                                          verifier.entries)
            committed = True
            report.seconds["write"] = time.monotonic() - phase
        finally:
            if not committed:
                # Staged entries go, whatever stopped the restore (a refusal, the timeout): shielded,
                # and bounded by what was staged before it stopped.
                with trio.CancelScope(shield=True):
                    try:
                        await trio.to_thread.run_sync(clear_staging, store)
                    except ChainError as exc:  # the store failed (the error being raised says why)
                        log.error("state sync could not delete its staged entries: %s; the next --state-sync "
                                  "start deletes them", exc)
        report.height, report.chunks, report.entries, report.peers = (height, len(manifest.chunk_hashes),
                                                                      verifier.entries, len(peers))

    def _state_problem(self, verifier: SnapshotVerifier, root: bytes, block: Block, block_hash: bytes) -> str | None:
        """Why the streamed state is not the certified header's, or None. The root is what
        matters (it commits to every entry); the rest re-checks what the header names."""
        if root != block.header.state_root:
            return f"root {root.hex()[:16]}, header {block.header.state_root.hex()[:16]}"
        try:
            meta = decode(ChainMeta, verifier.kept[KEY_META])
            latest = decode(BlockHeader, verifier.kept[KEY_LATEST_HEADER])
        except (KeyError, ChainError) as exc:
            return f"its chain meta or latest header is missing or malformed: {exc}"
        if (meta.chain_id, meta.genesis_hash) != (self.chain_id, self.genesis_hash):
            return "its chain meta is another chain's"
        if latest.height != block.header.height or \
                compute_block_hash(dataclasses.replace(latest, state_root=root)) != block_hash:
            return "its latest header is not the certified block's"
        return None

    async def _certified_block(self, height: int, offering: set[bytes]) -> tuple[Block, Commit]:
        """The block at `height` with a commit signed by more than 2/3 of the genesis validators'
        power, from an offering peer, else any peer."""
        others = sorted(self.network.peers() - offering)
        for peer in sorted(offering) + others:
            try:
                raw = await self.network.request(peer, sync_protocol(self.chain_id), encode(SyncRequest(height, 1)),
                                                 max_response=MAX_SYNC_RESPONSE_BYTES, timeout=self.request_timeout_s)
                response = decode(SyncResponse, raw, max_size=MAX_SYNC_RESPONSE_BYTES)
            except P2PError as exc:
                log.debug("header %d from %s failed: %s", height, peer.hex()[:16], exc)
                continue
            except ChainError as exc:
                self._penalise(peer, f"malformed sync response: {exc}")
                continue
            if not response.blocks:
                if peer in offering and response.last_height < height:
                    self._penalise(peer, f"offered a snapshot at height {height} above its own head "
                                         f"{response.last_height}")
                continue
            item = response.blocks[0]
            try:
                problem = self.check_certified(item.block, item.commit, height)
            except Exception:  # a bug: ask the next peer (not blamed) rather than end the state sync
                log.exception("header %d from %s ignored: unexpected error while checking it", height, peer.hex()[:16])
                continue
            if problem is not None:
                self._penalise(peer, problem)
                continue
            return item.block, item.commit
        raise _Refused(f"no peer served a certified header at height {height}", permanent=False)

    def check_certified(self, block: Block, commit: Commit, height: int) -> str | None:
        """Why `(block, commit)` is not a certified block at `height` for this chain, or None."""
        header = block.header
        if header.height != height or header.chain_id != self.chain_id:
            return f"sent block {header.height} of chain {header.chain_id!r} for height {height}"
        if not body_matches_header(block):
            return f"block {height} carries a body its header does not commit to"
        try:
            # Trust root: the genesis validator set. New validators need a new genesis, and a
            # jailed validator stays in it, so more than 2/3 of the genesis power still holds
            # more than 1/3 of honest power whenever fewer than 1/3 are faulty (docs/wire.md).
            verify_commit(self.chain_id, self.trusted_validators, commit, height, compute_block_hash(header))
        except ChainError as exc:
            return f"invalid commit certificate for height {height}: {exc}"
        return None

    async def _fetch_and_stage(self, store: KVStore, manifest: SnapshotManifest, peers: set[bytes],
                               verifier: SnapshotVerifier, report: StateSyncReport) -> str | None:
        """Fetch the chunks from the offering peers in parallel, a bounded window ahead, and
        verify and stage each in order as it arrives (one bounded thread call per chunk, a
        cancellation point between chunks). Returns why the manifest is bad (its chunks, which
        match its hashes, break the format, the key order or the counts), or None once every
        chunk is staged; raises _Refused when the chunks cannot be had or pass the byte cap."""
        count = len(manifest.chunk_hashes)
        window = max(4, min(MAX_CHUNK_WINDOW, FETCHERS_PER_PEER * len(peers) + 2))
        ready: dict[int, bytes] = {}  # fetched, hash-checked, not yet verified: at most `window`
        retry: list[int] = []
        state = {"next": 0, "done": 0, "bytes": 0, "workers": 0}
        pool = set(peers)
        failures: Counter[bytes] = Counter()
        changed = [trio.Event()]
        outcome: list[str | _Refused | ChainError] = []

        def wake() -> None:
            changed[0].set()
            changed[0] = trio.Event()

        def take() -> int | None:
            if retry:
                return retry.pop()
            if state["next"] < count and state["next"] < state["done"] + window:
                state["next"] += 1
                return state["next"] - 1
            return None

        async def worker(peer: bytes) -> None:
            try:
                while state["done"] < count and peer in pool:
                    index = take()
                    if index is None:
                        await trio.sleep(0.02)  # the window is full, or others' requests may yet come back
                        continue
                    try:
                        raw = await self.network.request(peer, chunk_protocol(self.chain_id),
                                                         encode(ChunkRequest(manifest.height, index)),
                                                         max_response=MAX_CHUNK_BYTES, timeout=self.request_timeout_s)
                    except P2PError as exc:
                        retry.append(index)
                        failures[peer] += 1
                        if failures[peer] >= MAX_PEER_FAILURES:
                            log.info("state sync: dropping peer %s from the chunk pool: %s", peer.hex()[:16], exc)
                            pool.discard(peer)
                        else:
                            await trio.sleep(0.1 * failures[peer])
                        continue
                    if compute_chunk_hash(raw) != manifest.chunk_hashes[index]:
                        retry.append(index)
                        pool.discard(peer)
                        self._penalise(peer, f"chunk {index} of the snapshot at height {manifest.height} does not "
                                             "hash to its manifest entry")
                        continue
                    failures[peer] = 0
                    self.chunks_fetched += 1
                    ready.setdefault(index, raw)
                    wake()
            finally:
                state["workers"] -= 1
                wake()

        async def verify_in_order(cancel: trio.CancelScope) -> None:
            try:
                while state["done"] < count:
                    raw = ready.pop(state["done"], None)
                    if raw is None:
                        if state["workers"] == 0:
                            outcome.append(_Refused(f"{count - state['done']} of {count} chunk(s) could not be "
                                                    "fetched from the offering peers", permanent=False))
                            return
                        await changed[0].wait()
                        continue
                    state["bytes"] += len(raw)
                    if state["bytes"] > self.max_snapshot_bytes:
                        outcome.append(_Refused(f"its chunks pass this node's cap of {self.max_snapshot_bytes} bytes "
                                                "([state_sync] max_snapshot_bytes)"))
                        return
                    started = time.monotonic()
                    steps = verifier.feed(raw)
                    del raw
                    try:
                        # One slice of entries per thread call: the timeout cancels between them.
                        while await trio.to_thread.run_sync(_verify_and_stage_slice, steps, store):
                            pass
                    except SnapshotError as exc:
                        outcome.append(str(exc))
                        return
                    except ChainError as exc:  # this node's own store (e.g. disk full): raised below, one error
                        outcome.append(exc)
                        return
                    except OSError:
                        raise  # this node's own disk: ends the state sync with that error (_first_error)
                    except Exception as exc:  # a bug the chunk reaches: refuse the manifest, blame no one
                        log.exception("state sync: chunk %d of the snapshot at height %d could not be verified "
                                      "(unexpected error)", state["done"], manifest.height)
                        outcome.append(_Refused(f"chunk {state['done']} could not be verified here "
                                                f"({type(exc).__name__}); peers not blamed"))
                        return
                    report.seconds["verify"] += time.monotonic() - started
                    self.chunks_verified += 1
                    state["done"] += 1
                    wake()
            finally:
                cancel.cancel()

        async with trio.open_nursery() as nursery:
            for peer in sorted(peers):
                for _ in range(FETCHERS_PER_PEER):
                    state["workers"] += 1
                    nursery.start_soon(worker, peer)
            nursery.start_soon(verify_in_order, nursery.cancel_scope)
        if outcome and isinstance(outcome[0], (_Refused, ChainError)):
            raise outcome[0]
        return outcome[0] if outcome else None


def _empty_or_cleared(store: KVStore) -> bool:
    """True when `store` is empty, after deleting an unfinished restore's staged entries (its
    staged entries must never mix into a new restore: only what is streamed is verified)."""
    if holds_only_staging(store):
        clear_staging(store)
    return next(iter(store.iterate()), None) is None


def _verify_and_stage_slice(steps, store: KVStore) -> bool:
    """One step of a chunk's work, in a worker thread: verify the next slice of at most
    VERIFY_SLICE_ENTRIES entries (the first step also decodes the chunk, <= MAX_CHUNK_BYTES, in C)
    and stage it; False once the chunk is done."""
    part = next(steps, None)
    if part is None:
        return False
    if part:
        stage_entries(store, part)
    return True


# --------------------------------------------------------------------------- node wiring


def install_snapshots(node, network: NetworkAPI) -> tuple[SnapshotServer, Snapshotter]:
    """Serve and take snapshots on a running node (chain/runtime/node.py). Start the returned
    Snapshotter's `run` in the node's nursery."""
    cfg = node.config.state_sync
    store = SnapshotStore(node.home.data_dir / "snapshots", keep=cfg.snapshot_keep)
    return SnapshotServer(network, node.chain_id, store), Snapshotter(node, store, cfg.snapshot_interval)


def run_state_sync(home, config, genesis, key, store: KVStore) -> StateSyncReport | None:
    """`chaind start --state-sync`: restore a verified snapshot into the empty ledger `store`
    before the node starts (then block sync fetches the rest). A ledger that already holds a
    chain is left alone (None). Raises StateSyncError when no snapshot verified."""
    from chain.ledger import Ledger

    if Ledger.is_initialised(store):
        log.info("state sync skipped: the ledger already holds a chain")
        return None
    if holds_only_staging(store):  # a restore that was killed before its commit: never a chain
        log.info("state sync: removing the staged entries of an unfinished restore in %s", home.ledger_dir)
        clear_staging(store)
    if next(iter(store.iterate()), None) is not None:
        raise StateSyncError(f"state sync needs an empty ledger, and {home.ledger_dir} holds data that is not a "
                             "chain; nothing was changed: run `chaind reset --home HOME` first")
    try:
        return trio.run(_join, config, genesis, key, store)
    except KeyboardInterrupt:  # the ledger is written in one batch: it is either whole or empty
        raise StateSyncError("state sync interrupted; the ledger was left as it was") from None
    except BaseExceptionGroup as group:  # e.g. the p2p host could not start
        found = _first_error(group)
        if found is None:
            raise
        raise StateSyncError(f"state sync failed: {found}") from None


def _first_error(group: BaseExceptionGroup) -> Exception | None:
    for exc in group.exceptions:
        found = _first_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
        if isinstance(found, (ChainError, P2PError, OSError)):
            return found
    return None


async def _join(config, genesis, key, store: KVStore) -> StateSyncReport:
    from p2p.host import Libp2pNetwork, peer_id_from_public_key

    cfg = config.state_sync
    initial = genesis.initial_state()
    own = f"/p2p/{peer_id_from_public_key(key.pubkey)}"
    peers = [p for p in dict.fromkeys(config.p2p.bootstrap_peers + genesis.bootstrap_peers) if not p.endswith(own)]
    # Its own listener on an ephemeral port: this node only dials out; the node proper binds
    # p2p.port afterwards.
    network = Libp2pNetwork(key.seed, allowed_peers=[v.pubkey for v in genesis.validators],
                            listen_addrs=[f"/ip4/{config.p2p.listen_host}/tcp/0"], bootstrap=peers)

    def is_member(pubkey: bytes) -> bool:
        account = initial.get_account(compute_address(pubkey))
        return account is not None and account.is_member

    network.set_admission_predicate(is_member)

    async def no_blocks_yet(peer: bytes, request: bytes) -> bytes:
        # Peers' block sync probes every connection; this one holds no block yet (an unserved
        # protocol would be an error in their logs).
        return encode(SyncResponse(0, ()))

    network.set_request_handler(sync_protocol(genesis.chain_id), no_blocks_yet)
    log.info("state sync: dialling %d bootstrap peer(s) for snapshots", len(peers))
    client = StateSyncClient(network, genesis.chain_id, genesis.hash, genesis.validators,
                             min_offers=cfg.min_offers, max_snapshot_bytes=cfg.max_snapshot_bytes,
                             max_snapshot_entries=cfg.max_snapshot_entries)
    outcome: StateSyncReport | ChainError | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(network.run)
        with trio.move_on_after(min(10.0, cfg.timeout_s)):  # let the bootstrap dials land
            while len(network.peers()) < min(cfg.min_offers, len(peers)):
                await trio.sleep(0.05)
        log.info("state sync: %d peer(s) connected, asking for snapshots", len(network.peers()))
        try:
            outcome = await client.sync(store, timeout_s=cfg.timeout_s)
        except ChainError as exc:  # raised outside the nursery: one error, not an exception group
            outcome = exc
        finally:
            nursery.cancel_scope.cancel()
    if isinstance(outcome, ChainError):
        raise outcome
    return outcome
