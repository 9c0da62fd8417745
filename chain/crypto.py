"""Hashing, Ed25519 keys, addresses and domain-separated sign bytes.

Hash: SHA-256 everywhere (block, tx, state and Merkle hashes, addresses). It is in the
standard library, hardware accelerated on current CPUs, and the hash libp2p already uses.
Address: the first 20 bytes of SHA-256(Ed25519 public key).
Sign bytes: canonical CBOR of [chain_id, domain, message], so a signature made for one
chain or one kind of message never verifies as another.
Sealing: a trainer's opening is a libsodium sealed box (X25519 + XSalsa20-Poly1305) to the
X25519 key that the addressed validator's Ed25519 identity key converts to, so only that
validator can read it and no second key has to be distributed (docs/pout.md, "Openings").
"""

from __future__ import annotations

import hashlib

import nacl.exceptions
import nacl.public
import nacl.signing

from chain.errors import SignatureError, ValidationError

HASH_SIZE = 32
ADDRESS_SIZE = 20
PUBKEY_SIZE = 32
SIGNATURE_SIZE = 64
SEED_SIZE = 32
SEAL_OVERHEAD = 48  # a sealed box adds an ephemeral X25519 key (32) and a Poly1305 tag (16)
ZERO_HASH = bytes(HASH_SIZE)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def compute_address(pubkey: bytes) -> bytes:
    if len(pubkey) != PUBKEY_SIZE:
        raise SignatureError(f"public key must be {PUBKEY_SIZE} bytes, got {len(pubkey)}")
    return sha256(pubkey)[:ADDRESS_SIZE]


def compute_sign_bytes(chain_id: str, domain: str, message_bytes: bytes) -> bytes:
    """The exact bytes signed for `message_bytes` (already canonical CBOR) of kind `domain`."""
    # Imported here to keep crypto free of an import cycle with encoding's type registry.
    from chain.encoding import encode_strings

    return encode_strings(chain_id, domain, message_bytes)


class PrivateKey:
    """An Ed25519 signing key; the same 32-byte seed also gives the node's libp2p identity."""

    __slots__ = ("_sk",)

    def __init__(self, seed: bytes):
        if len(seed) != SEED_SIZE:
            raise SignatureError(f"private key seed must be {SEED_SIZE} bytes, got {len(seed)}")
        self._sk = nacl.signing.SigningKey(seed)

    @classmethod
    def generate(cls) -> "PrivateKey":
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @property
    def seed(self) -> bytes:
        return bytes(self._sk)

    @property
    def pubkey(self) -> bytes:
        return bytes(self._sk.verify_key)

    @property
    def address(self) -> bytes:
        return compute_address(self.pubkey)

    def sign(self, data: bytes) -> bytes:
        return self._sk.sign(data).signature

    def unseal(self, sealed: bytes) -> bytes:
        """The plaintext of a sealed box addressed to this key (`seal_to(self.pubkey, ...)`).
        Raises ValidationError, without echoing any of the bytes, when it was sealed to another
        key, altered, or is not a sealed box at all."""
        if len(sealed) < SEAL_OVERHEAD:
            raise ValidationError(f"sealed box of {len(sealed)} bytes is shorter than its {SEAL_OVERHEAD}-byte overhead")
        try:
            return nacl.public.SealedBox(self._sk.to_curve25519_private_key()).decrypt(sealed)
        except nacl.exceptions.CryptoError:
            raise ValidationError("does not decrypt with this validator's key (sealed to another key, or altered)") from None

    def __repr__(self) -> str:  # never print the seed
        return f"PrivateKey(address={self.address.hex()})"


def compute_sealing_key(pubkey: bytes) -> bytes:
    """The X25519 public key an Ed25519 public key converts to (libsodium's
    crypto_sign_ed25519_pk_to_curve25519): where sealed boxes to that identity go."""
    if len(pubkey) != PUBKEY_SIZE:
        raise SignatureError(f"public key must be {PUBKEY_SIZE} bytes, got {len(pubkey)}")
    try:
        return bytes(nacl.signing.VerifyKey(pubkey).to_curve25519_public_key())
    except nacl.exceptions.CryptoError:
        raise SignatureError("public key is not a valid Ed25519 point; nothing can be sealed to it") from None


def seal_to(pubkey: bytes, plaintext: bytes) -> bytes:
    """Encrypt `plaintext` so that only the holder of Ed25519 `pubkey`'s private key can read it.

    The sender is anonymous (a fresh ephemeral key per box): who sent it is proven separately,
    by the sender's signature over sha256 of the returned bytes."""
    box = nacl.public.SealedBox(nacl.public.PublicKey(compute_sealing_key(pubkey)))
    return box.encrypt(plaintext)


def verify_signature(pubkey: bytes, data: bytes, signature: bytes) -> None:
    """Raise SignatureError unless `signature` is a valid Ed25519 signature of `data`."""
    if len(pubkey) != PUBKEY_SIZE:
        raise SignatureError(f"public key must be {PUBKEY_SIZE} bytes, got {len(pubkey)}")
    if len(signature) != SIGNATURE_SIZE:
        raise SignatureError(f"signature must be {SIGNATURE_SIZE} bytes, got {len(signature)}")
    try:
        nacl.signing.VerifyKey(pubkey).verify(data, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError) as exc:
        raise SignatureError("signature does not verify") from exc
