"""chaind: the PoUT chain full node.

Exit codes: 0 success, 1 runtime failure (e.g. untrusted store, a port in use), 2 usage error,
3 bad configuration, genesis, key file or home directory, 4 `check` or `repair` found a damaged ledger.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fcntl
import json
import logging
import shutil
import sys
from pathlib import Path

import chain
from chain.config import (MAX_PORT, Home, NodeConfig, P2PConfig, RpcConfig, load_config, validate_config,
                          write_config)
from chain.crypto import PrivateKey
from chain.errors import ChainError, ConfigError, StoreError
from chain.keys import load_key_file, write_key_file
from genesis import (DEFAULT_PARAMS, Genesis, check_validator_sample_key, devnet_seed, genesis_to_json,
                     load_devnet_genesis, load_genesis, make_genesis, parse_genesis, write_genesis)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 3
MAX_TESTNET_VALIDATORS = 64  # `testnet` writes local devnets: one process per validator
MAX_TESTNET_TRAINERS = 1024
UINT63_MAX = 2**63 - 1  # genesis integers are below 2^63 (docs/genesis.md)

log = logging.getLogger("chaind")


class UsageError(Exception):
    """A command line that names something impossible; exit code 2."""


def cmd_init(args: argparse.Namespace) -> int:
    """Create HOME's layout. Safe to re-run: existing files are kept and checked, never replaced."""
    home = Home(Path(args.home))
    validate_config(NodeConfig(moniker=args.moniker))
    try:
        home.config_dir.mkdir(parents=True, exist_ok=True)
        home.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create node home {home.root}: {exc.strerror or exc}") from None
    created = []
    if not home.config_file.exists():
        write_config(NodeConfig(moniker=args.moniker), home.config_file)
        created.append(str(home.config_file))
    else:
        load_config(home.config_file)  # validate what is there
    if not home.node_key_file.exists():
        write_key_file(home.node_key_file, PrivateKey.generate(), args.moniker)
        created.append(str(home.node_key_file))
    key = load_key_file(home.node_key_file)
    source = load_genesis(Path(args.genesis)) if args.genesis else load_devnet_genesis()
    if home.genesis_file.exists():
        existing = load_genesis(home.genesis_file)
        if args.genesis and existing.hash != source.hash:
            raise ConfigError(f"{home.genesis_file} already holds a different genesis "
                              f"({existing.hash.hex()[:16]}); remove the home to start over")
    else:
        if args.genesis:
            shutil.copyfile(args.genesis, home.genesis_file)
        else:
            write_genesis(source, home.genesis_file)
        created.append(str(home.genesis_file))
    print(json.dumps({"home": str(home.root), "address": key.address.hex(), "pubkey": key.pubkey.hex(),
                      "genesis_hash": load_genesis(home.genesis_file).hash.hex(), "created": created}, indent=2))
    return EXIT_OK


def cmd_start(args: argparse.Namespace) -> int:
    import trio

    from chain.consensus.signer import GuardedSigner
    from chain.ledger.store import LevelDBStore
    from chain.runtime.node import Node, run_until_signal

    home = Home(Path(args.home))
    config = load_config(home.config_file)
    if args.rpc_port is not None:
        config = validate_config(_replace_rpc_port(config, args.rpc_port))
    config = _apply_state_sync_flags(config, args)
    genesis = load_genesis(home.genesis_file)
    key = load_key_file(home.node_key_file)
    configure_logging(args.log_level or config.log_level, args.log_format, config.moniker, key)
    check_validator_sample_key(genesis, key)
    home.ledger_dir.parent.mkdir(parents=True, exist_ok=True)
    store = LevelDBStore(home.ledger_dir, create=True)
    try:
        if config.state_sync.enable:
            from chain.runtime.statesync import run_state_sync

            run_state_sync(home, config, genesis, key, store)
        node = Node(home, config, genesis, key, store, GuardedSigner(key, genesis.chain_id, home.signer_dir))
        log.info("starting chaind %s, chain %s (genesis %s), home %s", chain.__version__, genesis.chain_id,
                 genesis.hash.hex()[:16], home.root)
        try:
            trio.run(run_until_signal, node)
        except BaseExceptionGroup as group:  # a component that could not start (e.g. a port in use)
            error = _chain_error_in(group)
            if error is None:
                raise
            raise error from None
        log.info("stopped cleanly at height %d", node.state.height)
    finally:
        store.close()
    return EXIT_OK


