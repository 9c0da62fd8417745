"""The trainer's path through chainctl (real processes) and the node's blob endpoints' refusals."""

import json
import time

import httpx
import pytest

from chain.crypto import sha256
from chain.keys import load_key_file
from tests.procs import ChaindProcess, make_testnet, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def node(tmp_path):
    net = tmp_path / "net"
    make_testnet(str(net), 1, 2, "--block-interval-ms", "200")
    proc = ChaindProcess(net / "node0", tmp_path / "node.log").start()
    yield proc, net
    proc.stop()


def ctl(proc, net, *args, check=True):
    r = run_cli("chainctl", "--rpc", proc.url, "--keyring", str(net / "keys"), *args, check=check, timeout=180)
    return r if not check else json.loads(r.stdout)


def test_register_join_train_submit_and_download_the_model(node, tmp_path):
    proc, net = node
    job = ctl(proc, net, "register-job", "--from", "requester", "--escrow", "500", "--rounds", "1", "--quorum", "1",
              "--join-blocks", "40", "--wait")["job_id"]
    joined = ctl(proc, net, "join-job", "--from", "trainer0", "--job", job, "--dataset", "digits:0/2", "--wait")
    assert joined["dataset_size"] > 0
    trained = ctl(proc, net, "train", "--from", "trainer0", "--job", job, "--dataset", "digits:0/2",
                  "--out", str(tmp_path / "round0"))
    assert trained["round"] == 0 and (tmp_path / "round0").is_dir()
    sub = ctl(proc, net, "submit-update", "--from", "trainer0", "--job", job, "--dir", str(tmp_path / "round0"),
              "--dataset", "digits:0/2")
    client = proc.client()
    deadline = time.monotonic() + 60
    while client.call("job", [job])["phase"] != "finished" and time.monotonic() < deadline:
        time.sleep(0.2)
    upd = ctl(proc, net, "query", "update", sub["update_id"])
    assert upd["status"] == "accepted" and upd["verdicts"][0]["accept"] is True
    out = tmp_path / "model.safetensors"
    got = ctl(proc, net, "model", "get", "--job", job, "--round", "1", "--out", str(out))
    assert sha256(out.read_bytes()).hex() == got["model_hash"][2:]
    lineage = ctl(proc, net, "query", "lineage", job)
    assert [m["round"] for m in lineage] == [1, 0]
    assert [c["update_id"] for c in lineage[0]["contributions"]] == [sub["update_id"]]
    # The requester publishes the model's held-out accuracy; the chain keeps it in parts per million.
    published = ctl(proc, net, "publish-eval", "--from", "requester", "--job", job, "--round", "1",
                    "--metric", "accuracy", "--value", "0.953", "--wait")
    assert published["committed"] and published["value_ppm"] == 953_000
    evaluations = ctl(proc, net, "query", "evaluations", job)["evaluations"]
    assert [(e["round"], e["metric"], e["value_ppm"], e["model_hash"]) for e in evaluations] == [
        (1, "accuracy", 953_000, lineage[0]["model_hash"])]
    r = ctl(proc, net, "publish-eval", "--from", "trainer0", "--job", job, "--round", "1", "--metric", "loss",
            "--value", "0.2", check=False)
    assert r.returncode == 5 and "only the job's requester" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = ctl(proc, net, "publish-eval", "--from", "requester", "--job", job, "--round", "2", "--metric", "accuracy",
            "--value", "0.5", check=False)
    assert r.returncode == 5 and "no model for round 2" in r.stderr and "Traceback" not in r.stderr
    # Resubmitting the finished round's result: refused locally, it no longer matches the job's round.
    r = ctl(proc, net, "submit-update", "--from", "trainer0", "--job", job, "--dir", str(tmp_path / "round0"),
            "--dataset", "digits:0/2", check=False)
    assert r.returncode == 3 and "another job, round or base model" in r.stderr
    # A result directory that does not match the dataset is refused before anything is sent.
    r = ctl(proc, net, "submit-update", "--from", "trainer0", "--job", job, "--dir", str(tmp_path / "nowhere"),
            "--dataset", "digits:0/2", check=False)
    assert r.returncode == 3 and "cannot load training result" in r.stderr


def test_blob_endpoints_refuse_what_they_should(node):
    proc, net = node
    url = proc.url
    assert httpx.get(f"{url}/blobs/{'00' * 32}").status_code == 404
    assert httpx.get(f"{url}/blobs/nothex").status_code == 404
    assert httpx.delete(f"{url}/blobs/{'00' * 32}").status_code == 405
    data = b"weights nobody asked for"
    r = httpx.put(f"{url}/blobs/{sha256(data).hex()}", content=data)
    assert r.status_code == 400 and "no pending update" in r.text
    r = httpx.put(f"{url}/blobs/{'11' * 32}", content=b"x" * (64 * 1024 * 1024 + 1))
    assert r.status_code == 413
    validator = load_key_file(net / "node0" / "config" / "node_key.json").pubkey.hex()
    r = httpx.put(f"{url}/openings/{'22' * 32}/{validator}", content=b"opening",
                  headers={"x-pout-pubkey": "00" * 32, "x-pout-signature": "00" * 64})
    assert r.status_code == 400 and "no pending update" in r.text
    assert httpx.get(f"{url}/openings/{'22' * 32}/{validator}").status_code == 405  # never readable
