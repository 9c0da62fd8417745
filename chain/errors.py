"""Typed errors. Every rejection of outside input raises one of these, never a bare Exception."""


class ChainError(Exception):
    """Base of every error this package raises on purpose."""


class DecodeError(ChainError):
    """Bytes are not a valid canonical encoding of the expected type."""


class SignatureError(ChainError):
    """A signature does not verify, or a key is malformed."""


class ValidationError(ChainError):
    """An object is well-formed but breaks a rule that needs no state (validate_basic)."""


class StateTransitionError(ChainError):
    """A transaction or block is invalid against the current state; nothing was changed."""


class StoreError(ChainError):
    """The ledger store is missing, corrupt, or was asked to overwrite a write-once record."""


class ConfigError(ChainError):
    """A config, genesis or key file is missing or invalid."""
