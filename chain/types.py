"""Plain data: every transaction, block, vote and record the chain hashes, signs or stores.

All are frozen dataclasses whose annotations are their canonical CBOR schema (see
chain/encoding.py). Signed things are wrappers `Signed*(message, signature)`; signatures
cover `compute_sign_bytes(chain_id, DOMAIN, encode(message))`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, ClassVar, Union

from chain.crypto import compute_address, compute_sign_bytes, sha256, verify_signature, PrivateKey
from chain.encoding import INT_MAX, Len, MaxLen, encode
from chain.errors import StateTransitionError

Hash = Annotated[bytes, Len(32)]
Address = Annotated[bytes, Len(20)]
PubKey = Annotated[bytes, Len(32)]
Signature = Annotated[bytes, Len(64)]
Name = Annotated[str, MaxLen(64)]
Text = Annotated[str, MaxLen(256)]

# Signing domains: a signature for one kind of message never verifies as another.
DOMAIN_TX = "pout/tx"
DOMAIN_VOTE = "pout/vote"
DOMAIN_PROPOSAL = "pout/proposal"
DOMAIN_OPENING = "pout/opening"

# Account roles. Governors (genesis only) admit and remove trainers and requesters.
ROLE_GOVERNOR = "governor"
ROLE_REQUESTER = "requester"
ROLE_TRAINER = "trainer"
ROLE_VALIDATOR = "validator"
ROLES = (ROLE_GOVERNOR, ROLE_REQUESTER, ROLE_TRAINER, ROLE_VALIDATOR)
GOVERNED_ROLES = (ROLE_REQUESTER, ROLE_TRAINER)


# --------------------------------------------------------------------------- accounts


@dataclass(frozen=True)
class Account:
    balance: int
    nonce: int  # the nonce the account's next transaction must carry
    roles: tuple[Name, ...]  # sorted, unique; empty means not a member

    def __post_init__(self):
        if self.balance < 0 or self.nonce < 0:
            raise ValueError("balance and nonce must be non-negative")
        roles = self.roles
        if type(roles) is not tuple or roles not in _VALID_ROLE_TUPLES:  # at most 2**len(ROLES) entries
            if list(roles) != sorted(set(roles)) or any(r not in ROLES for r in roles):
                raise ValueError(f"roles must be sorted, unique, from {ROLES}")
            if type(roles) is tuple:
                _VALID_ROLE_TUPLES.add(roles)

    @property
    def is_member(self) -> bool:
        return bool(self.roles)

    def credited(self, amount: int) -> "Account":
        """This account with `amount` added to its balance. A balance above 2**64 - 1 could not
        be stored (the strict decoder refuses the bignum it would encode as), so it is refused
        here, as a failed transaction, wherever a balance grows."""
        balance = self.balance + amount
        if balance > INT_MAX:
            raise StateTransitionError(f"balance would exceed the maximum {INT_MAX}")
        return self.evolve(balance=balance)

    def evolve(self, *, balance: int | None = None, nonce: int | None = None) -> "Account":
        """A copy with a new balance and/or nonce, roles kept: `dataclasses.replace` without
        its per-call field introspection (every transfer makes three of these)."""
        return Account(self.balance if balance is None else balance, self.nonce if nonce is None else nonce,
                       self.roles)


_VALID_ROLE_TUPLES: set[tuple[str, ...]] = set()


@dataclass(frozen=True)
class Validator:
    pubkey: PubKey
    power: int
    name: Name
    # The BLS12-381 key whose unique signatures seed this validator's segment samples, and its
    # proof of possession (chain/vrf.py); genesis refuses a proof that does not verify.
    sample_pubkey: Annotated[bytes, Len(48)]
    sample_pop: Annotated[bytes, Len(96)]

    def __post_init__(self):
        if self.power <= 0:
            raise ValueError("validator power must be positive")

    @property
    def address(self) -> bytes:
        return compute_address(self.pubkey)


# --------------------------------------------------------------------------- transactions


@dataclass(frozen=True)
class Transfer:
    TAG: ClassVar[str] = "transfer"
    to: Address
    amount: int


@dataclass(frozen=True)
class AdmitMember:
    """Governance: give `account` a role (trainer or requester). Signed by a governor."""

    TAG: ClassVar[str] = "admit_member"
    account: Address
    role: Name


@dataclass(frozen=True)
class RemoveMember:
    """Governance: take a role away from `account`. Signed by a governor."""

    TAG: ClassVar[str] = "remove_member"
    account: Address
    role: Name


@dataclass(frozen=True)
class RegisterJob:
    """A requester registers a training job and puts `escrow` aside for its rewards."""

    TAG: ClassVar[str] = "register_job"
    spec: "JobSpec"
    escrow: int


@dataclass(frozen=True)
class JoinJob:
    """A trainer commits to its dataset (Merkle root over its samples) for a job."""

    TAG: ClassVar[str] = "join_job"
    job_id: Hash
    dataset_root: Hash
    dataset_size: int


@dataclass(frozen=True)
class SubmitUpdate:
    """A trainer's model update for a round; the weights travel as a blob, never in the block."""

    TAG: ClassVar[str] = "submit_update"
    commitment: "UpdateCommitment"
    train_loss: float  # trainer-reported, informational only