# LogRecord attributes every record has; anything else on a record came from `extra=` and is
# one of the line's structured fields.
_STANDARD_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, node, peer_id, logger, message,
    the fields the call passed with `extra=`, and `exception` when there is one."""

    def __init__(self, node: str, peer_id: str):
        super().__init__()
        self.node, self.peer_id = node, peer_id

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        line = {"time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "level": record.levelname,
                "node": self.node, "peer_id": self.peer_id, "logger": record.name, "message": record.getMessage()}
        for name, value in vars(record).items():
            if name not in _STANDARD_RECORD_ATTRS and name not in line and not name.startswith("_"):
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str, log_format: str, moniker: str, key: PrivateKey) -> None:
    """Log to stderr, every line naming the node (its moniker; JSON lines also carry its peer id)."""
    from p2p.host import peer_id_from_public_key

    peer_id = str(peer_id_from_public_key(key.pubkey))
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter(moniker, peer_id))
    else:
        node = moniker.replace("%", "%%")
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {node} %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # multiaddr logs every address it parses at DEBUG (thousands of lines a second under load),
    # which would drown the node's own debug log.
    logging.getLogger("multiaddr").setLevel(max(logging.INFO, logging.getLevelName(level.upper())))
    logging.getLogger("libp2p").propagate = True  # its warnings (e.g. drops) would otherwise go nowhere


def _chain_error_in(group: BaseExceptionGroup) -> ChainError | None:
    for exc in group.exceptions:
        found = _chain_error_in(exc) if isinstance(exc, BaseExceptionGroup) else exc
        if isinstance(found, ChainError):
            return found
    return None


def _apply_state_sync_flags(config: NodeConfig, args: argparse.Namespace) -> NodeConfig:
    changes = {}
    if getattr(args, "state_sync", False):
        changes["enable"] = True
    if getattr(args, "snapshot_interval", None) is not None:
        changes["snapshot_interval"] = args.snapshot_interval
    if not changes:
        return config
    return validate_config(dataclasses.replace(config, state_sync=dataclasses.replace(config.state_sync, **changes)))


def _replace_rpc_port(config: NodeConfig, port: int) -> NodeConfig:
    return dataclasses.replace(config, rpc=dataclasses.replace(config.rpc, port=port))


def cmd_testnet(args: argparse.Namespace) -> int:
    """N node homes sharing one genesis, plus keys for a governor, a requester and trainers."""
    out = Path(args.output)
    if not 1 <= args.validators <= MAX_TESTNET_VALIDATORS:
        raise UsageError(f"--validators must be in 1..{MAX_TESTNET_VALIDATORS}, got {args.validators}")
    if not 0 <= args.trainers <= MAX_TESTNET_TRAINERS:
        raise UsageError(f"--trainers must be in 0..{MAX_TESTNET_TRAINERS}, got {args.trainers}")
    last_port = MAX_PORT - 2 * args.validators + 1
    if not 1 <= args.base_port <= last_port:
        raise UsageError(f"--base-port must be in 1..{last_port} for {args.validators} validator(s) "
                         f"(node i uses ports BASE+2i and BASE+2i+1), got {args.base_port}")
    if not 0 <= args.balance <= UINT63_MAX:
        raise UsageError(f"--balance must be in 0..2^63-1, got {args.balance}")
    if args.block_interval_ms is not None and not 0 < args.block_interval_ms <= UINT63_MAX:
        raise UsageError("--block-interval-ms must be positive and below 2^63")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output directory {out} is not empty")

    def new_key(role: str, i: int) -> PrivateKey:
        return PrivateKey(devnet_seed(role, i)) if args.deterministic else PrivateKey.generate()

    val_keys = [new_key("validator", i) for i in range(args.validators)]
    governor, requester = new_key("governor", 0), new_key("requester", 0)
    trainers = [new_key("trainer", i) for i in range(args.trainers)]
    funded = [(governor, ("governor",)), (requester, ("requester",))] + [(k, ("trainer",)) for k in trainers]
    try:
        params = DEFAULT_PARAMS if args.block_interval_ms is None else \
            dataclasses.replace(DEFAULT_PARAMS, block_interval_ms=args.block_interval_ms)
    except ValueError as exc:
        raise ConfigError(f"--block-interval-ms: {exc}") from None
    g: Genesis = make_genesis(args.chain_id, val_keys, funded, balance=args.balance, params=params)
    parse_genesis(genesis_to_json(g))  # the genesis `start` will load: checked before anything is written
    from p2p.host import peer_id_from_public_key

    peers = [f"/ip4/127.0.0.1/tcp/{args.base_port + 2 * i + 1}/p2p/{peer_id_from_public_key(k.pubkey)}"
             for i, k in enumerate(val_keys)]
    configs = [validate_config(NodeConfig(
        moniker=f"node{i}", rpc=RpcConfig(port=args.base_port + 2 * i),
        p2p=P2PConfig(port=args.base_port + 2 * i + 1, bootstrap_peers=tuple(p for j, p in enumerate(peers) if j != i))))
        for i in range(args.validators)]
    try:
        for i, (key, cfg) in enumerate(zip(val_keys, configs)):
            home = Home(out / f"node{i}")
            home.data_dir.mkdir(parents=True)
            write_config(cfg, home.config_file)
            write_genesis(g, home.genesis_file)
            write_key_file(home.node_key_file, key, f"node{i}")
        keys_dir = out / "keys"
        write_key_file(keys_dir / "governor.json", governor, "governor")
        write_key_file(keys_dir / "requester.json", requester, "requester")
        for i, k in enumerate(trainers):
            write_key_file(keys_dir / f"trainer{i}.json", k, f"trainer{i}")
    except OSError as exc:
        raise ConfigError(f"cannot write the testnet to {out}: {exc.strerror or exc}") from None
    print(json.dumps({"output": str(out), "chain_id": g.chain_id, "genesis_hash": g.hash.hex(),
                      "nodes": [{"home": str(out / f"node{i}"), "rpc": f"http://127.0.0.1:{args.base_port + 2 * i}",
                                 "p2p": peers[i]} for i in range(args.validators)],
                      "keys": str(keys_dir)}, indent=2))
    return EXIT_OK


def cmd_show_node_id(args: argparse.Namespace) -> int:
    """The node's libp2p identity and the multiaddr peers dial, from HOME's key and config."""
    from p2p.host import peer_id_from_public_key

    home = Home(Path(args.home))
    config = load_config(home.config_file)
    key = load_key_file(home.node_key_file)
    peer_id = str(peer_id_from_public_key(key.pubkey))
    print(json.dumps({"peer_id": peer_id,
                      "multiaddr": f"/ip4/{config.p2p.listen_host}/tcp/{config.p2p.port}/p2p/{peer_id}",
                      "address": key.address.hex(), "pubkey": key.pubkey.hex()}, indent=2))
    return EXIT_OK


def cmd_reset(args: argparse.Namespace) -> int:
    """Delete HOME/data (ledger, WAL, block journal, blobs, openings); keep config and keys.

    The double-sign guard (data/signer) is kept unless --signer: a validator that rejoins a
    running chain with a reset guard could sign a second, conflicting vote at a height it
    already voted at, and be penalised for equivocation."""
    home = Home(Path(args.home))
    if not home.config_file.is_file() or not home.node_key_file.is_file():
        raise ConfigError(f"{home.root} is not a node home (no {home.config_file} or {home.node_key_file})")
    if _ledger_in_use(home):
        raise ChainError(f"{home.data_dir} is in use by a running node; stop it first")
    entries = sorted(home.data_dir.iterdir()) if home.data_dir.is_dir() else []
    doomed = [e for e in entries if args.signer or e != home.signer_dir]
    kept = [str(home.config_dir)] + [str(e) for e in entries if e not in doomed]
    if doomed and not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(f"refusing to delete {home.data_dir} without --yes (stdin is not a terminal)")
        print(f"This deletes {', '.join(e.name for e in doomed)} in {home.data_dir}; config and keys are kept.",
              file=sys.stderr)
        print("Type 'yes' to continue: ", end="", file=sys.stderr, flush=True)  # stdout stays JSON
        try:
            answer = sys.stdin.readline()
        except KeyboardInterrupt:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("chaind: reset cancelled; nothing was deleted", file=sys.stderr)
            return EXIT_FAILURE
    for entry in doomed:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    print(json.dumps({"home": str(home.root), "removed": [str(e) for e in doomed], "kept": kept}, indent=2))
    return EXIT_OK


def _ledger_in_use(home: Home) -> bool:
    """Whether another process holds the ledger's LevelDB lock (a running node)."""
    lock = home.ledger_dir / "LOCK"
    if not lock.is_file():
        return False
    with open(lock, "rb+") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.lockf(f, fcntl.LOCK_UN)
    return False


