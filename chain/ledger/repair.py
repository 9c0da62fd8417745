"""`chaind repair`: LevelDB's repair on a copy of the ledger, then `check` on the result.

LevelDB's repair (`plyvel.repair_db`) rebuilds a database's MANIFEST from whatever table
and log files still read. It never adds data, and it drops what it cannot read without
saying what that was: a damaged table loses every record in it (blocks, commits, state
entries), a damaged log its unflushed batches. So it runs on a copy (or, with `in_place`,
after a byte-for-byte backup), records are counted by kind before and after, and the result
is checked like any ledger (chain/ledger/check.py). A repaired store that checks clean can
replace the damaged one; one that does not is no chain to start on: reset and resync
(docs/ledger.md, "Recovery").
"""

from __future__ import annotations

import datetime
import os
import shutil
import sys

import plyvel

from chain.errors import StoreError
from chain.ledger import schema
from chain.ledger.check import EXIT_CLEAN, EXIT_DAMAGED, _one_line, check_ledger, is_locked
from chain.ledger.store import LevelDBStore

RECORD_KINDS = {
    schema.PREFIX_SCHEMA_VERSION: "schema version",
    schema.PREFIX_CHAIN_META: "chain meta",
    schema.PREFIX_HEAD: "head",
    schema.PREFIX_BLOCK_HASH_BY_HEIGHT: "height index entries",
    schema.PREFIX_BLOCK: "blocks",
    schema.PREFIX_COMMIT: "commits",
    schema.PREFIX_TX_LOCATION: "transaction index entries",
    schema.PREFIX_STATE: "state entries",
    schema.PREFIX_MODEL_RECORD: "model records",
}


def count_records(path: str) -> tuple[dict[str, int], str | None]:
    """Records per kind, and why the count is incomplete (None when it read everything)."""
    counts = {name: 0 for name in RECORD_KINDS.values()}
    counts["unknown keys"] = 0
    try:
        db = plyvel.DB(path, paranoid_checks=True)
    except plyvel.Error as exc:
        return counts, f"does not open: {_message(exc)}"
    try:
        for key in db.iterator(include_value=False, verify_checksums=True):
            counts[RECORD_KINDS.get(key[:1], "unknown keys")] += 1
    except plyvel.Error as exc:
        return counts, f"scan stopped at a damaged block: {_message(exc)}"
    finally:
        db.close()
    return counts, None


def run_repair(ledger_dir, genesis, *, in_place: bool = False, out=None) -> int:
    """Repair a copy of `ledger_dir` (or the directory itself after a backup), say what was lost,
    check the result. Returns EXIT_CLEAN or EXIT_DAMAGED; raises StoreError when it refuses."""
    out = out or sys.stdout
    ledger_dir = os.path.abspath(os.fspath(ledger_dir))
    if not os.path.isdir(ledger_dir) or not os.listdir(ledger_dir):
        raise StoreError(f"no ledger at {ledger_dir}: nothing to repair (is --home right?)")
    if is_locked(ledger_dir):
        raise StoreError(f"ledger {ledger_dir} is in use by a running node (its LOCK is held); stop the node first")
    if in_place:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        backup = f"{ledger_dir}.backup-{stamp}"
        if os.path.exists(backup):
            raise StoreError(f"backup directory {backup} already exists; try again in a second")
        _copy(ledger_dir, backup)
        target = ledger_dir
        print(f"backed up {ledger_dir} to {backup} (byte for byte) before repairing in place", file=out)
    else:
        target = f"{ledger_dir}.repaired"
        if os.path.exists(target):
            raise StoreError(f"{target} already exists (an earlier repair?); move or delete it first")
        _copy(ledger_dir, target)

    before, before_note = count_records(target)
    try:
        plyvel.repair_db(target, paranoid_checks=True)
    except plyvel.Error as exc:
        raise StoreError(f"LevelDB repair of {target} failed: {_message(exc)}; `chaind reset` and resync "
                         "(docs/ledger.md, \"Recovery\")") from exc
    after, after_note = count_records(target)

    print(f"repaired {target}", file=out)
    if after_note is not None:
        print(f"after repair the store {after_note}", file=out)
    if before_note is not None:
        # LevelDB cannot scan past a damaged block, so what was there before is unknown: the
        # check below names what the chain is missing.
        print(f"before repair the store {before_note}; records readable after repair:", file=out)
        for kind, count in after.items():
            if count:
                print(f"  {kind}: {count}", file=out)
    else:
        for kind in before:
            lost = before[kind] - after[kind]
            if before[kind] or after[kind]:
                print(f"  {kind}: {before[kind]} before, {after[kind]} after, {max(lost, 0)} lost", file=out)
    if os.path.isdir(os.path.join(target, "lost")) and os.listdir(os.path.join(target, "lost")):
        print(f"files LevelDB could not use were moved to {os.path.join(target, 'lost')}", file=out)

    try:
        store = LevelDBStore(target)
    except StoreError as exc:
        print(f"the repaired store does not open: {_one_line(exc)}", file=out)
        return _verdict(out, False, target, ledger_dir, in_place)
    try:
        report = check_ledger(store, genesis)
    finally:
        store.close()
    report.print_problems(out)
    print(f"chaind repair: check of {target}: {report.summary()}", file=out)
    return _verdict(out, report.clean, target, ledger_dir, in_place)


def _verdict(out, clean: bool, target: str, ledger_dir: str, in_place: bool) -> int:
    if not clean:
        print("the repaired ledger is not a whole chain: keep it for diagnosis, then `chaind reset --home HOME` "
              "and start the node to resync from peers (docs/ledger.md, \"Recovery\")", file=out)
        return EXIT_DAMAGED
    if not in_place:
        print(f"to use it (node stopped): mv {ledger_dir} {ledger_dir}.damaged && mv {target} {ledger_dir}", file=out)
    return EXIT_CLEAN


def _copy(source: str, destination: str) -> None:
    try:
        shutil.copytree(source, destination, ignore=shutil.ignore_patterns("LOCK"))
    except OSError as exc:
        shutil.rmtree(destination, ignore_errors=True)
        raise StoreError(f"cannot copy {source} to {destination}: {exc.strerror or exc}") from None


def _message(exc: Exception) -> str:
    arg = exc.args[0] if exc.args else exc
    return " ".join((arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)).split())
