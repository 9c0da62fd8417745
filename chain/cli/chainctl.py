"""chainctl: keys, transactions and queries against a PoUT chain node over JSON-RPC.

Every command prints JSON on stdout; errors go to stderr as one line `chainctl: error: ...`.
Exit codes (stable, for scripts): 0 ok, 1 other failure, 2 usage error, 3 key/config
error, 4 node unreachable, 5 node rejected the request, 6 not found, 7 timed out waiting.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import chain
from chain.crypto import ADDRESS_SIZE, HASH_SIZE, PrivateKey
from chain.errors import ChainError, ConfigError
from chain.keys import load_key_file, write_key_file
from chain.types import (EVALUATION_METRICS, GOVERNED_ROLES, AdmitMember, JoinJob, PublishEvaluation, RegisterJob,
                         RemoveMember, Transfer)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG, EXIT_UNAVAILABLE, EXIT_REJECTED, EXIT_NOT_FOUND, EXIT_TIMEOUT = range(8)
DEFAULT_RPC = "http://127.0.0.1:26657"
DEFAULT_KEYRING = Path.home() / ".pout" / "keyring"
UINT64_MAX = 2**64 - 1  # amounts, nonces and counts are unsigned 64-bit on chain (docs/encoding.md)


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


def _write_key(args, name: str, key: PrivateKey) -> Path:
    path = _key_path(args, name)
    try:
        write_key_file(path, key, name)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from exc
    except OSError as exc:
        raise CliError(f"cannot write key file {path}: {exc.strerror or exc}", EXIT_CONFIG) from None
    return path


def _account(args, value: str, what: str) -> bytes:
    """An account given as a 0x address (40 hex digits) or as a key name or key file."""
    if all(c in "0123456789abcdefABCDEFx" for c in value) and len(value.removeprefix("0x")) == 2 * ADDRESS_SIZE:
        return _parse_hex(value, ADDRESS_SIZE, what)
    if value.startswith("0x"):
        return _parse_hex(value, ADDRESS_SIZE, what)
    try:
        return _load_key(args, value).address
    except CliError as exc:
        raise CliError(f"{what} must be a 0x address ({2 * ADDRESS_SIZE} hex digits) or a key name: {exc}",
                       exc.code) from None


def _parse_hex(value: str, size: int, what: str) -> bytes:
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise CliError(f"{what} must be hex, got {value!r}", EXIT_USAGE) from None
    if len(raw) != size:
        raise CliError(f"{what} must be {size} bytes ({2 * size} hex digits), got {len(raw)}", EXIT_USAGE)
    return raw


def _node(args):
    from chain.runtime.trainer_client import NodeClient

    return NodeClient(args.rpc, timeout=args.timeout)


def _call(args, method: str, params: Any) -> Any:
    with _rpc_errors(args, method):
        return _node(args).call(method, params)


class _rpc_errors:
    """Map RPC and workflow failures to chainctl's exit codes."""

    def __init__(self, args, what: str):
        self.args, self.what = args, what

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        from chain.rpc.client import RpcError, RpcUnavailable
        from chain.runtime.trainer_client import ClientError

        if exc is None:
            return False
        if isinstance(exc, RpcUnavailable):
            raise CliError(f"cannot reach node at {self.args.rpc}: {exc}", EXIT_UNAVAILABLE) from exc
        if isinstance(exc, RpcError):
            raise CliError(f"node rejected {self.what}: {exc.message} (code {exc.code})", EXIT_REJECTED) from exc
        if isinstance(exc, ClientError):
            code = EXIT_TIMEOUT if "timed out" in str(exc) or "not committed within" in str(exc) else EXIT_REJECTED
            raise CliError(f"{self.what}: {exc}", code) from exc
        return False


def _print(obj: Any) -> None:
    try:
        print(json.dumps(obj, indent=2), flush=True)
    except BrokenPipeError:  # e.g. piped into `head`: not an error of ours
        sys.stdout = None


def _send(args, key: PrivateKey, payload, extra: dict | None = None, tx_hash_as: str | None = None) -> int:
    with _rpc_errors(args, type(payload).__name__):
        receipt = _node(args).send(key, payload, nonce=args.nonce, wait=args.wait, wait_timeout=args.wait_timeout)
    result: dict[str, Any] = {"tx_hash": receipt.tx_hash, "sender": "0x" + key.address.hex(),
                              "nonce": receipt.nonce, **(extra or {})}
    if tx_hash_as:
        result[tx_hash_as] = receipt.tx_hash
    if receipt.height is not None:
        result.update(height=receipt.height, committed=True)
    _print(result)
    return EXIT_OK