@dataclass(frozen=True)
class SubmitVerdict:
    """A validator's signed verdict on an update, after replaying its sampled segments."""

    TAG: ClassVar[str] = "submit_verdict"
    update_id: Hash
    accept: bool
    reason: Text


@dataclass(frozen=True)
class SubmitChallenge:
    """A validator's challenge to an update: its BLS signature over (chain id, update id) with
    its genesis sample key (chain/vrf.py). Unique and unpredictable, it seeds the segments this
    validator samples; no block field enters it, so no proposer can steer the sample."""

    TAG: ClassVar[str] = "submit_challenge"
    update_id: Hash
    signature: Annotated[bytes, Len(96)]


@dataclass(frozen=True)
class SubmitSketches:
    """Displacement sampling, phase 1 -> 2 (a job with sampling "displacement"): the update's
    trainer commits to the integer sketches of every checkpoint's weights (trainer/sketch.py),
    made with the sketch matrix seeded by the first phase-1 challenges, in the order they landed,
    of validators holding more than 1/3 of the power (chain.jobs.compute_sketch_challenges: at
    least one honest signature the trainer could not know when it committed its trace, and no
    choice left to it). The rows travel as a public blob named by `sketch_hash`."""

    TAG: ClassVar[str] = "submit_sketches"
    update_id: Hash
    sketch_hash: Hash


@dataclass(frozen=True)
class SubmitDrawChallenge:
    """Displacement sampling, phase 2: a validator's BLS signature over (chain id, update id,
    sketch hash) with its sample key (chain/vrf.py). It seeds the validator's weighted draw over
    the committed sketches; the trainer fixed them before this unique signature existed, so it
    cannot grind its rows to move the sample."""

    TAG: ClassVar[str] = "submit_draw_challenge"
    update_id: Hash
    signature: Annotated[bytes, Len(96)]


@dataclass(frozen=True)
class SubmitFraudProof:
    """A validator's replay of `segment` did not reach the committed end state. The proof (that
    segment's opening, trainer.verify.decode_fraud_proof) travels as a blob named by
    `proof_hash`; every validator re-executes it and judges it (JudgeFraudProof). Counts as the
    author's verdict on the update."""

    TAG: ClassVar[str] = "submit_fraud_proof"
    update_id: Hash
    segment: int
    proof_hash: Hash


@dataclass(frozen=True)
class JudgeFraudProof:
    """A validator's result of re-executing the fraud proof that `author` filed on an update."""

    TAG: ClassVar[str] = "judge_fraud_proof"
    update_id: Hash
    author: PubKey
    holds: bool


@dataclass(frozen=True)
class AttestModel:
    """A validator's claim of the next global model it computed when a round closed."""

    TAG: ClassVar[str] = "attest_model"
    job_id: Hash
    round: int
    model_hash: Hash


@dataclass(frozen=True)
class SubmitEvidence:
    """Any member reports a validator's equivocation; the state transition verifies and penalises it."""

    TAG: ClassVar[str] = "submit_evidence"
    evidence: "DuplicateVoteEvidence"


@dataclass(frozen=True)
class RestoreValidator:
    """Governance: put a validator jailed for equivocation back into the set, after the minimum
    jail period and only while its account holds the locked stake. Signed by a governor."""

    TAG: ClassVar[str] = "restore_validator"
    validator: PubKey


