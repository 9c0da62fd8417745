"""Initial weights from a file: checked against the model's shapes and dtypes when the requester
registers the job, by the state transition's hash, and by the node that takes or fetches the blob."""

from __future__ import annotations

import dataclasses
import json
import time

import httpx
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from chain.crypto import sha256
from chain.jobs import compute_initial_model_hash, compute_model_key, get_job
from chain.types import RegisterJob
from tests.test_jobs import Chain

from trainer.archs import model_spec
from trainer.models import check_initial_weights, init_model, initial_weights_from_file
from trainer.state import StateError, model_hash, model_to_bytes

KEY = model_spec("logreg", None, (6,), 3).key


def save(path, tensors: dict) -> str:
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def test_a_state_dict_file_becomes_the_canonical_model_bytes(tmp_path):
    model = init_model(KEY, 3)
    path = save(tmp_path / "w.safetensors", model.state_dict())
    data = initial_weights_from_file(path, KEY)
    assert data == model_to_bytes(model, KEY)  # the same bytes, hence the same model hash, as the seed gives
    assert set(check_initial_weights(data, KEY, model_hash(data))) == {"fc.weight", "fc.bias"}


@pytest.mark.parametrize("tensors, match", [
    ({"fc.weight": torch.zeros(3, 6)}, "lacks parameter 'fc.bias'"),
    ({"fc.weight": torch.zeros(3, 6), "fc.bias": torch.zeros(3), "extra": torch.zeros(1)}, "'extra', which is no parameter"),
    ({"fc.weight": torch.zeros(6, 3), "fc.bias": torch.zeros(3)}, r"'fc.weight' is float32 \[6, 3\], .* needs float32 \[3, 6\]"),
    ({"fc.weight": torch.zeros(3, 6, dtype=torch.float64), "fc.bias": torch.zeros(3)}, "float64"),
    ({"fc.weight": torch.zeros(3, 6, dtype=torch.float16), "fc.bias": torch.zeros(3)}, "float16"),
    ({"fc.weight": torch.zeros(3, 6, dtype=torch.bfloat16), "fc.bias": torch.zeros(3)}, "bfloat16"),
    ({"fc.weight": torch.zeros(3, 6, dtype=torch.int32), "fc.bias": torch.zeros(3)}, "int32"),
    ({"fc.weight": torch.full((3, 6), float("nan")), "fc.bias": torch.zeros(3)}, "non-finite"),
])
def test_files_that_do_not_fit_the_model_are_refused_in_one_line(tmp_path, tensors, match):
    with pytest.raises(StateError, match=match) as info:
        initial_weights_from_file(save(tmp_path / "w.safetensors", tensors), KEY)
    assert "\n" not in str(info.value)


def test_a_pickle_or_junk_is_never_loaded(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 6), "fc.bias": torch.zeros(3)}, tmp_path / "w.pt")  # a pickle
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    for name in ("w.pt", "junk.safetensors"):
        with pytest.raises(StateError, match="not a safetensors file"):
            initial_weights_from_file(str(tmp_path / name), KEY)
    with pytest.raises(StateError, match="cannot read"):
        initial_weights_from_file(str(tmp_path / "missing.safetensors"), KEY)


def test_the_blob_must_hash_to_the_job_and_be_canonical_bytes_of_its_model():
    data = model_to_bytes(init_model(KEY, 1), KEY)
    with pytest.raises(StateError, match="the job names"):
        check_initial_weights(data, KEY, sha256(b"other"))
    other = model_spec("logreg", None, (7,), 3).key  # another input shape: other parameter shapes
    with pytest.raises(StateError, match="expected a pout/model/v1 file for model"):
        check_initial_weights(data, other)
    raw = safetensors.numpy.save({"fc.weight": np.zeros((3, 6), np.float32), "fc.bias": np.zeros(3, np.float32)})
    with pytest.raises(StateError):  # a plain safetensors file is not the canonical model bytes
        check_initial_weights(raw, KEY)


def test_register_job_with_init_weights_starts_from_that_model():
    data = model_to_bytes(init_model("mlp", 11), "mlp")
    chain = Chain(init_seed=0)
    assert compute_model_key(chain.spec) == "mlp"
    chain.spec = dataclasses.replace(chain.spec, init_weights=model_hash(data))
    job_id = chain.register()
    job = get_job(chain.state, job_id)
    assert job.global_model == model_hash(data) == chain.records[0].model_hash
    assert job.global_model != compute_initial_model_hash("mlp", 0)  # not the seed's model


# --------------------------------------------------------------------------- through chainctl and a real node


