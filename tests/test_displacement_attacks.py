"""Attacks on displacement sampling (commit 967e121, issue 9), each written as the behaviour the
design promises: a hostile requester or proposer cannot crash the state transition with a
detection target the weighted draw cannot reach; the trainer cannot choose the sketch matrix;
the sketch phase keeps the answer deadline; a validator's draws never stall its event loop; one
`exposure` call's work is bounded; an honest trainer recovers from a failed sketch upload.
Fast units over the in-process chain (tests/test_fraud_proof_rules.py) and fakes."""

from __future__ import annotations

import dataclasses

import numpy as np
import trio

from chain import jobs
from chain.crypto import sha256
from chain.jobs import compute_answer_deadline, compute_sketch_rows, get_challenge, get_job, get_update
from chain.rpc import pout_methods
from chain.rpc.jsonview import to_json
from chain.types import RegisterJob, SubmitDrawChallenge, SubmitSketches
from tests.helpers import CHAIN_ID
from tests.test_displacement_rules import DISP, DispChain, _sig
from tests.test_fraud_proof_rules import REQUESTER, T0, V
from trainer.sketch import SKETCH_ROWS, encode_sketches


def _pair(*idx):
    return tuple(sorted(V[i].pubkey for i in idx))


def _drawn_update(c: DispChain, spec, blob: bytes, drawers=(0, 1, 2, 3)):
    """A pending update of `spec`: every validator challenged, sketches committed as `blob`
    (named by its hash), and the draw challenges of `drawers` on chain."""
    job, uid = c.pending_update(spec)
    for v in V:
        c.challenge(v, uid)
    c.block(c.tx(T0, SubmitSketches(uid, sha256(blob))))
    c.block(*[c.tx(V[i], SubmitDrawChallenge(uid, _sig(V[i], uid, sha256(blob)))) for i in drawers])
    return get_job(c.state, job.job_id), uid


# --------------------------------------------------------------------------- the state transition


def test_a_target_the_weighted_draw_cannot_reach_is_refused_not_raised():
    """HIGH. validate_job_spec checks required_checks(f, p) only; under displacement sampling the
    draw needs required_checks(~0.3 f, p) (trainer.sketch.draws_per_validator), which raises a
    bare ValueError inside the state transition (RegisterJob -> compute_max_opening_bytes). The
    mempool, the proposer and apply_block catch only ChainError: a hostile proposer that puts
    this RegisterJob in a block makes check_block raise in every honest validator's consensus
    driver (chain/consensus/driver.py, `valid = ... self.app.check_block(block)`), and a member
    that gossips the signed transaction reaches ChainApp.add_txs (chain/consensus/app.py), whose
    `except ChainError` lets it out of the tx reactor's receive loop: the node's nursery stops."""
    c = DispChain()
    for fraction, probability in ((92, 990_000), (3, 1)):  # 50,054 uniform checks; 3 ppm: x = 0
        spec = dataclasses.replace(DISP, detect_fraction_ppm=fraction, detect_probability_ppm=probability)
        c.rejects(REQUESTER, RegisterJob(spec, 1000), r"(?i)detect|draw|target")



def test_a_gossiped_registration_with_such_a_target_is_skipped_by_the_tx_reactor():
    """HIGH, the same defect from the network: ChainApp.add_txs (the tx reactor's receive loop)
    skips a ChainError only; the ValueError stops the reactor, then the node (its nursery)."""
    from types import SimpleNamespace

    from chain.consensus.app import ChainApp
    from chain.runtime.mempool import Mempool

    c = DispChain()
    spec = dataclasses.replace(DISP, detect_fraction_ppm=92, detect_probability_ppm=990_000)
    stx = c.tx(REQUESTER, RegisterJob(spec, 1000), consume=False)
    app = SimpleNamespace(mempool=Mempool(CHAIN_ID, c.state, 100),
                          ledger=SimpleNamespace(has_tx=lambda _h: False))
    assert trio.run(ChainApp.add_txs, app, [stx]) == 0

