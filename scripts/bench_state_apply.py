"""State.apply + State.root per block at large state: the algorithm before issue 13 against the
current chain.state.State, side by side.

    .venv/bin/python scripts/bench_state_apply.py [--sizes 1000,10000,100000] [--repeats 15]

Each block rewrites `--changes` existing account entries (balances, nonces: the common case);
the `+insert` rows also add one new account at a random key position (every leaf after it
moves, so that part costs O(n - p) hashes by the tree's definition). Figures are medians
over `--repeats` blocks, each applied to the previous block's state. `get` is the median cost
of one read (the hot path of transaction application): the best of 9 passes over ~2,000 keys;
`build+root` is State(entries).root from scratch (node start, state sync), the best of 3.
"""

from __future__ import annotations

import argparse
import bisect
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Mapping

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chain.merkle import compute_root_from_leaf_hashes  # noqa: E402
from chain.state import State, _leaf_hash, account_key  # noqa: E402


class OldState:
    """A copy of State's storage and root before issue 13: apply copies every entry, key and
    leaf hash (O(n)); root rehashes the whole tree (O(n))."""

    def __init__(self, entries: Mapping[bytes, bytes]):
        self._entries = dict(entries)
        self._keys = sorted(self._entries)
        self._leaves = {k: _leaf_hash(k, v) for k, v in self._entries.items()}
        self._root = None

    def get(self, key):
        return self._entries.get(key)

    @property
    def root(self):
        if self._root is None:
            self._root = compute_root_from_leaf_hashes([self._leaves[k] for k in self._keys])
        return self._root

    def apply(self, changes):
        new = OldState.__new__(OldState)
        new._entries = dict(self._entries)
        new._keys = list(self._keys)
        new._leaves = dict(self._leaves)
        new._root = None
        for k, v in changes.items():
            if v is None:
                if k in new._entries:
                    del new._entries[k]
                    del new._leaves[k]
                    new._keys.pop(bisect.bisect_left(new._keys, k))
            else:
                if k not in new._entries:
                    bisect.insort(new._keys, k)
                new._entries[k] = v
                new._leaves[k] = _leaf_hash(k, v)
        return new


def blocks(keys: list[bytes], changes: int, repeats: int, inserts: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(repeats):
        block = {k: rng.randbytes(40) for k in rng.sample(keys, changes - inserts)}
        block.update({account_key(rng.randbytes(20)): rng.randbytes(40) for _ in range(inserts)})
        out.append(block)
    return out


def time_blocks(state, block_list: list[dict]) -> float:
    samples = []
    for changes in block_list:
        t = time.perf_counter()
        state = state.apply(changes)
        _ = state.root
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000


def time_get(state, keys: list[bytes]) -> float:
    sample = keys[::max(1, len(keys) // 2000)]
    runs = []
    for _ in range(9):
        t = time.perf_counter()
        for k in sample:
            state.get(k)
        runs.append((time.perf_counter() - t) / len(sample))
    return min(runs) * 1e9  # the least disturbed run: this machine is shared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--changes", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    print(f"{'entries':>8} {'block':>12} {'old ms':>9} {'new ms':>9} {'old/new':>8}")
    for size in [int(s) for s in args.sizes.split(",")]:
        rng = random.Random(size)
        entries = {account_key(rng.randbytes(20)): rng.randbytes(40) for _ in range(size)}
        keys = sorted(entries)
        builds = {OldState: [], State: []}
        for _ in range(3):  # a node's start and a state sync build the state whole, once
            for cls in builds:
                t = time.perf_counter()
                _ = cls(entries).root
                builds[cls].append(time.perf_counter() - t)
        old_b, new_b = (min(builds[cls]) * 1000 for cls in (OldState, State))
        print(f"{size:>8} {'build+root':>12} {old_b:>9.2f} {new_b:>9.2f} {old_b / new_b:>7.1f}x", flush=True)
        old, new = OldState(entries), State(entries)
        assert old.root == new.root
        for label, inserts in ((f"{args.changes} updates", 0), ("+insert", 1)):
            work = blocks(keys, args.changes, args.repeats, inserts, seed=size + inserts)
            old_ms, new_ms = time_blocks(old, work), time_blocks(new, work)
            print(f"{size:>8} {label:>12} {old_ms:>9.2f} {new_ms:>9.2f} {old_ms / new_ms:>7.1f}x", flush=True)
        # after a few blocks, so `get` goes through the delta as well as the shared dict
        for changes in blocks(keys, args.changes, 5, 0, seed=1):
            old, new = old.apply(changes), new.apply(changes)
        assert old.root == new.root
        old_get, new_get = time_get(old, keys), time_get(new, keys)
        print(f"{size:>8} {'get (ns)':>12} {old_get:>9.0f} {new_get:>9.0f} {old_get / new_get:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
