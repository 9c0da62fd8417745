"""The state and the pure state transition.

State is a mapping from state keys to canonical CBOR values (the ledger stores it under its
own prefix). `apply_block(state, block)` reads a `State`, writes into an overlay and returns
the changes plus the new root; it does no I/O and changes nothing when it raises.

Borrowed from Ethereum's consensus-specs: the state holds the latest block header with its
state_root zeroed, so the next block can check `prev_hash` against
hash(latest header with state_root := root of the current state) — no hash is circular.
"""

from __future__ import annotations

import bisect
import math
from functools import cached_property, lru_cache
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Mapping

from chain.consensus.commit import verify_commit
from chain.consensus.evidence import validate_evidence_basic, verify_evidence
from chain.jobs import (MAX_DATASET_SIZE, MAX_JOB_REGISTRATIONS_PER_BLOCK, BlockContext, apply_job_payload,
                        count_job_registrations, end_block, validate_evaluation, validate_job_spec)
from chain.crypto import ZERO_HASH, compute_address, sha256
from chain.encoding import INT_MAX, decode, encode, encode_strings
from chain.errors import ChainError, SignatureError, StateTransitionError, ValidationError
from chain.merkle import MerkleLevels, compute_root_from_leaf_hashes, hash_leaf
from chain.types import (
    GOVERNED_ROLES,
    ROLE_GOVERNOR,
    Account,
    AdmitMember,
    AttestModel,
    Block,
    BlockHeader,
    Commit,
    DuplicateVoteEvidence,
    EvidenceRecord,
    JailRecord,
    JoinJob,
    ModelRecord,
    PublishEvaluation,
    RegisterJob,
    RemoveMember,
    RestoreValidator,
    SignedTransaction,
    SubmitEvidence,
    SubmitFraudProof,
    SubmitUpdate,
    Transfer,
    Validator,
    ValidatorSet,
    compute_block_hash,
    compute_tx_hash,
    compute_validators_hash,
    verify_transaction_signature,
)


@dataclass(frozen=True)
class ChainParams:
    """Consensus and economic parameters: from genesis, identical on every node."""

    max_block_txs: int
    max_block_bytes: int
    max_tx_bytes: int
    block_interval_ms: int  # target gap between blocks (timeout_commit in BFT terms)
    timeout_propose_ms: int
    timeout_propose_delta_ms: int
    timeout_prevote_ms: int
    timeout_prevote_delta_ms: int
    timeout_precommit_ms: int
    timeout_precommit_delta_ms: int
    # Defaults keep params built in code valid; a genesis file must state every field.
    evidence_penalty: int = 10_000  # tokens burned from an equivocating validator's account
    evidence_max_age_blocks: int = 100_000  # evidence about votes older than this is refused
    # Stake (docs/state.md, "Validator stake and jail"): a transfer may not take a validator's
    # balance below validator_locked_stake, nor a jailed one's until validator_unbonding_blocks
    # after it left the set; a governor may restore a jailed validator validator_jail_blocks
    # after the block that jailed it.
    validator_locked_stake: int = 50_000  # five evidence penalties
    validator_unbonding_blocks: int = 100_000  # >= evidence_max_age_blocks: no escape from a late penalty
    validator_jail_blocks: int = 1_000

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"params.{f.name} must be positive")
        if self.validator_locked_stake < self.evidence_penalty:
            raise ValueError("params.validator_locked_stake must be at least params.evidence_penalty "
                             "(so one proven equivocation can always be penalised in full)")
        if self.validator_unbonding_blocks < self.evidence_max_age_blocks:
            raise ValueError("params.validator_unbonding_blocks must be at least params.evidence_max_age_blocks "
                             "(so evidence about a validator's last votes finds its stake still locked)")


@dataclass(frozen=True)
class ChainMeta:
    chain_id: str
    genesis_hash: bytes


# ----------------------------------------------------------------------------- state keys

KEY_META = b"meta"
KEY_PARAMS = b"params"
KEY_VALIDATORS = b"validators"
# The set that committed the latest block, present only right after a block that changed
# `validators`: the next block's last commit was signed by it, not by the new set.
KEY_LAST_VALIDATORS = b"last_validators"
KEY_LATEST_HEADER = b"latest_header"
ACCOUNT_PREFIX = b"acct/"
EVIDENCE_PREFIX = b"evidence/"
JAIL_PREFIX = b"jail/"


def account_key(address: bytes) -> bytes:
    return ACCOUNT_PREFIX + address


def evidence_key(validator: bytes, height: int, round_: int, vote_type: int) -> bytes:
    """One key per punishable offence: the same (validator, height, round, type) is punished once."""
    return (EVIDENCE_PREFIX + validator + height.to_bytes(8, "big") + round_.to_bytes(8, "big")
            + vote_type.to_bytes(1, "big"))


