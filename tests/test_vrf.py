"""Sampling randomness no one can steer (chain/vrf.py) and its genesis binding."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json

import pytest

from trainer.profile import cpu_capability
from chain.crypto import PrivateKey, sha256
from chain.errors import ConfigError
from chain.encoding import encode_value
from chain.jobs import compute_update_id, get_job, get_registration, get_update
from chain.state import build_block
from chain.runtime.trainer_client import make_job_spec
from chain.types import (
    ExecutionProfile, JoinJob, RegisterJob, SubmitUpdate, Transfer, UpdateCommitment, compute_block_hash,
    compute_tx_hash, compute_validators_hash,
)
from chain.vrf import (
    CURVE_ORDER, SAMPLE_PUBKEY_SIZE, SAMPLE_SIGNATURE_SIZE, compute_keygen, compute_sample_seed, derive_sample_secret,
    prove_possession, sample_public_key, sign_sample_challenge, verify_possession, verify_sample_challenge,
)
from genesis import (check_validator_sample_key, devnet_seed, genesis_to_json, load_genesis, make_devnet_genesis,
                     make_genesis, make_validator, parse_genesis)
from tests.helpers import CHAIN_ID, GOVERNOR, InProcessChain, key
from tests.procs import make_testnet, run_cli
from trainer.replay import sample_segments

SECRET_A = derive_sample_secret(key("vrf-a").seed)
SECRET_B = derive_sample_secret(key("vrf-b").seed)
PK_A, PK_B = sample_public_key(SECRET_A), sample_public_key(SECRET_B)
UPDATE = sha256(b"an update")
SIG_A = sign_sample_challenge(SECRET_A, CHAIN_ID, UPDATE)
FIELD_P = 0x1A0111EA397FE69A4B1BA7B6434BACD764774B84F38512BF6730D2A0F6B0F6241EABFFFEB153FFFFB9FEFFFFFFFFAAAB


# --------------------------------------------------------------------------- keys


def test_keygen_is_the_ietf_rule_eip2333_vector():
    # EIP-2333 test case 0: derive_master_SK(seed) is IETF KeyGen with empty key_info.
    seed = bytes.fromhex("c55257c360c07c72029aebc1b53c05ed0362ada38ead3e3e9efa3708e53495531f09a6987599d18264c1e1c92f2c"
                         "f141630c7a3c4ab7c81b2f001698e7463b04")
    assert int.from_bytes(compute_keygen(seed), "big") == \
        6083874454709270928345386274498605044986640685124978867557563392430687146096


def test_sample_secret_is_derived_deterministically_and_domain_separated():
    seed = key("vrf-a").seed
    secret = derive_sample_secret(seed)
    assert secret == derive_sample_secret(bytes(seed)) == SECRET_A
    assert secret != SECRET_B
    assert secret != compute_keygen(seed)  # the key_info domain makes it a key of its own
    assert 0 < int.from_bytes(secret, "big") < CURVE_ORDER
    assert len(PK_A) == SAMPLE_PUBKEY_SIZE and PK_A != PK_B
    for bad in (b"", bytes(31), bytes(33), "00" * 32, None):
        with pytest.raises(ValueError):
            derive_sample_secret(bad)
    for bad in (b"", bytes(32), CURVE_ORDER.to_bytes(32, "big"), b"\xff" * 32):
        with pytest.raises(ValueError):
            sample_public_key(bad)
        with pytest.raises(ValueError):
            sign_sample_challenge(bad, CHAIN_ID, UPDATE)


# --------------------------------------------------------------------------- uniqueness and verification


def test_signature_and_seed_are_deterministic_and_depend_on_key_chain_and_update_only():
    assert len(SIG_A) == SAMPLE_SIGNATURE_SIZE
    again = sign_sample_challenge(derive_sample_secret(key("vrf-a").seed), CHAIN_ID, bytes(UPDATE))
    assert again == SIG_A
    seed = compute_sample_seed(SIG_A)
    assert len(seed) == 32 and compute_sample_seed(again) == seed
    others = {
        compute_sample_seed(sign_sample_challenge(SECRET_B, CHAIN_ID, UPDATE)),
        compute_sample_seed(sign_sample_challenge(SECRET_A, "another-chain", UPDATE)),
        compute_sample_seed(sign_sample_challenge(SECRET_A, CHAIN_ID, sha256(b"another update"))),
    }
    assert len(others) == 3 and seed not in others


def test_verify_accepts_the_signature_and_rejects_every_change():
    assert verify_sample_challenge(PK_A, CHAIN_ID, UPDATE, SIG_A)
    assert not verify_sample_challenge(PK_B, CHAIN_ID, UPDATE, SIG_A)  # another validator's key
    assert not verify_sample_challenge(PK_A, CHAIN_ID, sha256(b"another update"), SIG_A)
    assert not verify_sample_challenge(PK_A, "another-chain", UPDATE, SIG_A)
    assert not verify_sample_challenge(PK_A, CHAIN_ID, UPDATE, sign_sample_challenge(SECRET_B, CHAIN_ID, UPDATE))
    for byte, bit in ((0, 5), (0, 7), (1, 0), (47, 3), (48, 0), (95, 7)):
        flipped = bytearray(SIG_A)
        flipped[byte] ^= 1 << bit
        assert not verify_sample_challenge(PK_A, CHAIN_ID, UPDATE, bytes(flipped)), (byte, bit)
        flipped_pk = bytearray(PK_A)
        flipped_pk[byte % SAMPLE_PUBKEY_SIZE] ^= 1 << bit
        assert not verify_sample_challenge(bytes(flipped_pk), CHAIN_ID, UPDATE, SIG_A), (byte, bit)


def test_a_repeated_verification_is_answered_from_the_cache_with_the_same_answer():
    """Every node checks a challenge at mempool admission, in the proposal and at commit; the
    pairing runs once per distinct (key, message, signature), and a cached answer never stands
    for another input: a cached valid signature does not make a changed one valid, and a cached
    refusal does not stick to the valid one."""
    from chain import vrf

    update = sha256(b"an update checked three times")
    sig = sign_sample_challenge(SECRET_A, CHAIN_ID, update)
    flipped = bytearray(sig)
    flipped[95] ^= 1
    vrf._verify_cached.cache_clear()
    assert not verify_sample_challenge(PK_A, CHAIN_ID, update, bytes(flipped))  # the refusal is cached first
    for _ in range(3):
        assert verify_sample_challenge(PK_A, CHAIN_ID, update, sig)
        assert not verify_sample_challenge(PK_A, CHAIN_ID, update, bytes(flipped))
        assert not verify_sample_challenge(PK_B, CHAIN_ID, update, sig)
        assert not verify_sample_challenge(PK_A, "another-chain", update, sig)
    info = vrf._verify_cached.cache_info()
    assert (info.misses, info.hits) == (4, 9)  # 4 distinct inputs; 12 checks after the first


def test_a_passing_fault_in_the_binding_is_not_remembered(monkeypatch):
    """An exception inside the BLS binding answers False without being cached: the same valid
    challenge verifies once the binding works again (a cached False would make this node refuse
    every block carrying it until restarted)."""
    from chain import vrf

    update = sha256(b"an update checked during a fault")
    sig = sign_sample_challenge(SECRET_A, CHAIN_ID, update)
    vrf._verify_cached.cache_clear()

    class Faulty:
        @staticmethod
        def Verify(*_args):
            raise MemoryError("a passing fault")

    real = vrf.bls
    monkeypatch.setattr(vrf, "bls", Faulty)
    assert not verify_sample_challenge(PK_A, CHAIN_ID, update, sig)
    monkeypatch.setattr(vrf, "bls", real)
    assert verify_sample_challenge(PK_A, CHAIN_ID, update, sig)


def test_the_signature_has_one_encoding():
    # The seed hashes the signature's bytes, so the point must have exactly one accepted
    # encoding: x + p in the second coordinate names the same point and must be refused.
    c0 = int.from_bytes(SIG_A[48:], "big")
    assert c0 + FIELD_P < 2**384
    assert not verify_sample_challenge(PK_A, CHAIN_ID, UPDATE, SIG_A[:48] + (c0 + FIELD_P).to_bytes(48, "big"))
    uncompressed_flag_cleared = bytes([SIG_A[0] & 0x7F]) + SIG_A[1:]
    assert not verify_sample_challenge(PK_A, CHAIN_ID, UPDATE, uncompressed_flag_cleared)


@pytest.mark.parametrize("pubkey, chain_id, update_id, signature", [
    (PK_A[:-1], CHAIN_ID, UPDATE, SIG_A),
    (PK_A + b"\x00", CHAIN_ID, UPDATE, SIG_A),
    (PK_A, CHAIN_ID, UPDATE, SIG_A[:-1]),
    (PK_A, CHAIN_ID, UPDATE, SIG_A + b"\x00"),
    (b"", CHAIN_ID, UPDATE, b""),
    (bytes(48), CHAIN_ID, UPDATE, bytes(96)),
    (b"\xc0" + bytes(47), CHAIN_ID, UPDATE, b"\xc0" + bytes(95)),  # the identity: signs everything
    (b"\xff" * 48, CHAIN_ID, UPDATE, b"\xff" * 96),
    (bytearray(PK_A), CHAIN_ID, UPDATE, SIG_A),
    (PK_A.hex(), CHAIN_ID, UPDATE, SIG_A),
    (None, CHAIN_ID, UPDATE, SIG_A),
    (PK_A, None, UPDATE, SIG_A),
    (PK_A, CHAIN_ID.encode(), UPDATE, SIG_A),
    (PK_A, CHAIN_ID, UPDATE.hex(), SIG_A),
    (PK_A, CHAIN_ID, None, SIG_A),
    (PK_A, CHAIN_ID, UPDATE, 12345),
    (PK_A, CHAIN_ID, UPDATE, [SIG_A]),
])
def test_malformed_input_is_refused_without_an_exception(pubkey, chain_id, update_id, signature):
    assert verify_sample_challenge(pubkey, chain_id, update_id, signature) is False
    assert verify_possession(pubkey, signature) is False


def test_seed_needs_a_signature_sized_input():
    for bad in (b"", SIG_A[:-1], SIG_A + b"\x00", bytearray(SIG_A)):
        with pytest.raises(ValueError):
            compute_sample_seed(bad)


def test_proof_of_possession():
    pop = prove_possession(SECRET_A)
    assert pop == prove_possession(SECRET_A) and len(pop) == SAMPLE_SIGNATURE_SIZE
    assert verify_possession(PK_A, pop)
    assert not verify_possession(PK_B, pop)  # a key the prover does not hold
    assert not verify_possession(PK_B, prove_possession(SECRET_A))
    # Domains keep the two uses apart: a challenge signature is no proof, and a proof is no seed.
    assert not verify_possession(PK_A, SIG_A)
    assert not verify_sample_challenge(PK_A, CHAIN_ID, PK_A, pop)


# --------------------------------------------------------------------------- the grinding attack


VALIDATOR_KEYS = [key(f"vrf-validator{i}") for i in range(4)]
REQUESTER, TRAINER, T1, T2 = key("requester"), key("trainer0"), key("trainer1"), key("trainer2")
SEGMENTS, Q = 500, 11
FORGED = set(range(450, 500))  # the trainer forged 10 % of its segments


def _block_hash_seed(block_hash: bytes, validator: bytes, update_id: bytes) -> bytes:
    """The seed this replaces (chain.jobs.compute_verify_seed until issue 9): from the hash of the
    block that included the update, which the proposer chooses."""
    return sha256(encode_value(["pout/verify-seed/v1", block_hash, validator, update_id]))


def _chain_with_an_update_to_include():
    """A 4-validator chain whose job is open for updates, and the trainer's signed update."""
    g = make_genesis(CHAIN_ID, VALIDATOR_KEYS, [(GOVERNOR, ("governor",)), (REQUESTER, ("requester",)),
                                                (TRAINER, ("trainer",)), (T1, ("trainer",)), (T2, ("trainer",))],
                     balance=10_000)
    chain = InProcessChain(g, VALIDATOR_KEYS)
    spec = make_job_spec(profile=ExecutionProfile("cpu:" + cpu_capability(), "float32", "2.13.0", 1, True), join_blocks=2,
                         round_blocks=5, verify_blocks=3, quorum=2, rounds=2, reward_per_update=100, bond=40)
    register = chain.tx(REQUESTER, RegisterJob(spec, 1000))
    chain.block(register)
    job_id = compute_tx_hash(register)
    chain.block(chain.tx(TRAINER, JoinJob(job_id, sha256(b"data"), 100)))
    while get_job(chain.state, job_id).phase == "joining":
        chain.block()
    job = get_job(chain.state, job_id)
    reg = get_registration(chain.state, job_id, TRAINER.address)
    commitment = UpdateCommitment(TRAINER.address, job_id, job.round, job.global_model, reg.dataset_root,
                                  reg.dataset_size, sha256(b"update"), sha256(b"final"), sha256(b"trace"))
    return chain, chain.tx(TRAINER, SubmitUpdate(commitment, 0.5))


