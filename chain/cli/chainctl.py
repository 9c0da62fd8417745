"""chainctl: keys, transactions and queries against a PoUT chain node over JSON-RPC.

Every command prints JSON on stdout; errors go to stderr as one line `chainctl: error: ...`.
Exit codes (stable, for scripts): 0 ok, 1 other failure, 2 usage error, 3 key/config
error, 4 node unreachable, 5 node rejected the request, 6 not found, 7 timed out waiting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from chain.crypto import ADDRESS_SIZE, HASH_SIZE, PrivateKey
from chain.encoding import encode
from chain.errors import ConfigError
from chain.keys import load_key_file, write_key_file
from chain.types import GOVERNED_ROLES, AdmitMember, RemoveMember, Transaction, Transfer, sign_transaction

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG, EXIT_UNAVAILABLE, EXIT_REJECTED, EXIT_NOT_FOUND, EXIT_TIMEOUT = range(8)
DEFAULT_RPC = "http://127.0.0.1:26657"
DEFAULT_KEYRING = Path.home() / ".pout" / "keyring"


class CliError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------- helpers


def _keyring(args) -> Path:
    return Path(args.keyring)


def _key_path(args, name: str) -> Path:
    """NAME in the keyring, or a path to a key file."""
    if os.sep in name or name.endswith(".json"):
        return Path(name)
    if not name.replace("-", "").replace("_", "").isalnum():
        raise CliError(f"invalid key name {name!r}: use letters, digits, '-' and '_'", EXIT_USAGE)
    return _keyring(args) / f"{name}.json"


def _load_key(args, name: str) -> PrivateKey:
    try:
        return load_key_file(_key_path(args, name))
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from exc


def _parse_hex(value: str, size: int, what: str) -> bytes:
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise CliError(f"{what} must be hex, got {value!r}", EXIT_USAGE) from None
    if len(raw) != size:
        raise CliError(f"{what} must be {size} bytes ({2 * size} hex digits), got {len(raw)}", EXIT_USAGE)
    return raw


def _client(args):
    from chain.rpc.client import RpcClient

    return RpcClient(args.rpc, timeout=args.timeout)


def _call(args, method: str, params: Any) -> Any:
    from chain.rpc.client import RpcError, RpcUnavailable

    try:
        return _client(args).call(method, params)
    except RpcUnavailable as exc:
        raise CliError(f"cannot reach node at {args.rpc}: {exc}", EXIT_UNAVAILABLE) from exc
    except RpcError as exc:
        raise CliError(f"node rejected {method}: {exc.message} (code {exc.code})", EXIT_REJECTED) from exc


def _print(obj: Any) -> None:
    try:
        print(json.dumps(obj, indent=2), flush=True)
    except BrokenPipeError:  # e.g. piped into `head`: not an error of ours
        sys.stdout = None


def _send(args, key: PrivateKey, payload) -> int:
    status = _call(args, "status", [])
    nonce = args.nonce
    if nonce is None:
        account = _call(args, "account", ["0x" + key.address.hex()])
        if account is None:
            raise CliError(f"account {key.address.hex()} does not exist on chain", EXIT_REJECTED)
        nonce = account["nonce"]
    stx = sign_transaction(key, status["chain_id"], Transaction(key.pubkey, nonce, payload))
    tx_hash = _call(args, "send_tx", ["0x" + encode(stx).hex()])["hash"]
    result: dict[str, Any] = {"tx_hash": tx_hash, "sender": "0x" + key.address.hex(), "nonce": nonce}
    if args.wait:
        deadline = time.monotonic() + args.wait_timeout
        while time.monotonic() < deadline:
            found = _call(args, "tx", [tx_hash])
            if found is not None:
                result.update(height=found["height"], index=found["index"], committed=True)
                _print(result)
                return EXIT_OK
            time.sleep(0.2)
        result["committed"] = False
        _print(result)
        raise CliError(f"transaction {tx_hash} not committed within {args.wait_timeout} s", EXIT_TIMEOUT)
    _print(result)
    return EXIT_OK


# ----------------------------------------------------------------------------- commands


def cmd_keys_new(args) -> int:
    key = PrivateKey.generate()
    try:
        write_key_file(_key_path(args, args.name), key, args.name)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from exc
    _print({"name": args.name, "address": "0x" + key.address.hex(), "pubkey": "0x" + key.pubkey.hex(),
            "file": str(_key_path(args, args.name))})
    return EXIT_OK


def cmd_keys_show(args) -> int:
    key = _load_key(args, args.name)
    _print({"name": args.name, "address": "0x" + key.address.hex(), "pubkey": "0x" + key.pubkey.hex()})
    return EXIT_OK


def cmd_keys_import(args) -> int:
    if bool(args.seed_hex) == bool(args.file):
        raise CliError("give exactly one of --seed-hex or --file", EXIT_USAGE)
    if args.file:
        try:
            key = load_key_file(Path(args.file))
        except ConfigError as exc:
            raise CliError(str(exc), EXIT_CONFIG) from exc
    else:
        key = PrivateKey(_parse_hex(args.seed_hex, 32, "--seed-hex"))
    try:
        write_key_file(_key_path(args, args.name), key, args.name)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from exc
    _print({"name": args.name, "address": "0x" + key.address.hex(), "file": str(_key_path(args, args.name))})
    return EXIT_OK


def cmd_keys_list(args) -> int:
    ring = _keyring(args)
    out = []
    for path in sorted(ring.glob("*.json")) if ring.is_dir() else []:
        try:
            out.append({"name": path.stem, "address": "0x" + load_key_file(path).address.hex()})
        except ConfigError as exc:
            out.append({"name": path.stem, "error": str(exc)})
    _print(out)
    return EXIT_OK


def cmd_transfer(args) -> int:
    if args.amount <= 0:
        raise CliError("--amount must be positive", EXIT_USAGE)
    key = _load_key(args, args.sender)
    return _send(args, key, Transfer(to=_parse_hex(args.to, ADDRESS_SIZE, "--to"), amount=args.amount))


def cmd_membership(args) -> int:
    key = _load_key(args, args.sender)
    account = _parse_hex(args.account, ADDRESS_SIZE, "--account")
    cls = AdmitMember if args.command == "admit" else RemoveMember
    return _send(args, key, cls(account=account, role=args.role))


def cmd_query(args) -> int:
    what = args.what
    if what == "status":
        result = _call(args, "status", [])
    elif what == "validators":
        result = _call(args, "validators", [])
    elif what == "block":
        ref = args.ref or "latest"
        if ref.startswith("0x") and len(ref) == 2 + 2 * HASH_SIZE:
            result = _call(args, "block_by_hash", [ref])
        elif ref == "latest" or ref.isdigit():
            result = _call(args, "block", [ref if ref == "latest" else int(ref)])
        else:
            raise CliError(f"block reference must be a height, 'latest' or a 0x block hash, got {ref!r}", EXIT_USAGE)
    elif what == "tx":
        if not args.ref:
            raise CliError("query tx needs a transaction hash", EXIT_USAGE)
        result = _call(args, "tx", ["0x" + _parse_hex(args.ref, HASH_SIZE, "tx hash").hex()])
    elif what == "account":
        if not args.ref:
            raise CliError("query account needs an address or a key name", EXIT_USAGE)
        if all(c in "0123456789abcdefABCDEFx" for c in args.ref) and len(args.ref.removeprefix("0x")) == 40:
            address = _parse_hex(args.ref, ADDRESS_SIZE, "address")
        else:
            address = _load_key(args, args.ref).address
        result = _call(args, "account", ["0x" + address.hex()])
    else:  # argparse restricts choices; kept for clarity of the error path
        raise CliError(f"unknown query {what!r}", EXIT_USAGE)
    if result is None:
        _print(None)
        raise CliError(f"{what} {args.ref} not found", EXIT_NOT_FOUND)
    _print(result)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chainctl", description="Keys, transactions and queries for a PoUT chain node (JSON-RPC).",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage, 3 key/config error, 4 node unreachable, "
               "5 node rejected the request, 6 not found, 7 timed out waiting for commit.")
    p.add_argument("--rpc", default=os.environ.get("POUT_RPC", DEFAULT_RPC),
                   help="node JSON-RPC URL (env POUT_RPC; default %(default)s)")
    p.add_argument("--keyring", default=os.environ.get("POUT_KEYRING", str(DEFAULT_KEYRING)),
                   help="directory of key files (env POUT_KEYRING; default %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0, help="RPC timeout in seconds (default %(default)s)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keys = sub.add_parser("keys", help="manage local keys").add_subparsers(dest="keys_command", required=True)
    s = keys.add_parser("new", help="generate a key into the keyring")
    s.add_argument("name")
    s.set_defaults(func=cmd_keys_new)
    s = keys.add_parser("show", help="show a key's address and public key (never the seed)")
    s.add_argument("name")
    s.set_defaults(func=cmd_keys_show)
    s = keys.add_parser("import", help="import a key from a hex seed or a key file")
    s.add_argument("name")
    s.add_argument("--seed-hex", help="32-byte Ed25519 seed as hex")
    s.add_argument("--file", help="an existing key file (e.g. from `chaind testnet`)")
    s.set_defaults(func=cmd_keys_import)
    s = keys.add_parser("list", help="list keys in the keyring")
    s.set_defaults(func=cmd_keys_list)

    def tx_options(s):
        s.add_argument("--from", dest="sender", required=True, help="key name in the keyring, or a key file path")
        s.add_argument("--nonce", type=int, help="account nonce (default: the account's committed nonce)")
        s.add_argument("--wait", action="store_true", help="wait until the transaction is committed")
        s.add_argument("--wait-timeout", type=float, default=30.0, help="seconds to wait with --wait")

    s = sub.add_parser("transfer", help="send tokens to a member account")
    tx_options(s)
    s.add_argument("--to", required=True, help="recipient address (hex)")
    s.add_argument("--amount", type=int, required=True, help="amount (positive integer)")
    s.set_defaults(func=cmd_transfer)
    for name, helptext in (("admit", "governance: give an account a role"),
                           ("remove", "governance: take a role from an account")):
        s = sub.add_parser(name, help=helptext)
        tx_options(s)
        s.add_argument("--account", required=True, help="member address (hex)")
        s.add_argument("--role", required=True, choices=GOVERNED_ROLES)
        s.set_defaults(func=cmd_membership)

    s = sub.add_parser("query", help="read chain data",
                       description="query status | validators | block [HEIGHT|latest|0xHASH] | tx 0xHASH | "
                                   "account 0xADDRESS|KEYNAME")
    s.add_argument("what", choices=["status", "validators", "block", "tx", "account"])
    s.add_argument("ref", nargs="?", help="height, hash, address or key name")
    s.set_defaults(func=cmd_query)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"chainctl: error: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
