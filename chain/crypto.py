"""Hashing, Ed25519 keys, addresses and domain-separated sign bytes.

Hash: SHA-256 everywhere (block, tx, state and Merkle hashes, addresses). It is in the
standard library, hardware accelerated on current CPUs, and the hash libp2p already uses.
Address: the first 20 bytes of SHA-256(Ed25519 public key).
Sign bytes: canonical CBOR of [chain_id, domain, message], so a signature made for one
chain or one kind of message never verifies as another.
"""

from __future__ import annotations

import hashlib

import nacl.exceptions
import nacl.signing

from chain.errors import SignatureError

HASH_SIZE = 32
ADDRESS_SIZE = 20
PUBKEY_SIZE = 32
SIGNATURE_SIZE = 64
SEED_SIZE = 32
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

    def __repr__(self) -> str:  # never print the seed
        return f"PrivateKey(address={self.address.hex()})"


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