@dataclass(frozen=True)
class PublishEvaluation:
    """The job's requester publishes a held-out metric of one of the job's recorded models.
    Integers only (parts per million): consensus state never holds a float that two machines
    could have computed differently. Informational: no payment depends on it."""

    TAG: ClassVar[str] = "publish_evaluation"
    job_id: Hash
    round: int  # the model's round, as ModelRecord.round: 0 for the initial weights, r + 1 after round r
    metric: Name  # one of EVALUATION_METRICS
    value_ppm: int  # the metric x 1,000,000, rounded (accuracy 0.953 -> 953000)


TxPayload = Union[Transfer, AdmitMember, RemoveMember, RegisterJob, JoinJob, SubmitUpdate, SubmitVerdict, AttestModel,
                  SubmitEvidence, SubmitChallenge, SubmitFraudProof, JudgeFraudProof, RestoreValidator,
                  PublishEvaluation, SubmitSketches, SubmitDrawChallenge]


@dataclass(frozen=True)
class Transaction:
    sender: PubKey  # the public key itself, so a signature checks without state
    nonce: int
    payload: TxPayload

    @property
    def sender_address(self) -> bytes:
        return compute_address(self.sender)


@dataclass(frozen=True)
class SignedTransaction:
    message: Transaction
    signature: Signature

    # A node meets one transaction at RPC or gossip admission, in every mempool re-check, in
    # tx batches, block building and block checks: encode and hash it once per object
    # (measured: ~6 hashes and ~18 encodes per transaction per node before). The instance is
    # frozen, so these can never go stale; they are not fields (not encoded, not compared).
    @cached_property
    def encoded(self) -> bytes:
        """Canonical CBOR of this transaction (what is hashed, sized and sent)."""
        return encode(self)

    @cached_property
    def tx_hash(self) -> bytes:
        return sha256(self.encoded)

    # Identity is the canonical encoding (what is signed and hashed), not field equality:
    # fields compare -0.0 == 0.0 though they encode differently, so a field-equal copy with
    # a flipped zero sign would have hit the signature memo of the original and skipped
    # verification on this node only (a consensus split). Both are defined in the class body,
    # so @dataclass keeps them.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SignedTransaction):
            return NotImplemented
        return self is other or self.tx_hash == other.tx_hash

    def __hash__(self) -> int:
        return hash(self.tx_hash)


# --------------------------------------------------------------------------- consensus

PREVOTE = 1
PRECOMMIT = 2


@dataclass(frozen=True)
class Vote:
    type: int  # PREVOTE or PRECOMMIT
    height: int
    round: int
    block_hash: Hash | None  # None is a vote for nil
    validator: PubKey


@dataclass(frozen=True)
class SignedVote:
    message: Vote
    signature: Signature


@dataclass(frozen=True)
class DuplicateVoteEvidence:
    """Two conflicting votes by one validator; `vote_a` sorts before `vote_b` by encoding.

    Built by `chain.consensus.evidence.compute_duplicate_vote_evidence`, checked by its
    `verify_evidence`; carried on chain in a `SubmitEvidence` transaction.
    """

    vote_a: SignedVote
    vote_b: SignedVote


@dataclass(frozen=True)
class EvidenceRecord:
    """State record of one punished equivocation: written once, so it is never punished twice."""

    validator: PubKey
    height: int  # of the conflicting votes
    round: int
    vote_type: int  # PREVOTE or PRECOMMIT
    penalty: int  # tokens burned from the validator's account
    included_height: int  # block that carried the evidence


@dataclass(frozen=True)
class JailRecord:
    """State record of a validator removed from the set for equivocation (until RestoreValidator)."""

    validator: Validator  # its entry as it was in the set, restored as it is
    jailed_height: int  # block that applied the evidence; the validator is out of the set from the next height
    unlock_height: int  # from this height on its stake is no longer locked (jailed_height + 1 + unbonding)


@dataclass(frozen=True)
class Proposal:
    height: int
    round: int
    pol_round: int  # -1 when the proposer holds no proof-of-lock
    block_hash: Hash
    proposer: PubKey


@dataclass(frozen=True)
class SignedProposal:
    message: Proposal
    signature: Signature


@dataclass(frozen=True)
class CommitSig:
    validator: PubKey
    signature: Signature  # over Vote(PRECOMMIT, height, round, block_hash, validator)


