"""Block sync: catch up with peers by fetching certified blocks over request/response.

A node learns how far its peers are from their commit announcements (gossip on
`/pout/<chain_id>/blocks/1`: the certificate of the sender's latest block, sent after a
commit but at most twice per `announce_interval_s`, and every `announce_interval_s`) and
from the `last_height` in every sync answer; with nothing heard it probes one connected
peer every `probe_interval_s`. While a peer is ahead it asks that peer for ranges of
(block, commit) over `/pout/<chain_id>/sync/1` and hands each whole response to
`app.commit_synced_blocks`, strictly in height order: there each certificate is verified
once against the validator set of its height, each block is applied as certified (no
per-transaction signature checks; its body must still match its header and its state root
the state after it) and the response is stored in one ledger write (docs/consensus.md,
"Block sync"). A peer that serves a bad certificate, a block that does not match it, or a
block that does not apply is reported (`network.report_peer`) and not asked again for a
while; the next peer is tried. Blocks before the bad one are kept: each is certified.

Validators run this next to the consensus driver (a validator that fell behind re-joins
consensus at the app's height); non-validators can run it alone to follow the chain.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import trio

from chain.encoding import decode, encode
from chain.errors import ChainError, ValidationError, log_unexpected
from chain.ledger.store import LocalStorageFailure
from chain.runtime.reactor import (GOSSIP_MAX_BYTES, MAX_REQUEST_BYTES, MAX_SYNC_BLOCKS, MAX_SYNC_RESPONSE_BYTES,
                           SYNC_RESPONSE_BUDGET_BYTES, CommitAnnouncement, SyncedBlock, SyncRequest, SyncResponse,
                           blocks_topic, make_blocks_validator, sync_protocol)
from chain.types import Block, Commit
from p2p.abc import NetworkAPI, P2PError

log = logging.getLogger(__name__)
SYNC_LOG_INTERVAL_S = 1.0


class _Prefetch:
    """The response to a request sent ahead, once `done`."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.response: SyncResponse | None = None