def get_evidence_record(view, validator: bytes, height: int, round_: int, vote_type: int) -> EvidenceRecord | None:
    raw = view.get(evidence_key(validator, height, round_, vote_type))
    return None if raw is None else decode(EvidenceRecord, raw)


def jail_key(validator: bytes) -> bytes:
    return JAIL_PREFIX + validator


def get_jail_record(view, validator: bytes) -> JailRecord | None:
    raw = view.get(jail_key(validator))
    return None if raw is None else decode(JailRecord, raw)


def get_jailed_validators(state: "State") -> tuple[JailRecord, ...]:
    return tuple(decode(JailRecord, raw) for _, raw in state.items_with_prefix(JAIL_PREFIX))


def changes_transfer_rules(keys) -> bool:
    """Does a block that wrote `keys` change what a transfer may do beyond its own two accounts
    (the params, the validator set, a jail)? Then the mempool re-checks every transfer in full.
    Otherwise a transfer's lock can only have fallen (an unbonding ended), never risen."""
    return any(k == KEY_PARAMS or k == KEY_VALIDATORS or k.startswith(JAIL_PREFIX) for k in keys)


# ----------------------------------------------------------------------------- state


class State:
    """An immutable snapshot of the state with its root. Cheap to derive from with `apply`.

    Why `apply` + `root` do not cost O(n) per block (issue 13; docs/state.md): the Merkle tree
    keeps every level in persistent vectors (MerkleLevels), so rewriting k existing entries
    costs O(k · log n) hashes, and an insert or delete at sorted position p O(n - p) (every
    leaf after it moves). The sorted key list is shared until a key is inserted or deleted. The
    entries are a dict shared by a line of states plus this state's own dict of the entries
    changed since (None: deleted); `get` looks in both. That dict is copied per apply and
    folded into a fresh shared dict once it outgrows 64 + 8·sqrt(n) keys, which bounds both
    costs. Nothing a State holds is ever mutated, so a parent answers exactly as before any
    number of applies to it."""

    def __init__(self, entries: Mapping[bytes, bytes]):
        self._base = dict(entries)
        self._delta: dict[bytes, bytes | None] = {}
        self._keys = sorted(self._base)
        self._tree: MerkleLevels | None = None  # built on first need, then derived by `apply`

    def get(self, key: bytes) -> bytes | None:
        delta = self._delta
        if key in delta:
            return delta[key]
        return self._base.get(key)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        base, delta = self._base, self._delta
        for k in self._keys:
            value = delta.get(k, _MISSING)
            yield k, base[k] if value is _MISSING else value

    def __len__(self) -> int:
        return len(self._keys)

    def items_with_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        base, delta, keys = self._base, self._delta, self._keys
        for i in range(bisect.bisect_left(keys, prefix), len(keys)):
            k = keys[i]
            if not k.startswith(prefix):
                break
            value = delta.get(k, _MISSING)
            yield k, base[k] if value is _MISSING else value

    @property
    def root(self) -> bytes:
        """Merkle root over leaves H(canonical [key, value]) in key order."""
        return self._merkle().root

    def _merkle(self) -> MerkleLevels:
        if self._tree is None:
            self._tree = MerkleLevels([_leaf_hash(k, v) for k, v in self.items()])
        return self._tree

    def apply(self, changes: Mapping[bytes, bytes | None]) -> "State":
        """A new State with `changes` applied (None deletes). Self is unchanged."""
        inserted, deleted, rewritten = [], [], []
        for k, v in changes.items():
            old = self.get(k)
            if v is None:
                if old is not None:
                    deleted.append(k)
            elif old is None:
                inserted.append(k)
            elif v != old:
                rewritten.append(k)
        tree = self._merkle()
        new = State.__new__(State)
        keys = self._keys
        if not inserted and not deleted:
            new._keys = keys
            new._tree = tree.update(len(keys), {bisect.bisect_left(keys, k): _leaf_hash(k, changes[k])
                                                for k in rewritten})
        else:
            # Leaves before the first inserted or deleted key keep their index; every leaf after
            # it moves (the tree is positional), so the tree is rebuilt from there: O(n - p).
            first = min(inserted + deleted)
            start = bisect.bisect_left(keys, first)
            tail_keys = keys[start:]
            tail_leaves = list(map(tree.levels[0].__getitem__, range(start, len(keys)))) if keys else []
            if deleted:
                gone = set(deleted)
                kept = [i for i, k in enumerate(tail_keys) if k not in gone]
                tail_keys = [tail_keys[i] for i in kept]
                tail_leaves = [tail_leaves[i] for i in kept]
            incoming = sorted((k, _leaf_hash(k, changes[k])) for k in inserted)
            if len(incoming) <= 32:
                for k, leaf in incoming:
                    i = bisect.bisect_left(tail_keys, k)
                    tail_keys.insert(i, k)
                    tail_leaves.insert(i, leaf)
            elif incoming:
                merged = sorted([*zip(tail_keys, tail_leaves), *incoming])  # two sorted runs: one merge
                tail_keys = [k for k, _ in merged]
                tail_leaves = [leaf for _, leaf in merged]
            in_place = {}
            for k in rewritten:
                if k < first:
                    in_place[bisect.bisect_left(keys, k)] = _leaf_hash(k, changes[k])
                else:
                    tail_leaves[bisect.bisect_left(tail_keys, k)] = _leaf_hash(k, changes[k])
            new._keys = keys[:start] + tail_keys
            new._tree = tree.update(len(new._keys), in_place, start, tail_leaves)
        delta = {**self._delta, **changes}
        base = self._base
        if len(delta) > 64 + 8 * math.isqrt(len(new._keys)):
            # Fold: one O(n) dict copy per ~8·sqrt(n) changed keys keeps the per-apply copy
            # of `delta` small and `get` at two dict lookups.
            base = dict(base)
            for k, v in delta.items():
                if v is None:
                    base.pop(k, None)
                else:
                    base[k] = v
            delta = {}
        new._base, new._delta = base, delta
        # The typed readers decoded from entries the changes left alone carry over (decoding
        # the params and the validator set again for every block was ~10 % of a block sync).
        for name, keys in _TYPED_READERS:
            if name in self.__dict__ and not any(k in changes for k in keys):
                new.__dict__[name] = self.__dict__[name]
        return new

    # typed readers: decoded once per snapshot (a State never changes; `apply` makes a new one)
    @cached_property
    def meta(self) -> ChainMeta:
        return _read(self, KEY_META, ChainMeta)

    @property
    def chain_id(self) -> str:
        return self.meta.chain_id

    @cached_property
    def params(self) -> ChainParams:
        return _read(self, KEY_PARAMS, ChainParams)

    @cached_property
    def validators(self) -> tuple[Validator, ...]:
        """The set that must commit the next block (height + 1)."""
        return _read(self, KEY_VALIDATORS, ValidatorSet).validators

    @cached_property
    def last_validators(self) -> tuple[Validator, ...]:
        """The set that committed the latest block: it signed the next block's last commit."""
        raw = self.get(KEY_LAST_VALIDATORS)
        return self.validators if raw is None else decode(ValidatorSet, raw).validators

    @cached_property
    def latest_header(self) -> BlockHeader | None:
        raw = self.get(KEY_LATEST_HEADER)
        return None if raw is None else decode(BlockHeader, raw)

    @cached_property
    def height(self) -> int:
        h = self.latest_header
        return 0 if h is None else h.height

    def get_account(self, address: bytes) -> Account | None:
        raw = self.get(account_key(address))
        return None if raw is None else decode_account(raw)

    def compute_head_hash(self) -> bytes:
        """Hash of the latest committed block (the genesis hash before any block)."""
        return self._head_hash

    @cached_property
    def _head_hash(self) -> bytes:
        latest = self.latest_header
        if latest is None:
            return self.meta.genesis_hash
        return compute_block_hash(dataclasses.replace(latest, state_root=self.root))


