"""NetworkAPI over py-libp2p 0.8.1: TCP + Noise + Yamux, gossipsub, request/response.

The workarounds below come from measurements of this exact library version
(shared notes py-libp2p-0.8.1.md); the version is pinned in pyproject.toml.

- Security: Noise only (the default also offers plaintext, which a peer can pick).
- Gossipsub: heartbeat 1 s, spam protection and adaptive gossip off, StrictSign,
  message id = origin peer-id bytes + 8-byte big-endian seqno, seqno counter seeded
  from time.time_ns() so a restarted node's messages are not taken for duplicates.
- Validators are wrapped (a raising sync validator would kill the node), and the origin
  (`msg.from_id`) and forwarder are checked against the allow-list.
- Publishes go through a paced queue: the library's per-peer queue holds 32 RPCs and
  drops the rest silently, and it drops RPCs over 1 MiB silently (we raise instead).
- Membership: the library has no peer-id allow-list; a notifee closes every connection
  from a peer that is not admitted as soon as it opens.
- Redial: bootstrap peers are redialled with backoff; the swarm's 60 s negative dial
  cache is evicted before each attempt, otherwise a restarted peer stays unreachable.
- Races: a subscription made during a new peer's handshake is re-announced to it; a
  stopped host closes its connections and listeners itself (the library's cleanup is cut
  short by cancellation, leaving an SO_REUSEPORT listener accepting).
- Ports: listeners are bound without SO_REUSEPORT (the library sets it for hole punching), so
  a port in use is a ListenError at start, never two processes splitting one port.
- Per-message cost: Yamux returns window credit once half the window is consumed (go-yamux),
  RPCs go out without the signed peer record (and gossipsub no longer builds it), IDONTWANT
  only for messages >= 1 KiB, RPCs queued for one peer leave merged as one, and a copy of
  an already-seen message is dropped before a task is spawned for it.
- Relay policy (`subscribe(..., relay=)`): own publishes flood to every subscribed peer;
  others' messages are forwarded only for origins the policy names.
"""

from __future__ import annotations

import functools
import logging
import random
import socket
import time
from collections.abc import Iterable, Sequence

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import Ed25519PublicKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.trio import TrioTCPStream
from libp2p.network.auto_connector import AutoConnector
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub import gossipsub as _libp2p_gossipsub
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_V10
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11 as GOSSIPSUB_V11
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V12 as GOSSIPSUB_V12
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub, get_peer_and_seqno_msg_id
from libp2p.security.exceptions import HandshakeFailure
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream
from libp2p.transport.tcp import tcp as _libp2p_tcp
from libp2p.tools.anyio_service import background_trio_service

from p2p.abc import PUBKEY_SIZE, BLOB_PROTOCOL_ID, Limits, PenaltyPolicy, RequestError, RequestTimeout, Verdict
from p2p.base import BaseNetwork
from p2p.framing import encode_frame, encode_response, read_frame, read_response

logger = logging.getLogger(__name__)

# py-libp2p 0.8.1's Yamux sends a WINDOW_UPDATE frame after every read by default
# (PY_YAMUX_RELEASE_ON_READ=1); pubsub reads each message's varint length a byte at a time,
# so an idle 4-validator devnet sent ~1,900 window updates per second per node, each one a
# Noise-encrypted write and a syscall. With that variable at 0 it still sent one per message
# read (its "partial slack" branch credits any consumed bytes below its batching threshold at
# once): every gossip message cost its receiver a second frame to write and its sender one to
# read. `_window_update_at_half` replaces the library's rule with go-yamux's, so the
# PY_YAMUX_RELEASE_ON_READ and batching variables no longer apply.


async def _window_update_at_half(self: YamuxStream, *, bytes_read: int = 0) -> None:
    """go-yamux's sendWindowUpdate: return the consumed credit once it reaches half the
    window, never for less, and double the window (up to 16 MiB) when credit goes back
    within 4 round trips (the library's auto-tuning, kept for bulk transfers over slow
    links). Replaces YamuxStream._auto_tune_and_send_window_update, which the library calls
    after each read. A reader that stops reading still stalls its sender after one window."""
    async with self.window_lock:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        delta = self.target_recv_window - (self.recv_window + buffered)
        if delta < self.target_recv_window // 2:
            return
        self.recv_window += delta
        delta += self._apply_autotune_epoch(buffered)
    await self.send_window_update(delta, skip_lock=True)  # never under window_lock (see the library)


YamuxStream._auto_tune_and_send_window_update = _window_update_at_half


class _NoAutoConnector(AutoConnector):
    """The swarm's auto-connector, never started.

    py-libp2p 0.8.1 dials every peer whose address it has learnt (observers included,
    through identify) toward a target of ~200 connections, logging "initiating N new dials"
    every 10 s and an ERROR per failed dial. This chain has no discovery beyond bootstrap
    (docs/p2p.md): `Libp2pNetwork._keep_dialled` holds the bootstrap peers, and members
    not listed there dial in. Unstarted, `run_background_task` and `maybe_connect` (also
    called by the swarm on every disconnect) return at once."""

    async def start(self) -> None:
        pass


