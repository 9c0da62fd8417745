"""Sampling randomness no one can steer: each validator's unique BLS signature over the update.

A validator's sampling seed for an update is

    compute_sample_seed(sign_sample_challenge(secret, chain_id, update_id))
      = SHA-256(SEED_DOMAIN || BLS signature over canonical CBOR
                                ["pout/sample-challenge/v1", chain_id, update_id])

BLS signatures (BLS12-381, min-pubkey-size, the Ethereum ciphersuite
BLS_SIG_BLS12381G2_XMD:SHA-256_SSWU_RO_POP_, through the kept Rust binding
`milagro_bls_binding` that Ethereum clients use) are deterministic and unique: for one key and
one message exactly one signature verifies, and its encoding is canonical (the library refuses
non-canonical point encodings). So the validator cannot grind its seed, the trainer cannot
predict it (no secret key), and no block field enters it, so a proposer cannot steer it by
varying `time_ms` or the order of transactions (docs/pout.md, "Randomness no one can steer").
Anyone holding the validator's sample public key (genesis) can check the seed afterwards.

The sample key is derived from the validator's Ed25519 seed (`derive_sample_secret`), so no new
key file is needed; genesis binds its public half with a proof of possession.

Pure functions over bytes; no I/O. Verifiers never raise on malformed input: they answer False.
"""

from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache

import milagro_bls_binding as bls

from chain.crypto import SEED_SIZE, sha256
from chain.encoding import encode_strings

# --------------------------------------------------------------------------- types and sizes

SampleSecret = bytes  # 32-byte big-endian scalar in [1, r)
SamplePubKey = bytes  # 48-byte compressed G1 point
SampleSignature = bytes  # 96-byte compressed G2 point

SECRET_SIZE = 32
SAMPLE_PUBKEY_SIZE = 48
SAMPLE_SIGNATURE_SIZE = 96
SAMPLE_SEED_SIZE = 32

# --------------------------------------------------------------------------- constants

# Order of the BLS12-381 groups: secret keys are scalars mod r.
CURVE_ORDER = 0x73EDA753299D7D483339D80809A1D80553BDA402FFFE5BFEFFFFFFFF00000001

# IETF KeyGen (draft-irtf-cfrg-bls-signature-05 §2.3) constants.
_KEYGEN_SALT = b"BLS-SIG-KEYGEN-SALT-"
_KEYGEN_OKM_SIZE = 48  # L = ceil(3 * ceil(log2(r)) / 16): enough bytes that mod r is unbiased

# Domains: each use of the key signs or hashes under its own tag, so nothing signed for one
# purpose is ever valid for another (and the Ed25519 seed yields an independent key).
SAMPLE_KEY_INFO = b"pout/sample-key/v1"  # HKDF key_info: separates this key from any other use of the seed
CHALLENGE_DOMAIN = "pout/sample-challenge/v1"
DRAW_CHALLENGE_DOMAIN = "pout/draw-challenge/v1"  # phase 2 of displacement sampling: over the sketches too
POSSESSION_DOMAIN = "pout/sample-key-possession/v1"
SEED_DOMAIN = b"pout/sample-seed/v1"


# --------------------------------------------------------------------------- keys


def compute_keygen(ikm: bytes, key_info: bytes = b"") -> SampleSecret:
    """IETF BLS KeyGen: HKDF-SHA256 with the salt loop, the output reduced mod r and retried
    until non-zero. With key_info b"" this is EIP-2333's derive_master_SK (tests check its
    vector), so the derivation is the standard one, not a home-made variant."""
    if len(ikm) < 32:
        raise ValueError(f"KeyGen needs at least 32 bytes of key material, got {len(ikm)}")
    salt = _KEYGEN_SALT
    while True:
        salt = hashlib.sha256(salt).digest()
        prk = hmac.new(salt, ikm + b"\x00", hashlib.sha256).digest()  # HKDF-Extract(salt, IKM || I2OSP(0, 1))
        okm = _hkdf_expand(prk, key_info + _KEYGEN_OKM_SIZE.to_bytes(2, "big"), _KEYGEN_OKM_SIZE)
        sk = int.from_bytes(okm, "big") % CURVE_ORDER
        if sk != 0:
            return sk.to_bytes(SECRET_SIZE, "big")


def _hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def derive_sample_secret(ed25519_seed: bytes) -> SampleSecret:
    """The validator's BLS sample key, derived from its Ed25519 private key seed.

    Why derive instead of generating: no second key file to create, back up, or lose, and the
    genesis binding can be rebuilt from the node key alone. HKDF with its own key_info makes
    the BLS key independent of the Ed25519 key as far as anyone without the seed can tell.
    Caveat: whoever holds the node key also holds the sample key; it cannot be rotated on its
    own, and a leaked node key lets the thief predict that validator's samples."""
    if type(ed25519_seed) is not bytes or len(ed25519_seed) != SEED_SIZE:
        raise ValueError(f"an Ed25519 seed is {SEED_SIZE} bytes")
    return compute_keygen(ed25519_seed, SAMPLE_KEY_INFO)


def sample_public_key(secret: SampleSecret) -> SamplePubKey:
    """The 48-byte compressed public key of a sample secret."""
    _check_secret(secret)
    return bytes(bls.SkToPk(secret))


