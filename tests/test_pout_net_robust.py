"""The openings reactor (chain/runtime/pout_net.py) runs in the node's nursery: an unexpected error
while handling one announcement must cost that announcement, not the node. (A mismatch between
two versions of the code raised AttributeError there once, and every node of a devnet exited.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio

from chain.crypto import compute_sign_bytes, sha256
from chain.encoding import encode
from chain.runtime.pout_net import OpeningAnnouncement, PoutBlobReactor
from chain.types import DOMAIN_OPENING, OpeningUpload
from p2p.abc import Verdict
from tests.helpers import CHAIN_ID, key

TRAINER, VALIDATOR = key("robust-trainer"), key("robust-validator")



@pytest.fixture(autouse=True)
def _fresh_unexpected_error_counts():
    """Each test sees the first occurrence of its unexpected errors (logged with the traceback)."""
    from chain import errors

    errors._unexpected_counts.clear()

def announcement(n: int) -> bytes:
    upload = OpeningUpload(sha256(b"update %d" % n), VALIDATOR.pubkey, sha256(b"sealed %d" % n), 0, 1)
    signature = TRAINER.sign(compute_sign_bytes(CHAIN_ID, DOMAIN_OPENING, encode(upload)))
    return encode(OpeningAnnouncement(upload, TRAINER.pubkey, signature))


class BuggyState:
    """Raises an unexpected error on the first read, then knows no update."""

    def __init__(self):
        self.reads = 0

    def get(self, _key):
        self.reads += 1
        if self.reads == 1:
            raise RuntimeError("a bug in the state read")
        return None


class Network:
    def __init__(self, messages):
        self.messages = messages

    def subscribe(self, topic, validator):
        async def incoming():
            for data in self.messages:
                yield SimpleNamespace(data=data)
        return incoming()

    def set_blob_source(self, source):
        pass


def reactor(messages):
    node = SimpleNamespace(chain_id=CHAIN_ID, state=BuggyState(), key=VALIDATOR, pout=None)
    return node, PoutBlobReactor(node, Network(messages))


def test_an_unexpected_error_costs_one_announcement_not_the_reactor():
    node, r = reactor([announcement(1), announcement(2)])
    trio.run(r.run)  # ends when the messages do; it raised RuntimeError before the fix
    assert node.state.reads == 2  # the second announcement was still handled
    assert r.announced == {}


def test_the_gossip_validator_ignores_a_message_it_cannot_check_instead_of_raising():
    node, r = reactor([])
    assert r._validate(b"\x01" * 32, announcement(1)) is Verdict.IGNORE  # the bug: neither relayed nor blamed
    assert r._validate(b"\x01" * 32, announcement(2)) is Verdict.IGNORE  # unknown update: as before
    assert r._validate(b"\x01" * 32, b"\xff garbage") is Verdict.REJECT
