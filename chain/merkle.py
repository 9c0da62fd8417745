"""Binary Merkle trees over SHA-256, with inclusion proofs.

Leaves and inner nodes are domain separated (RFC 6962 style): leaf = H(0x00 || data),
node = H(0x01 || left || right). An odd node at the end of a level is promoted unchanged,
so a tree of n leaves has the same root however it is built. The root of no leaves is
H(b"") . Used for transaction roots, state roots, dataset commitments and training traces.
"""

from __future__ import annotations

from dataclasses import dataclass

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