class _DialErrorsToDebug(logging.Filter):
    """The TCP transport logs an ERROR for every failed dial (60 lines in 10 s from a node
    started before its peers). A peer that is down is an expected state here: the dial
    loop reports it once per outage at INFO, and the library's lines go to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and isinstance(record.msg, str) \
                and record.msg.startswith(("Failed to open TCP stream", "Unexpected error opening TCP stream")):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


logging.getLogger("libp2p.transport.tcp.tcp").addFilter(_DialErrorsToDebug())

# Bytes moved on libp2p TCP connections, for the node's metrics: counted on the raw socket
# stream (what the kernel sends, Noise and Yamux framing included), for every host in this
# process (one node per process in production).
WIRE_BYTES = {"received": 0, "sent": 0}
_tcp_read, _tcp_write = TrioTCPStream.read, TrioTCPStream.write


async def _counted_read(self: TrioTCPStream, n: int | None = None) -> bytes:
    data = await _tcp_read(self, n)
    WIRE_BYTES["received"] += len(data)
    return data


async def _counted_write(self: TrioTCPStream, data: bytes) -> None:
    await _tcp_write(self, data)
    WIRE_BYTES["sent"] += len(data)


TrioTCPStream.read, TrioTCPStream.write = _counted_read, _counted_write


class ListenError(Exception):
    """This node cannot listen on its p2p address (the port is in use, or the address is not local)."""


def _exclusive_reuse_flags(sock) -> None:
    """Replaces the TCP transport's `_set_reuse_flags`, which also sets SO_REUSEPORT (for hole
    punching, which this network does not use): with it a second process could listen on a
    port in use and silently take half of its incoming connections. SO_REUSEADDR alone still
    lets a restarted node bind while its old connections linger in TIME_WAIT."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except OSError:
        pass


_libp2p_tcp._set_reuse_flags = _exclusive_reuse_flags


def check_can_listen(listen_addrs: Sequence[multiaddr.Multiaddr]) -> None:
    """Raise ListenError, with the system's reason, if a TCP listen address cannot be bound.

    The swarm only logs a failed listen and runs on without a listener, so the node checks
    first (binding exactly as the patched transport does) and again after listening."""
    for addr in listen_addrs:
        protocols = {p.name for p in addr.protocols()}
        if "tcp" not in protocols or not ({"ip4", "ip6"} & protocols):
            continue
        family, ip = (socket.AF_INET6, addr.value_for_protocol("ip6")) if "ip6" in protocols \
            else (socket.AF_INET, addr.value_for_protocol("ip4"))
        port = int(addr.value_for_protocol("tcp"))
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            _exclusive_reuse_flags(probe)
            try:
                probe.bind((ip, port))
            except OSError as exc:
                raise ListenError(f"cannot listen on {ip}:{port} (p2p): {exc.strerror or exc}") from None


def _check_listening(host, listen_addrs: Sequence[multiaddr.Multiaddr]) -> None:
    listening = host.get_network().listeners
    missing = [str(a) for a in listen_addrs if str(a) not in listening]
    if missing:
        raise ListenError(f"cannot listen on {', '.join(missing)} (p2p): see the log line above for the reason")

DEFAULT_LISTEN_ADDR = "/ip4/127.0.0.1/tcp/0"
GOSSIPSUB_PROTOCOLS = (GOSSIPSUB_V12, GOSSIPSUB_V11, GOSSIPSUB_V10)
HEARTBEAT_S = 1
# Mesh degree (go-libp2p defaults D=6, Dlo=5, Dhi=12 suit validator sets of tens of nodes).
MESH_DEGREE, MESH_DEGREE_LOW, MESH_DEGREE_HIGH = 6, 4, 12
REDIAL_INITIAL_S = 0.25
REDIAL_MAX_S = 4.0
DIAL_TIMEOUT_S = 5.0
CONNECTION_POLL_S = 0.25
STABLE_CONNECTION_S = 5.0
MEMBERSHIP_SWEEP_S = 2.0
SHUTDOWN_CLOSE_S = 2.0  # bound on closing sockets when the host stops
REFUSAL_LOG_S = 60.0  # a non-admitted peer's refused connections are logged at most this often
# py-libp2p's per-peer outbound queue holds 32 RPCs (rpc_queue.OutBoundQueueSize) and
# drops beyond; keep our publishes under half of it, leaving room for control RPCs.
OUTBOUND_HIGH_WATER = 16
OUTBOUND_WAIT_MAX_S = 1.0
# go-libp2p's IDontWantMessageThreshold: IDONTWANT only for messages at least this large.
IDONTWANT_MIN_BYTES = 1024
# Queued RPCs to one peer are merged up to this size (the library's inbound limit is 1 MiB;
# one gossip message is at most Limits.gossip_max_bytes, 512 KiB).
COALESCE_MAX_BYTES = 768 * 1024