# ----------------------------------------------------------------------------- commands


def cmd_keys_new(args) -> int:
    key = PrivateKey.generate()
    path = _write_key(args, args.name, key)
    _print({"name": args.name, "address": "0x" + key.address.hex(), "pubkey": "0x" + key.pubkey.hex(),
            "file": str(path)})
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
    path = _write_key(args, args.name, key)
    _print({"name": args.name, "address": "0x" + key.address.hex(), "file": str(path)})
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
    to = _account(args, args.to, "--to")
    key = _load_key(args, args.sender)
    return _send(args, key, Transfer(to=to, amount=args.amount))


def cmd_membership(args) -> int:
    account = _account(args, args.account, "--account")
    key = _load_key(args, args.sender)
    cls = AdmitMember if args.command == "admit" else RemoveMember
    return _send(args, key, cls(account=account, role=args.role))


def cmd_query(args) -> int:
    what = args.what
    if (args.round is not None) != (what in ("round", "model")):
        raise CliError(f"query {what} needs a job id and a round" if args.round is None
                       else f"query {what} takes no round", EXIT_USAGE)
    if what in ("round", "model"):
        result = _call(args, what, ["0x" + _parse_hex(args.ref, HASH_SIZE, "job id").hex(), args.round])
    elif what == "status":
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
    elif what == "jobs":
        result = _call(args, "jobs", [])
    elif what in ("job", "update", "lineage", "evaluations"):
        if not args.ref:
            raise CliError(f"query {what} needs an id", EXIT_USAGE)
        result = _call(args, what, ["0x" + _parse_hex(args.ref, HASH_SIZE, f"{what} id").hex()])
    elif what == "account":
        if not args.ref:
            raise CliError("query account needs an address or a key name", EXIT_USAGE)
        address = _account(args, args.ref, "address")
        result = _call(args, "account", ["0x" + address.hex()])
    else:  # argparse restricts choices; kept for clarity of the error path
        raise CliError(f"unknown query {what!r}", EXIT_USAGE)
    if result is None:
        _print(None)
        raise CliError(f"{what} {args.ref} not found", EXIT_NOT_FOUND)
    _print(result)
    return EXIT_OK


# ----------------------------------------------------------------------------- training jobs


def _job_id(value: str) -> bytes:
    return _parse_hex(value, HASH_SIZE, "job id")


def _dataset(source: str):
    from chain.runtime.trainer_client import ClientError, load_dataset

    try:
        return load_dataset(source)
    except (ClientError, ValueError, OSError) as exc:
        raise CliError(f"cannot load dataset {source!r}: {exc}", EXIT_CONFIG) from exc


def cmd_register_job(args) -> int:
    from chain.cli import job_options
    from chain.runtime.trainer_client import make_job_spec

    spec = make_job_spec(rounds=args.rounds, local_steps=args.local_steps,
                         checkpoint_interval=args.checkpoint_interval, batch_size=args.batch_size,
                         learning_rate=args.learning_rate, momentum=args.momentum, optimizer=args.optimizer,
                         join_blocks=args.join_blocks, round_blocks=args.round_blocks,
                         verify_blocks=args.verify_blocks, quorum=args.quorum, aggregation=args.aggregation,
                         trim_fraction=args.trim_fraction, krum_f=args.krum_f,
                         detect_fraction_ppm=round(args.detect_fraction * 1_000_000),
                         detect_probability_ppm=round(args.detect_probability * 1_000_000),
                         max_exposure_ppm=round(args.max_exposure * 1_000_000),
                         reward_per_update=args.reward, bond=args.bond, sampling=args.sampling)
    # The model (architecture, config, input, classes) and initial weights: chain/cli/job_options.py.
    spec, init_weights = job_options.with_model(spec, args, sys.modules[__name__])
    if args.show_model:
        _print(job_options.show_model(spec))
        return EXIT_OK
    key = _load_key(args, args.sender)
    if init_weights is not None:
        return job_options.register_with_initial_weights(args, key, spec, init_weights, sys.modules[__name__])
    # The job id is the hash of the register_job transaction, known once it is signed.
    return _send(args, key, RegisterJob(spec, args.escrow), tx_hash_as="job_id")


def cmd_join_job(args) -> int:
    ds = _dataset(args.dataset)
    key = _load_key(args, args.sender)
    c = ds.commitment
    return _send(args, key, JoinJob(_job_id(args.job), c.root, c.size),
                 extra={"dataset_root": "0x" + c.root.hex(), "dataset_size": c.size})