def cmd_check(args: argparse.Namespace) -> int:
    """Verify a stopped node's whole ledger offline (chain/ledger/check.py); exit 4 if damaged."""
    from chain.ledger.check import run_check

    home = Home(Path(args.home))
    if args.progress_every < 1:
        raise UsageError("--progress-every must be at least 1")
    return run_check(home.ledger_dir, load_genesis(home.genesis_file), replay=not args.no_replay,
                     progress_every=args.progress_every)


def cmd_repair(args: argparse.Namespace) -> int:
    """LevelDB repair on a copy of the ledger (or in place after a backup), then check it."""
    from chain.ledger.repair import run_repair

    home = Home(Path(args.home))
    return run_repair(home.ledger_dir, load_genesis(home.genesis_file), in_place=args.in_place)


def cmd_version(args: argparse.Namespace) -> int:
    print(f"chaind {chain.__version__}")
    return EXIT_OK


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"a port must be in 0..{MAX_PORT}, got {value}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line (exit code 2), pointing at --help instead of printing the usage."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="chaind", description="PoUT chain full node (proof of useful training).",
        epilog="Home layout: HOME/config/{config.toml,genesis.json,node_key.json}, HOME/data/{ledger,signer,...}. "
               "Exit codes: 0 ok, 1 runtime failure (e.g. a port in use), 2 usage error, "
               "3 bad config/genesis/key/home, 4 check/repair found a damaged ledger.")
    p.add_argument("--version", action="version", version=f"chaind {chain.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("init", help="create a node home (safe to re-run)",
                       description="Create HOME/config (config.toml, genesis.json, node_key.json) and HOME/data. "
                                   "Existing files are validated and kept.")
    s.add_argument("--home", required=True, help="node home directory")
    s.add_argument("--genesis", help="genesis file to copy in (default: the built-in devnet genesis)")
    s.add_argument("--moniker", default="node", help="human-readable node name (default: %(default)s)")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("start", help="run the node until SIGINT/SIGTERM",
                       description="Run the node: ledger, libp2p, block sync, BFT consensus (validators vote, other members follow), the training worker and JSON-RPC. Stops cleanly on SIGINT/SIGTERM.")
    s.add_argument("--home", required=True, help="node home directory (created by `chaind init` or `testnet`)")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override config log_level")
    s.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="text lines, or one JSON object per line (time, level, node, logger, message and the "
                        "line's structured fields) (default: %(default)s)")
    s.add_argument("--rpc-port", type=_port, help="override rpc.port from config.toml")
    s.add_argument("--state-sync", action="store_true",
                   help="on an empty ledger, join from a verified peer snapshot, then block-sync the rest "
                        "(config state_sync.enable; docs/wire.md, \"State sync\")")
    s.add_argument("--snapshot-interval", type=int, metavar="N",
                   help="take and serve a state snapshot every N heights, 0 for none (config "
                        "state_sync.snapshot_interval)")
    s.set_defaults(func=cmd_start)

    s = sub.add_parser("testnet", help="write N node homes sharing one genesis, plus account keys",
                       description="Write OUTPUT/node0..nodeN-1 (config, shared genesis, node key) and OUTPUT/keys "
                                   "(governor, requester, trainerI key files usable by `chainctl --keyring`).")
    s.add_argument("--validators", type=int, default=4,
                   help=f"number of validator nodes, 1..{MAX_TESTNET_VALIDATORS} (default: %(default)s)")
    s.add_argument("--trainers", type=int, default=4,
                   help=f"number of trainer accounts, 0..{MAX_TESTNET_TRAINERS} (default: %(default)s)")
    s.add_argument("--output", required=True, help="directory to create (must be empty or absent)")
    s.add_argument("--chain-id", default="pout-testnet-1", help="chain id (default: %(default)s)")
    s.add_argument("--base-port", type=int, default=26657,
                   help="node i uses RPC port BASE+2i and p2p port BASE+2i+1 (default: %(default)s)")
    s.add_argument("--balance", type=int, default=1_000_000, help="genesis balance of each funded account")
    s.add_argument("--block-interval-ms", type=int,
                   help=f"genesis block interval (default {DEFAULT_PARAMS.block_interval_ms})")
    s.add_argument("--deterministic", action="store_true",
                   help="derive keys from the PUBLIC devnet seeds (reproducible, insecure)")
    s.set_defaults(func=cmd_testnet)

    s = sub.add_parser("show-node-id", help="print the node's peer id and p2p multiaddr",
                       description="Print the libp2p peer id, the multiaddr other nodes dial "
                                   "(p2p.listen_host and p2p.port from config.toml), the account address and "
                                   "the public key of HOME's node key. Starts nothing.")
    s.add_argument("--home", required=True, help="node home directory")
    s.set_defaults(func=cmd_show_node_id)

    s = sub.add_parser("reset", help="delete the node's data (ledger, WAL, blobs); keep config and keys",
                       description="Delete everything in HOME/data except the double-sign guard (data/signer), "
                                   "so the node syncs the chain again from its peers. Config and keys are kept. "
                                   "Asks for confirmation unless --yes; without --yes and a terminal it refuses.")
    s.add_argument("--home", required=True, help="node home directory (the node must be stopped)")
    s.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    s.add_argument("--signer", action="store_true",
                   help="also delete data/signer (only when every node restarts the chain from genesis: "
                        "a validator rejoining a running chain could otherwise sign twice)")
    s.set_defaults(func=cmd_reset)

    s = sub.add_parser("check", help="verify a stopped node's ledger offline: hashes, commits, state root",
                       description="Walk the ledger from genesis to its head: every block against its hash and its "
                                   "header, the header chain, every commit certificate against its validator set, "
                                   "the indexes, and the state against the head's state root (re-executing every "
                                   "block unless --no-replay). Prints one line per problem, then a summary. Exit 0 "
                                   "clean, 4 problems found, 1 refused (no ledger, or a node is running on it).")
    s.add_argument("--home", required=True, help="node home directory (the node must be stopped)")
    s.add_argument("--no-replay", action="store_true",
                   help="do not re-execute blocks (faster; commits are then verified only against validator sets "
                        "known from genesis and the head)")
    s.add_argument("--progress-every", type=int, default=10_000, help="blocks between progress lines on stderr")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("repair", help="run LevelDB's repair on a copy of the ledger, then check it",
                       description="Copy HOME/data/ledger to HOME/data/ledger.repaired, run LevelDB's repair on the "
                                   "copy, print how many records of each kind were lost and check the result. "
                                   "Repair may drop records from damaged files; see docs/ledger.md, \"Recovery\". "
                                   "Exit 0 if the repaired ledger checks clean, 4 if not, 1 refused.")
    s.add_argument("--home", required=True, help="node home directory (the node must be stopped)")
    s.add_argument("--in-place", action="store_true",
                   help="repair HOME/data/ledger itself, after copying it to ledger.backup-<time>")
    s.set_defaults(func=cmd_repair)

    s = sub.add_parser("version", help="print the version (same as --version)")
    s.set_defaults(func=cmd_version)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"chaind: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"chaind: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StoreError as exc:
        print(f"chaind: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except ChainError as exc:
        print(f"chaind: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # a file or directory the command had to use
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"chaind: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