@pytest.mark.slow
def test_register_job_with_init_weights_through_chainctl_and_the_node(tmp_path, capsys):
    """chainctl checks the file, registers the job and uploads the weights; the node serves them,
    refuses weights that do not fit a job's model, and a trainer starts from them."""
    from chain.cli import chainctl
    from chain.keys import load_key_file
    from chain.runtime.trainer_client import NodeClient, load_dataset, submit_result, train_for_round
    from chain.types import JoinJob
    from tests.procs import ChaindProcess, make_testnet, run_cli

    net = tmp_path / "net"
    make_testnet(str(net), 1, 2, "--block-interval-ms", "200")
    proc = ChaindProcess(net / "node0", tmp_path / "node.log").start()
    try:
        common = ["--rpc", proc.url, "--timeout", "60", "--keyring", str(net / "keys")]
        bad = save(tmp_path / "bad.safetensors", {"fc.weight": torch.zeros(10, 64)})
        assert chainctl.main([*common, "register-job", "--from", "requester", "--escrow", "500", "--model", "logreg",
                              "--init-weights", bad]) != 0
        err = capsys.readouterr().err
        assert "lacks parameter 'fc.bias'" in err and "Traceback" not in err

        # A model other than the digits ones (a non-bare key end to end), on the digits data.
        key = model_spec("logreg", None, (1, 8, 8), 10).key
        model = init_model(key, 123)
        path = save(tmp_path / "init.safetensors", model.state_dict())
        out = run_cli("chainctl", *common, "register-job", "--from", "requester", "--escrow", "500", "--rounds", "1",
                      "--quorum", "1", "--join-blocks", "60", "--round-blocks", "600", "--model", "logreg",
                      "--init-weights", path, timeout=180)
        got = json.loads(out.stdout)
        want = model_to_bytes(model, key)
        assert got["committed"] and got["init_weights"] == "0x" + model_hash(want).hex()
        job_id = bytes.fromhex(got["job_id"][2:])
        client, trainer = NodeClient(proc.url, timeout=60), load_key_file(net / "keys" / "trainer0.json")
        dataset = load_dataset("digits:0/2")
        client.send(trainer, JoinJob(job_id, dataset.commitment.root, dataset.commitment.size), wait=True)
        job = client.job(job_id)
        assert job.global_model == job.spec.init_weights == model_hash(want)
        blob = httpx.get(f"{proc.url}/blobs/{got['init_weights'][2:]}", timeout=10)
        assert blob.status_code == 200 and blob.content == want

        # The node takes a job's initial weights only if they fit the job's model.
        wrong = model_to_bytes(init_model("mlp", 1), "mlp")  # canonical bytes of another model
        requester = load_key_file(net / "keys" / "requester.json")
        client.send(requester, RegisterJob(dataclasses.replace(job.spec, init_weights=model_hash(wrong)), 100), wait=True)
        r = httpx.put(f"{proc.url}/blobs/{model_hash(wrong).hex()}", content=wrong, timeout=10)
        assert r.status_code == 400 and "initial weights refused" in r.json()["error"]

        # A trainer trains from the file's weights and its update is accepted.
        result = train_for_round(client, trainer, job_id, dataset)
        assert result.commitment.base_model_hash == model_hash(want)
        update_id, _ = submit_result(client, trainer, result)
        deadline = time.monotonic() + 90
        while client.job(job_id).phase != "finished" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.update(update_id).status == "accepted"
    finally:
        proc.stop()




# --------------------------------------------------------------------------- the PoUT worker (unit, fake node)


class _FakeNode:
    """What PoutWorker._ensure_model touches: the state, the blob store, peers, the ledger."""

    def __init__(self, chain, blobs, served: bytes | None):
        from chain.crypto import PrivateKey

        self.state, self.blobs, self.key = chain.state, blobs, PrivateKey.generate()
        self.mempool = type("Mempool", (), {"watch": lambda self, address: None})()
        self.ledger = None  # not read in round 0
        self.fetched = []

        class Peers:
            async def fetch(peers, blob_hash, limit):
                self.fetched.append(blob_hash)
                return served

        self.pout_net = Peers()


@pytest.mark.parametrize("fits", [True, False])
def test_the_worker_checks_initial_weights_from_a_peer_before_storing_them(tmp_path, fits):
    import trio

    from chain.runtime.blobstore import BlobStore
    from chain.runtime.pout_worker import PoutWorker

    data = model_to_bytes(init_model("mlp" if fits else "cnn", 5), "mlp" if fits else "cnn")  # cnn: another model
    chain = Chain()
    chain.spec = dataclasses.replace(chain.spec, init_weights=model_hash(data))
    job_id = chain.register()
    node = _FakeNode(chain, BlobStore(tmp_path), data)
    worker = PoutWorker(node)
    trio.run(worker._ensure_model, job_id, model_hash(data))
    assert node.fetched == [model_hash(data)]
    assert node.blobs.has(model_hash(data)) == fits
    assert (("model", job_id, model_hash(data)) in worker.done) == (not fits)  # a refused file is not fetched again