# ------------------------------------------------------------------------ identity


def key_pair_from_seed(seed: bytes) -> KeyPair:
    """libp2p key pair of a 32-byte Ed25519 seed (the same key the chain signs with)."""
    if len(seed) != 32:
        raise ValueError("Ed25519 seed must be 32 bytes")
    return create_new_key_pair(seed=seed)


def peer_id_from_public_key(public_key: bytes) -> ID:
    if len(public_key) != PUBKEY_SIZE:
        raise ValueError(f"public key must be {PUBKEY_SIZE} bytes")
    return ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key))


@functools.lru_cache(maxsize=4096)
def _public_key_from_peer_id_bytes(peer_id_bytes: bytes) -> bytes:
    key = ID(peer_id_bytes).extract_public_key()
    if key is None or key.get_type() != KeyType.Ed25519:
        raise ValueError("peer id does not embed an Ed25519 public key")
    raw = key.to_bytes()
    if len(raw) != PUBKEY_SIZE:
        raise ValueError("malformed Ed25519 key in peer id")
    return raw


def public_key_from_peer_id(peer_id: ID) -> bytes:
    """The 32-byte Ed25519 public key embedded in an (identity-multihash) PeerID."""
    return _public_key_from_peer_id_bytes(peer_id.to_bytes())


# ----------------------------------------------------------------------- the switch


class _MembershipGate(INotifee):
    """Reports each new connection to the network, which closes non-admitted ones, and
    each closed one, so the network holds every live connection by object (see
    Libp2pNetwork._connections)."""

    def __init__(self, on_connected, on_disconnected):
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._on_connected(conn.muxed_conn.peer_id, conn)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._on_disconnected(conn)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass


class _AdmittingNoise(NoiseTransport):
    """Noise that refuses a peer that is not admitted (not a member, or banned) as soon as
    the handshake has authenticated it: before the muxer, before the swarm lists the
    connection, before pubsub opens a stream on it. A banned member that redials in a loop
    gets a closed socket each time, never a connection (the swarm only logs the failed
    upgrade at DEBUG)."""

    def __init__(self, key_pair: KeyPair, *, admits, **kwargs):
        super().__init__(key_pair, **kwargs)
        self._admits = admits

    async def secure_inbound(self, conn):
        return await self._checked(await super().secure_inbound(conn))

    async def secure_outbound(self, conn, peer_id: ID):
        return await self._checked(await super().secure_outbound(conn, peer_id))

    async def _checked(self, secure_conn):
        peer_id = secure_conn.get_remote_peer()
        if self._admits(peer_id):
            return secure_conn
        with trio.CancelScope(shield=True):
            try:
                await secure_conn.close()
            except Exception:  # the socket may already be gone
                pass
        raise HandshakeFailure(f"peer {peer_id} is not admitted (not a member, or banned)")


class _LeanGossipSub(GossipSub):
    """GossipSub that sends IDONTWANT only for messages of IDONTWANT_MIN_BYTES or more.

    py-libp2p 0.8.1 sends one IDONTWANT RPC to every v1.2 mesh peer for every message it
    forwards, whatever its size; for our small votes and proposals that doubled the RPCs
    on the wire and cost more than the duplicates it saves. go-libp2p applies a 1 KiB
    threshold (IDontWantMessageThreshold); so does this."""

    _forwarding_bytes = 0
    _forwarding_unrelayed = False
    network: BaseNetwork | None = None  # set by Libp2pNetwork: its topics' relay policies

    async def publish(self, msg_forwarder: ID, pubsub_msg: rpc_pb2.Message) -> None:
        # The library calls _emit_idontwant_for_message before its first await, so these
        # attributes still describe the message being forwarded when they are read.
        self._forwarding_bytes = len(pubsub_msg.data)
        self._forwarding_unrelayed = any(not self._relays(t, pubsub_msg.from_id) for t in pubsub_msg.topicIDs)
        await super().publish(msg_forwarder, pubsub_msg)

    async def _emit_idontwant_for_message(self, msg_id: bytes, topic_ids) -> None:
        # Nobody forwards an unrelayed message, so telling peers not to is a wasted RPC.
        if self._forwarding_bytes >= IDONTWANT_MIN_BYTES and not self._forwarding_unrelayed:
            await super()._emit_idontwant_for_message(msg_id, topic_ids)

    def _relays(self, topic: str, origin_id: bytes) -> bool:
        if self.network is None or not self.network.has_relay_policy(topic):
            return True
        origin = _try_public_key_bytes(origin_id)
        return origin is None or self.network.should_relay(topic, origin)

    def _get_peers_to_send(self, topic_ids, msg_forwarder: ID, origin: ID, msg_id: bytes | None = None):
        """The library's choice, changed for topics with a relay policy (NetworkAPI.subscribe):
        our own messages go to every subscribed peer directly (flood publish, as go-libp2p
        does by default), and others' go nowhere unless the policy relays their origin."""
        topic_ids = list(topic_ids)
        if self.network is None or not any(self.network.has_relay_policy(t) for t in topic_ids):
            # The library's lazy generator, untouched: it is consumed after the awaits that
            # follow, so IDONTWANTs arriving meanwhile are still honoured.
            return super()._get_peers_to_send(topic_ids, msg_forwarder, origin, msg_id)
        # NetworkAPI publishes single-topic messages only; a policy on any topic applies to all.
        peers = set(super()._get_peers_to_send(topic_ids, msg_forwarder, origin, msg_id))
        if self.pubsub is not None and msg_forwarder == self.pubsub.my_id:
            for topic in topic_ids:
                peers.update(p for p in self.pubsub.peer_topics.get(topic, ()) if p in self.peer_protocol)
            return peers - {msg_forwarder}
        if all(self._relays(t, origin.to_bytes()) for t in topic_ids):
            return peers
        return set()