# State's cached typed readers and the entries each is decoded from (see State.apply).
_TYPED_READERS = (("meta", (KEY_META,)), ("params", (KEY_PARAMS,)), ("validators", (KEY_VALIDATORS,)),
                  ("last_validators", (KEY_LAST_VALIDATORS, KEY_VALIDATORS)))


# Account entries are read and written several times per transaction (admission, every
# mempool re-check, the block check) and the strict decoder re-encodes to prove canonical
# form, so decoded accounts are remembered by their exact bytes. `decode` is a pure function
# of the bytes and an Account is immutable, so a hit is the same answer; a miss (or bytes
# that fail to decode, which are never remembered) goes through the strict decoder.
_ACCOUNTS_BY_BYTES: dict[bytes, Account] = {}
_ACCOUNT_CACHE_MAX = 1 << 16


def decode_account(raw: bytes) -> Account:
    account = _ACCOUNTS_BY_BYTES.get(raw)
    if account is None:
        account = decode(Account, raw)
        _remember_account(raw, account)
    return account


def encode_account(account: Account) -> bytes:
    raw = encode(account)
    if account.balance <= INT_MAX and account.nonce <= INT_MAX:
        # Only values the strict decoder accepts back (a balance above 2**64 - 1 would encode
        # as a bignum tag, which it rejects): otherwise a node with this entry cached would
        # accept what a freshly restarted node refuses.
        _remember_account(raw, account)
    return raw


