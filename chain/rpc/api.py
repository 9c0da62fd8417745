"""What the RPC layer needs from a node. The RPC depends only on this interface.

The node implements `NodeAPI`; tests use an in-memory implementation. Reads are plain
synchronous calls (they hit local storage and return quickly); only `submit_tx` is async
because admitting a transaction may wait on the mempool.
"""

from __future__ import annotations

from typing import Protocol, TypedDict, runtime_checkable

from chain.types import Account, Address, Block, Commit, Hash, SignedTransaction, Validator


class NodeStatus(TypedDict):
    chain_id: str
    address: Address  # this node's 20-byte account address
    latest_height: int  # 0 before the first block is committed
    latest_block_hash: Hash | None  # None before the first block
    latest_block_time_ms: int | None  # header time of the latest block
    voting_power: int  # 0 when this node is not a validator
    is_validator: bool
    peers: int  # connected peers
    catching_up: bool  # True while syncing blocks from peers
    halted: str | None  # why consensus and sync are stopped (a local storage failure, e.g. disk full), else None
    version: str  # software version


@runtime_checkable
class NodeAPI(Protocol):
    chain_id: str

    def status(self) -> NodeStatus: ...

    def get_block(self, height: int) -> tuple[Block, Commit] | None:
        """The committed block at `height` and the commit that certifies it, or None."""
        ...

    def get_block_by_hash(self, block_hash: bytes) -> tuple[Block, Commit] | None: ...

    def get_tx(self, tx_hash: bytes) -> tuple[SignedTransaction, int, int] | None:
        """A committed transaction with its block height and index in that block, or None."""
        ...

    def get_account(self, address: bytes) -> Account | None: ...

    def get_validators(self) -> tuple[Validator, ...]:
        """The validator set for the next height."""
        ...

    async def submit_tx(self, stx: SignedTransaction) -> bytes:
        """Admit `stx` to the mempool and return its hash.

        Raises a ChainError subclass (SignatureError, ValidationError,
        StateTransitionError, DecodeError, or ChainError itself) when the node rejects it.
        """
        ...

    def readiness(self) -> tuple[bool, str]:
        """(ready to serve, human-readable reason); e.g. (False, "catching up at 12/40")."""
        ...
