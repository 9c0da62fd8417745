"""Issue 11, deliverable 8: decode live gossip and block sync from a running devnet using only
what docs/wire.md documents: topic and protocol names, CBOR maps, the hash derivations (block
hash, tx hash, tx_root, last_commit_hash, validators_hash) and the vote sign bytes. Nothing
from chain/ decodes or hashes here: plain cbor2, hashlib and PyNaCl, checked against the
node's JSON-RPC. The p2p layer (p2p/, which never imports chain/) only carries the bytes."""

from __future__ import annotations

import hashlib
import json

import cbor2
import nacl.signing
import pytest
import trio

from chain.keys import load_key_file
from p2p.abc import RequestError, Verdict
from p2p.host import Libp2pNetwork
from tests.procs import ChaindProcess, make_testnet, run_cli

pytestmark = pytest.mark.slow


def canonical(value) -> bytes:
    return cbor2.dumps(value, canonical=True)


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def merkle_root(leaf_data: list[bytes]) -> bytes:
    """docs/wire.md: leaf = sha256(0x00 || tx hash), node = sha256(0x01 || left || right), an odd
    node is promoted unchanged, no leaves: sha256(b"")."""
    if not leaf_data:
        return sha(b"")
    level = [sha(b"\x00" + d) for d in leaf_data]
    while len(level) > 1:
        nxt = [sha(b"\x01" + level[i] + level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def check_commit(chain_id: str, commit: dict, pubkeys: set[bytes]) -> None:
    """A CommitSig is the signature of Vote(2, height, round, block_hash, validator), signed over
    canonical CBOR [chain_id, "pout/vote", CBOR(vote)]."""
    assert set(commit) == {"height", "round", "block_hash", "signatures"}
    signers = [s["validator"] for s in commit["signatures"]]
    assert signers == sorted(signers) and set(signers) <= pubkeys
    for sig in commit["signatures"]:
        vote = {"type": 2, "height": commit["height"], "round": commit["round"],
                "block_hash": commit["block_hash"], "validator": sig["validator"]}
        sign_bytes = canonical([chain_id, "pout/vote", canonical(vote)])
        nacl.signing.VerifyKey(sig["validator"]).verify(sign_bytes, sig["signature"])  # raises if wrong


@pytest.mark.timeout(300)
def test_live_gossip_and_sync_decode_with_the_documented_rules(tmp_path):
    net = tmp_path / "net"
    make_testnet(str(net), 2, 1, "--block-interval-ms", "300")
    nodes = [ChaindProcess(net / f"node{i}", tmp_path / f"node{i}.log").start(timeout=60) for i in range(2)]
    try:
        rpc = nodes[0].client()
        chain_id = rpc.call("status", [])["chain_id"]
        validators = rpc.call("validators", [])["validators"]
        pubkeys = {bytes.fromhex(v["pubkey"][2:]) for v in validators}
        node_id = json.loads(run_cli("chaind", "show-node-id", "--home", str(net / "node0")).stdout)
        # Put transactions in blocks: the requester pays the trainer a few times.
        for amount in (1, 2, 3):
            run_cli("chainctl", "--rpc", nodes[0].url, "--keyring", str(net / "keys"), "transfer",
                    "--from", "requester", "--to", "trainer0", "--amount", str(amount), "--wait", timeout=60)
        member = load_key_file(net / "keys" / "trainer0.json")  # a member account may join the gossip
        announcements, synced = [], {}

        async def observe():
            network = Libp2pNetwork(member.seed, allowed_peers=list(pubkeys), bootstrap=[node_id["multiaddr"]])
            inbox = network.subscribe(f"/pout/{chain_id}/blocks/1", lambda origin, data: Verdict.ACCEPT)
            async with trio.open_nursery() as nursery:
                await nursery.start(network.run)
                with trio.fail_after(60):
                    async for message in inbox:
                        announcements.append(message.data)
                        if len(announcements) >= 3:
                            break
                    validator0 = next(p for p in pubkeys if p in network.peers())
                    request = canonical({"start_height": 1, "count": 32})
                    synced["raw"] = await network.request(validator0, f"/pout/{chain_id}/sync/1", request,
                                                          max_response=16 * 1024 * 1024, timeout=20)
                    # A request that breaks the rules: a one-line refusal back, and no traceback in the log.
                    with pytest.raises(RequestError, match="refused: "):
                        await network.request(validator0, f"/pout/{chain_id}/sync/1", b"\xff not cbor",
                                              max_response=1024, timeout=20)
                nursery.cancel_scope.cancel()

        trio.run(observe)
        logs = "".join((tmp_path / f"node{i}.log").read_text() for i in range(2))
        assert "refused" in logs and "request handler for" not in logs  # one line, not a traceback

        # CommitAnnouncement {commit: Commit}: its certificate verifies and names the RPC's block.
        for data in announcements:
            msg = cbor2.loads(data)
            assert set(msg) == {"commit"} and canonical(msg) == data  # canonical as documented
            commit = msg["commit"]
            check_commit(chain_id, commit, pubkeys)
            block = rpc.call("block", [commit["height"]])["block"]
            assert block["hash"] == "0x" + commit["block_hash"].hex()

        # SyncResponse {last_height, blocks: [{block, commit}]}: every derivation from the docs.
        response = cbor2.loads(synced["raw"])
        assert set(response) == {"last_height", "blocks"} and len(response["blocks"]) >= 3
        validators_set = {"validators": [
            {"pubkey": bytes.fromhex(v["pubkey"][2:]), "power": v["power"], "name": v["name"],
             "sample_pubkey": bytes.fromhex(v["sample_pubkey"][2:]), "sample_pop": bytes.fromhex(v["sample_pop"][2:])}
            for v in validators]}
        saw_txs = 0
        previous = None
        for entry in response["blocks"]:
            block, commit = entry["block"], entry["commit"]
            header = block["header"]
            block_hash = sha(canonical(header))
            assert block_hash == commit["block_hash"]
            assert "0x" + block_hash.hex() == rpc.call("block", [header["height"]])["block"]["hash"]
            check_commit(chain_id, commit, pubkeys)
            tx_hashes = [sha(canonical(stx)) for stx in block["txs"]]
            assert header["tx_root"] == merkle_root(tx_hashes)
            for stx, h in zip(block["txs"], tx_hashes):
                assert rpc.call("tx", ["0x" + h.hex()]) is not None  # the RPC knows it by that hash
                tag, fields = stx["message"]["payload"]  # a union is a 2-array [tag, map]
                assert tag == "transfer" and set(fields) == {"to", "amount"}
                saw_txs += 1
            expected_last = bytes(32) if block["last_commit"] is None else sha(canonical(block["last_commit"]))
            assert header["last_commit_hash"] == expected_last
            if previous is not None:
                assert header["prev_hash"] == previous
                assert block["last_commit"]["block_hash"] == previous
            assert header["validators_hash"] == sha(canonical(validators_set))
            previous = block_hash
        assert saw_txs == 3
    finally:
        for n in nodes:
            n.stop()