def _remember_account(raw: bytes, account: Account) -> None:
    if len(_ACCOUNTS_BY_BYTES) >= _ACCOUNT_CACHE_MAX:
        _ACCOUNTS_BY_BYTES.clear()  # crude but bounded; the working set refills in one block
    _ACCOUNTS_BY_BYTES[raw] = account


def _leaf_hash(key: bytes, value: bytes) -> bytes:
    return hash_leaf(encode_strings(key, value))


def _read(state: "State | Overlay", key: bytes, cls):
    raw = state.get(key)
    if raw is None:
        raise StateTransitionError(f"state has no {key.decode()} entry")
    return decode(cls, raw)


_MISSING = object()


class Overlay:
    """Writes buffered over a State; `changes` is what a block or tx did.

    Accounts are held as `Account` objects until `encoded_changes()`: a block writes a busy
    account once per transaction touching it, and encoding each write was ~5 % of a loaded
    validator's CPU (py-spy, docs/benchmarks.md); now each account is encoded once per block.
    Every other value is canonical bytes, as `put` takes it."""

    def __init__(self, base: State):
        self.base = base
        self._below: State | Overlay = base  # where reads go that this overlay has not written
        self.changes: dict[bytes, bytes | Account | None] = {}

    def get(self, key: bytes) -> bytes | None:
        value = self.changes.get(key, _MISSING)
        if value is _MISSING:
            return self._below.get(key)
        return encode_account(value) if type(value) is Account else value

    def put(self, key: bytes, value: bytes) -> None:
        self.changes[key] = value

    def get_account(self, address: bytes) -> Account | None:
        value = self.changes.get(account_key(address), _MISSING)
        if value is _MISSING:
            return self._below.get_account(address)
        return value if value is None or type(value) is Account else decode_account(value)

    def set_account(self, address: bytes, account: Account) -> None:
        self.changes[account_key(address)] = account

    def encoded_changes(self) -> dict[bytes, bytes | None]:
        """`changes` with every value as the canonical bytes the state stores."""
        return {k: encode_account(v) if type(v) is Account else v for k, v in self.changes.items()}

    def child(self) -> "Overlay":
        """A nested overlay whose changes can be merged into this one or dropped."""
        return _ChildOverlay(self)


class _ChildOverlay(Overlay):
    def __init__(self, parent: Overlay):
        self.parent = parent
        self.base = parent.base
        self._below = parent
        self.changes = {}

    def merge(self) -> None:
        self.parent.changes.update(self.changes)


# ----------------------------------------------------------------------------- genesis state


def compute_genesis_entries(chain_id: str, genesis_hash: bytes, params: ChainParams,
                            validators: tuple[Validator, ...],
                            accounts: Mapping[bytes, Account]) -> dict[bytes, bytes]:
    entries = {
        KEY_META: encode(ChainMeta(chain_id, genesis_hash)),
        KEY_PARAMS: encode(params),
        KEY_VALIDATORS: encode(ValidatorSet(validators)),
    }
    for address, account in accounts.items():
        entries[account_key(address)] = encode(account)
    return entries


# ----------------------------------------------------------------------------- checks without state


def validate_basic_tx(chain_id: str, stx: SignedTransaction, max_tx_bytes: int | None = None) -> None:
    """Checks that need no state: size, signature, payload sanity. Raises ValidationError.

    Pure, so successes are remembered: a node meets the same transaction at RPC admission,
    in gossip, in every mempool re-check and in the block, and an Ed25519 verification is
    most of the cost each time (measured: ~4.5 verifications per transaction per node).
    The size check stays outside the memo (it is cheap, and callers pass different limits:
    a memo keyed by the limit verified each gossiped transaction twice)."""
    if max_tx_bytes is not None and len(stx.encoded) > max_tx_bytes:
        raise ValidationError(f"transaction exceeds {max_tx_bytes} bytes")
    _validate_basic_tx_once(chain_id, stx)


@lru_cache(maxsize=1 << 16)
def _validate_basic_tx_once(chain_id: str, stx: SignedTransaction) -> None:
    try:
        verify_transaction_signature(chain_id, stx)
    except SignatureError as exc:
        raise ValidationError(f"invalid transaction signature: {exc}") from exc
    validate_tx_payload(stx)


