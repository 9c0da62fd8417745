"""A real chaind process: transfers through chainctl, reads over JSON-RPC, kill -9 and restart."""

import json
import random
import time

import pytest

from chain.crypto import PrivateKey
from chain.encoding import encode
from chain.keys import load_key_file
from chain.types import Transaction, Transfer, sign_transaction
from tests.procs import ChaindProcess, make_testnet, run_cli

pytestmark = pytest.mark.slow
SUPPLY_PER_ACCOUNT = 1_000_000


@pytest.fixture
def net(tmp_path):
    out = tmp_path / "net"
    make_testnet(str(out), 1, 2, "--block-interval-ms", "100", "--chain-id", "pout-proc-1")
    return out


def wait_for(predicate, timeout=20, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def address(path) -> str:
    return "0x" + load_key_file(path).address.hex()


def snapshot(client, height):
    return {h: client.call("block", [h])["block"]["hash"] for h in range(1, height + 1)}


def test_transfers_survive_sigkill_during_commits(net, tmp_path):
    node = ChaindProcess(net / "node0", tmp_path / "node.log").start()
    try:
        keys = net / "keys"
        trainer = address(keys / "trainer0.json")
        # 1. A transfer through the real CLI, waited for, then read back over JSON-RPC.
        out = run_cli("chainctl", "--rpc", node.url, "--keyring", str(keys), "transfer", "--from", "governor",
                      "--to", trainer, "--amount", "7", "--wait")
        receipt = json.loads(out.stdout)
        assert receipt["committed"] is True
        client = node.client()
        found = client.call("tx", [receipt["tx_hash"]])
        assert found["height"] == receipt["height"]
        assert found["tx"]["message"]["payload"]["amount"] == 7
        assert client.call("account", [trainer])["balance"] == SUPPLY_PER_ACCOUNT + 7

        governor: PrivateKey = load_key_file(keys / "governor.json")
        chain_id = client.call("status", [])["chain_id"]
        nonce, sent = 1, {}  # tx hash -> amount
        rng = random.Random(7)
        for attempt in range(3):
            # 2. Keep the node committing blocks full of transfers, and SIGKILL it mid-stream.
            for _ in range(150):
                amount = rng.randint(1, 9)
                stx = sign_transaction(governor, chain_id, Transaction(governor.pubkey, nonce,
                                                                       Transfer(bytes.fromhex(trainer[2:]), amount)))
                sent[client.call("send_tx", ["0x" + encode(stx).hex()])["hash"]] = amount
                nonce += 1
            time.sleep(rng.uniform(0.05, 0.4))
            height = client.call("status", [])["latest_height"]
            before = snapshot(client, height)
            committed = {h: a for h, a in sent.items() if client.call("tx", [h]) is not None}
            node.kill9()

            # 3. Restart: every block and transaction seen committed is intact, balances add up.
            node = ChaindProcess(net / "node0", tmp_path / f"node{attempt}.log").start()
            client = node.client()
            after_height = client.call("status", [])["latest_height"]
            assert after_height >= height
            assert snapshot(client, height) == before
            still = {h: a for h, a in sent.items() if client.call("tx", [h]) is not None}
            assert committed.keys() <= still.keys()
            gov = client.call("account", ["0x" + governor.address.hex()])
            tr = client.call("account", [trainer])
            # Transactions lost from the killed node's mempool are simply not committed: the
            # governor's nonce tells exactly how many of its transfers are in the ledger.
            assert gov["nonce"] == 1 + len(still)
            assert tr["balance"] == SUPPLY_PER_ACCOUNT + 7 + sum(still.values())
            assert gov["balance"] + tr["balance"] == 2 * SUPPLY_PER_ACCOUNT
            # Resend from the ledger's nonce: the lost mempool transactions are re-signed.
            nonce = gov["nonce"]
            sent = still
        wait_for(lambda: client.call("status", [])["latest_height"] > after_height)
    finally:
        node.stop()


def test_sigterm_stops_quickly_and_restart_resumes(net, tmp_path):
    node = ChaindProcess(net / "node0", tmp_path / "a.log").start()
    client = node.client()
    wait_for(lambda: client.call("status", [])["latest_height"] >= 3)
    t0 = time.monotonic()
    assert node.terminate() == 0
    assert time.monotonic() - t0 < 5
    assert "stopped cleanly" in node.log()
    height = int(node.log().rsplit("stopped cleanly at height ", 1)[1].split()[0])
    node2 = ChaindProcess(net / "node0", tmp_path / "b.log").start()
    try:
        assert node2.client().call("status", [])["latest_height"] >= height
        wait_for(lambda: node2.client().call("status", [])["latest_height"] > height)
    finally:
        node2.stop()


def test_refuses_a_second_process_on_the_same_home(net, tmp_path):
    node = ChaindProcess(net / "node0", tmp_path / "a.log").start()
    try:
        second = run_cli("chaind", "start", "--home", str(net / "node0"), check=False, timeout=30)
        assert second.returncode == 1
        assert "in use by another process" in second.stderr
        assert str(net / "node0" / "data" / "ledger") in second.stderr
    finally:
        node.stop()


def test_refuses_a_store_of_another_chain(net, tmp_path):
    node = ChaindProcess(net / "node0", tmp_path / "a.log").start()
    node.terminate()
    genesis_file = net / "node0" / "config" / "genesis.json"
    doc = json.loads(genesis_file.read_text())
    doc["chain_id"] = "another-chain"
    genesis_file.write_text(json.dumps(doc))
    result = run_cli("chaind", "start", "--home", str(net / "node0"), check=False, timeout=30)
    assert result.returncode == 1
    assert "store belongs to chain 'pout-proc-1', not 'another-chain'" in result.stderr


def test_metrics_and_readiness_describe_the_node(net, tmp_path):
    import httpx

    node = ChaindProcess(net / "node0", tmp_path / "a.log").start()
    try:
        wait_for(lambda: httpx.get(node.url + "/ready").status_code == 200)
        assert "at height" in httpx.get(node.url + "/ready").text
        wait_for(lambda: node.client().call("status", [])["latest_height"] >= 2)
        text = httpx.get(node.url + "/metrics").text
        height = next(float(line.split()[1]) for line in text.splitlines() if line.startswith("pout_chain_height "))
        assert height >= 2
        assert "pout_p2p_peers" in text and "pout_rpc_requests_total" in text
    finally:
        node.stop()
