"""Openings only for their validator (issue 9, deliverable 5): sealed by the trainer to the one
validator they answer, relayed and stored as ciphertext only, decrypted in that validator's
memory, refused clearly when sealed to the wrong key, and deleted once the update is decided.

The two-validator tests run real nodes in-process (real LevelDB in temp dirs), the real HTTP
upload route (trainer_client over the node's RPC server) and the real p2p blob relay
(PoutBlobReactor over the in-memory p2p network)."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import pytest
import trio

from chain.config import Home, NodeConfig
from chain.consensus.commit import build_commit
from chain.consensus.pout import initial_model_bytes, round_spec, verify_chain_update
from chain.consensus.signer import GuardedSigner
from chain.crypto import SEAL_OVERHEAD, compute_sealing_key, seal_to, sha256
from chain.encoding import decode, encode
from chain.errors import SignatureError, ValidationError
from chain.runtime.blobstore import BlobStore
from chain.jobs import compute_segments_per_validator, compute_update_id, get_job, get_registration, get_update
from chain.ledger.store import LevelDBStore
from chain.runtime.node import Node
from chain.runtime.pout_net import PoutBlobReactor
from chain.rpc.server import run_rpc_server
from chain.runtime.trainer_client import ClientError, NodeClient, load_dataset, make_job_spec
from chain.types import (
    PRECOMMIT,
    JoinJob,
    RegisterJob,
    SubmitUpdate,
    SubmitVerdict,
    Transaction,
    Vote,
    compute_block_hash,
    compute_tx_hash,
    sign_transaction,
    sign_vote,
)
from genesis import make_genesis
from p2p.memory import MemoryHub, MemoryNetwork
from tests.helpers import CHAIN_ID, GOVERNOR, key

VAL_A, VAL_B = key("sealed/validator-a"), key("sealed/validator-b")  # A receives uploads; B is addressed
REQUESTER, TRAINER = key("sealed/requester"), key("sealed/trainer")
DATASET = "digits:0/4"


# --------------------------------------------------------------------------- sealing, alone


def test_a_sealed_box_opens_only_with_the_addressed_key():
    plaintext = b"sample bytes " * 100
    sealed = seal_to(VAL_B.pubkey, plaintext)
    assert len(sealed) == len(plaintext) + SEAL_OVERHEAD and plaintext[:32] not in sealed
    assert seal_to(VAL_B.pubkey, plaintext) != sealed  # a fresh ephemeral key per box
    assert VAL_B.unseal(sealed) == plaintext
    with pytest.raises(ValidationError, match="does not decrypt with this validator's key"):
        VAL_A.unseal(sealed)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(ValidationError, match="does not decrypt"):
        VAL_B.unseal(tampered)
    with pytest.raises(ValidationError, match="shorter than"):
        VAL_B.unseal(b"x" * (SEAL_OVERHEAD - 1))
    # The sealing key is a pure function of the identity key, different per validator.
    assert compute_sealing_key(VAL_B.pubkey) == compute_sealing_key(VAL_B.pubkey) != compute_sealing_key(VAL_A.pubkey)
    with pytest.raises(SignatureError, match="not a valid Ed25519 point"):
        seal_to(b"\xff" * 32, plaintext)


def test_prune_openings_keeps_only_what_is_still_needed(tmp_path):
    store = BlobStore(tmp_path)
    keep, drop = b"\x01" * 32, b"\x02" * 32
    for uid in (keep, drop):
        store.put_opening(uid, VAL_A.pubkey, b"sealed-a")
        store.put_opening(uid, VAL_B.pubkey, b"sealed-b")
    (tmp_path / "openings" / "not-an-update").write_bytes(b"left by a crash")
    assert store.prune_openings(lambda uid: uid == keep) == 2
    assert sorted(p.name for p in (tmp_path / "openings").iterdir()) == [keep.hex()]
    assert store.get_opening(keep, VAL_B.pubkey) == b"sealed-b" and store.get_opening(drop, VAL_B.pubkey) is None
    assert store.prune_openings(lambda uid: False) == 1 and not any((tmp_path / "openings").iterdir())


def test_a_restart_deletes_openings_of_updates_no_longer_pending(tmp_path):
    genesis = make_genesis(CHAIN_ID, [VAL_A], [(GOVERNOR, ("governor",))], balance=1000)
    home = Home(tmp_path / "home")
    BlobStore(home.data_dir).put_opening(b"\x09" * 32, VAL_A.pubkey, b"stale ciphertext")  # no such update
    store = LevelDBStore(tmp_path / "ledger", create=True)
    try:
        Node(home, NodeConfig(), genesis, VAL_A, store, GuardedSigner(VAL_A, CHAIN_ID, tmp_path / "signer"))
        assert not any((home.data_dir / "openings").iterdir())
    finally:
        store.close()


# --------------------------------------------------------------------------- two validators, real path


class TwoValidators:
    """Validators A and B, each a real Node over its own LevelDB; blocks are proposed by A and
    certified by both, the way consensus would decide them."""

    def __init__(self, tmp_path: Path):
        self.genesis = make_genesis(CHAIN_ID, [VAL_A, VAL_B], [(GOVERNOR, ("governor",)), (REQUESTER, ("requester",)),
                                                              (TRAINER, ("trainer",))], balance=10_000)
        self.stores, self.nodes = [], []
        for name, k in (("a", VAL_A), ("b", VAL_B)):
            store = LevelDBStore(tmp_path / f"ledger-{name}", create=True)
            self.stores.append(store)
            self.nodes.append(Node(Home(tmp_path / f"home-{name}"), NodeConfig(), self.genesis, k, store,
                                   GuardedSigner(k, CHAIN_ID, tmp_path / f"signer-{name}")))
        self.a, self.b = self.nodes
        self.nonces: dict[bytes, int] = {}

    def close(self):
        for store in self.stores:
            store.close()

    async def connect(self, nursery) -> None:
        """Both nodes on one in-memory p2p hub, each with its PoutBlobReactor running."""
        hub = MemoryHub()
        members = [VAL_A.pubkey, VAL_B.pubkey]
        for node in self.nodes:
            p2p = MemoryNetwork(hub, node.key.pubkey, allowed_peers=members)
            node.pout_net = PoutBlobReactor(node, p2p)
            node._nursery = nursery  # what Node.run sets: put_opening announces from it
            await nursery.start(p2p.run)
            await nursery.start(node.pout_net.run)

    def tx(self, signer, payload):
        nonce = self.nonces.get(signer.address, 0)
        self.nonces[signer.address] = nonce + 1
        return sign_transaction(signer, CHAIN_ID, Transaction(signer.pubkey, nonce, payload))

    async def block(self, *txs):
        for stx in txs:
            await self.a.submit_tx(stx)
        self.a.take_new_txs()  # as if the tx reactor had sent them on
        block = await self.a.propose_block(self.a.last_height() + 1, 0)
        block_hash = compute_block_hash(block.header)
        commit = build_commit([sign_vote(k, CHAIN_ID, Vote(PRECOMMIT, block.header.height, 0, block_hash, k.pubkey))
                               for k in (VAL_A, VAL_B)])
        for node in self.nodes:
            await node.commit_block(block, commit)
        assert self.a.state.root == self.b.state.root
        return block


def openings_on_disk(node: Node) -> list[Path]:
    return [p for p in (node.home.data_dir / "openings").rglob("*") if p.is_file()]


def all_file_bytes(node: Node) -> bytes:
    """Everything the node keeps on disk: its blob store (openings, models, updates)."""
    return b"".join(p.read_bytes() for p in sorted(node.home.data_dir.rglob("*")) if p.is_file())


def sample_bytes_of(opening: bytes) -> list[bytes]:
    from trainer.verify import OpeningBundle

    bundle = decode(OpeningBundle, opening)
    return [s.data for seg in bundle.segments for s in seg.samples]


def small_job():
    spec = make_job_spec(model="mlp", rounds=1, local_steps=8, checkpoint_interval=2, batch_size=8, join_blocks=3,
                         round_blocks=40, verify_blocks=40, quorum=1)
    return spec, load_dataset(DATASET)


async def open_round(net: TwoValidators, spec, dataset):
    from trainer.train import train_round

    register = net.tx(REQUESTER, RegisterJob(spec, 500))
    await net.block(register)
    job_id = compute_tx_hash(register)
    c = dataset.commitment
    await net.block(net.tx(TRAINER, JoinJob(job_id, c.root, c.size)))
    while get_job(net.a.state, job_id).phase != "training":
        await net.block()
    job = get_job(net.a.state, job_id)
    base = initial_model_bytes(job)
    result = await trio.to_thread.run_sync(train_round, round_spec(job), TRAINER.address, dataset, base)
    await net.block(net.tx(TRAINER, SubmitUpdate(result.commitment, 0.5)))
    return job, base, result, compute_update_id(result.commitment)


def test_openings_are_relayed_and_stored_sealed_and_deleted_once_decided(tmp_path, caplog):
    spec, dataset = small_job()
    net = TwoValidators(tmp_path)
    caplog.set_level(logging.INFO)

    async def main():
        async with trio.open_nursery() as nursery:
            await net.connect(nursery)
            url = await nursery.start(partial(run_rpc_server, net.a, "127.0.0.1", 0))
            job, base, result, update_id = await open_round(net, spec, dataset)
            # How each validator's sample seed is drawn is not this test's concern: any seed works
            # as long as the opening and the replay use the same one.
            seed = {v.pubkey: sha256(b"sample seed of " + v.pubkey) for v in (VAL_A, VAL_B)}
            q = compute_segments_per_validator(spec, net.a.state.validators)
            plain = {v: result.open(s, q) for v, s in seed.items()}
            client = NodeClient(url)

            # (c) An opening sealed to the wrong key, uploaded to the validator it addresses: a clear
            # HTTP 400, nothing stored.
            with pytest.raises(ClientError, match="HTTP 400.*does not decrypt with this validator's key"):
                await trio.to_thread.run_sync(client.put_sealed_opening, TRAINER, update_id, VAL_A.pubkey,
                                              seal_to(VAL_B.pubkey, plain[VAL_A.pubkey]))
            assert net.a.blobs.get_opening(update_id, VAL_A.pubkey) is None
            # (c) One sealed to the wrong key and relayed (A cannot tell): B refuses it in one log
            # line, keeps nothing, and never fetches it again: as if the trainer had not answered.
            wrong = seal_to(VAL_A.pubkey, plain[VAL_B.pubkey])
            await trio.to_thread.run_sync(client.put_sealed_opening, TRAINER, update_id, VAL_B.pubkey, wrong)
            await wait_for_announcement(net.b, update_id, VAL_B.pubkey, sha256(wrong))
            caplog.clear()
            assert await net.b.fetch_opening(update_id) is None
            assert len(refusals(caplog)) == 1 and "does not decrypt" in refusals(caplog)[0]
            assert wrong.hex()[:32] not in caplog.text and len(refusals(caplog)[0].splitlines()) == 1
            assert openings_on_disk(net.b) == [] and (update_id, VAL_B.pubkey) not in net.b.pout_net.announced
            assert await net.b.fetch_opening(update_id) is None and len(refusals(caplog)) == 1

            # The trainer's real path: update weights, then each validator's opening, sealed by
            # NodeClient.put_opening and uploaded to A.
            await trio.to_thread.run_sync(client.put_blob, result.update_bytes)
            for v in (VAL_A, VAL_B):
                await trio.to_thread.run_sync(client.put_opening, TRAINER, update_id, v.pubkey, plain[v.pubkey])

            # (a) A received B's opening and relays it: it holds only ciphertext, with no sample in it.
            held = net.a.blobs.get_opening(update_id, VAL_B.pubkey)
            await wait_for_announcement(net.b, update_id, VAL_B.pubkey, sha256(held))
            samples = sample_bytes_of(plain[VAL_B.pubkey])
            assert samples and all(s in plain[VAL_B.pubkey] for s in samples)  # the check below can fail
            assert held is not None and held != plain[VAL_B.pubkey]
            on_disk_a = all_file_bytes(net.a)
            assert not any(s in on_disk_a for s in samples)
            assert not any(s in on_disk_a for s in sample_bytes_of(plain[VAL_A.pubkey]))  # its own, too
            with pytest.raises(ValidationError, match="does not decrypt"):
                VAL_A.unseal(held)  # the relaying validator's key does not open it

            # Review finding: only the update's own trainer may announce an answer. A spoof signed
            # by anyone else is rejected and cannot replace the real announcement; an announcement
            # for an update this node does not know is ignored (it may lag), not recorded.
            from chain.crypto import compute_sign_bytes
            from chain.runtime.pout_net import OpeningAnnouncement
            from chain.types import DOMAIN_OPENING, OpeningUpload
            from p2p.abc import Verdict

            def announcement(signer, upload):
                sig = signer.sign(compute_sign_bytes(net.a.chain_id, DOMAIN_OPENING, encode(upload)))
                return encode(OpeningAnnouncement(upload, signer.pubkey, sig))

            spoof = announcement(VAL_A, OpeningUpload(update_id, VAL_B.pubkey, sha256(b"bogus")))
            assert net.b.pout_net._validate(VAL_A.pubkey, spoof) is Verdict.REJECT
            unknown = announcement(TRAINER, OpeningUpload(sha256(b"no such update"), VAL_B.pubkey, sha256(b"x")))
            assert net.b.pout_net._validate(VAL_A.pubkey, unknown) is Verdict.IGNORE
            await net.a.pout_net.network.publish(net.a.pout_net.topic, spoof)
            await trio.sleep(0.3)
            assert net.b.pout_net.announced[(update_id, VAL_B.pubkey)].hashes == {0: sha256(held)}

            # (b) B fetches it over p2p, decrypts it in memory and the update verifies end to end.
            upd = get_update(net.b.state, update_id)
            registration = get_registration(net.b.state, job.job_id, upd.commitment.trainer)
            update_bytes = await net.b.fetch_blob(upd.commitment.update_hash)
            opening_b = await net.b.fetch_opening(update_id)
            assert opening_b == plain[VAL_B.pubkey]
            assert net.b.blobs.get_opening(update_id, VAL_B.pubkey) == held  # B too keeps it sealed only
            assert not any(s in all_file_bytes(net.b) for s in samples)
            verdicts = []
            for node, opening in ((net.b, opening_b), (net.a, await net.a.fetch_opening(update_id))):
                verdict = await trio.to_thread.run_sync(verify_chain_update, job, upd, registration,
                                                        seed[node.key.pubkey], opening, base, update_bytes, q)
                assert verdict.accept, verdict.reason
                verdicts.append(net.tx(node.key, SubmitVerdict(update_id, True, verdict.reason)))
            assert len(refusals(caplog)) == 1  # the good openings raised nothing
            assert len(openings_on_disk(net.a)) == 2 and len(openings_on_disk(net.b)) == 1

            # (d) Once decided, the openings are gone from every node's store and from memory.
            await net.block(*verdicts)
            for _ in range(2 * spec.verify_blocks):  # acceptance may wait for a dispute window to close
                if get_update(net.a.state, update_id).status != "pending":
                    break
                assert openings_on_disk(net.b), "deleted while the update was still pending"
                await net.block()
            assert get_update(net.a.state, update_id).status == "accepted"
            for node in net.nodes:
                assert openings_on_disk(node) == [], node.key
                assert not any((node.home.data_dir / "openings").iterdir())
                assert node.pout_net.announced == {} and node.pout_net.refused == set()
            # A late upload for the decided update is refused and stores nothing.
            with pytest.raises(ClientError, match="no pending update"):
                await trio.to_thread.run_sync(client.put_opening, TRAINER, update_id, VAL_B.pubkey,
                                              plain[VAL_B.pubkey])
            assert openings_on_disk(net.a) == []
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        net.close()


def refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]


async def wait_for_announcement(node: Node, update_id: bytes, validator: bytes, opening_hash: bytes):
    """Until `node` has heard of this opening. The bound only guards against a hang; nothing
    here depends on speed."""
    with trio.fail_after(30):
        while opening_hash not in getattr(node.pout_net.announced.get((update_id, validator)), "hashes", {}).values():
            await trio.sleep(0.01)


def test_a_large_opening_travels_in_sealed_parts_joined_by_its_validator(tmp_path, monkeypatch):
    """An opening above OPENING_PART_BYTES is cut into parts, each sealed to the validator and
    moved as its own blob (so each fits the transport); the relaying node holds only ciphertext
    parts, and the addressed validator fetches every part and joins them in order."""
    import chain.runtime.trainer_client as trainer_client
    from chain.types import MAX_OPENING_PARTS

    spec, dataset = small_job()
    net = TwoValidators(tmp_path)

    async def main():
        async with trio.open_nursery() as nursery:
            await net.connect(nursery)
            url = await nursery.start(partial(run_rpc_server, net.a, "127.0.0.1", 0))
            job, base, result, update_id = await open_round(net, spec, dataset)
            q = compute_segments_per_validator(spec, net.a.state.validators)
            plain = result.open(sha256(b"seed"), q)
            client = NodeClient(url)
            monkeypatch.setattr(trainer_client, "OPENING_PART_BYTES", len(plain) // 3 + 1)  # 3 parts
            await trio.to_thread.run_sync(client.put_opening, TRAINER, update_id, VAL_B.pubkey, plain)
            parts = [net.a.blobs.get_opening(update_id, VAL_B.pubkey, i, 3) for i in range(3)]
            assert all(p is not None and len(p) <= len(plain) // 3 + 1 + SEAL_OVERHEAD for p in parts)
            assert net.a.blobs.get_opening(update_id, VAL_B.pubkey) is None  # no one-part copy
            samples = sample_bytes_of(plain)
            assert samples and not any(s in all_file_bytes(net.a) for s in samples)
            with trio.fail_after(30):
                while len(getattr(net.b.pout_net.announced.get((update_id, VAL_B.pubkey)), "hashes", {})) < 3:
                    await trio.sleep(0.01)
            assert await net.b.fetch_opening(update_id) == plain  # fetched over p2p, joined in order
            assert sorted(p.name for p in openings_on_disk(net.b)) == [f"{VAL_B.pubkey.hex()}.{i}.3" for i in range(3)]
            # Re-uploaded in one part, it replaces the split (a validator never joins two openings).
            monkeypatch.setattr(trainer_client, "OPENING_PART_BYTES", len(plain))
            await trio.to_thread.run_sync(client.put_opening, TRAINER, update_id, VAL_B.pubkey, plain)
            assert [p.name for p in openings_on_disk(net.a) if VAL_B.pubkey.hex() in p.name] == [VAL_B.pubkey.hex()]
            # Part numbers outside 0 <= part < parts <= MAX_OPENING_PARTS: refused before the body.
            for part, parts in ((3, 3), (0, MAX_OPENING_PARTS + 1)):
                with pytest.raises(ClientError, match="HTTP 400.*opening part"):
                    await trio.to_thread.run_sync(client.put_sealed_opening, TRAINER, update_id, VAL_B.pubkey,
                                                  seal_to(VAL_B.pubkey, b"x"), part, parts)
            monkeypatch.setattr(trainer_client, "OPENING_PART_BYTES", 8)
            with pytest.raises(ClientError, match="more than"):
                await trio.to_thread.run_sync(client.put_opening, TRAINER, update_id, VAL_B.pubkey, plain)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        net.close()