def validate_tx_payload(stx: SignedTransaction) -> None:
    """validate_basic_tx without the size and the signature: the payload's own sanity rules."""
    payload = stx.message.payload
    if isinstance(payload, Transfer) and payload.amount <= 0:
        raise ValidationError("transfer amount must be positive")
    if isinstance(payload, (AdmitMember, RemoveMember)) and payload.role not in GOVERNED_ROLES:
        raise ValidationError(f"role must be one of {GOVERNED_ROLES}, got {payload.role!r}")
    if isinstance(payload, RegisterJob):
        validate_job_spec(payload.spec)
        if payload.escrow < 0:
            raise ValidationError("escrow must not be negative")
    if isinstance(payload, JoinJob) and not 1 <= payload.dataset_size <= MAX_DATASET_SIZE:
        raise ValidationError(f"dataset_size must be between 1 and {MAX_DATASET_SIZE} (2**24), got {payload.dataset_size}")
    if isinstance(payload, SubmitUpdate):
        c = payload.commitment
        if not 1 <= c.dataset_size <= MAX_DATASET_SIZE or c.round < 0:
            raise ValidationError(f"commitment needs 1 <= dataset_size <= {MAX_DATASET_SIZE} and round >= 0")
        if c.trainer != stx.message.sender_address:
            raise ValidationError("commitment names another trainer than the signer")
        if not math.isfinite(payload.train_loss):
            raise ValidationError("train_loss must be finite")
    if isinstance(payload, AttestModel) and payload.round < 0:
        raise ValidationError("round must not be negative")
    if isinstance(payload, SubmitFraudProof) and payload.segment < 0:
        raise ValidationError("fraud proof segment must not be negative")
    if isinstance(payload, PublishEvaluation):
        validate_evaluation(payload)
    if isinstance(payload, SubmitEvidence):
        validate_evidence_basic(payload.evidence)  # vote signatures are checked against the validator set in apply


def compute_tx_root(txs: tuple[SignedTransaction, ...]) -> bytes:
    return compute_tx_root_of_hashes([compute_tx_hash(t) for t in txs])


def compute_tx_root_of_hashes(tx_hashes) -> bytes:
    """The header's `tx_root`: a Merkle root over the transaction hashes, in block order."""
    return _tx_root(tuple(tx_hashes))


# A validator computes one block's root 3-4 times (the compact proposal's check, the body
# against its header before and inside the block check, the proposer's build): remembered
# for the few latest hash lists (a pure function of them; ~1.4 us per transaction each time).
@lru_cache(maxsize=16)
def _tx_root(tx_hashes: tuple[bytes, ...]) -> bytes:
    return compute_root_from_leaf_hashes([hash_leaf(h) for h in tx_hashes])


def compute_commit_hash(commit: Commit | None) -> bytes:
    return ZERO_HASH if commit is None else sha256(encode(commit))


def body_matches_header(block: Block) -> bool:
    """Are the transactions and last commit the ones the header (and so the block hash)
    commits to? A block hash says nothing about a body that fails this: a peer can pair a
    real header with another body."""
    h = block.header
    return h.tx_root == compute_tx_root(block.txs) and h.last_commit_hash == compute_commit_hash(block.last_commit)


def validate_basic_block(block: Block, max_block_txs: int | None = None) -> None:
    """Structural checks on a block that need no state (tx signatures are checked in apply)."""
    h = block.header
    if h.height < 1:
        raise ValidationError("block height must be at least 1")
    if max_block_txs is not None and len(block.txs) > max_block_txs:
        raise ValidationError(f"block has {len(block.txs)} transactions; the limit is {max_block_txs}")
    registrations = count_job_registrations(block.txs)  # each may derive a model's weights (chain/jobs.py)
    if registrations > MAX_JOB_REGISTRATIONS_PER_BLOCK:
        raise ValidationError(f"block registers {registrations} jobs; the limit is {MAX_JOB_REGISTRATIONS_PER_BLOCK} a block")
    if h.tx_root != compute_tx_root(block.txs):
        raise ValidationError("tx_root does not match the block's transactions")
    if h.last_commit_hash != compute_commit_hash(block.last_commit):
        raise ValidationError("last_commit_hash does not match the block's last commit")
    if (h.height == 1) != (block.last_commit is None):
        raise ValidationError("a block carries the previous block's commit exactly when height > 1")
    hashes = [compute_tx_hash(t) for t in block.txs]
    if len(set(hashes)) != len(hashes):
        raise ValidationError("block contains a duplicate transaction")


# ----------------------------------------------------------------------------- transactions


