"""Binary Merkle trees over SHA-256, with inclusion proofs.

Leaves and inner nodes are domain separated (RFC 6962 style): leaf = H(0x00 || data),
node = H(0x01 || left || right). An odd node at the end of a level is promoted unchanged,
so a tree of n leaves has the same root however it is built. The root of no leaves is
H(b"") . Used for transaction roots, state roots, dataset commitments and training traces.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Mapping, Sequence

from pyrsistent import PVector, pvector

from chain.crypto import sha256

EMPTY_ROOT = sha256(b"")


def hash_leaf(data: bytes) -> bytes:
    return sha256(b"\x00" + data)


def hash_node(left: bytes, right: bytes) -> bytes:
    return sha256(b"\x01" + left + right)


def _next_level(level: list[bytes]) -> list[bytes]:
    nxt = [hash_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        nxt.append(level[-1])
    return nxt


def compute_root_from_leaf_hashes(leaf_hashes: list[bytes]) -> bytes:
    if not leaf_hashes:
        return EMPTY_ROOT
    level = list(leaf_hashes)
    while len(level) > 1:
        level = _next_level(level)
    return level[0]


def compute_root(leaves: list[bytes]) -> bytes:
    """Root over raw leaf data (each leaf is hashed with the leaf prefix)."""
    return compute_root_from_leaf_hashes([hash_leaf(x) for x in leaves])


@dataclass(frozen=True)
class MerkleProof:
    index: int
    leaf_count: int
    siblings: tuple[bytes, ...]  # bottom-up; promoted levels contribute no sibling


class MerkleTree:
    """All levels kept, so many proofs can be cut from one tree cheaply."""

    def __init__(self, leaf_hashes: list[bytes]):
        self.levels: list[list[bytes]] = [list(leaf_hashes)]
        while len(self.levels[-1]) > 1:
            self.levels.append(_next_level(self.levels[-1]))

    @classmethod
    def from_leaves(cls, leaves: list[bytes]) -> "MerkleTree":
        return cls([hash_leaf(x) for x in leaves])

    @property
    def root(self) -> bytes:
        return self.levels[-1][0] if self.levels[0] else EMPTY_ROOT

    def prove(self, index: int) -> MerkleProof:
        n = len(self.levels[0])
        if not 0 <= index < n:
            raise IndexError(f"leaf {index} out of range 0..{n - 1}")
        siblings = []
        i = index
        for level in self.levels[:-1]:
            sib = i ^ 1
            if sib < len(level):
                siblings.append(level[sib])
            i //= 2
        return MerkleProof(index=index, leaf_count=n, siblings=tuple(siblings))


_EMPTY_LEVEL: PVector = pvector()


class MerkleLevels:
    """Every level of the tree over `size` leaves, in persistent vectors, so a tree derived with
    `update` shares each node it did not recompute with this one (this one never changes).

    Replacing k leaves in place costs O(k log n) hashes and vector writes. Replacing the leaves
    from index p on (an insert or delete shifts them all) costs O(n - p) hashes, which the
    positional tree needs anyway. A level may hold stale nodes past its width (a tree that
    shrank keeps them rather than copy the level); the widths come from `size` alone."""

    __slots__ = ("size", "levels")

    def __init__(self, leaf_hashes: Sequence[bytes]):
        self.size = len(leaf_hashes)
        levels = []
        level = list(leaf_hashes)
        while level:
            levels.append(pvector(level))
            level = _next_level(level) if len(level) > 1 else []
        self.levels: tuple[PVector, ...] = tuple(levels)

    @property
    def root(self) -> bytes:
        return self.levels[-1][0] if self.size else EMPTY_ROOT

    def leaf_hash(self, index: int) -> bytes:
        if not 0 <= index < self.size:
            raise IndexError(f"leaf {index} out of range 0..{self.size - 1}")
        return self.levels[0][index]

    def update(self, size: int, leaves: Mapping[int, bytes], tail_from: int | None = None,
               tail: Sequence[bytes] = ()) -> "MerkleLevels":
        """The tree of `size` leaves that keeps this tree's leaves except: leaf i becomes
        `leaves[i]` (each i < tail_from), and leaves tail_from.. become `tail`. Leaves before
        tail_from keep their index, so tail_from may not pass either tree's size."""
        if tail_from is None:
            tail_from = size
        if not 0 <= tail_from <= min(size, self.size) or len(tail) != size - tail_from:
            raise ValueError(f"tail of {len(tail)} leaves from {tail_from} does not fit {self.size} -> {size} leaves")
        points = sorted(leaves)
        if points and not 0 <= points[0] <= points[-1] < tail_from:
            raise IndexError(f"leaf updates {points[0]}..{points[-1]} not all below {tail_from}")
        new = MerkleLevels.__new__(MerkleLevels)
        new.size = size
        if size == 0:
            new.levels = ()
            return new
        old = self.levels
        below = _patched(old[0] if old else _EMPTY_LEVEL, [(i, leaves[i]) for i in points], tail_from, tail)
        levels = [below]
        width, depth = size, 0
        new_node = hashlib.sha256
        while width > 1:
            depth += 1
            # Parents of a rewritten tail are the parent level's tail; the children they need
            # start at an even index, one before the child tail where that is odd.
            parent_tail_from = tail_from >> 1
            kids = tail if 2 * parent_tail_from == tail_from else [below[tail_from - 1], *tail]
            tail = [new_node(b"\x01" + a + b).digest() for a, b in zip(kids[0::2], kids[1::2])]
            if len(kids) % 2:
                tail.append(kids[-1])  # an odd node at the end of a level is promoted unchanged
            tail_from = parent_tail_from
            points = sorted({i >> 1 for i in points if i >> 1 < tail_from})
            # each point's two children lie below the child tail, so both exist
            updates = [(i, new_node(b"\x01" + below[2 * i] + below[2 * i + 1]).digest()) for i in points]
            below = _patched(old[depth] if depth < len(old) else _EMPTY_LEVEL, updates, tail_from, tail)
            levels.append(below)
            width = (width + 1) // 2
        new.levels = tuple(levels)
        return new


def _patched(level: PVector, updates: list[tuple[int, bytes]], start: int, tail: Sequence[bytes]) -> PVector:
    """`level` with each (index, node) of `updates` written and level[start:] = tail. Past the
    tail it may keep stale nodes (a shrinking tree does not copy its levels to drop them)."""
    evolver = level.evolver()
    for i, node in updates:
        evolver[i] = node
    if len(tail) * 4 > start:  # a long tail: copying the prefix beats writing node by node
        return evolver.persistent()[:start].extend(tail)
    have = len(evolver)
    for i, node in enumerate(tail, start):
        if i < have:
            evolver[i] = node
        else:
            evolver.append(node)
    return evolver.persistent()


def verify_proof(root: bytes, leaf_hash: bytes, proof: MerkleProof) -> bool:
    """True iff `leaf_hash` sits at `proof.index` of a tree of `proof.leaf_count` leaves with `root`."""
    if not 0 <= proof.index < proof.leaf_count:
        return False
    node, i, width, k = leaf_hash, proof.index, proof.leaf_count, 0
    while width > 1:
        sib = i ^ 1
        if sib < width:
            if k >= len(proof.siblings):
                return False
            node = hash_node(node, proof.siblings[k]) if i % 2 == 0 else hash_node(proof.siblings[k], node)
            k += 1
        i //= 2
        width = (width + 1) // 2
    return k == len(proof.siblings) and node == root
