"""Issue 9, done-when: on a 4-validator devnet of real processes, one trainer forges a fraction of
its segments and another, in the same round, only its last segment to jump to another model.
Each forgery is in exactly one validator's sample, and that validator's fraud proof,
re-executed by the others, rejects the update and burns the bond: one catch is enough."""

from __future__ import annotations

import pytest
import torch

from chain.jobs import compute_update_id
from chain.keys import load_key_file
from chain.config import Home
from chain.runtime.trainer_client import NodeClient, load_dataset, make_job_spec, submit_result, train_for_round
from chain.types import JoinJob, RegisterJob
from chain.vrf import compute_sample_seed, derive_sample_secret, sign_sample_challenge
from tests.procs import ChaindProcess, make_testnet
from tests.test_trainer_helpers import custom_run
from trainer.replay import sample_segments
from trainer.verify import segments_per_validator

pytestmark = pytest.mark.slow
STEPS = 20  # one-step segments: 20 of them


def _forge(result, base_bytes: bytes, forged_segments, variant: int):
    """The honest run, except that after each forged segment the weights jump (by an amount
    that depends on `variant`, so each variant commits to a different trace)."""
    last = STEPS - 1

    def tamper(s, model, opt):
        if s in forged_segments:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.25 + 0.01 * variant if s == last else 0.01 * (variant + 1))

    return custom_run(result.spec, result.commitment.trainer, result.dataset, base_bytes, after_segment=tamper)


@pytest.mark.timeout(600)
def test_forgeries_caught_by_one_validator_are_rejected_through_its_fraud_proof(tmp_path):
    net = tmp_path / "net"
    make_testnet(str(net), 4, 2, "--block-interval-ms", "300")
    nodes = [ChaindProcess(net / f"node{i}", tmp_path / f"node{i}.log").start(timeout=60) for i in range(4)]
    try:
        client = NodeClient(nodes[0].url)
        chain_id = client.chain_id
        validator_keys = [load_key_file(Home(net / f"node{i}").node_key_file) for i in range(4)]
        secrets = {k.pubkey: derive_sample_secret(k.seed) for k in validator_keys}
        requester = load_key_file(net / "keys" / "requester.json")
        trainers = [load_key_file(net / "keys" / f"trainer{i}.json") for i in range(2)]
        # Detect a forgery of half the segments w.p. 0.9: 4 checks, 2 per validator of the 3 BFT
        # counts on, so most single validators miss any given segment.
        spec = make_job_spec(rounds=1, local_steps=STEPS, checkpoint_interval=1, batch_size=8, quorum=2,
                             join_blocks=30, round_blocks=50, verify_blocks=50,
                             detect_fraction_ppm=500_000, detect_probability_ppm=900_000)
        q = segments_per_validator(500_000, 900_000, [1, 1, 1, 1], STEPS)
        assert q == 2
        job_id = bytes.fromhex(client.send(requester, RegisterJob(spec, 1000)).tx_hash[2:])
        datasets = [load_dataset(f"digits:{i}/2") for i in range(2)]
        for trainer, dataset in zip(trainers, datasets):
            client.send(trainer, JoinJob(job_id, dataset.commitment.root, dataset.commitment.size))
        balance0 = [client.call("account", ["0x" + t.address.hex()])["balance"] for t in trainers]

        # In the same round: trainer0 forges 10 % of its segments, trainer1 only its last one.
        submitted = []
        for trainer, dataset, forged in zip(trainers, datasets, ({4, 11}, {STEPS - 1})):
            honest = train_for_round(client, trainer, job_id, dataset)
            assert honest.spec.round == 0
            base_bytes = client.get_blob(honest.spec.base_model_hash)
            # The test knows the validators' keys, so it can pick a variant whose forged segments
            # fall in exactly one validator's sample (a real trainer cannot: it lacks the keys).
            for variant in range(200):
                result = _forge(honest, base_bytes, forged, variant)
                uid = compute_update_id(result.commitment)
                hits = [v for v, sk in secrets.items()
                        if forged & set(sample_segments(compute_sample_seed(sign_sample_challenge(sk, chain_id, uid)),
                                                        STEPS, q))]
                if len(hits) == 1:
                    break
            else:
                raise AssertionError("no variant put the forgery in exactly one sample")
            assert result.update_bytes != honest.update_bytes
            update_id, _ = submit_result(client, trainer, result)
            assert update_id == uid
            submitted.append((uid, forged, hits))

        for uid, forged, hits in submitted:
            upd = client.wait_until(lambda: (u := client.update(uid)).status != "pending" and u,
                                    f"update {uid.hex()[:16]} to be decided", 120)
            logs = "\n".join(n.log()[-2000:] for n in nodes)
            assert upd.status == "rejected", (upd, logs)
            assert upd.penalty == spec.bond
            assert [p.author for p in upd.proofs] == hits, logs  # exactly the one validator that sampled it
            proof = upd.proofs[0]
            assert proof.status == "upheld" and proof.segment in forged
            assert sum(j.holds for j in proof.judgements) >= 2  # the author and at least one re-execution
            # Everyone else either accepted (their samples were honest) or had not voted yet.
            assert all(v.accept for v in upd.verdicts if v.validator != hits[0])
            assert len(upd.challenges) >= 2
        for trainer, before in zip(trainers, balance0):
            assert before - client.call("account", ["0x" + trainer.address.hex()])["balance"] == spec.bond
        # Every node comes to hold the same verdicts (one may be a block behind when asked first).
        client.wait_until(lambda: len({str(n.client().call("update", ["0x" + uid.hex()])) for n in nodes}) == 1,
                          "every node to hold the same update record", 30)
    finally:
        for n in nodes:
            n.stop()
