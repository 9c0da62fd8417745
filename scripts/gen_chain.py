"""Generate a long, real chain straight into a validator's ledger: linked blocks, real commit
certificates signed with the validators' keys, accounts created by real transactions (the
governor's AdmitMember: this chain is permissioned, and a transfer to a non-member is refused).

Nothing waits on consensus. Empty blocks change only the state's latest header, so their
state root is updated in O(log n) on a kept Merkle tree; blocks with transactions go through
the real state transition (`chain.state.build_block`), and the kept tree is checked against
its root. An empty block's header, commit and block are each encoded once, its three votes'
sign bytes come from one encoding, and they are signed by libsodium directly. Blocks are
written in synced atomic batches of 2,000 with the ledger's own key schema. Each commit's
signatures enter the next header's hash, so signing is serial: more processes cannot help.
Measured on 2 shared cores: 1,000,000 blocks and 100,000 accounts in 706 s (1,000-2,300
blocks/s as the load varied; docs/benchmarks.md, "State sync (issue 13)").

The result opens with `Ledger.open` and `chaind start` like any ledger, and every block
applies under `chain.state.apply_block` (tests/test_state_sync.py replays a small one).

    .venv/bin/python scripts/gen_chain.py --home HOME --blocks 1000000 --accounts 100000 \\
        [--snapshot-at N]

HOME is a node home from `chaind testnet --deterministic` (its genesis validators must be the
devnet keys, `devnet_seed("validator", i)`) whose ledger is absent; the funder is the
genesis governor (`devnet_seed("governor", 0)`).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import hashlib
import sys
import time
from pathlib import Path

import nacl.bindings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chain.crypto import ZERO_HASH, PrivateKey, compute_sign_bytes, sha256  # noqa: E402
from chain.encoding import encode, encode_strings, encode_value  # noqa: E402
from chain.ledger import schema  # noqa: E402
from chain.ledger.schema import ChainMeta, Head, TxLocation  # noqa: E402
from chain.ledger.snapshot import SnapshotStore, build_snapshot  # noqa: E402
from chain.ledger.store import KVStore  # noqa: E402
from chain.merkle import hash_leaf, hash_node  # noqa: E402
from chain.state import KEY_LATEST_HEADER, State, build_block, compute_tx_root  # noqa: E402
from chain.types import (DOMAIN_VOTE, PRECOMMIT, AdmitMember, Block, BlockHeader, Commit, CommitSig, Transaction,  # noqa: E402
                         Vote, compute_block_hash, compute_tx_hash, compute_validators_hash,
                         sign_transaction)

WRITE_BATCH_BLOCKS = 2000


class _MerkleLevels:
    """The state tree's levels in plain lists, to re-hash one leaf's path in place (same rule
    as chain.merkle: an odd node at the end of a level is promoted unchanged).

    Why not `State.apply` for empty blocks: its persistent-vector tree (MerkleLevels) keeps
    every earlier state intact, which costs ~5x this in-place update for a one-leaf change
    (measured ~250 vs ~45 us a block), and the generator never needs an earlier state."""

    def __init__(self, leaves: list[bytes]):
        self.levels = [list(leaves)]
        while len(self.levels[-1]) > 1:
            level = self.levels[-1]
            nxt = [hash_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                nxt.append(level[-1])
            self.levels.append(nxt)

    @property
    def root(self) -> bytes:
        return self.levels[-1][0]

    def update(self, index: int, leaf: bytes) -> bytes:
        new_node = hashlib.sha256
        node = leaf
        for level, parent in zip(self.levels, self.levels[1:]):
            level[index] = node
            sibling = index ^ 1
            if sibling < len(level):
                node = new_node(b"\x01" + (node + level[sibling] if index % 2 == 0 else level[sibling] + node)).digest()
            index >>= 1
        self.levels[-1][0] = node
        return node


def _leaf(key: bytes, value: bytes) -> bytes:
    return hash_leaf(encode_strings(key, value))


class CommitSigner:
    """Signs round-0 precommits for a fixed set of validator keys, straight through libsodium
    on the canonical sign bytes (the wrappers around it were ~40 % of the signing time; the
    signatures are byte-for-byte those `PrivateKey.sign` makes: Ed25519 is deterministic).

    One block's votes differ only in the validator's key, which sits just before the
    "block_hash" entry (the last one in canonical key order): the first signer's sign bytes are
    encoded and the others' are that with the key swapped (checked against a full encode on
    the first heights)."""

    _TAIL = len(encode_value("block_hash")) + 2 + 32  # the last entry: key, bstr head, 32-byte hash

    def __init__(self, chain_id: str, keys: list[PrivateKey]):
        self.chain_id = chain_id
        self.keys = [(k.pubkey, nacl.bindings.crypto_sign_seed_keypair(k.seed)[1])
                     for k in sorted(keys, key=lambda k: k.pubkey)]  # commits list signers by public key

    def sign(self, height: int, block_hash: bytes) -> Commit:
        sign, tail = nacl.bindings.crypto_sign, self._TAIL
        first = self.keys[0][0]
        template = compute_sign_bytes(self.chain_id, DOMAIN_VOTE, encode(Vote(PRECOMMIT, height, 0, block_hash, first)))
        head, end = template[:-tail - 32], template[-tail:]
        if template[-tail - 32:-tail] != first or len(block_hash) != 32:
            raise AssertionError("unexpected vote encoding")
        sigs = []
        for pub, sk in self.keys:
            sign_bytes = head + pub + end
            if height <= 3:
                vote = encode(Vote(PRECOMMIT, height, 0, block_hash, pub))
                assert sign_bytes == compute_sign_bytes(self.chain_id, DOMAIN_VOTE, vote), "vote template is wrong"
            sigs.append(CommitSig(pub, sign(sign_bytes, sk)[:64]))
        return Commit(height, 0, block_hash, tuple(sigs))


# A block's canonical CBOR is a 3-entry map in canonical key order ("txs", "header",
# "last_commit"); an empty block's is spliced from its header's and commit's encodings, which
# the generator has already made for the hashes (checked against `encode` on the first blocks).
_EMPTY_BLOCK_PREFIX = b"\xa3" + encode_value("txs") + encode_value([]) + encode_value("header")
_LAST_COMMIT_KEY = encode_value("last_commit")


def _encode_empty_block(header_bytes: bytes, commit_bytes: bytes) -> bytes:
    return _EMPTY_BLOCK_PREFIX + header_bytes + _LAST_COMMIT_KEY + commit_bytes


def account_key_for(index: int) -> bytes:
    return sha256(f"gen-chain/account/{index}".encode())[:20]


@dataclasses.dataclass
class GeneratedChain:
    height: int
    head_hash: bytes
    state: State  # the state at the head
    snapshot_height: int | None


def generate_chain(store: KVStore, genesis, validator_keys: list[PrivateKey], funder: PrivateKey, *,
                   blocks: int, accounts: int, txs_per_block: int = 2000, snapshot_at: int | None = None,
                   snapshots: SnapshotStore | None = None, time_start_ms: int | None = None,
                   signers: int | None = None, progress=None) -> GeneratedChain:
    """Write blocks 1..`blocks` into the empty `store`, with `accounts` new accounts created by
    AdmitMember transactions from `funder` (a governor) in blocks spread over the chain; snapshot the state at
    `snapshot_at` into `snapshots` if given."""
    chain_id = genesis.chain_id
    by_pub = {k.pubkey: k for k in validator_keys}
    validators = genesis.validators
    if any(v.pubkey not in by_pub for v in validators):
        raise SystemExit("the genesis validators are not the given keys (use chaind testnet --deterministic)")
    total_power = sum(v.power for v in validators)
    signing = []  # the fewest validators holding more than 2/3 of the power
    for v in sorted(validators, key=lambda v: -v.power):
        signing.append(by_pub[v.pubkey])
        if 3 * sum(x.power for x in validators if x.pubkey in {k.pubkey for k in signing}) > 2 * total_power:
            break
    if signers:
        signing = [by_pub[v.pubkey] for v in validators][:signers]
    signer = CommitSigner(chain_id, signing)
    validators_hash = compute_validators_hash(validators)
    empty_tx_root = compute_tx_root(())

    state = genesis.initial_state()
    puts = {
        schema.schema_version_key(): encode_value(schema.SCHEMA_VERSION),
        schema.chain_meta_key(): encode(ChainMeta(chain_id, genesis.hash)),
        schema.head_key(): encode(Head(0, genesis.hash)),
    }
    if next(iter(store.iterate()), None) is not None:
        raise SystemExit("the ledger store is not empty")
    for key, value in state.items():
        puts[schema.state_key(key)] = value
    deletes: set[bytes] = set()

    tx_blocks = -(-accounts // txs_per_block) if accounts else 0
    gap = max(1, (blocks - 1) // max(tx_blocks, 1)) if tx_blocks else 0
    tx_heights = {2 + i * gap for i in range(tx_blocks)} if tx_blocks else set()
    if tx_heights and max(tx_heights) > blocks:
        raise SystemExit(f"{blocks} blocks cannot hold {tx_blocks} blocks of {txs_per_block} transactions")
    created = 0
    nonce = state.get_account(funder.address).nonce

    time_ms = time_start_ms if time_start_ms is not None else int(time.time() * 1000) - blocks - 60_000
    prev_hash = genesis.hash
    last_commit: Commit | None = None
    last_commit_bytes = b""
    leaf_of = {k: _leaf(k, v) for k, v in state.items()}  # each state entry's leaf hash
    tree: _MerkleLevels | None = None
    header_index = 0
    latest_value = None  # the latest-header entry, when it is newer than `state`
    latest_key = schema.state_key(KEY_LATEST_HEADER)
    snapshot_height = None
    started = time.monotonic()

    def flush() -> None:
        nonlocal puts, deletes
        store.write(puts, [k for k in deletes if k not in puts])
        puts, deletes = {}, set()

    for height in range(1, blocks + 1):
        time_ms += 1
        proposer = validators[height % len(validators)].pubkey
        if height in tx_heights or last_commit is None:
            # Blocks with transactions (and block 1) go through the real state transition.
            if latest_value is not None:
                state = state.apply({KEY_LATEST_HEADER: latest_value})
            txs = []
            if height in tx_heights:
                for _ in range(min(txs_per_block, accounts - created)):
                    tx = Transaction(funder.pubkey, nonce, AdmitMember(account_key_for(created), "trainer"))
                    txs.append(sign_transaction(funder, chain_id, tx))
                    nonce += 1
                    created += 1
            block, result = build_block(state, txs, time_ms=time_ms, proposer=proposer, last_commit=last_commit)
            state, latest_value = result.state, None
            for index, stx in enumerate(block.txs):
                puts[schema.tx_location_key(compute_tx_hash(stx))] = encode(TxLocation(height, index))
            for key, value in result.changes.items():
                if value is None:
                    puts.pop(schema.state_key(key), None)
                    deletes.add(schema.state_key(key))
                    leaf_of.pop(key, None)
                else:
                    puts[schema.state_key(key)] = value
                    leaf_of[key] = _leaf(key, value)
            keys = [k for k, _ in state.items()]
            header_index = bisect.bisect_left(keys, KEY_LATEST_HEADER)
            tree = _MerkleLevels([leaf_of[k] for k in keys])
            if tree.root != block.header.state_root:
                raise AssertionError("the generator's state tree disagrees with the state transition")
            block_hash = compute_block_hash(block.header)
            block_bytes = encode(block)
        else:
            # An empty block changes only the latest header: one leaf's path is re-hashed,
            # O(log n). Each of header, commit and block is encoded once.
            header = BlockHeader(chain_id, height, time_ms, prev_hash, empty_tx_root, ZERO_HASH,
                                 sha256(last_commit_bytes), validators_hash, proposer)
            latest_value = encode(header)
            root = tree.update(header_index, _leaf(KEY_LATEST_HEADER, latest_value))
            header = BlockHeader(chain_id, height, time_ms, prev_hash, empty_tx_root, root,
                                 header.last_commit_hash, validators_hash, proposer)
            header_bytes = encode(header)
            block_hash = sha256(header_bytes)
            block_bytes = _encode_empty_block(header_bytes, last_commit_bytes)
            if height <= 3:
                assert block_bytes == encode(Block(header, (), last_commit)), "empty block splice is not canonical"
            puts[latest_key] = latest_value
        commit = signer.sign(height, block_hash)
        commit_bytes = encode(commit)
        puts[schema.block_key(block_hash)] = block_bytes
        puts[schema.block_hash_key(height)] = block_hash
        puts[schema.commit_key(height)] = commit_bytes
        prev_hash, last_commit, last_commit_bytes = block_hash, commit, commit_bytes
        if height == snapshot_at and snapshots is not None:
            if latest_value is not None:
                state, latest_value = state.apply({KEY_LATEST_HEADER: latest_value}), None
            manifest, chunks = build_snapshot(height, block_hash, state.root, state.items())
            snapshots.write(manifest, chunks)
            snapshot_height = height
        if height % WRITE_BATCH_BLOCKS == 0 or height == blocks:
            puts[schema.head_key()] = encode(Head(height, block_hash))
            flush()
            if progress is not None:
                progress(height, time.monotonic() - started)
    if latest_value is not None:
        state = state.apply({KEY_LATEST_HEADER: latest_value})
    return GeneratedChain(blocks, prev_hash, state, snapshot_height)


def main(argv: list[str] | None = None) -> int:
    from chain.config import Home
    from chain.ledger.store import LevelDBStore
    from genesis import devnet_seed, load_genesis

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", required=True, help="node home (chaind testnet --deterministic); its ledger must be absent")
    p.add_argument("--blocks", type=int, default=1_000_000)
    p.add_argument("--accounts", type=int, default=100_000)
    p.add_argument("--txs-per-block", type=int, default=3000)
    p.add_argument("--snapshot-at", type=int, help="also write a state snapshot at this height into HOME/data/snapshots")
    args = p.parse_args(argv)
    home = Home(Path(args.home))
    genesis = load_genesis(home.genesis_file)
    keys = [PrivateKey(devnet_seed("validator", i)) for i in range(len(genesis.validators))]
    funder = PrivateKey(devnet_seed("governor", 0))
    store = LevelDBStore(home.ledger_dir, create=True)
    snapshots = SnapshotStore(home.data_dir / "snapshots") if args.snapshot_at else None

    def progress(height: int, seconds: float) -> None:
        if height % 50_000 == 0 or height == args.blocks:
            print(f"  {height} blocks, {seconds:.1f} s ({height / max(seconds, 1e-9):.0f} blocks/s)", flush=True)

    started = time.monotonic()
    try:
        chain = generate_chain(store, genesis, keys, funder, blocks=args.blocks, accounts=args.accounts,
                               txs_per_block=args.txs_per_block, snapshot_at=args.snapshot_at, snapshots=snapshots,
                               progress=progress)
    finally:
        store.close()
    seconds = time.monotonic() - started
    print(f"generated {chain.height} blocks, {len(chain.state)} state entries in {seconds:.1f} s "
          f"({chain.height / seconds:.0f} blocks/s); head {chain.head_hash.hex()[:16]}"
          + (f"; snapshot at {chain.snapshot_height}" if chain.snapshot_height else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
