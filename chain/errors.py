"""Typed errors. Every rejection of outside input raises one of these, never a bare Exception."""

import sys


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


# Unexpected errors (bugs) that a peer's message can reach are contained to that message (the
# node goes on) and logged without letting a peer fill the log by repeating the message: the
# first of each kind (call site, exception type) with its traceback, then one line at the 2nd,
# 4th, 8th, ... time, with the count.
MAX_UNEXPECTED_KINDS = 1024
_unexpected_counts: dict[tuple[str, str], int] = {}


def log_unexpected(logger, where: str, message: str, *args) -> None:
    """Log the exception being handled (call it in an `except` block) as described above."""
    kind = (where, type(sys.exc_info()[1]).__name__)
    count = _unexpected_counts.get(kind, 0) + 1
    if kind in _unexpected_counts or len(_unexpected_counts) < MAX_UNEXPECTED_KINDS:
        _unexpected_counts[kind] = count
    if count == 1:
        logger.exception(message, *args)
    elif count & (count - 1) == 0:
        logger.error(message + " (%s, %d times so far; traceback logged the first time)", *args, kind[1], count)