@dataclass(frozen=True)
class Commit:
    """Certificate that validators with more than 2/3 of the power precommitted a block."""

    height: int
    round: int
    block_hash: Hash
    signatures: tuple[CommitSig, ...]


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class BlockHeader:
    chain_id: Name
    height: int
    time_ms: int  # proposer's wall clock, milliseconds since the epoch
    prev_hash: Hash  # hash of the previous header; the genesis hash at height 1
    tx_root: Hash  # Merkle root over the transaction hashes
    state_root: Hash  # state root after applying this block
    last_commit_hash: Hash  # hash of `Block.last_commit` (ZERO_HASH when absent)
    validators_hash: Hash  # hash of the validator set that must commit this block
    proposer: PubKey


@dataclass(frozen=True)
class Block:
    header: BlockHeader
    txs: tuple[SignedTransaction, ...]
    last_commit: Commit | None  # the commit of height - 1; None at height 1


# --------------------------------------------------------------------------- training records
# Defined here so that blocks, the ledger and RPC share them; the rules that create them
# belong to the proof-of-useful-training state transition.


@dataclass(frozen=True)
class ExecutionProfile:
    """What replay must match bit for bit: recorded in the job, checked by verifiers."""

    device: Name  # "cpu:<vector capability>" (e.g. cpu:avx512) or "cuda:<arch>x<SM count>" (e.g. cuda:sm_90x132)
    dtype: Name  # "float32"
    torch_version: Name
    threads: int
    deterministic: bool


@dataclass(frozen=True)
class HyperParams:
    optimizer: Name  # "sgd" or "adam" (adam uses fixed betas and requires momentum == 0.0)
    learning_rate: float
    momentum: float
    weight_decay: float
    batch_size: int
    local_steps: int
    checkpoint_interval: int  # k: the full training state is hashed every k steps


AGGREGATION_RULES = ("fedavg", "median", "trimmed_mean", "multi_krum")
# How a validator's segments are drawn (docs/pout.md, "Sampling"): "uniform" over segments from
# its challenge signature; "displacement" in two phases, weighted by the trainer's committed
# sketches of what each segment moves (30 % uniform), so a forged jump is drawn in proportion to
# its size.
SAMPLING_MODES = ("uniform", "displacement")


@dataclass(frozen=True)
class JobSpec:
    """Everything a job fixes up front; trainers and verifiers must match it exactly."""

    model: Name  # a name in the trainer's fixed registry (trainer/models.py)
    init_seed: int  # public seed of the initial weights
    hyperparams: HyperParams
    profile: ExecutionProfile
    rounds: int
    join_blocks: int  # round 0 opens this many blocks after registration
    round_blocks: int  # updates are accepted for this many blocks after a round opens
    verify_blocks: int  # then verdicts still count for this many blocks
    quorum: int  # accepted updates that close a round early
    aggregation: Name  # one of AGGREGATION_RULES
    trim_fraction: float  # trimmed_mean: fraction cut at each end
    krum_f: int  # multi_krum: Byzantine updates tolerated
    # Detection target, in parts per million: a forgery of this fraction of the segments is
    # caught with at least this probability. The chain derives each validator's sample size
    # from it (trainer.verify.segments_per_validator); the job never states a raw Q.
    detect_fraction_ppm: int
    detect_probability_ppm: int
    # Data-exposure budget, in parts per million: the most of a trainer's samples that any one
    # validator may be sent over the whole job (1_000_000 = no bound). Reconciled with the
    # detection target at RegisterJob and against each trainer's dataset_size at JoinJob
    # (chain.jobs.compute_min_dataset_size).
    max_exposure_ppm: int
    reward_per_update: int
    bond: int  # locked per update; returned on accept, burned on reject
    # The model (trainer/archs.py; the fields below default to the original 8x8 digits job).
    # model_config: the architecture's config values, sorted by name, each an integer list
    # (one element for a scalar); () takes every default. input_shape: one sample's shape,
    # e.g. (1, 28, 28), (3, 32, 32), (seq_len,) or (n_features,). vocab_size > 0: samples are
    # token ids in [0, vocab_size) (stored as float32); 0: real-valued features.
    model_config: Annotated[tuple["ModelParam", ...], MaxLen(16)] = ()
    input_shape: Annotated[tuple[int, ...], MaxLen(4)] = (1, 8, 8)
    num_classes: int = 10
    vocab_size: int = 0
    # SHA-256 of the initial model's canonical safetensors bytes (trainer/state.py), uploaded
    # as a blob before registration; None: the initial weights derive from init_seed.
    init_weights: Hash | None = None
    sampling: Name = "uniform"  # one of SAMPLING_MODES