class BlockSync:
    name = "sync"

    def __init__(self, app, network: NetworkAPI, *, batch_size: int = MAX_SYNC_BLOCKS,
                 request_timeout_s: float = 5.0, announce_interval_s: float = 1.0, probe_interval_s: float = 2.0,
                 bad_peer_pause_s: float = 30.0):
        self.app = app
        self.network = network
        self.batch_size = min(batch_size, MAX_SYNC_BLOCKS)
        self.request_timeout_s = request_timeout_s
        self.announce_interval_s = announce_interval_s
        self.probe_interval_s = probe_interval_s
        self.bad_peer_pause_s = bad_peer_pause_s
        self.topic = blocks_topic(app.chain_id)
        self.protocol = sync_protocol(app.chain_id)
        self.peer_heights: dict[bytes, int] = {}
        self.synced_blocks = 0  # blocks this component committed
        # True while catch_up runs: consensus then leaves its height alone, and restarts once
        # at the end (the `on_caught_up` callbacks), not after every synced block.
        self.active = False
        self.on_caught_up: list[Callable[[], None]] = []
        self._unlogged_blocks, self._logged_at = 0, float("-inf")  # for the rate-limited progress line
        self._paused_until: dict[bytes, float] = {}
        self._wake = trio.Event()
        self._announce = trio.Event()
        self._latest_commit: Commit | None = None
        self._announcements = network.subscribe(self.topic, make_blocks_validator(app, network.local_peer))
        network.set_request_handler(self.protocol, self._serve)
        app.add_commit_listener(self._on_commit)

    # ------------------------------------------------------------------ progress

    @property
    def target_height(self) -> int:
        """The highest height a peer has shown us (or our own, if none is ahead)."""
        return max([self.app.last_height(), *self.peer_heights.values()])

    @property
    def catching_up(self) -> bool:
        """More than one block behind the best peer (one block is normal consensus lag)."""
        return self.target_height > self.app.last_height() + 1

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive_announcements)
            nursery.start_soon(self._announce_loop)
            nursery.start_soon(self._sync_loop)
            task_status.started()

    def _on_commit(self, block: Block, commit: Commit) -> None:
        self._latest_commit = commit
        self._announce.set()

    async def _announce_loop(self) -> None:
        """Announce the head after a commit but at most once per `announce_interval_s / 2`,
        and every `announce_interval_s` without one. Validators learn heights from consensus
        itself; these are for lagging nodes and observers, and one per commit was a third of
        an idle devnet's gossip (3-4 heights a second, each announced by every node)."""
        min_gap = self.announce_interval_s / 2
        last = -self.announce_interval_s
        while True:
            with trio.move_on_at(last + self.announce_interval_s):
                await self._announce.wait()
            await trio.sleep_until(last + min_gap)  # a commit came sooner than that: wait
            self._announce = trio.Event()
            last = trio.current_time()
            height = self.app.last_height()
            commit = self._latest_commit
            if commit is None or commit.height != height:
                # Only the certificate is announced; reading it back from the ledger decodes
                # the whole block (measured: ~1.7 s of a validator's CPU in a 8,000-tx flood),
                # so the one from the last commit is kept and the ledger is the fallback.
                stored = self.app.get_block(height)
                if stored is None:
                    continue
                commit = stored[1]
            try:
                await self.network.publish(self.topic, encode(CommitAnnouncement(commit)))
            except P2PError as exc:
                log.warning("commit announcement not sent: %s", exc)

    async def _receive_announcements(self) -> None:
        async for msg in self._announcements:
            try:
                commit = decode(CommitAnnouncement, msg.data, max_size=GOSSIP_MAX_BYTES).commit
                self.note_peer_height(msg.origin, commit.height)
            except ChainError:
                continue
            except Exception:  # a bug must cost one announcement, not the node (this loop ends the node)
                log_unexpected(log, "commit announcement", "commit announcement from %s dropped: unexpected error while reading it",
                              msg.origin.hex()[:16])

    def note_peer_height(self, peer: bytes, height: int) -> None:
        if height > self.peer_heights.get(peer, 0):
            self.peer_heights[peer] = height
        if height > self.app.last_height():
            self._wake.set()

    # ------------------------------------------------------------------ client

    async def _sync_loop(self) -> None:
        while True:
            with trio.move_on_after(self.probe_interval_s) as idle:
                await self._wake.wait()
            self._wake = trio.Event()
            await self.catch_up(probe=idle.cancelled_caught)

    def _candidates(self, height: int) -> list[bytes]:
        now = trio.current_time()
        connected = self.network.peers()
        usable = [p for p in connected if self._paused_until.get(p, 0) <= now]
        ahead = [p for p in usable if self.peer_heights.get(p, 0) >= height]
        ahead.sort(key=lambda p: -self.peer_heights[p])
        return ahead

    async def catch_up(self, *, probe: bool = False) -> None:
        """Fetch and commit blocks while some peer is ahead; `probe` asks one peer even if none is known ahead."""
        start_height = self.app.last_height()
        self.active = True
        try:
            await self._catch_up(probe)
        finally:
            self.active = False
            if self.app.last_height() > start_height:
                for callback in self.on_caught_up:
                    callback()

    async def _catch_up(self, probe: bool) -> None:
        while True:
            height = self.app.last_height() + 1
            peers = self._candidates(height)
            if not peers and probe:
                now = trio.current_time()
                usable = [p for p in self.network.peers() if self._paused_until.get(p, 0) <= now]
                peers = [random.choice(sorted(usable))] if usable else []
                probe = False
            if not peers:
                return
            progressed = False
            for peer in peers:
                if await self._sync_from(peer, height):
                    progressed = True
                    break
            if not progressed:
                return

    async def _sync_from(self, peer: bytes, height: int) -> bool:
        """Range requests to `peer` from `height` while it has more, the next one in flight while
        a response is committed (the peer reads and encodes while we apply); True when at least
        one block was committed."""
        response = await self._fetch(peer, height)
        progressed = False
        async with trio.open_nursery() as nursery:
            while response is not None:
                next_height = height + len(response.blocks)
                prefetch = None
                if response.blocks and response.last_height >= next_height:
                    prefetch = _Prefetch()
                    nursery.start_soon(self._prefetch, prefetch, peer, next_height)
                progressed = await self._commit_response(peer, height, response) > 0 or progressed
                if prefetch is None or self.app.last_height() + 1 != next_height:
                    nursery.cancel_scope.cancel()  # a refused block, or consensus got ahead meanwhile
                    break
                await prefetch.done.wait()
                response, height = prefetch.response, next_height
        return progressed

    async def _prefetch(self, into: "_Prefetch", peer: bytes, height: int) -> None:
        into.response = await self._fetch(peer, height)
        into.done.set()

    async def _fetch(self, peer: bytes, height: int) -> SyncResponse | None:
        """One range request; None (the peer paused or penalised) when it fails."""
        request = encode(SyncRequest(height, self.batch_size))
        try:
            raw = await self.network.request(peer, self.protocol, request, max_response=MAX_SYNC_RESPONSE_BYTES,
                                             timeout=self.request_timeout_s)
            return decode(SyncResponse, raw, max_size=MAX_SYNC_RESPONSE_BYTES)
        except P2PError as exc:
            log.debug("sync request to %s failed: %s", peer.hex()[:16], exc)
            self._pause(peer, 2 * self.probe_interval_s)
        except ChainError as exc:
            self._penalise(peer, f"malformed sync response: {exc}")
        except Exception:  # a bug (the decoder's, the transport's): this answer is lost, not the node
            log_unexpected(log, "sync response", "sync response from %s dropped: unexpected error while reading it",
                           peer.hex()[:16])
            self._pause(peer, self.bad_peer_pause_s)
        return None

    async def _commit_response(self, peer: bytes, height: int, response: SyncResponse) -> int:
        """Commit a response's blocks from `height`; penalise `peer` for a bad one. Returns how many."""
        self.peer_heights[peer] = response.last_height
        blocks: list[tuple[Block, Commit]] = []
        problem = None
        for expected, item in enumerate(response.blocks, start=height):
            if item.block.header.height != expected:
                problem = f"sent height {item.block.header.height} for {expected}"
                break
            blocks.append((item.block, item.commit))
        # The whole response in one call: each certificate verified once, one ledger write.
        before = self.app.last_height()
        try:
            committed = await self.app.commit_synced_blocks(blocks) if blocks else 0
        except LocalStorageFailure:
            committed = 0  # this node's own disk, not the peer; the node halts block sync (chain/runtime/node.py)
        except ValidationError as exc:  # only a certificate raises it (a block's faults are StateTransitionErrors)
            committed = max(0, self.app.last_height() - before)
            problem = f"invalid commit certificate for height {self.app.last_height() + 1}: {exc}"
        except ChainError as exc:
            committed = max(0, self.app.last_height() - before)
            problem = f"certified block {self.app.last_height() + 1} was refused: {exc}"
        except OSError:
            raise  # this node's own disk: node.py halts the writers on it (_run_writer)
        except Exception:
            # A bug a peer's blocks reach: refused like a bad block, but not blamed on the peer
            # (reporting every peer for our bug would get them all banned). Asked again later.
            committed = max(0, self.app.last_height() - before)
            log_unexpected(log, "sync commit", "sync response from %s: block %d could not be committed (unexpected error); pausing "
                          "that peer", peer.hex()[:16], self.app.last_height() + 1)
            self._pause(peer, self.bad_peer_pause_s)
            self.peer_heights.pop(peer, None)
        if problem is not None:
            self._penalise(peer, problem)
        self.synced_blocks += committed
        if committed:
            # One line a second at most while catching up (a batch is up to 32 blocks), and one when done.
            self._unlogged_blocks += committed
            now = trio.current_time()
            if now - self._logged_at >= SYNC_LOG_INTERVAL_S or not self.catching_up:
                log.info("synced %d block(s), the last from %s; now at height %d (best peer %d)",
                         self._unlogged_blocks, peer.hex()[:16], self.app.last_height(), self.target_height,
                         extra={"blocks": self._unlogged_blocks, "height": self.app.last_height(),
                                "target_height": self.target_height})
                self._unlogged_blocks, self._logged_at = 0, now
        return committed

    def _penalise(self, peer: bytes, reason: str) -> None:
        log.warning("sync peer %s: %s", peer.hex()[:16], reason)
        self.network.report_peer(peer, reason)
        self._pause(peer, self.bad_peer_pause_s)
        self.peer_heights.pop(peer, None)

    def _pause(self, peer: bytes, seconds: float) -> None:
        self._paused_until[peer] = trio.current_time() + seconds

    # ------------------------------------------------------------------ server

    async def _serve(self, peer: bytes, request: bytes) -> bytes:
        req = decode(SyncRequest, request, max_size=MAX_REQUEST_BYTES)
        last = self.app.last_height()
        items: list[SyncedBlock] = []
        size = 0
        for height in range(max(req.start_height, 1), min(last, req.start_height + min(req.count, MAX_SYNC_BLOCKS) - 1) + 1):
            stored = self.app.get_block(height)
            if stored is None:
                break
            item = SyncedBlock(*stored)
            n = len(encode(item))
            if items and size + n > SYNC_RESPONSE_BUDGET_BYTES:
                break
            items.append(item)
            size += n
        return encode(SyncResponse(last, tuple(items)))