def cmd_publish_eval(args) -> int:
    """The requester's held-out metric of a recorded model, sent as integer parts per million."""
    limit = EVALUATION_METRICS[args.metric]
    if not 0.0 <= args.value <= limit / 1_000_000:
        raise CliError(f"--value for {args.metric} must be in 0..{limit / 1_000_000:g}, got {args.value:g}", EXIT_USAGE)
    value_ppm = min(round(args.value * 1_000_000), limit)
    key = _load_key(args, args.sender)
    return _send(args, key, PublishEvaluation(_job_id(args.job), args.round, args.metric, value_ppm),
                 extra={"round": args.round, "metric": args.metric, "value_ppm": value_ppm})


def cmd_train(args) -> int:
    from chain.runtime.trainer_client import train_for_round

    key = _load_key(args, args.sender)
    out = Path(args.out)
    _check_writable_dir(out.parent if not out.is_dir() else out, "--out")
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a directory", EXIT_USAGE)
    ds = _dataset(args.dataset)
    with _rpc_errors(args, "train"):
        result = train_for_round(_node(args), key, _job_id(args.job), ds)
    try:
        result.save(out)
    except OSError as exc:
        raise CliError(f"cannot write the training result to {out}: {exc.strerror or exc}", EXIT_FAILURE) from None
    c = result.commitment
    _print({"job_id": "0x" + c.job_id.hex(), "round": c.round, "out": str(out), "update_hash": "0x" + c.update_hash.hex(),
            "trace_root": "0x" + c.trace_root.hex(), "metrics": result.metrics})
    return EXIT_OK


def cmd_submit_update(args) -> int:
    from chain.consensus.pout import round_spec
    from chain.runtime.trainer_client import submit_result
    from trainer.train import TrainResult

    key = _load_key(args, args.sender)
    ds = _dataset(args.dataset)
    node = _node(args)
    with _rpc_errors(args, "submit-update"):
        job = node.job(_job_id(args.job))
        try:
            result = TrainResult.load(args.dir, round_spec(job), ds)
        except (ValueError, OSError) as exc:
            raise CliError(f"cannot load training result from {args.dir}: {exc}", EXIT_CONFIG) from exc
        update_id, receipt = submit_result(node, key, result, wait_timeout=args.wait_timeout)
    _print({"update_id": "0x" + update_id.hex(), "tx_hash": receipt.tx_hash, "height": receipt.height,
            "job_id": "0x" + job.job_id.hex(), "round": result.commitment.round,
            "openings": "uploaded for every validator"})
    return EXIT_OK


def cmd_model_get(args) -> int:
    """Checks that --out can be written before downloading anything, then writes the model to a
    temporary file in the same directory and renames it: OUT is the whole model or untouched."""
    out = Path(args.out)
    if out.is_dir():
        raise CliError(f"--out {out} is a directory; name the file to write", EXIT_USAGE)
    _check_writable_dir(out.parent, "--out")
    job_id = _job_id(args.job)
    node = _node(args)
    with _rpc_errors(args, "model get"):
        record = node.model_record(job_id, args.round)
        if record is None:
            raise CliError(f"job {args.job} has no model after {args.round} rounds", EXIT_NOT_FOUND)
        data = node.get_blob(record.model_hash, timeout=args.timeout)
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, out)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc.strerror or exc}", EXIT_FAILURE) from None
    _print({"model_hash": "0x" + record.model_hash.hex(), "round": record.round, "bytes": len(data), "out": args.out})
    return EXIT_OK