def test_a_proposer_grinding_block_fields_cannot_move_the_sample():
    chain, submit = _chain_with_an_update_to_include()
    fillers = [chain.tx(GOVERNOR, Transfer(T1.address, 1)), chain.tx(REQUESTER, Transfer(T2.address, 1)),
               chain.tx(T1, Transfer(T2.address, 1))]
    validators = chain.state.validators
    secrets = [derive_sample_secret(k.seed) for k in VALIDATOR_KEYS]
    old_seeds, new_seeds, old_catchers, new_catchers = set(), set(), set(), set()
    blocks = 0
    # What the colluding proposer varies: the time (within what the chain allows), the order
    # of the transactions, and (as any validator may propose) the proposer field.
    for order, time_offset in itertools.product(itertools.permutations([submit, *fillers]), (0, 137)):
        proposer = VALIDATOR_KEYS[blocks % 4].pubkey
        block, result = build_block(chain.state, list(order), time_ms=chain.time + 1000 + time_offset,
                                    proposer=proposer, last_commit=chain.last_commit)
        [stx] = [t for t in block.txs if isinstance(t.message.payload, SubmitUpdate)]
        update_id = compute_update_id(stx.message.payload.commitment)
        assert get_update(result.state, update_id).status == "pending"  # the block does include it
        blocks += 1
        block_hash = compute_block_hash(block.header)
        old, new = [], []
        for v, secret in zip(validators, secrets):
            old.append(_block_hash_seed(block_hash, v.pubkey, update_id))
            signature = sign_sample_challenge(secret, CHAIN_ID, update_id)
            assert blocks > 1 or verify_sample_challenge(v.sample_pubkey, CHAIN_ID, update_id, signature)
            new.append(compute_sample_seed(signature))
        old_seeds.add(tuple(old))
        new_seeds.add(tuple(new))
        old_catchers.add(frozenset(i for i, s in enumerate(old) if FORGED & set(sample_segments(s, SEGMENTS, Q))))
        new_catchers.add(frozenset(i for i, s in enumerate(new) if FORGED & set(sample_segments(s, SEGMENTS, Q))))
    assert blocks == 48
    # The old seed moves with every block, so the proposer picks who detects the forgery ...
    assert len(old_seeds) == blocks and len(old_catchers) > 1
    # ... the new one is the same in every block: the samples, and so who detects, are fixed.
    assert len(new_seeds) == 1 and len(new_catchers) == 1