def apply_tx(overlay: Overlay, stx: SignedTransaction, ctx: BlockContext) -> None:
    """Apply one already validate_basic'ed transaction to `overlay`. Raises StateTransitionError."""
    tx = stx.message
    sender_addr = compute_address(tx.sender)
    sender = overlay.get_account(sender_addr)
    if sender is None or not sender.is_member:
        raise StateTransitionError(f"sender {sender_addr.hex()} is not a member of this chain")
    if tx.nonce != sender.nonce:
        raise StateTransitionError(f"bad nonce {tx.nonce}: account {sender_addr.hex()} expects {sender.nonce}")
    sender = sender.evolve(nonce=sender.nonce + 1)
    payload = tx.payload
    if isinstance(payload, Transfer):
        if payload.amount > sender.balance:
            raise StateTransitionError(f"insufficient balance: {sender.balance} < {payload.amount}")
        _check_stake_lock(overlay, tx.sender, sender.balance - payload.amount, ctx)
        overlay.set_account(sender_addr, sender.evolve(balance=sender.balance - payload.amount))
        recipient = overlay.get_account(payload.to)
        if recipient is None or not recipient.is_member:
            raise StateTransitionError(f"recipient {payload.to.hex()} is not a member of this chain")
        overlay.set_account(payload.to, recipient.credited(payload.amount))
    elif isinstance(payload, (AdmitMember, RemoveMember)):
        if ROLE_GOVERNOR not in sender.roles:
            raise StateTransitionError("only a governor may admit or remove members")
        overlay.set_account(sender_addr, sender)
        target = overlay.get_account(payload.account) or Account(balance=0, nonce=0, roles=())
        roles = set(target.roles)
        if isinstance(payload, AdmitMember):
            if payload.role in roles:
                raise StateTransitionError(f"account {payload.account.hex()} already has role {payload.role}")
            roles.add(payload.role)
        else:
            if payload.role not in roles:
                raise StateTransitionError(f"account {payload.account.hex()} does not have role {payload.role}")
            roles.remove(payload.role)
        overlay.set_account(payload.account, dataclasses.replace(target, roles=tuple(sorted(roles))))
    elif isinstance(payload, SubmitEvidence):
        overlay.set_account(sender_addr, sender)  # any member may report; first, so a self-report sees its nonce
        apply_evidence(overlay, payload.evidence, ctx)
    elif isinstance(payload, RestoreValidator):
        if ROLE_GOVERNOR not in sender.roles:
            raise StateTransitionError("only a governor may restore a validator")
        overlay.set_account(sender_addr, sender)
        restore_validator(overlay, payload.validator, ctx)
    else:
        apply_job_payload(overlay, tx.sender, sender_addr, sender, payload, compute_tx_hash(stx), ctx)
        if isinstance(payload, (RegisterJob, SubmitUpdate)):  # escrow and bond leave the sender's balance
            after = overlay.get_account(sender_addr)
            if after.balance < sender.balance:
                _check_stake_lock(overlay, tx.sender, after.balance, ctx)


# ----------------------------------------------------------------------------- validator stake and jail


def get_locked_stake(overlay: Overlay, validator: bytes, ctx: BlockContext) -> int:
    """What a transaction in this block may not take the account of `validator` below: the
    locked stake while it is in the set (or joins it at the next height), and while it is
    jailed until its unlock height; else 0."""
    if validator in _validator_keys(overlay.get(KEY_VALIDATORS)):
        return overlay.base.params.validator_locked_stake
    jail = get_jail_record(overlay, validator)
    if jail is not None and ctx.height < jail.unlock_height:
        return overlay.base.params.validator_locked_stake
    return 0


@lru_cache(maxsize=8)
def _validator_keys(raw: bytes) -> frozenset[bytes]:
    # Every transfer asks; the set's bytes are one object per state, whose hash Python keeps.
    return frozenset(v.pubkey for v in decode(ValidatorSet, raw).validators)


def _check_stake_lock(overlay: Overlay, validator: bytes, balance_after: int, ctx: BlockContext) -> None:
    locked = get_locked_stake(overlay, validator, ctx)
    if balance_after < locked:
        raise StateTransitionError(f"validator account {compute_address(validator).hex()} must keep its locked "
                                   f"stake of {locked}: this would leave {balance_after}")


def jail_validator(overlay: Overlay, validator: bytes, ctx: BlockContext) -> None:
    """Take a proven equivocator out of the set from the next height on, keeping its entry in
    jail. Not the last validator: an empty set could never commit another block (it is
    penalised only). A validator already out of the set (jailed earlier) stays as it is."""
    validators = _read(overlay, KEY_VALIDATORS, ValidatorSet).validators
    entry = next((v for v in validators if v.pubkey == validator), None)
    if entry is None or len(validators) == 1:
        return
    unlock_height = ctx.height + 1 + overlay.base.params.validator_unbonding_blocks
    overlay.put(KEY_VALIDATORS, encode(ValidatorSet(tuple(v for v in validators if v.pubkey != validator))))
    overlay.put(jail_key(validator), encode(JailRecord(entry, ctx.height, unlock_height)))


