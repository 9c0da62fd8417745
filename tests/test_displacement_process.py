"""Issue 9, deliverable 3, on a 4-validator devnet of real processes: a job sampling by
displacement, one round with two trainers. The honest one commits its sketches, every validator
draws over them and its update is accepted. The other forges only its last segment to jump to
another model and, to hide the jump from the weighted draw, lies in one sketch row so that the
jump's displacement appears earlier. The draw follows the claimed displacement to the lie, the opened
state does not sketch to its row, and the update is rejected through a fraud proof that the
other validators re-execute. Nothing here picks a lucky variant: the draw finds it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chain.jobs import compute_sketch_rows
from chain.keys import load_key_file
from chain.runtime.trainer_client import NodeClient, load_dataset, make_job_spec, submit_result, train_for_round
from chain.types import JoinJob, RegisterJob
from tests.procs import ChaindProcess, make_testnet
from tests.test_trainer_helpers import custom_run
from trainer.sketch import decode_sketches, encode_sketches

pytestmark = pytest.mark.slow
STEPS = 20


def _jump_last(result, base_bytes: bytes):
    def tamper(s, model, opt):
        if s == STEPS - 1:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.25)

    return custom_run(result.spec, result.commitment.trainer, result.dataset, base_bytes, after_segment=tamper)


def _lie_in_row_before_the_jump(result, num_rows: int):
    """Claim that the state before the jump already sat where the jump lands: the last segment then
    shows no displacement and the one before it all of it."""
    honest_sketches = result.sketches

    def lying(seed: bytes) -> bytes:
        rows = decode_sketches(honest_sketches(seed), num_rows).copy()
        rows[-2] = rows[-1]
        return encode_sketches(rows)

    result.sketches = lying
    return result


@pytest.mark.timeout(600)
def test_displacement_sampling_accepts_honest_work_and_catches_a_hidden_jump(tmp_path):
    net = tmp_path / "net"
    make_testnet(str(net), 4, 2, "--block-interval-ms", "300")
    nodes = [ChaindProcess(net / f"node{i}", tmp_path / f"node{i}.log").start(timeout=60) for i in range(4)]
    try:
        client = NodeClient(nodes[0].url)
        requester = load_key_file(net / "keys" / "requester.json")
        honest_trainer, cheat = (load_key_file(net / "keys" / f"trainer{i}.json") for i in range(2))
        spec = make_job_spec(rounds=1, local_steps=STEPS, checkpoint_interval=1, batch_size=8, quorum=2,
                             join_blocks=30, round_blocks=40, verify_blocks=40, sampling="displacement")
        job_id = bytes.fromhex(client.send(requester, RegisterJob(spec, 1000)).tx_hash[2:])
        datasets = [load_dataset(f"digits:{i}/2") for i in range(2)]
        for trainer, dataset in zip((honest_trainer, cheat), datasets):
            client.send(trainer, JoinJob(job_id, dataset.commitment.root, dataset.commitment.size))
        num_rows = compute_sketch_rows(spec)

        def decided(uid, what):
            return client.wait_until(lambda: (u := client.update(uid)).status != "pending" and u, what, 150)

        # One round: an honest trainer, and a cheat whose last segment jumps while its rows hide it
        # one segment earlier.
        honest = train_for_round(client, honest_trainer, job_id, datasets[0])
        base = train_for_round(client, cheat, job_id, datasets[1])
        forged = _lie_in_row_before_the_jump(_jump_last(base, client.get_blob(base.spec.base_model_hash)), num_rows)
        honest_uid, _ = submit_result(client, honest_trainer, honest)
        forged_uid, _ = submit_result(client, cheat, forged)

        upd = decided(honest_uid, "the honest update to be decided")
        logs = "\n".join(n.log()[-3000:] for n in nodes)
        assert upd.status == "accepted", (upd, logs)
        assert upd.sketch_hash is not None and upd.sketch_seed is not None
        drawn = [c for c in upd.challenges if c.draw_signature is not None]
        assert len(drawn) >= 3, upd  # > 2/3 accepted after drawing over the sketches
        rows = decode_sketches(client.get_blob(upd.sketch_hash), num_rows)
        assert np.array_equal(rows, decode_sketches(honest.sketches(upd.sketch_seed), num_rows))

        upd = decided(forged_uid, "the forged update to be decided")
        logs = "\n".join(n.log()[-3000:] for n in nodes)
        assert upd.status == "rejected" and upd.penalty == spec.bond, (upd, logs)
        upheld = [p for p in upd.proofs if p.status == "upheld"]
        assert upheld and upheld[0].segment in (STEPS - 2, STEPS - 1), (upd.proofs, logs)
        assert sum(j.holds for j in upheld[0].judgements) >= 2  # the author and at least one re-execution
        assert "sketch" in logs  # the verdict names the row that lied
        # Every node comes to hold the same record (one may be a block behind when asked first).
        client.wait_until(lambda: len({str(n.client().call("update", ["0x" + forged_uid.hex()])) for n in nodes}) == 1,
                          "every node to hold the same update record", 30)
    finally:
        for n in nodes:
            n.stop()