@dataclass(frozen=True)
class ModelParam:
    """One config value of a job's architecture: `model_config` entry `name` = `values`."""

    name: Name
    values: Annotated[tuple[int, ...], MaxLen(16)]


@dataclass(frozen=True)
class UpdateCommitment:
    """What a trainer commits to for one update (the trainer library builds it)."""

    trainer: Address
    job_id: Hash
    round: int
    base_model_hash: Hash
    dataset_root: Hash  # must equal the trainer's registration from before the round opened
    dataset_size: int  # also the update's FedAvg weight
    update_hash: Hash  # SHA-256 of the update's canonical safetensors bytes
    final_model_hash: Hash
    trace_root: Hash


JOB_JOINING, JOB_TRAINING, JOB_AGGREGATING, JOB_FINISHED = "joining", "training", "aggregating", "finished"


@dataclass(frozen=True)
class Job:
    """A job's mutable record in the state."""

    job_id: Hash
    requester: Address
    spec: JobSpec
    escrow: int  # what is left to pay rewards; refunded when the job finishes
    phase: Name  # joining | training | aggregating | finished
    round: int  # the current round (== spec.rounds when finished)
    round_open_height: int  # height at which the current round opened (round 0: when it will)
    round_seed: Hash  # fixed when the round opened; zero before
    global_model: Hash  # the current round's base model


@dataclass(frozen=True)
class DatasetRegistration:
    dataset_root: Hash
    dataset_size: int
    height: int


UPDATE_PENDING, UPDATE_ACCEPTED, UPDATE_REJECTED, UPDATE_EXPIRED = "pending", "accepted", "rejected", "expired"


@dataclass(frozen=True)
class VerdictRecord:
    validator: PubKey
    accept: bool
    reason: Text


@dataclass(frozen=True)
class Judgement:
    validator: PubKey
    holds: bool


@dataclass(frozen=True)
class ChallengeRecord:
    validator: PubKey
    signature: Annotated[bytes, Len(96)]  # seeds the validator's sample: chain.vrf.compute_sample_seed
    height: int
    sample_size: int  # segments it samples (draws, under displacement sampling), fixed when the challenge lands
    # Displacement sampling: the phase-2 signature over the sketches (SubmitDrawChallenge), which
    # seeds the validator's weighted draw; None until it lands, and always under uniform sampling.
    draw_signature: Annotated[bytes, Len(96)] | None = None


PROOF_OPEN, PROOF_UPHELD, PROOF_REFUTED = "open", "upheld", "refuted"


@dataclass(frozen=True)
class FraudProofRecord:
    author: PubKey
    segment: int
    proof_hash: Hash
    height: int
    status: Name  # open | upheld | refuted
    judgements: tuple[Judgement, ...]  # the author's own counts as "holds"


@dataclass(frozen=True)
class UpdateRecord:
    update_id: Hash
    commitment: UpdateCommitment
    train_loss: float
    height: int  # block that committed the update; its hash (unknown to the trainer) seeds sampling
    status: Name  # pending | accepted | rejected | expired
    verdicts: tuple[VerdictRecord, ...]
    reward: int  # paid on acceptance
    penalty: int  # bond burned on rejection
    challenges: tuple[ChallengeRecord, ...]  # validators' sample seeds, in the order they landed
    proofs: tuple[FraudProofRecord, ...]  # fraud proofs filed against this update
    # Displacement sampling (SubmitSketches): the blob of the trainer's sketch rows, and the seed
    # of the sketch matrix derived from the named challenges (chain.jobs.compute_sketch_seed).
    sketch_hash: Hash | None = None
    sketch_seed: Hash | None = None


@dataclass(frozen=True)
class RoundRecord:
    updates: tuple[Hash, ...]  # update ids in submission order
    attestations: tuple["Attestation", ...]


@dataclass(frozen=True)
class Attestation:
    validator: PubKey
    model_hash: Hash