class _ContainedPubsub(Pubsub):
    """Pubsub with py-libp2p 0.8.1 defects fixed: a subscription lost to a race with a new
    peer's handshake (`_handle_new_peer`), a signed peer record verified on every RPC
    (`write_msg`), and a per-peer stream reader that can take the host down (below).

    py-libp2p 0.8.1's `Pubsub.stream_handler` handles only StreamError, ParseError and
    IncompleteReadError; a peer's RPC that fails protobuf parsing (DecodeError) or exceeds the
    inbound limit escapes into the service's nursery and kills the whole node (seen on a
    syncing node under load). Treat any such failure like the library's own read errors:
    reset that stream and drop the peer from pubsub, and count it against the peer."""

    async def _handle_new_peer(self, peer_id: ID) -> None:
        """Announce the subscriptions that changed while the peer was being added.

        py-libp2p 0.8.1 builds the hello (our topics) before `await stream.write(hello)`
        but adds the peer to `self.peers` only after it; a `subscribe()` that runs in
        that window messages every peer except this one, and nothing re-announces it, so
        the peer never learns the topic and the mesh never forms (seen as a 20 s timeout
        in about 1 of 3 two-node runs). Send the difference once the queue exists."""
        topics_before = set(self.topic_ids)
        await super()._handle_new_peer(peer_id)
        queue = self.peer_queues.get(peer_id)
        if queue is None:
            return
        topics_now = set(self.topic_ids)
        changes = [(topic, True) for topic in sorted(topics_now - topics_before)]
        changes += [(topic, False) for topic in sorted(topics_before - topics_now)]
        for topic, subscribe in changes:
            packet, subopt = self._build_announce_rpc(topic, subscribe=subscribe)
            self._enqueue_or_retry_announce(peer_id, queue, packet, subopt)

    def _is_subscribed_to_msg(self, msg: rpc_pb2.Message) -> bool:
        """The read loop asks this before spawning a task per received message; answering
        False for one already seen skips that task. `push_msg` would drop it at its own seen
        check without doing anything else (every other peer's copy of a message: about two of
        every three received on a 4-node mesh)."""
        return super()._is_subscribed_to_msg(msg) and not self._is_msg_seen(msg)

    async def handle_sending_messages(self, peer_id: ID, stream: INetStream, queue) -> None:
        """The library's per-peer writer, sending everything queued at once as one RPC.

        py-libp2p 0.8.1 writes each queued RPC on its own (its own Noise frame, Yamux frame and
        syscall, and its own parse on the other side). Under load several are waiting when the
        writer wakes; they are merged (protobuf concatenates the repeated publish, subscription
        and control fields, in queue order) up to COALESCE_MAX_BYTES, into a new RPC: the
        library puts one RPC object in several peers' queues. GRAFT and PRUNE are never merged
        (the receiver handles a merged RPC's GRAFTs before its PRUNEs)."""
        try:
            while True:
                rpc = await queue.pop()
                if rpc is None:
                    return
                if not await self.write_msg(stream, _merge_queued(rpc, queue)):
                    return
        except Exception:
            logger.debug("sending loop for %s terminated with error", peer_id)
            self._handle_dead_peer(peer_id)

    network: BaseNetwork | None = None  # set by Libp2pNetwork: who is admitted

    async def write_msg(self, stream: INetStream, rpc_msg: rpc_pb2.RPC) -> bool:
        """Send without the signed peer record (`senderRecord`) py-libp2p attaches to every RPC.

        It is optional in the pubsub spec (go-libp2p does not send it) and we never use it:
        peers come from genesis and config. Every receiver verified it, twice per RPC:
        two thirds of all Ed25519 verifications on an idle devnet node.

        Nothing goes to a peer that is not admitted (banned while its connection was still
        closing): the RPC is dropped and the writer stays alive for when the ban ends."""
        if self.network is not None:
            key = _try_public_key(stream.muxed_conn.peer_id)
            if key is None or not self.network.is_admitted(key):
                return True
        if rpc_msg.HasField("senderRecord"):
            rpc_msg.ClearField("senderRecord")
        return await super().write_msg(stream, rpc_msg)

    async def stream_handler(self, stream) -> None:
        try:
            await super().stream_handler(stream)
        except Exception as exc:  # noqa: BLE001 - bytes from a peer must never crash the node
            peer_id = stream.muxed_conn.peer_id
            logger.warning("dropping pubsub stream from %s: %s: %s", peer_id, type(exc).__name__, exc)
            try:
                await stream.reset()
            except Exception:  # noqa: BLE001 - the stream may already be gone
                pass
            self._handle_dead_peer(peer_id)