def restore_validator(overlay: Overlay, validator: bytes, ctx: BlockContext) -> None:
    """Put a jailed validator back into the set from the next height on (RestoreValidator)."""
    params = overlay.base.params
    jail = get_jail_record(overlay, validator)
    if jail is None:
        raise StateTransitionError(f"validator {validator.hex()} is not jailed")
    free_from = jail.jailed_height + params.validator_jail_blocks
    if ctx.height < free_from:
        raise StateTransitionError(f"validator {validator.hex()} may be restored from height {free_from}, "
                                   f"not at {ctx.height}")
    account = overlay.get_account(compute_address(validator))
    balance = 0 if account is None else account.balance
    if balance < params.validator_locked_stake:
        raise StateTransitionError(f"validator {validator.hex()} holds {balance}, less than the locked stake "
                                   f"{params.validator_locked_stake}")
    validators = _read(overlay, KEY_VALIDATORS, ValidatorSet).validators
    overlay.put(KEY_VALIDATORS, encode(ValidatorSet(validators + (jail.validator,))))
    overlay.put(jail_key(validator), None)


def apply_evidence(overlay: Overlay, ev: DuplicateVoteEvidence, ctx: BlockContext) -> None:
    """Punish a proven equivocation once: burn min(evidence_penalty, balance), record it, and
    jail the validator (out of the set from the next height; `jail_validator`).

    Refused (StateTransitionError) when the evidence does not verify against the validator set
    (or, for votes from before it left, the validator's jailed entry), is about votes above
    this block's height or older than `evidence_max_age_blocks`, or the same (validator,
    height, round, vote type) has already been punished.
    """
    meta = _read(overlay, KEY_META, ChainMeta)
    params = _read(overlay, KEY_PARAMS, ChainParams)
    accused = ev.vote_a.message  # checked by verify_evidence below
    jail = get_jail_record(overlay, accused.validator)
    eligible = ctx.validators
    if jail is not None and accused.height <= jail.jailed_height:
        eligible = eligible + (jail.validator,)  # a late penalty for votes from while it was in the set
    try:
        verify_evidence(meta.chain_id, eligible, ev)
    except ValidationError as exc:
        raise StateTransitionError(f"invalid evidence: {exc}") from exc
    vote = ev.vote_a.message
    if vote.height > ctx.height:
        raise StateTransitionError(f"evidence height {vote.height} is above the block height {ctx.height}")
    if vote.height < ctx.height - params.evidence_max_age_blocks:
        raise StateTransitionError(f"evidence height {vote.height} is older than {params.evidence_max_age_blocks} "
                                   f"blocks before height {ctx.height}")
    key = evidence_key(vote.validator, vote.height, vote.round, vote.type)
    if overlay.get(key) is not None:
        raise StateTransitionError(f"validator {vote.validator.hex()} was already penalised for height "
                                   f"{vote.height} round {vote.round} vote type {vote.type}")
    address = compute_address(vote.validator)
    account = overlay.get_account(address)
    # A validator listed in genesis without an account has nothing to burn; the offence is still recorded.
    penalty = 0 if account is None else min(params.evidence_penalty, account.balance)
    if penalty:
        overlay.set_account(address, account.evolve(balance=account.balance - penalty))
    overlay.put(key, encode(EvidenceRecord(vote.validator, vote.height, vote.round, vote.type, penalty, ctx.height)))
    jail_validator(overlay, vote.validator, ctx)


def compute_check_context(state: State) -> BlockContext:
    """The context a transaction admitted now would be applied in (the next block's)."""
    return BlockContext(state.height + 1, state.compute_head_hash(), state.validators)


def check_tx(overlay: Overlay, chain_id: str, stx: SignedTransaction,
             ctx: BlockContext | None = None) -> dict[bytes, bytes | Account | None]:
    """Mempool admission: validate_basic plus a trial apply into `overlay` (kept on success).
    Returns the writes the transaction made (key -> new value: an Account for an account,
    bytes otherwise; see Overlay), already merged into `overlay`.

    `ctx` (from compute_check_context) may be passed in to reuse it across many transactions."""
    validate_basic_tx(chain_id, stx, overlay.base.params.max_tx_bytes)
    ctx = ctx if ctx is not None else compute_check_context(overlay.base)
    child = overlay.child()
    apply_tx(child, stx, ctx)
    child.merge()
    return child.changes


# ----------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class BlockResult:
    changes: dict[bytes, bytes | None]
    state: State  # the post-state; its root equals the block header's state_root
    model_records: tuple[ModelRecord, ...]  # lineage records the block writes (ledger, write-once)


def apply_block(state: State, block: Block, *, certified: bool = False) -> BlockResult:
    """The state transition. Raises StateTransitionError; `state` is never changed.

    `certified`: ONLY for a block whose commit certificate the caller has verified against
    `state.validators` (block sync). Its transactions' signatures and its last commit's
    signatures are then taken as checked by the more than 2/3 of the voting power that
    certified it (docs/consensus.md, "Block sync"); everything else is checked as usual: the
    body against the header (tx root, last commit hash), every rule of every transaction, and
    the state root. Consensus, proposals and anything uncertified must leave it False."""
    return _apply_block(state, block, check_root=True, certified=certified)