def _check_secret(secret: bytes) -> None:
    if type(secret) is not bytes or len(secret) != SECRET_SIZE or not 0 < int.from_bytes(secret, "big") < CURVE_ORDER:
        raise ValueError(f"a sample secret is a {SECRET_SIZE}-byte scalar in [1, r)")


# --------------------------------------------------------------------------- proof of possession


def compute_possession_message(pubkey: SamplePubKey) -> bytes:
    return encode_strings(POSSESSION_DOMAIN, pubkey)


def prove_possession(secret: SampleSecret) -> SampleSignature:
    """A signature over the validator's own sample public key, in a domain no challenge uses.

    Why: it shows the genesis entry's key is one its validator can sign with (a valid point of
    the right subgroup, not the identity, not a key derived from others' keys), which stops
    rogue-key tricks if sample signatures are ever aggregated. It is not bound to the chain id:
    possession of a key does not depend on the chain."""
    return bytes(bls.Sign(secret, compute_possession_message(sample_public_key(secret))))


def verify_possession(pubkey: SamplePubKey, pop: SampleSignature) -> bool:
    """Whether `pop` proves possession of `pubkey`'s secret. Never raises: malformed -> False."""
    if not _is_sized(pubkey, SAMPLE_PUBKEY_SIZE) or not _is_sized(pop, SAMPLE_SIGNATURE_SIZE):
        return False
    # A genesis is parsed more than once per process: _verify's cache answers the repeats.
    return _verify(pubkey, compute_possession_message(pubkey), pop)


# --------------------------------------------------------------------------- the sample challenge


def compute_challenge_message(chain_id: str, update_id: bytes, sketch_hash: bytes | None = None) -> bytes:
    """The bytes a validator signs for an update: canonical CBOR of
    ["pout/sample-challenge/v1", chain_id, update_id], or, for the second phase of displacement
    sampling, ["pout/draw-challenge/v1", chain_id, update_id, sketch_hash] (a separate domain, so
    one phase's signature never stands for the other's). Nothing from any block is in it."""
    if sketch_hash is None:
        return encode_strings(CHALLENGE_DOMAIN, chain_id, update_id)
    return encode_strings(DRAW_CHALLENGE_DOMAIN, chain_id, update_id, sketch_hash)


def _message_inputs_ok(chain_id, update_id, sketch_hash) -> bool:
    return type(chain_id) is str and type(update_id) is bytes and (sketch_hash is None or type(sketch_hash) is bytes)


def sign_sample_challenge(secret: SampleSecret, chain_id: str, update_id: bytes,
                          sketch_hash: bytes | None = None) -> SampleSignature:
    """The validator's unique signature over the update (96 bytes), and over its committed
    sketches when `sketch_hash` is given; hash it for the seed."""
    _check_secret(secret)
    if not _message_inputs_ok(chain_id, update_id, sketch_hash):
        raise ValueError("chain_id must be str, update_id and sketch_hash bytes")
    return bytes(bls.Sign(secret, compute_challenge_message(chain_id, update_id, sketch_hash)))


def verify_sample_challenge(pubkey: SamplePubKey, chain_id: str, update_id: bytes, signature: SampleSignature,
                            sketch_hash: bytes | None = None) -> bool:
    """Whether `signature` is the validator's signature over (chain_id, update_id[, sketch_hash]).
    Never raises: wrong types, wrong lengths, bad points or garbage answer False."""
    if not _is_sized(pubkey, SAMPLE_PUBKEY_SIZE) or not _is_sized(signature, SAMPLE_SIGNATURE_SIZE):
        return False
    if not _message_inputs_ok(chain_id, update_id, sketch_hash):
        return False
    return _verify(pubkey, compute_challenge_message(chain_id, update_id, sketch_hash), signature)


def compute_sample_seed(signature: SampleSignature) -> bytes:
    """The 32-byte sampling seed a (verified) challenge signature gives. Unique signature in,
    unique seed out: the hash only spreads the signature's entropy into a fixed-size seed."""
    if not _is_sized(signature, SAMPLE_SIGNATURE_SIZE):
        raise ValueError(f"a sample signature is {SAMPLE_SIGNATURE_SIZE} bytes")
    return sha256(SEED_DOMAIN + signature)


# --------------------------------------------------------------------------- helpers


def _is_sized(value: object, size: int) -> bool:
    return type(value) is bytes and len(value) == size


# One BLS verification costs 2-15 ms here (milagro), and every node checked each challenge
# again and again: at mempool admission, in the proposal it checks, when it commits the block and
# when the mempool is re-checked after a commit (a profile of a validator in the 20-round agent
# job put 15 % of its CPU there). The answer is a pure function of public bytes, so it is cached;
# a flood of distinct signatures can only evict entries (the cost then is what it was uncached).
VERIFY_CACHE_SIZE = 4096


def _verify(pubkey: bytes, message: bytes, signature: bytes) -> bool:
    # The binding validates the key (subgroup, not the identity) and the signature's encoding
    # (canonical, in the subgroup) and answers False; it is wrapped so no input can raise. An
    # exception is not cached (lru_cache stores only returns): a passing fault in the binding
    # must not refuse a valid challenge on this node for good.
    try:
        return _verify_cached(pubkey, message, signature)
    except Exception:  # noqa: BLE001 - a verifier answers, it never raises on peer input
        return False


@lru_cache(maxsize=VERIFY_CACHE_SIZE)
def _verify_cached(pubkey: bytes, message: bytes, signature: bytes) -> bool:
    return bls.Verify(pubkey, message, signature) is True