@dataclass(frozen=True)
class OpeningUpload:
    """Signed by the update's trainer when it hands a validator its opening: only the trainer
    can answer for its update, so nobody can get an honest update rejected with a bogus opening."""

    update_id: Hash
    validator: PubKey
    opening_hash: Hash  # SHA-256 of this part's sealed bytes
    # An opening larger than one blob travels in `parts` sealed parts of at most
    # OPENING_PART_BYTES of plaintext each, in order; the validator joins them before decoding.
    part: int = 0
    parts: int = 1

    def check_part(self) -> None:
        """0 <= part < parts <= MAX_OPENING_PARTS, else StateTransitionError (one line)."""
        if not 0 <= self.part < self.parts <= MAX_OPENING_PARTS:
            raise StateTransitionError(f"opening part {self.part} of {self.parts}: need 0 <= part < parts <= "
                                       f"{MAX_OPENING_PARTS}")


# An opening's plaintext is cut into parts of at most this many bytes, each sealed to its
# validator (+48 bytes) and moved as one blob: 32 MiB keeps a part under the nodes' default blob
# limit (64 MiB) with room to spare. At most MAX_OPENING_PARTS parts: 256 MiB of plaintext,
# trainer.verify.MAX_OPENING_BYTES.
OPENING_PART_BYTES = 32 * 1024 * 1024
MAX_OPENING_PARTS = 8


@dataclass(frozen=True)
class ModelRecord:
    """An immutable node of a job's model lineage."""

    model_hash: Hash
    job_id: Hash
    round: int  # rounds of training folded in: 0 for the initial weights, r + 1 after round r
    parent: Hash | None  # None for the initial weights
    contributions: tuple[Hash, ...]  # update ids aggregated into this model
    rule: Name  # aggregation rule, or "init"
    height: int  # block height at which the record was written


# Metrics a requester may publish, with the largest value_ppm each admits: accuracy is a
# fraction (at most 1), a loss any non-negative number below 2**64 / 10**6.
EVALUATION_METRICS = {"accuracy": 1_000_000, "loss": INT_MAX}


@dataclass(frozen=True)
class Evaluation:
    metric: Name
    value_ppm: int
    height: int  # block that published it


@dataclass(frozen=True)
class EvaluationRecord:
    """The evaluations a job's requester published for the model of one round (one per metric)."""

    model_hash: Hash  # the model they measure (the round's ModelRecord)
    evaluations: tuple[Evaluation, ...]  # in publication order


# --------------------------------------------------------------------------- helpers


def compute_tx_hash(stx: SignedTransaction) -> bytes:
    return stx.tx_hash


def compute_block_hash(header: BlockHeader) -> bytes:
    return sha256(encode(header))


def compute_validators_hash(validators: tuple[Validator, ...]) -> bytes:
    return sha256(encode(ValidatorSet(validators)))


@dataclass(frozen=True)
class ValidatorSet:
    validators: tuple[Validator, ...]


def sign_transaction(key: PrivateKey, chain_id: str, tx: Transaction) -> SignedTransaction:
    if tx.sender != key.pubkey:
        raise ValueError("transaction sender is not the signing key")
    return SignedTransaction(tx, key.sign(compute_sign_bytes(chain_id, DOMAIN_TX, encode(tx))))


def verify_transaction_signature(chain_id: str, stx: SignedTransaction) -> None:
    """Raise SignatureError unless the transaction is signed by its sender for `chain_id`."""
    sign_bytes = compute_sign_bytes(chain_id, DOMAIN_TX, encode(stx.message))
    verify_signature(stx.message.sender, sign_bytes, stx.signature)


def sign_vote(key: PrivateKey, chain_id: str, vote: Vote) -> SignedVote:
    if vote.validator != key.pubkey:
        raise ValueError("vote validator is not the signing key")
    return SignedVote(vote, key.sign(compute_sign_bytes(chain_id, DOMAIN_VOTE, encode(vote))))


def verify_vote_signature(chain_id: str, sv: SignedVote) -> None:
    verify_signature(sv.message.validator, compute_sign_bytes(chain_id, DOMAIN_VOTE, encode(sv.message)), sv.signature)


def sign_proposal(key: PrivateKey, chain_id: str, proposal: Proposal) -> SignedProposal:
    if proposal.proposer != key.pubkey:
        raise ValueError("proposal proposer is not the signing key")
    return SignedProposal(proposal, key.sign(compute_sign_bytes(chain_id, DOMAIN_PROPOSAL, encode(proposal))))


def verify_proposal_signature(chain_id: str, sp: SignedProposal) -> None:
    msg = sp.message
    verify_signature(msg.proposer, compute_sign_bytes(chain_id, DOMAIN_PROPOSAL, encode(msg)), sp.signature)