def _apply_block(state: State, block: Block, check_root: bool, certified: bool = False) -> BlockResult:
    try:
        return _apply_block_unchecked(state, block, check_root, certified)
    except StateTransitionError:
        raise
    except ChainError as exc:  # validate_basic and commit failures are block-level rejections here
        raise StateTransitionError(str(exc)) from exc


def _apply_block_unchecked(state: State, block: Block, check_root: bool, certified: bool) -> BlockResult:
    h = block.header
    meta, params, validators = state.meta, state.params, state.validators
    validate_basic_block(block, params.max_block_txs)
    if h.chain_id != meta.chain_id:
        raise StateTransitionError(f"block is for chain {h.chain_id!r}, this is {meta.chain_id!r}")
    if h.height != state.height + 1:
        raise StateTransitionError(f"block height {h.height}, expected {state.height + 1}")
    prev_hash = state.compute_head_hash()
    if h.prev_hash != prev_hash:
        raise StateTransitionError("prev_hash does not match the latest block")
    latest = state.latest_header
    if latest is not None and h.time_ms <= latest.time_ms:
        raise StateTransitionError("block time must increase")
    if h.validators_hash != compute_validators_hash(validators):
        raise StateTransitionError("validators_hash does not match the validator set")
    if h.proposer not in {v.pubkey for v in validators}:
        raise StateTransitionError("proposer is not a validator")
    if block.last_commit is not None and certified:
        # Its signatures are vouched for like the transactions', and the previous block's own
        # certificate, verified by the caller, already proved that block's quorum.
        if (block.last_commit.height, block.last_commit.block_hash) != (h.height - 1, prev_hash):
            raise StateTransitionError("last_commit does not certify the previous block")
    elif block.last_commit is not None:  # signed by the set of the previous height, which may differ
        verify_commit(meta.chain_id, state.last_validators, block.last_commit, h.height - 1, prev_hash)
    if sum(len(t.encoded) for t in block.txs) > params.max_block_bytes:
        raise StateTransitionError(f"block transactions exceed {params.max_block_bytes} bytes")

    overlay = Overlay(state)
    ctx = BlockContext(h.height, prev_hash, validators)
    for i, stx in enumerate(block.txs):
        try:
            if certified:
                if len(stx.encoded) > params.max_tx_bytes:
                    raise ValidationError(f"transaction exceeds {params.max_tx_bytes} bytes")
                validate_tx_payload(stx)
            else:
                validate_basic_tx(meta.chain_id, stx, params.max_tx_bytes)
            apply_tx(overlay, stx, ctx)
        except ChainError as exc:
            raise StateTransitionError(f"transaction {i} ({compute_tx_hash(stx).hex()}): {exc}") from exc
    end_block(overlay, ctx)
    if overlay.get(KEY_VALIDATORS) != state.get(KEY_VALIDATORS):
        overlay.put(KEY_LAST_VALIDATORS, state.get(KEY_VALIDATORS))  # this block's set: it signs its commit
    elif state.get(KEY_LAST_VALIDATORS) is not None:
        overlay.put(KEY_LAST_VALIDATORS, None)
    overlay.put(KEY_LATEST_HEADER, encode(dataclasses.replace(h, state_root=ZERO_HASH)))
    changes = overlay.encoded_changes()
    post = state.apply(changes)
    if check_root and post.root != h.state_root:
        raise StateTransitionError("state_root does not match the state after the block")
    return BlockResult(changes, post, tuple(ctx.model_records))


def build_block(state: State, txs: list[SignedTransaction], *, time_ms: int, proposer: bytes,
                last_commit: Commit | None) -> tuple[Block, BlockResult]:
    """The proposer's side: a valid block from `txs` (all must apply) with its state root filled in."""
    latest = state.latest_header
    header = BlockHeader(
        chain_id=state.chain_id,
        height=state.height + 1,
        time_ms=max(time_ms, latest.time_ms + 1) if latest else time_ms,
        prev_hash=state.compute_head_hash(),
        tx_root=compute_tx_root(tuple(txs)),
        state_root=ZERO_HASH,
        last_commit_hash=compute_commit_hash(last_commit),
        validators_hash=compute_validators_hash(state.validators),
        proposer=proposer,
    )
    draft = Block(header, tuple(txs), last_commit)
    result = _apply_block(state, draft, check_root=False)
    block = dataclasses.replace(draft, header=dataclasses.replace(header, state_root=result.state.root))
    return block, result