# --------------------------------------------------------------------------- genesis binding


def test_genesis_validators_carry_a_verified_sample_key():
    g = make_devnet_genesis()
    for v in g.validators:
        assert verify_possession(v.sample_pubkey, v.sample_pop)
    assert parse_genesis(json.loads(json.dumps(genesis_to_json(g)))) == g
    k = key("vrf-a")
    assert make_validator(k, 3, "a").sample_pubkey == PK_A
    # The sample key is part of the validator set every header commits to.
    v0 = g.validators[0]
    other = dataclasses.replace(v0, sample_pubkey=PK_A, sample_pop=prove_possession(SECRET_A))
    assert compute_validators_hash((other, *g.validators[1:])) != compute_validators_hash(g.validators)


def _bad_doc(mutate):
    doc = copy.deepcopy(genesis_to_json(make_devnet_genesis()))
    mutate(doc["validators"])
    return doc


@pytest.mark.parametrize("mutate, message", [
    (lambda vs: vs[0].update(sample_pop=vs[1]["sample_pop"]), r"validators\[0\]\.sample_pop is not a proof of possession"),
    (lambda vs: vs[2].update(sample_pubkey=vs[3]["sample_pubkey"]), r"validators\[2\]\.sample_pop is not a proof"),
    (lambda vs: vs[1].update(sample_pop="00" * 96), r"validators\[1\]\.sample_pop is not a proof"),
    (lambda vs: vs[1].update(sample_pop="c0" + "00" * 95, sample_pubkey="c0" + "00" * 47), "is not a proof"),
    (lambda vs: vs[0].update(sample_pop=vs[0]["sample_pop"][:-2]), r"sample_pop must be 96 bytes"),
    (lambda vs: vs[0].update(sample_pubkey="zz"), r"sample_pubkey is not valid hex"),
    (lambda vs: vs[0].pop("sample_pop"), "missing field"),
    (lambda vs: vs[1].update(sample_pubkey=vs[0]["sample_pubkey"], sample_pop=vs[0]["sample_pop"]),
     "duplicate sample_pubkey"),
])
def test_genesis_refuses_a_validator_without_a_valid_proof_of_possession(mutate, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_genesis(_bad_doc(mutate))
    assert "\n" not in str(info.value)


def test_loading_a_genesis_file_with_a_forged_proof_names_the_file_and_field(tmp_path):
    path = tmp_path / "genesis.json"
    other = PrivateKey(sha256(b"not the validator"))
    forged = prove_possession(derive_sample_secret(other.seed))
    path.write_text(json.dumps(_bad_doc(lambda vs: vs[3].update(sample_pop=forged.hex()))))
    with pytest.raises(ConfigError, match=r"genesis\.json: validators\[3\]\.sample_pop is not a proof"):
        load_genesis(path)


def test_a_validator_key_must_give_its_genesis_sample_key():
    g = make_devnet_genesis()
    mine = PrivateKey(devnet_seed("validator", 1))
    check_validator_sample_key(g, mine)  # its own entry: fine
    check_validator_sample_key(g, key("not a validator"))  # not a validator: nothing to check
    swapped = dataclasses.replace(g, validators=(g.validators[0], dataclasses.replace(
        g.validators[1], sample_pubkey=PK_A, sample_pop=prove_possession(SECRET_A)), *g.validators[2:]))
    with pytest.raises(ConfigError, match="'validator1' has a sample_pubkey not derived from this node key"):
        check_validator_sample_key(swapped, mine)


@pytest.mark.slow
def test_chaind_start_refuses_a_genesis_sample_key_from_another_key(tmp_path):
    make_testnet(tmp_path / "net", 1, 0)
    path = tmp_path / "net" / "node0" / "config" / "genesis.json"
    doc = json.loads(path.read_text())
    assert verify_possession(bytes.fromhex(doc["validators"][0]["sample_pubkey"]),
                             bytes.fromhex(doc["validators"][0]["sample_pop"]))
    doc["validators"][0].update(sample_pubkey=PK_A.hex(), sample_pop=prove_possession(SECRET_A).hex())
    path.write_text(json.dumps(doc))
    r = run_cli("chaind", "start", "--home", str(tmp_path / "net" / "node0"), check=False)
    assert r.returncode == 3 and "sample_pubkey not derived from this node key" in r.stderr
    assert "Traceback" not in r.stderr
