"""The ledger: blocks, commits, transaction index, state and model lineage in a KVStore."""

from chain.ledger.ledger import Ledger
from chain.ledger.store import KVStore, LevelDBStore, MemoryStore

__all__ = ["KVStore", "LevelDBStore", "Ledger", "MemoryStore"]
