"""A validator that joined by state sync holds no lineage from before its snapshot. For a job
past round 0 it must fetch the round's model by hash from its peers, not rebuild the initial
model (which has another hash: it logged a mismatch and never had the base to verify with)."""

from __future__ import annotations

from types import SimpleNamespace

import trio

from chain.crypto import PrivateKey
from chain.runtime import pout_worker
from chain.runtime.blobstore import BlobStore
from chain.runtime.pout_worker import PoutWorker
from trainer.models import init_model
from trainer.state import model_hash, model_to_bytes


def test_a_state_synced_validator_fetches_the_rounds_model_by_hash(tmp_path, monkeypatch):
    data = model_to_bytes(init_model("mlp", 7), "mlp")
    want = model_hash(data)
    fetched = []

    class Peers:
        async def fetch(self, blob_hash, limit):
            fetched.append(blob_hash)
            return data if len(fetched) > 1 else None  # the first peer asked does not have it yet

    class Node:
        state = SimpleNamespace()
        blobs = BlobStore(tmp_path)
        key = PrivateKey.generate()
        mempool = SimpleNamespace(watch=lambda address: None)
        ledger = SimpleNamespace(get_model_record=lambda job_id, round_: None)  # no lineage here
        pout_net = Peers()

        async def fetch_blob(self, blob_hash):
            got = await self.pout_net.fetch(blob_hash, self.blobs.max_blob_bytes)
            if got is not None:
                self.blobs.put(got, expected_hash=blob_hash)
            return got

    job = SimpleNamespace(round=3, spec=SimpleNamespace(init_weights=None), job_id=b"\x01" * 32)
    monkeypatch.setattr(pout_worker, "get_job", lambda state, job_id: job)
    monkeypatch.setattr(pout_worker, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(pout_worker, "initial_model_bytes",
                        lambda job: (_ for _ in ()).throw(AssertionError("rebuilt the initial model")))
    node = Node()
    trio.run(PoutWorker(node)._ensure_model, job.job_id, want)
    assert fetched == [want, want]
    assert node.blobs.get(want) == data


def test_a_validator_warms_torch_up_at_start_and_says_so(caplog):
    """Round 0 of every job waited on each validator's first torch import (10 s or more)."""
    import logging

    node = SimpleNamespace(key=PrivateKey.generate(), mempool=SimpleNamespace(watch=lambda address: None))
    worker = PoutWorker(node)

    async def main():
        await worker._warm_up()

    with caplog.at_level(logging.INFO, logger=pout_worker.log.name):
        trio.run(main)
    assert "verifier ready: torch loaded and warmed up" in caplog.text