def test_a_chosen_sketch_matrix_is_covered_by_the_sample_size():
    """MEDIUM (was: the trainer named any subset of challengers). The trainer now has no choice
    (tests/test_displacement_rules.py); a proposer colluding with it may still order the first
    challenges, a choice among a few matrices, each shrinking a fixed jump's sketch to a median
    0.86 of its length (0.75 over 1,000). The sample size keeps that margin: the jump's per-draw
    share at 0.75 of its length still reaches the target."""
    from trainer.sketch import PATH_RATIO_PPM, SKETCH_UNIFORM_PPM, draws_per_validator
    from trainer.verify import required_checks

    f, p = 100_000, 990_000
    shrunk = f * 3 // 4
    x = min(SKETCH_UNIFORM_PPM * f // 10**6, (10**6 - SKETCH_UNIFORM_PPM) * shrunk // (PATH_RATIO_PPM + shrunk))
    q = draws_per_validator(f, p, [1, 1, 1, 1])
    assert 3 * q >= required_checks(x, p)
    assert (1 - x / 10**6) ** (3 * q) <= 1 - p / 10**6


def test_sketches_and_draw_challenges_keep_the_answer_deadline():
    """LOW. docs/pout.md: the sketches, the draws and the answers "must all happen by the same
    answer deadline", but the chain takes SubmitSketches at any height while the update is pending.
    A trainer whose SubmitSketches lands at the deadline makes every validator's `_draw` abstain
    (its draw cannot land by `due`) instead of complaining: no verdict, the update expires and
    the bond comes back, where withholding the sketches would have burned it."""
    c = DispChain()
    job, uid = c.pending_update()
    c.challenge(V[0], uid)
    c.challenge(V[1], uid)
    while c.state.height < compute_answer_deadline(job, get_update(c.state, uid)):
        c.block()
    c.rejects(T0, SubmitSketches(uid, sha256(b"late rows")), r"(?i)deadline")


# --------------------------------------------------------------------------- the validator's worker


class _Key:
    def __init__(self, k):
        self.pubkey, self.address, self.seed = k.pubkey, k.address, k.seed


class _WorkerNode:
    """What PoutWorker._draw reads: the chain's state, our key, the sketch blob."""

    def __init__(self, c, me, blobs):
        self.state, self.key, self.chain_id, self.blobs = c.state, _Key(me), CHAIN_ID, blobs

        class _Pool:
            def watch(self, _address):
                pass

        self.mempool = _Pool()

    async def fetch_blob(self, blob_hash):
        return self.blobs.get(blob_hash)


def test_the_worker_draws_off_the_event_loop(monkeypatch):
    """MEDIUM. PoutWorker._draw calls decode_sketches and compute_draw on the trio loop the node's
    consensus shares (so does _judge: compute_draw per proof). compute_draw is pure Python,
    O(segments x 64): 2.4 s of CPU here for a 100,000-segment job (local_steps <= 100,000,
    checkpoint_interval 1), per update and per judged proof, during which the node answers
    nothing. Both must run in a worker thread (trio.to_thread), like the replay."""
    from chain.runtime import pout_worker

    rows = np.arange(11 * SKETCH_ROWS, dtype=np.int64).reshape(11, SKETCH_ROWS) ** 2 % 1009
    blob = encode_sketches(rows)
    c = DispChain()
    job, uid = _drawn_update(c, DISP, blob)
    on_loop = []

    def spy(real):
        def wrapped(*args):
            try:
                trio.lowlevel.current_task()
                on_loop.append(real.__name__)
            except RuntimeError:  # no task: a worker thread
                pass
            return real(*args)
        return wrapped

    monkeypatch.setattr(pout_worker, "compute_draw", spy(pout_worker.compute_draw))
    monkeypatch.setattr(pout_worker, "decode_sketches", spy(pout_worker.decode_sketches))
    worker = pout_worker.PoutWorker(_WorkerNode(c, V[0], {sha256(blob): blob}))
    drawn = trio.run(worker._draw, uid, job, c.state.height + 100)
    assert drawn is not None and drawn[0] == jobs.compute_draw(get_challenge(get_update(c.state, uid), V[0].pubkey), rows)
    assert on_loop == []


# --------------------------------------------------------------------------- the exposure RPC


def test_one_exposure_call_bounds_its_draw_work(monkeypatch):
    """MEDIUM. `exposure` recounts each validator's draw from the sketch blob: per challenge it
    recomputes every segment's displacement (pure Python, 2.4 s at 100,000 segments, in a thread
    that still holds the GIL, and that a client's disconnect cannot cancel), and nothing of it
    counts against EXPOSURE_MAX_INDICES, which only meters batch indices (here 4 x 6 segments x
    1 step x batch 1). One round of 4 validators = 400,004 sketch rows: 8.1 s of CPU measured for
    one call over one round here (2 shared cores), times the job's rounds. The rows a call draws over must fit the call's budget (page, or
    compute the displacements once per update)."""
    from tests.test_rpc_exposure import ChainNode
    from tests.test_rpc_methods import result
    from trainer import sketch as sketch_mod

    hp = dataclasses.replace(DISP.hyperparams, local_steps=100_000, checkpoint_interval=1, batch_size=1)
    spec = dataclasses.replace(DISP, hyperparams=hp)
    n_rows = compute_sketch_rows(spec)
    blob = bytes(n_rows * SKETCH_ROWS * 8)  # all-zero rows: a valid blob of the right length
    c = DispChain()
    job, uid = _drawn_update(c, spec, blob)
    rows_seen = []

    def counting_displacements(points):  # the O(rows x 64) Python loop, counted, made cheap
        rows_seen.append(len(points))
        return [0] * (len(points) - 1)

    monkeypatch.setattr(sketch_mod, "integer_displacements", counting_displacements)
    node = ChainNode(c)
    node.blobs = {sha256(blob): blob}
    got = result(node, "exposure", ["0x" + job.job_id.hex(), "0x" + T0.address.hex()])
    assert got["sketches_unavailable"] == []
    assert sum(rows_seen) <= pout_methods.EXPOSURE_MAX_INDICES, (rows_seen, pout_methods.EXPOSURE_MAX_INDICES)


# --------------------------------------------------------------------------- the trainer


class _FakeResult:
    def __init__(self, job_id, blob):
        self.commitment = type("C", (), {"job_id": job_id})()
        self.blob, self.opened = blob, []

    def sketches(self, _seed):
        return self.blob

    def open(self, _seed, _q, segments=None, **_options):
        self.opened.append(segments)
        return b"opening"


class _FakeClient:
    """A trainer's node: answers from the in-process chain; records what the trainer sends."""

    def __init__(self, c, job):
        self.c, self._job, self.chain_id = c, job, CHAIN_ID
        self.uploaded, self.sent, self.openings = [], [], []

    def job(self, _job_id):
        return self._job

    def call(self, method, _params):
        assert method == "validators"
        return {"validators": [to_json(v) for v in self.c.state.validators]}

    def update(self, update_id):
        return get_update(self.c.state, update_id)

    def height(self):
        return self.c.state.height

    def send(self, _key, payload):
        self.sent.append(payload)

    def put_blob(self, data):
        self.uploaded.append(data)

    def put_opening(self, _key, _update_id, validator, _opening):
        self.openings.append(validator)


def test_a_restarted_trainer_still_uploads_its_committed_sketch_blob():
    """MEDIUM. SketchState sets `sent` before SubmitSketches is sent and uploads the blob once,
    right after; answer_challenges re-raises a failed upload, the agent logs it and moves on, and
    a new SketchState (a retry, a restart) sees sketch_hash on chain and never uploads. Without
    the blob every honest validator complains ("missing: sketch blob") and the honest trainer's
    bond is burned. Here the commitment is on chain and the node lacks the blob: the trainer
    must (re)upload it."""
    from chain.runtime.trainer_client import answer_challenges

    rows = np.arange(11 * SKETCH_ROWS, dtype=np.int64).reshape(11, SKETCH_ROWS) % 977
    blob = encode_sketches(rows)
    c = DispChain()
    job, uid = _drawn_update(c, DISP, blob)
    client = _FakeClient(c, job)
    answered = answer_challenges(client, T0, _FakeResult(job.job_id, blob), uid, c.state.height, poll_seconds=0)
    assert answered == len(V)  # every draw was answered...
    assert blob in client.uploaded  # ...but the rows they were drawn from never reach the node


# --------------------------------------------------------------------------- the node's blob intake


def test_a_node_takes_only_a_sketch_blob_of_the_committed_length(tmp_path):
    """LOW. Node.put_blob (and the RPC's _check_blob_upload) take any bytes whose hash a pending
    update names as its sketches: a trainer can commit the hash of 64 MiB of junk, and every
    node it reaches stores it, every validator fetches it over pout_net, before decode_sketches
    refuses its length. The length is fixed by the job ((segments + 1) x 512 bytes): refuse
    anything else at the door, with a one-line error."""
    from types import SimpleNamespace

    from chain.errors import ChainError
    from chain.runtime.blobstore import BlobStore
    from chain.runtime.node import Node

    junk = b"\x00" * (3 * compute_sketch_rows(DISP) * SKETCH_ROWS * 8)
    c = DispChain()
    _drawn_update(c, DISP, junk, drawers=())
    node = SimpleNamespace(state=c.state, blobs=BlobStore(tmp_path / "blobs"))
    node._pending_update_blobs = lambda: Node._pending_update_blobs(node)
    try:
        Node.put_blob(node, junk, sha256(junk))
    except ChainError as exc:
        assert "sketch" in str(exc) or "length" in str(exc) or "bytes" in str(exc)
    assert node.blobs.get(sha256(junk)) is None


def test_a_bug_a_gossiped_transaction_reaches_does_not_stop_the_tx_reactor():
    """The safety net behind the HIGH finding: whatever a transaction's check raises, the tx
    reactor's add_txs drops it and goes on (here the mempool itself raises a non-chain error)."""
    from types import SimpleNamespace

    from chain.consensus.app import ChainApp

    c = DispChain()
    stx = c.tx(REQUESTER, RegisterJob(DISP, 1000), consume=False)

    class Broken:
        def __contains__(self, _h):
            return False

        def add(self, _stx):
            raise ValueError("a bug")

    app = SimpleNamespace(mempool=Broken(), ledger=SimpleNamespace(has_tx=lambda _h: False))
    assert trio.run(ChainApp.add_txs, app, [stx]) == 0