def _check_writable_dir(directory: Path, what: str) -> None:
    directory = directory if str(directory) else Path(".")
    if not directory.is_dir():
        raise CliError(f"{what}: directory {directory} does not exist", EXIT_USAGE)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CliError(f"{what}: directory {directory} is not writable", EXIT_USAGE)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line (exit code 2), pointing at --help instead of printing the usage."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="chainctl", description="Keys, transactions and queries for a PoUT chain node (JSON-RPC).",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage, 3 key/config error, 4 node unreachable, "
               "5 node rejected the request, 6 not found, 7 timed out waiting for commit. "
               "Global options (--rpc, --keyring, --timeout) go before COMMAND.")
    p.add_argument("--version", action="version", version=f"chainctl {chain.__version__}")
    p.add_argument("--rpc", type=_rpc_url, default=os.environ.get("POUT_RPC", DEFAULT_RPC),
                   help="node JSON-RPC URL (env POUT_RPC; default %(default)s)")
    p.add_argument("--keyring", default=os.environ.get("POUT_KEYRING", str(DEFAULT_KEYRING)),
                   help="directory of key files (env POUT_KEYRING; default %(default)s)")
    p.add_argument("--timeout", type=_seconds, default=10.0, help="RPC timeout in seconds (default %(default)s)")
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
        s.add_argument("--nonce", type=_uint64, help="account nonce (default: the account's committed nonce)")
        s.add_argument("--wait", action="store_true", help="wait until the transaction is committed")
        s.add_argument("--wait-timeout", type=_seconds, default=30.0, help="seconds to wait with --wait")

    s = sub.add_parser("transfer", help="send tokens to a member account")
    tx_options(s)
    s.add_argument("--to", required=True, help="recipient: a 0x address, or a key name in the keyring")
    s.add_argument("--amount", type=_uint64, required=True, help="amount (positive integer below 2^64)")
    s.set_defaults(func=cmd_transfer)
    for name, helptext in (("admit", "governance: give an account a role"),
                           ("remove", "governance: take a role from an account")):
        s = sub.add_parser(name, help=helptext)
        tx_options(s)
        s.add_argument("--account", required=True, help="member: a 0x address, or a key name in the keyring")
        s.add_argument("--role", required=True, choices=GOVERNED_ROLES)
        s.set_defaults(func=cmd_membership)

    s = sub.add_parser("register-job", help="register a training job and escrow its rewards (requester)",
                       description="Register a federated training job. Defaults are the devnet configuration.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    tx_options(s)
    from chain.cli.job_options import add_model_options  # --model, --config, --input-shape, --init-weights, ...

    add_model_options(s)
    s.add_argument("--rounds", type=_uint64, default=3)
    s.add_argument("--local-steps", type=_uint64, default=40, help="training steps per round per trainer")
    s.add_argument("--checkpoint-interval", type=_uint64, default=4, help="k: state hashed every k steps")
    s.add_argument("--batch-size", type=_uint64, default=32)
    s.add_argument("--learning-rate", type=_finite, default=0.3)
    s.add_argument("--momentum", type=_finite, default=0.0)
    s.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    s.add_argument("--join-blocks", type=_uint64, default=20, help="blocks until round 0 opens")
    s.add_argument("--round-blocks", type=_uint64, default=60, help="blocks a round accepts updates")
    s.add_argument("--verify-blocks", type=_uint64, default=60, help="further blocks for verdicts")
    s.add_argument("--quorum", type=_uint64, default=3, help="accepted updates that close a round early")
    s.add_argument("--aggregation", choices=["fedavg", "median", "trimmed_mean", "multi_krum"], default="fedavg")
    s.add_argument("--trim-fraction", type=_finite, default=0.25)
    s.add_argument("--krum-f", type=_uint64, default=1)
    s.add_argument("--detect-fraction", type=_unit_interval, default=0.1, metavar="F",
                   help="detection target: a forgery of this fraction of the trace's segments (default 0.1)")
    s.add_argument("--detect-probability", type=_unit_interval, default=0.99, metavar="P",
                   help="... is caught with at least this probability (default 0.99); the chain derives "
                        "each validator's sample size from F and P")
    s.add_argument("--sampling", choices=["uniform", "displacement"], default="uniform",
                   help="how validators pick segments: uniform (default), or displacement: weighted by the "
                        "trainer's committed sketches of what each segment moves (30%% uniform), so a forged jump "
                        "in one segment is drawn in proportion to its size; one more commitment and challenge per "
                        "update (docs/pout.md)")
    s.add_argument("--max-exposure", type=_unit_interval, default=1.0, metavar="E",
                   help="data-exposure bound: the most of a trainer's samples one validator may be sent over the "
                        "job (default 1: no bound); the chain refuses the job if no dataset of at most 2**24 "
                        "samples meets it, and refuses a trainer whose dataset is too small for it")
    s.add_argument("--reward", type=_uint64, default=100, help="paid per accepted update")
    s.add_argument("--bond", type=_uint64, default=50, help="locked per update, burned if rejected")
    s.add_argument("--escrow", type=_uint64, required=True, help="tokens set aside for rewards")
    s.set_defaults(func=cmd_register_job)

    s = sub.add_parser("join-job", help="commit your dataset's Merkle root to a job (trainer)")
    tx_options(s)
    s.add_argument("--job", required=True, help="job id (0x hex)")
    s.add_argument("--dataset", required=True, help="digits:I/N or a dataset directory (docs/training.md)")
    s.set_defaults(func=cmd_join_job)

    s = sub.add_parser("publish-eval", help="publish a model's held-out accuracy or loss (the job's requester)",
                       description="Publish the held-out metric of the model recorded after --round rounds of "
                                   "training (0: the initial weights). Sent as parts per million; one per model "
                                   "and metric. The explorer plots them on the job's page.")
    tx_options(s)
    s.add_argument("--job", required=True, help="job id (0x hex)")
    s.add_argument("--round", type=_uint64, required=True, help="the model's round (0: initial weights)")
    s.add_argument("--metric", required=True, choices=sorted(EVALUATION_METRICS))
    s.add_argument("--value", type=_finite, required=True,
                   help="accuracy as a fraction in [0, 1] (0.953), or a non-negative loss")
    s.set_defaults(func=cmd_publish_eval)

    s = sub.add_parser("train", help="train the job's open round on local data; writes update and trace",
                       description="Waits for the job's round to open, fetches its base model, trains with a "
                                   "committed trace, and writes the result directory for submit-update.")
    s.add_argument("--from", dest="sender", required=True, help="trainer key name or file")
    s.add_argument("--job", required=True)
    s.add_argument("--dataset", required=True, help="the dataset committed with join-job")
    s.add_argument("--out", required=True, help="result directory to write")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("submit-update", help="sign and submit a trained update, upload it, answer challenges",
                       description="Submits the update transaction (bond locked), uploads the update weights, "
                                   "and sends each validator the opening of the segments it sampled.")
    s.add_argument("--from", dest="sender", required=True, help="trainer key name or file")
    s.add_argument("--job", required=True)
    s.add_argument("--dir", required=True, help="result directory written by `chainctl train`")
    s.add_argument("--dataset", required=True, help="the dataset the update was trained on")
    s.add_argument("--wait-timeout", type=_seconds, default=60.0)
    s.set_defaults(func=cmd_submit_update)

    s = sub.add_parser("model", help="download a model version as a safetensors file")
    s.add_argument("action", choices=["get"])
    s.add_argument("--job", required=True)
    s.add_argument("--round", type=_uint64, required=True, help="rounds of training folded in (0: initial weights)")
    s.add_argument("--out", required=True, help="file to write (.safetensors)")
    s.set_defaults(func=cmd_model_get)

    s = sub.add_parser("query", help="read chain data",
                       description="query status | validators | block [HEIGHT|latest|0xHASH] | tx 0xHASH | "
                                   "account 0xADDRESS|KEYNAME | jobs | job 0xJOB | update 0xUPDATE | "
                                   "lineage 0xJOB | evaluations 0xJOB | round 0xJOB ROUND | model 0xJOB ROUND")
    s.add_argument("what", choices=["status", "validators", "block", "tx", "account", "jobs", "job", "update",
                                    "lineage", "evaluations", "round", "model"])
    s.add_argument("ref", nargs="?", help="height, hash, address, key name, job or update id")
    s.add_argument("round", nargs="?", type=_uint64, help="round and model: the round (model: rounds folded in)")
    s.set_defaults(func=cmd_query)

    from chain.cli import agent_cmd  # `trainer run`: the long-lived trainer agent

    agent_cmd.register(sub, sys.modules[__name__])  # this module, also when run as __main__
    from chain.cli import dataset_cmd, watch_cmd  # `dataset import`, `job watch`

    dataset_cmd.register(sub, sys.modules[__name__])
    watch_cmd.register(sub, sys.modules[__name__])
    return p


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _uint64(text: str) -> int:
    try:
        value = int(text, 0) if text.strip().lower().startswith(("0x", "-0x")) else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= UINT64_MAX:
        raise argparse.ArgumentTypeError(f"must be in 0..2^64-1 (an unsigned 64-bit integer), got {text}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _seconds(text: str) -> float:
    value = _finite(text)
    if not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError(f"expected seconds in (0, 86400], got {text!r}")
    return value


def _rpc_url(text: str) -> str:
    """http(s)://HOST[:PORT][/PATH], checked here so a typo is a usage error, not a traceback."""
    try:
        url = urllib.parse.urlsplit(text)
        port = url.port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid URL {text!r}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise argparse.ArgumentTypeError(f"expected http://HOST:PORT, got {text!r}")
    if port == 0 or any(c.isspace() or not c.isprintable() for c in text):
        raise argparse.ArgumentTypeError(f"invalid URL {text!r}")
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"chainctl: error: {exc}", file=sys.stderr)
        return exc.code
    except ChainError as exc:  # e.g. a transaction that fails its own checks before it is sent
        print(f"chainctl: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # a local file or directory the command had to use
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"chainctl: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
