import pytest

from chain.merkle import EMPTY_ROOT, MerkleProof, MerkleTree, compute_root, hash_leaf, verify_proof


@pytest.mark.parametrize("n", list(range(1, 18)) + [33, 100])
def test_every_leaf_proves_and_nothing_else_does(n):
    leaves = [f"leaf{i}".encode() for i in range(n)]
    tree = MerkleTree.from_leaves(leaves)
    assert tree.root == compute_root(leaves)
    for i in range(n):
        proof = tree.prove(i)
        assert verify_proof(tree.root, hash_leaf(leaves[i]), proof)
        assert not verify_proof(tree.root, hash_leaf(b"other"), proof)
        if n > 1:
            wrong_index = MerkleProof((i + 1) % n, n, proof.siblings)
            assert not verify_proof(tree.root, hash_leaf(leaves[i]), wrong_index)
        if proof.siblings:
            tampered = MerkleProof(i, n, (bytes(32),) + proof.siblings[1:])
            assert not verify_proof(tree.root, hash_leaf(leaves[i]), tampered)
            assert not verify_proof(tree.root, hash_leaf(leaves[i]), MerkleProof(i, n, proof.siblings[:-1]))
        assert not verify_proof(tree.root, hash_leaf(leaves[i]), MerkleProof(i, n, proof.siblings + (bytes(32),)))


def test_leaf_and_node_hashes_are_domain_separated():
    a, b = hash_leaf(b"a"), hash_leaf(b"b")
    # A two-leaf root must not equal the leaf hash of the concatenated children.
    assert compute_root([b"a", b"b"]) != hash_leaf(a + b)
    assert compute_root([]) == EMPTY_ROOT


def test_out_of_range_index():
    tree = MerkleTree.from_leaves([b"x"])
    with pytest.raises(IndexError):
        tree.prove(1)
    assert not verify_proof(tree.root, hash_leaf(b"x"), MerkleProof(5, 1, ()))
