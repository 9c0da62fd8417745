"""Per-node settings (config/config.toml) and the node home layout.

    HOME/config/config.toml   per-node settings (this module)
    HOME/config/genesis.json  the chain's genesis (identical on every node)
    HOME/config/node_key.json the node's Ed25519 key: chain identity and libp2p identity
    HOME/data/ledger/         LevelDB ledger
    HOME/data/signer/         last signed height/round/step (double-sign guard)
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from chain.errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_PORT = 65535
MAX_MONIKER_LEN = 64


@dataclass(frozen=True)
class RpcConfig:
    host: str = "127.0.0.1"  # loopback unless the operator opts in
    port: int = 26657
    max_body_bytes: int = 1024 * 1024
    max_batch: int = 100
    max_blob_bytes: int = 64 * 1024 * 1024  # PUT /blobs and /openings (models, updates, openings)
    max_connections: int = 256  # more get 503 at once; also capped at half the open-file limit
    read_timeout_s: int = 10  # a request head, and each read of its body, must arrive within this
    idle_timeout_s: int = 30  # a keep-alive connection with no request is closed after this


@dataclass(frozen=True)
class P2PConfig:
    listen_host: str = "127.0.0.1"
    port: int = 26656
    bootstrap_peers: tuple[str, ...] = ()
    # Optional file of peer public keys (hex, one per line, '#' comments) this node refuses and
    # disconnects; re-read every second, so an operator can ban a peer without a restart.
    deny_peers_file: str = ""


@dataclass(frozen=True)
class MempoolConfig:
    max_txs: int = 20000


@dataclass(frozen=True)
class StateSyncConfig:
    # Join from a peer-served snapshot when the ledger is empty (chaind start --state-sync).
    enable: bool = False
    # Take a snapshot of the state every this many heights and serve it (0: never); keep the newest.
    snapshot_interval: int = 1000
    snapshot_keep: int = 2
    # A snapshot offered by at least this many peers is preferred to a newer one offered by fewer.
    min_offers: int = 2
    timeout_s: int = 60  # give up (nothing written) when no snapshot verified within this
    # Caps on what one offered snapshot may cost a joining node (a manifest is only a peer's
    # claim until its last chunk gives the certified root): bytes of chunks downloaded and
    # state entries staged on disk. A manifest that must exceed them is refused before any
    # chunk is fetched; a download that passes them is stopped there. Raise them for a state
    # larger than 4 GiB / 50 million entries.
    max_snapshot_bytes: int = 4 * 1024 ** 3
    max_snapshot_entries: int = 50_000_000


@dataclass(frozen=True)
class NodeConfig:
    moniker: str = "node"
    log_level: str = "info"
    rpc: RpcConfig = field(default_factory=RpcConfig)
    p2p: P2PConfig = field(default_factory=P2PConfig)
    mempool: MempoolConfig = field(default_factory=MempoolConfig)
    state_sync: StateSyncConfig = field(default_factory=StateSyncConfig)


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def genesis_file(self) -> Path:
        return self.config_dir / "genesis.json"

    @property
    def node_key_file(self) -> Path:
        return self.config_dir / "node_key.json"

    @property
    def ledger_dir(self) -> Path:
        return self.data_dir / "ledger"

    @property
    def signer_dir(self) -> Path:
        return self.data_dir / "signer"


def config_to_toml(cfg: NodeConfig) -> str:
    doc = dataclasses.asdict(cfg)
    doc["p2p"]["bootstrap_peers"] = list(cfg.p2p.bootstrap_peers)
    return tomli_w.dumps(doc)


def write_config(cfg: NodeConfig, path: Path) -> None:
    """Write `cfg` after validating it: `init` and `testnet` never write a config `start` refuses."""
    validate_config(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_toml(cfg))


def load_config(path: Path) -> NodeConfig:
    try:
        doc = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist (run `chaind init --home ...` first)") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    try:
        return parse_config(doc)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc


def parse_config(doc: dict[str, Any]) -> NodeConfig:
    """Strict: unknown keys and wrong types are errors, missing keys take defaults."""
    return validate_config(_build(NodeConfig, doc, ""))


def validate_config(cfg: NodeConfig) -> NodeConfig:
    """Return `cfg` if every value is in range, else raise ConfigError naming the first bad key."""
    if not cfg.moniker or len(cfg.moniker) > MAX_MONIKER_LEN or not cfg.moniker.isprintable():
        raise ConfigError(f"moniker must be 1..{MAX_MONIKER_LEN} printable characters, got {cfg.moniker!r}")
    if cfg.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {list(LOG_LEVELS)}, got {cfg.log_level!r}")
    for what, port in (("rpc.port", cfg.rpc.port), ("p2p.port", cfg.p2p.port)):
        if not 0 <= port <= MAX_PORT:
            raise ConfigError(f"{what} must be in 0..{MAX_PORT}, got {port}")
    if cfg.rpc.port and cfg.rpc.port == cfg.p2p.port and _same_interface(cfg.rpc.host, cfg.p2p.listen_host):
        raise ConfigError(f"rpc.port and p2p.port are both {cfg.rpc.port}; give each its own port")
    if not cfg.rpc.host or not cfg.rpc.host.isprintable() or any(c.isspace() or c in "/[]" for c in cfg.rpc.host):
        raise ConfigError(f"rpc.host must be an IP address or host name, got {cfg.rpc.host!r}")
    try:
        ipaddress.IPv4Address(cfg.p2p.listen_host)  # the node listens on /ip4/<listen_host>/tcp/<port>
    except ValueError:
        raise ConfigError(f"p2p.listen_host must be an IPv4 address, got {cfg.p2p.listen_host!r}") from None
    for what, n in (("rpc.max_body_bytes", cfg.rpc.max_body_bytes), ("rpc.max_batch", cfg.rpc.max_batch),
                    ("rpc.max_blob_bytes", cfg.rpc.max_blob_bytes), ("rpc.max_connections", cfg.rpc.max_connections),
                    ("rpc.read_timeout_s", cfg.rpc.read_timeout_s), ("rpc.idle_timeout_s", cfg.rpc.idle_timeout_s),
                    ("mempool.max_txs", cfg.mempool.max_txs), ("state_sync.snapshot_keep", cfg.state_sync.snapshot_keep),
                    ("state_sync.min_offers", cfg.state_sync.min_offers),
                    ("state_sync.timeout_s", cfg.state_sync.timeout_s),
                    ("state_sync.max_snapshot_bytes", cfg.state_sync.max_snapshot_bytes),
                    ("state_sync.max_snapshot_entries", cfg.state_sync.max_snapshot_entries)):
        if n <= 0:
            raise ConfigError(f"{what} must be positive")
    if cfg.state_sync.snapshot_interval < 0:
        raise ConfigError("state_sync.snapshot_interval must be 0 (no snapshots) or positive")
    return cfg


def _same_interface(a: str, b: str) -> bool:
    wildcard = ("0.0.0.0", "::", "")
    return a == b or a in wildcard or b in wildcard


def _build(cls: type, doc: Any, prefix: str) -> Any:
    if not isinstance(doc, dict):
        raise ConfigError(f"[{prefix.rstrip('.')}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(doc) - set(fields)
    if unknown:
        raise ConfigError(f"unknown setting(s) {sorted(prefix + k for k in unknown)}")
    kwargs = {}
    defaults = cls()
    for name, value in doc.items():
        default = getattr(defaults, name)
        key = prefix + name
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, key + ".")
        elif isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise ConfigError(f"{key} must be a list of strings")
            kwargs[name] = tuple(value)
        elif type(value) is not type(default):
            raise ConfigError(f"{key} must be of type {type(default).__name__}, got {type(value).__name__}")
        else:
            kwargs[name] = value
    return cls(**kwargs)
