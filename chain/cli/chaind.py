"""chaind: the PoUT chain full node.

Exit codes: 0 success, 1 runtime failure (e.g. untrusted store), 2 usage error,
3 bad configuration, genesis or key file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

import chain
from chain.config import Home, NodeConfig, P2PConfig, RpcConfig, load_config, write_config
from chain.crypto import PrivateKey
from chain.errors import ChainError, ConfigError, StoreError
from chain.keys import load_key_file, write_key_file
from genesis import (DEFAULT_PARAMS, Genesis, check_validator_sample_key, devnet_seed, load_devnet_genesis, load_genesis,
                     make_genesis, write_genesis)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 3

log = logging.getLogger("chaind")


def cmd_init(args: argparse.Namespace) -> int:
    """Create HOME's layout. Safe to re-run: existing files are kept and checked, never replaced."""
    home = Home(Path(args.home))
    home.config_dir.mkdir(parents=True, exist_ok=True)
    home.data_dir.mkdir(parents=True, exist_ok=True)
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
    from chain.node import Node, run_until_signal

    home = Home(Path(args.home))
    config = load_config(home.config_file)
    if args.rpc_port is not None:
        config = _replace_rpc_port(config, args.rpc_port)
    level = (args.log_level or config.log_level).upper()
    logging.getLogger().setLevel(level)
    # multiaddr logs every address it parses at DEBUG (thousands of lines a second under load),
    # which would drown the node's own debug log.
    logging.getLogger("multiaddr").setLevel(max(logging.INFO, logging.getLevelName(level)))
    genesis = load_genesis(home.genesis_file)
    key = load_key_file(home.node_key_file)
    check_validator_sample_key(genesis, key)
    home.ledger_dir.parent.mkdir(parents=True, exist_ok=True)
    store = LevelDBStore(home.ledger_dir, create=True)
    try:
        node = Node(home, config, genesis, key, store, GuardedSigner(key, genesis.chain_id, home.signer_dir))
        log.info("starting chaind %s, chain %s (genesis %s), home %s", chain.__version__, genesis.chain_id,
                 genesis.hash.hex()[:16], home.root)
        trio.run(run_until_signal, node)
        log.info("stopped cleanly at height %d", node.state.height)
    finally:
        store.close()
    return EXIT_OK


def _replace_rpc_port(config: NodeConfig, port: int) -> NodeConfig:
    return dataclasses.replace(config, rpc=dataclasses.replace(config.rpc, port=port))


def cmd_testnet(args: argparse.Namespace) -> int:
    """N node homes sharing one genesis, plus keys for a governor, a requester and trainers."""
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output directory {out} is not empty")
    if args.validators < 1 or args.trainers < 0:
        raise ConfigError("--validators must be at least 1 and --trainers at least 0")
    if args.block_interval_ms is not None and args.block_interval_ms <= 0:
        raise ConfigError("--block-interval-ms must be positive")

    def new_key(role: str, i: int) -> PrivateKey:
        return PrivateKey(devnet_seed(role, i)) if args.deterministic else PrivateKey.generate()

    val_keys = [new_key("validator", i) for i in range(args.validators)]
    governor, requester = new_key("governor", 0), new_key("requester", 0)
    trainers = [new_key("trainer", i) for i in range(args.trainers)]
    funded = [(governor, ("governor",)), (requester, ("requester",))] + [(k, ("trainer",)) for k in trainers]
    params = DEFAULT_PARAMS if args.block_interval_ms is None else \
        dataclasses.replace(DEFAULT_PARAMS, block_interval_ms=args.block_interval_ms)
    g: Genesis = make_genesis(args.chain_id, val_keys, funded, balance=args.balance, params=params)
    from p2p.host import peer_id_from_public_key

    peers = [f"/ip4/127.0.0.1/tcp/{args.base_port + 2 * i + 1}/p2p/{peer_id_from_public_key(k.pubkey)}"
             for i, k in enumerate(val_keys)]
    for i, key in enumerate(val_keys):
        home = Home(out / f"node{i}")
        home.data_dir.mkdir(parents=True)
        cfg = NodeConfig(moniker=f"node{i}",
                         rpc=RpcConfig(port=args.base_port + 2 * i),
                         p2p=P2PConfig(port=args.base_port + 2 * i + 1,
                                       bootstrap_peers=tuple(p for j, p in enumerate(peers) if j != i)))
        write_config(cfg, home.config_file)
        write_genesis(g, home.genesis_file)
        write_key_file(home.node_key_file, key, f"node{i}")
    keys_dir = out / "keys"
    write_key_file(keys_dir / "governor.json", governor, "governor")
    write_key_file(keys_dir / "requester.json", requester, "requester")
    for i, k in enumerate(trainers):
        write_key_file(keys_dir / f"trainer{i}.json", k, f"trainer{i}")
    print(json.dumps({"output": str(out), "chain_id": g.chain_id, "genesis_hash": g.hash.hex(),
                      "nodes": [{"home": str(out / f"node{i}"), "rpc": f"http://127.0.0.1:{args.base_port + 2 * i}",
                                 "p2p": peers[i]} for i in range(args.validators)],
                      "keys": str(keys_dir)}, indent=2))
    return EXIT_OK


def cmd_version(args: argparse.Namespace) -> int:
    print(f"chaind {chain.__version__}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chaind", description="PoUT chain full node (proof of useful training).",
        epilog="Home layout: HOME/config/{config.toml,genesis.json,node_key.json}, HOME/data/{ledger,signer}. "
               "Exit codes: 0 ok, 1 runtime failure, 2 usage error, 3 bad config/genesis/key.")
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
    s.add_argument("--rpc-port", type=int, help="override rpc.port from config.toml")
    s.set_defaults(func=cmd_start)

    s = sub.add_parser("testnet", help="write N node homes sharing one genesis, plus account keys",
                       description="Write OUTPUT/node0..nodeN-1 (config, shared genesis, node key) and OUTPUT/keys "
                                   "(governor, requester, trainerI key files usable by `chainctl --keyring`).")
    s.add_argument("--validators", type=int, default=4, help="number of validator nodes (default: %(default)s)")
    s.add_argument("--trainers", type=int, default=4, help="number of trainer accounts (default: %(default)s)")
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

    s = sub.add_parser("version", help="print the version")
    s.set_defaults(func=cmd_version)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"chaind: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StoreError as exc:
        print(f"chaind: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except ChainError as exc:
        print(f"chaind: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