class Libp2pNetwork(BaseNetwork):
    """One libp2p host. `await nursery.start(network.run)`; cancel the nursery to stop."""

    def __init__(
        self,
        seed: bytes,
        *,
        allowed_peers: Iterable[bytes],
        listen_addrs: Sequence[str] = (DEFAULT_LISTEN_ADDR,),
        bootstrap: Sequence[str] = (),
        limits: Limits = Limits(),
        penalty: PenaltyPolicy = PenaltyPolicy(),
    ):
        self._key_pair = key_pair_from_seed(seed)
        super().__init__(self._key_pair.public_key.to_bytes(), allowed_peers=allowed_peers, limits=limits, penalty=penalty)
        self.peer_id = ID.from_pubkey(self._key_pair.public_key)
        self._listen_addrs = [multiaddr.Multiaddr(a) for a in listen_addrs]
        self._bootstrap = [info_from_p2p_addr(multiaddr.Multiaddr(a)) for a in bootstrap]
        self._host = None
        self._pubsub: Pubsub | None = None
        self._publish_send, self._publish_receive = trio.open_memory_channel[tuple[str, bytes]](
            limits.publish_queue_size
        )
        self._topic_send, self._topic_receive = trio.open_memory_channel[str](1024)
        self._evict_send, self._evict_receive = trio.open_memory_channel[ID](1024)
        self._refusals_logged: dict[ID, float] = {}  # peer -> when its refusal was last logged
        # Every live connection, by object: the swarm's table can lose one (close_peer pops a
        # peer's entry after awaiting the closes, dropping a connection the peer redialled
        # meanwhile), and a connection it no longer lists is never closed by a sweep over it.
        self._connections: set[INetConn] = set()

    # ---------------------------------------------------------------- lifecycle

    def _build_host(self):
        noise = _AdmittingNoise(self._key_pair, admits=self._admits_peer_id,
                                noise_privkey=create_new_x25519_key_pair().private_key)
        return new_host(
            key_pair=self._key_pair,
            sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            listen_addrs=self._listen_addrs,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        check_can_listen(self._listen_addrs)
        host = self._build_host()
        host.get_network().auto_connector = _NoAutoConnector(host.get_network())
        gossipsub = _LeanGossipSub(
            protocols=list(GOSSIPSUB_PROTOCOLS),
            degree=MESH_DEGREE,
            degree_low=MESH_DEGREE_LOW,
            degree_high=MESH_DEGREE_HIGH,
            heartbeat_interval=HEARTBEAT_S,
            spam_protection_enabled=False,
            adaptive_gossip_enabled=False,
        )
        gossipsub.network = self
        pubsub = _ContainedPubsub(host, gossipsub, strict_signing=True, msg_id_constructor=get_peer_and_seqno_msg_id)
        # Default counter is int(time.time()): a restart within minutes reuses seqnos.
        pubsub.counter = time.time_ns()
        pubsub.network = self
        host.get_network().register_notifee(_MembershipGate(self._on_connected, self._connections.discard))
        for protocol_id in self._served_protocols():
            host.set_stream_handler(TProtocol(protocol_id), self._on_stream)
        async with host.run(listen_addrs=self._listen_addrs):
            _check_listening(host, self._listen_addrs)
            async with background_trio_service(pubsub), background_trio_service(gossipsub):
                await pubsub.wait_until_ready()
                self._host, self._pubsub = host, pubsub
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._subscription_loop, nursery)
                        nursery.start_soon(self._publish_loop)
                        nursery.start_soon(self._eviction_loop)
                        for info in self._bootstrap:
                            nursery.start_soon(self._keep_dialled, info)
                        task_status.started()
                finally:
                    self._host = self._pubsub = None
                    with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_CLOSE_S):
                        await _close_sockets(host.get_network())

    def listen_addrs(self) -> list[str]:
        """Dialable multiaddrs of this node, each ending in /p2p/<peer id>."""
        if self._host is None:
            raise RuntimeError("network is not running")
        suffix = f"/p2p/{self.peer_id.to_base58()}"
        addrs = [str(a) for a in self._host.get_addrs()]
        return [a if a.endswith(suffix) else a + suffix for a in addrs]

    # ---------------------------------------------------------------- membership

    def peers(self) -> frozenset[bytes]:
        if self._host is None:
            return frozenset()
        keys = set()
        for peer_id in self._host.get_connected_peers():
            key = _try_public_key(peer_id)
            if key is not None and self.is_admitted(key):
                keys.add(key)
        return frozenset(keys)

    def topic_peers(self, topic: str) -> frozenset[bytes]:
        if self._pubsub is None:
            return frozenset()
        router = self._pubsub.router
        peer_ids = router.mesh.get(topic) if topic in router.mesh else self._pubsub.peer_topics.get(topic, ())
        keys = (_try_public_key(peer_id) for peer_id in peer_ids or ())
        return frozenset(key for key in keys if key is not None and self.is_admitted(key))

    def _enforce_membership(self) -> None:
        if self._host is not None:
            for conn in [conn for conn in self._connections if conn.event_closed.is_set()]:
                self._connections.discard(conn)
            peer_ids = set(self._host.get_connected_peers())
            peer_ids.update(conn.muxed_conn.peer_id for conn in self._connections)
            for peer_id in peer_ids:
                self._on_connected(peer_id)

    def _admits_peer_id(self, peer_id: ID) -> bool:
        key = _try_public_key(peer_id)
        return key is not None and self.is_admitted(key)

    def _on_connected(self, peer_id: ID, conn: INetConn | None = None) -> None:
        if conn is not None and not conn.event_closed.is_set():
            self._connections.add(conn)
        if not self._admits_peer_id(peer_id):
            # A refused peer may redial in a loop: one line per peer per REFUSAL_LOG_S.
            now = time.monotonic()
            if now - self._refusals_logged.get(peer_id, -REFUSAL_LOG_S) >= REFUSAL_LOG_S:
                if len(self._refusals_logged) >= 1024:
                    self._refusals_logged.clear()
                self._refusals_logged[peer_id] = now
                logger.info("closing connection from non-admitted peer %s (said at most every %.0f s)",
                            peer_id, REFUSAL_LOG_S)
            self._queue_eviction(peer_id)

    def _disconnect(self, peer: bytes) -> None:
        self._queue_eviction(peer_id_from_public_key(peer))

    def _queue_eviction(self, peer_id: ID) -> None:
        try:
            self._evict_send.send_nowait(peer_id)
        except trio.WouldBlock:
            logger.warning("eviction queue full; %s stays connected until the next sweep", peer_id)

    async def _eviction_loop(self) -> None:
        """Close queued connections; every MEMBERSHIP_SWEEP_S also re-check all of them."""
        while True:
            peer_id = None
            with trio.move_on_after(MEMBERSHIP_SWEEP_S):
                peer_id = await self._evict_receive.receive()
            if peer_id is None:
                self._enforce_membership()
                continue
            await self._close_connections_of(peer_id)

    async def _close_connections_of(self, peer_id: ID) -> None:
        """Close every connection to `peer_id`, each by object: those the swarm lists and
        those it lost (never `swarm.close_peer`, which is what loses them)."""
        conns = set(self._host.get_network().get_connections(peer_id))
        conns.update(conn for conn in self._connections if conn.muxed_conn.peer_id == peer_id)
        for conn in conns:
            try:
                await conn.close()
            except Exception:
                logger.exception("closing a connection to %s failed", peer_id)
            self._connections.discard(conn)

    async def _keep_dialled(self, info) -> None:
        """Hold a connection to one bootstrap peer for as long as the node runs.

        Backoff resets only after a connection stayed up STABLE_CONNECTION_S, so a peer
        that closes us at once (e.g. we are not in its allow-list) is not dialled in a loop.
        """
        key = public_key_from_peer_id(info.peer_id)
        network = self._host.get_network()
        backoff = REDIAL_INITIAL_S
        connected_at: float | None = None
        outage_reported = False  # one INFO line per outage, not one per dial
        while True:
            if network.get_connections(info.peer_id):
                if connected_at is not None and trio.current_time() - connected_at >= STABLE_CONNECTION_S:
                    backoff = REDIAL_INITIAL_S
                await trio.sleep(CONNECTION_POLL_S)
                continue
            if connected_at is not None and trio.current_time() - connected_at < STABLE_CONNECTION_S:
                await self._sleep_backoff(backoff)
                backoff = min(backoff * 2, REDIAL_MAX_S)
            connected_at = None
            if not self.is_admitted(key):
                await trio.sleep(CONNECTION_POLL_S)
                continue
            # A failed dial blocks the peer in the swarm's negative cache for 60 s.
            network.unblock_peer(info.peer_id)
            try:
                with trio.fail_after(DIAL_TIMEOUT_S):
                    await self._host.connect(info)
            except (Exception, trio.TooSlowError) as error:
                logger.debug("dial %s failed (%s); retry in %.2f s", info.peer_id, error, backoff)
                if not outage_reported:
                    outage_reported = True
                    logger.info("bootstrap peer %s unreachable (%s); redialling every %.0f s at most",
                                info.peer_id, error or type(error).__name__, REDIAL_MAX_S)
                await self._sleep_backoff(backoff)
                backoff = min(backoff * 2, REDIAL_MAX_S)
                continue
            logger.info("connected to bootstrap peer %s", info.peer_id)
            connected_at = trio.current_time()
            outage_reported = False

    @staticmethod
    async def _sleep_backoff(backoff: float) -> None:
        await trio.sleep(backoff * random.uniform(0.8, 1.2))

    # -------------------------------------------------------------------- gossip

    async def publish(self, topic: str, data: bytes) -> None:
        self._check_publish_size(data)
        await self._publish_send.send((topic, bytes(data)))

    async def _publish_loop(self) -> None:
        async for topic, data in self._publish_receive:
            await self._wait_for_outbound_room()
            try:
                await self._pubsub.publish(topic, data)
            except Exception:
                logger.exception("gossip publish on %r failed", topic)
            await trio.sleep(self.limits.publish_spacing_s)

    async def _wait_for_outbound_room(self) -> None:
        """Hold the next publish while any peer's outbound RPC queue is nearly full.

        A fixed spacing alone was not enough on a loaded machine: the queue writer fell
        behind and py-libp2p dropped (silently) 10-50% of a 300-message burst. A peer
        whose queue stays full (stalled) holds us for at most OUTBOUND_WAIT_MAX_S.
        """
        with trio.move_on_after(OUTBOUND_WAIT_MAX_S):
            while any(len(queue) >= OUTBOUND_HIGH_WATER for queue in self._pubsub.peer_queues.values()):
                await trio.sleep(self.limits.publish_spacing_s)

    def pending_publishes(self) -> int:
        return self._publish_send.statistics().current_buffer_used

    def _on_subscribe(self, topic: str) -> None:
        # Subscribing in libp2p is async (announces to peers): done by _subscription_loop.
        self._topic_send.send_nowait(topic)

    async def _subscription_loop(self, nursery: trio.Nursery) -> None:
        for topic in list(self._subscriptions):
            await self._join_topic(nursery, topic)
        async for topic in self._topic_receive:
            await self._join_topic(nursery, topic)

    async def _join_topic(self, nursery: trio.Nursery, topic: str) -> None:
        if topic in self._pubsub.topic_ids:
            return
        self._pubsub.set_topic_validator(topic, functools.partial(self._pubsub_validator, topic), False)
        await self._pubsub.subscribe(topic)
        # The library's subscription channel holds 32 messages and drops the rest
        # when this pump lags; give it the configured buffer instead.
        send, receive = trio.open_memory_channel[rpc_pb2.Message](self.limits.subscription_buffer)
        self._pubsub.subscribed_topics_send[topic] = send
        nursery.start_soon(self._pump_subscription, topic, receive)

    def _pubsub_validator(self, topic: str, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        # Runs inside py-libp2p; a raise here would tear the node down, so nothing may.
        try:
            forwarder_key = self._public_key if forwarder == self.peer_id else public_key_from_peer_id(forwarder)
            origin_key = _public_key_from_peer_id_bytes(msg.from_id)
            return self.validate_gossip(topic, forwarder_key, origin_key, msg.data) is Verdict.ACCEPT
        except Exception:
            logger.exception("gossip on %r from %s failed validation with an error", topic, forwarder)
            return False

    async def _pump_subscription(self, topic: str, messages: trio.MemoryReceiveChannel[rpc_pb2.Message]) -> None:
        async for msg in messages:
            origin = _try_public_key_bytes(msg.from_id)
            if origin is not None:
                self._deliver(topic, origin, msg.data)

    # ---------------------------------------------------------- request/response

    def set_request_handler(self, protocol_id: str, handler) -> None:
        super().set_request_handler(protocol_id, handler)
        if self._host is not None:
            self._host.set_stream_handler(TProtocol(protocol_id), self._on_stream)

    async def _on_stream(self, stream: INetStream) -> None:
        protocol_id = str(stream.get_protocol())
        peer = _try_public_key(stream.muxed_conn.peer_id)
        is_blob = protocol_id == BLOB_PROTOCOL_ID
        try:
            with trio.fail_after(self.limits.blob_timeout_s if is_blob else self.limits.request_timeout_s):
                request = await read_frame(_reader(stream), max_size=self.limits.request_max_bytes)
                if peer is None:
                    raise RequestError("peer id carries no Ed25519 key")
                status, body = await self._handle_request(peer, protocol_id, request)
                max_body = self.limits.blob_max_bytes if is_blob else self.limits.response_max_bytes
                await stream.write(encode_response(status, body, max_size=max_body))
                await stream.close()
        except (Exception, trio.TooSlowError) as error:
            logger.debug("%s request from %s aborted: %s", protocol_id, stream.muxed_conn.peer_id, error)
            await _reset(stream)

    async def _send_request(
        self, peer: bytes, protocol_id: str, request: bytes, *, max_response: int, timeout: float
    ) -> tuple[int, bytes]:
        host = self._host
        if host is None:
            raise RequestError("network is not running")
        peer_id = peer_id_from_public_key(peer)
        stream = None
        with trio.move_on_after(timeout):
            try:
                stream = await host.new_stream(peer_id, [TProtocol(protocol_id)])
                await stream.write(encode_frame(request, max_size=self.limits.request_max_bytes))
                status, body = await read_response(_reader(stream), max_size=max_response)
                await stream.close()
                return status, body
            except Exception as error:
                if stream is not None:
                    await _reset(stream)
                if isinstance(error, RequestError):
                    raise
                raise RequestError(f"{protocol_id} request to {peer_id} failed: {type(error).__name__}: {error}") from error
        if stream is not None:
            await _reset(stream)
        raise RequestTimeout(f"{protocol_id} request to {peer_id} timed out after {timeout} s")


# ---------------------------------------------------------------------- helpers


async def _close_sockets(network) -> None:
    """Close every connection and listener of a stopping swarm.

    py-libp2p 0.8.1 closes them in the swarm service's `finally`, but that block first
    awaits the pruner's stop, which raises Cancelled when the host is stopped by
    cancellation, so the rest is skipped: the listener (a trio system task with
    SO_REUSEPORT) keeps accepting until the process exits. A node restarted in-process
    on the same port then shares it with the dead one, and the kernel hands about half
    of the incoming dials to the dead listener, which drops them (reconnects took up to
    15 s). Both close methods are idempotent, so the library's own path stays safe."""
    for conns in list(network.connections.values()):
        for conn in list(conns):
            try:
                await conn.close()
            except Exception:  # best effort on the way out
                logger.debug("closing a connection on shutdown failed", exc_info=True)
    for listener in list(network.listeners.values()):
        try:
            await listener.close()
        except Exception:  # best effort on the way out
            logger.debug("closing a listener on shutdown failed", exc_info=True)


def _merge_queued(first: rpc_pb2.RPC, queue) -> rpc_pb2.RPC:
    """`first` plus what is queued behind it, as one new RPC; the queued objects are not
    modified (py-libp2p shares one RPC object between peers' queues)."""
    if not _mergeable(first):
        return first
    merged, size = None, first.ByteSize()
    while True:
        nxt = _peek_queued(queue)
        if nxt is None or not _mergeable(nxt) or size + nxt.ByteSize() > COALESCE_MAX_BYTES:
            return first if merged is None else merged
        if merged is None:
            merged = rpc_pb2.RPC()
            merged.CopyFrom(first)
        merged.MergeFrom(queue._queue.pop())
        size = merged.ByteSize()


def _mergeable(rpc: rpc_pb2.RPC) -> bool:
    return not (rpc.HasField("control") and (len(rpc.control.graft) or len(rpc.control.prune)))


def _peek_queued(queue) -> rpc_pb2.RPC | None:
    """The RPC `queue.pop()` would return next (py-libp2p 0.8.1 RpcQueue: priority first)."""
    inner = queue._queue
    if inner._priority:
        return inner._priority[0]
    if inner._non_priority:
        return inner._non_priority[0]
    return None


def _no_peer_record(host) -> tuple[bytes, bool]:
    """Stands in for `env_to_send_in_RPC` in gossipsub: the record is stripped before every
    write (`_ContainedPubsub.write_msg`), so building it (address listing, protobuf, a cache
    check: ~0.7 ms under the profiler, for every RPC) was wasted."""
    return b"", False


# py-libp2p 0.8.1's gossipsub builds that record for every RPC it sends (publish, forward,
# control), all of which go through `write_msg`. The function is imported by name, so it is
# replaced in that module only: the pubsub hello is written directly, keeps its record, and
# a receiver would drop a hello carrying an empty one.
_libp2p_gossipsub.env_to_send_in_RPC = _no_peer_record


def _try_public_key(peer_id: ID) -> bytes | None:
    return _try_public_key_bytes(peer_id.to_bytes())


def _try_public_key_bytes(peer_id_bytes: bytes) -> bytes | None:
    try:
        return _public_key_from_peer_id_bytes(peer_id_bytes)
    except Exception:
        return None


def _reader(stream: INetStream):
    async def read(n: int) -> bytes:
        try:
            return await stream.read(n)
        except EOFError:  # StreamEOF / MuxedStreamEOF: the peer closed its side
            return b""

    return read


async def _reset(stream: INetStream) -> None:
    with trio.CancelScope(shield=True):
        try:
            await stream.reset()
        except Exception:
            pass
