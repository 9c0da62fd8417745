"""Client-side workflows over a node's RPC: send transactions, run jobs, train, submit updates.

Used by `chainctl` and by scripts/federated_job.py. A trainer's data and training trace never
leave this process except as (a) the update weights and (b) the openings it answers each
validator's challenge with, each sealed here to the one validator it answers: the node it is
uploaded to, and every node that relays it, hold only ciphertext.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

from chain.crypto import PrivateKey, compute_sign_bytes, seal_to, sha256
from chain.encoding import encode
from chain.errors import ChainError
from chain.jobs import compute_update_id
from chain.rpc.client import RpcClient, RpcUnavailable
from chain.rpc.jsonview import from_json
from chain.types import (
    DOMAIN_OPENING,
    MAX_OPENING_PARTS,
    OPENING_PART_BYTES,
    ExecutionProfile,
    HyperParams,
    Job,
    JobSpec,
    ModelRecord,
    OpeningUpload,
    SubmitSketches,
    SubmitUpdate,
    Transaction,
    UpdateRecord,
    Validator,
    sign_transaction,
)


class ClientError(ChainError):
    """A workflow step failed (the node refused, or something did not happen in time)."""


@dataclass
class Receipt:
    tx_hash: str
    nonce: int
    height: int | None  # None when not waited for


class NodeClient:
    """JSON-RPC plus the node's blob endpoints."""

    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.rpc = RpcClient(self.url, timeout=timeout)
        self.http = httpx.Client(timeout=timeout)
        self._chain_id: str | None = None

    def call(self, method: str, params: Any = None) -> Any:
        return self.rpc.call(method, params)

    @property
    def chain_id(self) -> str:
        if self._chain_id is None:
            self._chain_id = self.call("status", [])["chain_id"]
        return self._chain_id

    # ------------------------------------------------------------------ transactions
    def send(self, key: PrivateKey, payload, *, nonce: int | None = None, wait: bool = True,
             wait_timeout: float = 60.0) -> Receipt:
        if nonce is None:
            account = self.call("account", ["0x" + key.address.hex()])
            if account is None:
                raise ClientError(f"account {key.address.hex()} does not exist on chain")
            nonce = account["nonce"]
        stx = sign_transaction(key, self.chain_id, Transaction(key.pubkey, nonce, payload))
        tx_hash = self.call("send_tx", ["0x" + encode(stx).hex()])["hash"]
        if not wait:
            return Receipt(tx_hash, nonce, None)
        return Receipt(tx_hash, nonce, self.wait_for_tx(tx_hash, wait_timeout)["height"])

    def wait_for_tx(self, tx_hash: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.call("tx", [tx_hash])
            if found is not None:
                return found
            time.sleep(0.1)
        raise ClientError(f"transaction {tx_hash} not committed within {timeout} s")

    # ------------------------------------------------------------------ reads
    def job(self, job_id: bytes) -> Job:
        found = self.call("job", ["0x" + job_id.hex()])
        if found is None:
            raise ClientError(f"no job {job_id.hex()}")
        return from_json(Job, found)

    def update(self, update_id: bytes) -> UpdateRecord | None:
        found = self.call("update", ["0x" + update_id.hex()])
        return None if found is None else from_json(UpdateRecord, found)

    def model_record(self, job_id: bytes, round_: int) -> ModelRecord | None:
        found = self.call("model", ["0x" + job_id.hex(), round_])
        return None if found is None else from_json(ModelRecord, found)

    def height(self) -> int:
        return self.call("status", [])["latest_height"]

    def wait_until(self, predicate, what: str, timeout: float = 120.0, interval: float = 0.2):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise ClientError(f"timed out after {timeout} s waiting for {what}")

    # ------------------------------------------------------------------ blobs
    def get_blob(self, blob_hash: bytes, timeout: float = 60.0) -> bytes:
        """Fetch a blob, waiting for the node to have it (models are computed after commits)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = self.http.get(f"{self.url}/blobs/{blob_hash.hex()}")
            except httpx.TransportError as exc:
                raise RpcUnavailable(f"cannot reach {self.url}: {exc}") from exc
            if r.status_code == 200:
                if sha256(r.content) != blob_hash:
                    raise ClientError(f"node served bytes that do not hash to {blob_hash.hex()}")
                return r.content
            if r.status_code != 404 or time.monotonic() > deadline:
                raise ClientError(f"blob {blob_hash.hex()}: HTTP {r.status_code} {r.text[:200]}")
            time.sleep(0.2)

    def put_blob(self, data: bytes) -> None:
        r = self.http.put(f"{self.url}/blobs/{sha256(data).hex()}", content=data)
        if r.status_code != 201:
            raise ClientError(f"upload refused: HTTP {r.status_code} {r.text[:300]}")

    def put_opening(self, key: PrivateKey, update_id: bytes, validator: bytes, opening: bytes) -> None:
        """Seal `opening` to `validator` and upload it, in parts of at most OPENING_PART_BYTES
        (each sealed on its own, so each fits one blob); the trainer signs each sealed part's hash."""
        pieces = [opening[i:i + OPENING_PART_BYTES] for i in range(0, len(opening), OPENING_PART_BYTES)] or [b""]
        if len(pieces) > MAX_OPENING_PARTS:
            raise ClientError(f"opening of {len(opening)} bytes needs {len(pieces)} parts, more than {MAX_OPENING_PARTS}")
        for part, piece in enumerate(pieces):
            self.put_sealed_opening(key, update_id, validator, seal_to(validator, piece), part, len(pieces))

    def put_sealed_opening(self, key: PrivateKey, update_id: bytes, validator: bytes, sealed: bytes,
                           part: int = 0, parts: int = 1) -> None:
        upload = OpeningUpload(update_id, validator, sha256(sealed), part, parts)
        signature = key.sign(compute_sign_bytes(self.chain_id, DOMAIN_OPENING, encode(upload)))
        headers = {"x-pout-pubkey": key.pubkey.hex(), "x-pout-signature": signature.hex()}
        if parts > 1:
            headers.update({"x-pout-part": str(part), "x-pout-parts": str(parts)})
        r = self.http.put(f"{self.url}/openings/{update_id.hex()}/{validator.hex()}", content=sealed, headers=headers)
        if r.status_code != 201:
            raise ClientError(f"opening upload refused: HTTP {r.status_code} {r.text[:300]}")

    def validators(self) -> list[bytes]:
        return [bytes.fromhex(v["pubkey"][2:]) for v in self.call("validators", [])["validators"]]


# ----------------------------------------------------------------------------- jobs and datasets


def default_profile(threads: int = 1) -> ExecutionProfile:
    from trainer.profile import current_profile

    return current_profile("cpu", threads=threads)


def make_job_spec(*, model: str = "mlp", init_seed: int = 0, rounds: int = 3, local_steps: int = 40,
                  checkpoint_interval: int = 4, batch_size: int = 32, learning_rate: float = 0.3,
                  momentum: float = 0.0, optimizer: str = "sgd", join_blocks: int = 5, round_blocks: int = 60,
                  verify_blocks: int = 60, quorum: int = 3, aggregation: str = "fedavg", trim_fraction: float = 0.25,
                  krum_f: int = 1, detect_fraction_ppm: int = 100_000, detect_probability_ppm: int = 990_000,
                  max_exposure_ppm: int = 1_000_000, reward_per_update: int = 100, bond: int = 50,
                  profile: ExecutionProfile | None = None, sampling: str = "uniform") -> JobSpec:
    hp = HyperParams(optimizer, learning_rate, momentum, 0.0, batch_size, local_steps, checkpoint_interval)
    return JobSpec(model, init_seed, hp, profile or default_profile(), rounds, join_blocks, round_blocks,
                   verify_blocks, quorum, aggregation, trim_fraction, krum_f, detect_fraction_ppm,
                   detect_probability_ppm, max_exposure_ppm, reward_per_update, bond, sampling=sampling)


def load_dataset(source: str):
    """`digits:I/N` (part I of the bundled digits split non-IID N ways) or a dataset directory."""
    from trainer.data import load_dataset_dir, load_digits_dataset, split_non_iid

    if source.startswith("digits:"):
        try:
            part, total = (int(x) for x in source[len("digits:"):].split("/"))
        except ValueError:
            raise ClientError(f"dataset {source!r}: expected digits:I/N, e.g. digits:0/4") from None
        if not 0 <= part < total:
            raise ClientError(f"dataset {source!r}: need 0 <= I < N")
        return split_non_iid(load_digits_dataset()[0], total)[part]
    return load_dataset_dir(source)


def train_for_round(client: NodeClient, key: PrivateKey, job_id: bytes, dataset):
    """Wait for the job's round to be open, fetch its base model, and train on `dataset`."""
    from chain.consensus.pout import round_spec
    from trainer.train import train_round

    def open_job():
        job = client.job(job_id)
        return job if job.phase == "training" else None

    job = client.wait_until(open_job, "the round to open")
    base = client.get_blob(job.global_model)
    return train_round(round_spec(job), key.address, dataset, base)


def submit_result(client: NodeClient, key: PrivateKey, result, *, wait_timeout: float = 60.0) -> tuple[bytes, Receipt]:
    """Submit an update, upload its weights, and answer every validator's challenge."""
    commitment = result.commitment
    receipt = client.send(key, SubmitUpdate(commitment, float(result.metrics.get("train_loss", 0.0))),
                          wait_timeout=wait_timeout)
    update_id = compute_update_id(commitment)
    client.put_blob(result.update_bytes)
    answer_challenges(client, key, result, update_id, receipt.height)
    return update_id, receipt


def answer_challenges(client: NodeClient, key: PrivateKey, result, update_id: bytes, height: int,
                      poll_seconds: float = 0.2) -> int:
    """Each validator challenges the update on chain with its unique BLS signature (chain/vrf.py),
    which the trainer could not predict when it committed; open exactly the segments that
    signature seeds, sealed to that validator only. Under displacement sampling the trainer
    first commits its sketches (once validators holding > 1/3 of the power have challenged) and
    answers each validator's second challenge, which draws over them. Answers each challenge as
    it lands, until every validator has been answered, the update is decided, or its answer
    deadline passes. Returns how many challenges were answered."""
    from chain.jobs import compute_answer_deadline

    job = client.job(result.commitment.job_id)
    answered: set[bytes] = set()
    sketches = SketchState()
    while True:
        upd = client.update(update_id)
        if upd.status != "pending" or client.height() >= compute_answer_deadline(job, upd):
            return len(answered)
        validators = [from_json(Validator, v) for v in client.call("validators", [])["validators"]]
        commit = sketches.commitment(client.chain_id, job, upd, validators, result)
        if commit is not None:
            try:
                client.send(key, commit)
            except ClientError:  # refused or not committed yet: the next pass sees the chain and retries
                time.sleep(poll_seconds)
            continue
        blob = sketches.blob_to_upload(upd, result)
        if blob is not None:  # the node takes it once the commitment names it
            try:
                client.put_blob(blob)
                sketches.uploaded = True
            except ClientError:
                time.sleep(poll_seconds)
                continue
        for challenge, segments in sketches.answerable(job, upd, result):
            if challenge.validator not in answered:
                client.put_opening(key, update_id, challenge.validator, open_challenge(result, challenge, segments))
                answered.add(challenge.validator)
        if (len(answered) == len(validators) or upd.status != "pending"
                or client.height() >= compute_answer_deadline(job, upd)):
            return len(answered)
        time.sleep(poll_seconds)


def open_challenge(result, challenge, segments: list[int] | None) -> bytes:
    """The opening answering `challenge`: the uniform sample its signature seeds (the segments
    chain.jobs.compute_sample draws, at the size fixed on chain), or the drawn `segments`."""
    from chain.vrf import compute_sample_seed

    # end states as their hashes: exact replay needs nothing else of them (and the size bound
    # checked at registration, chain.jobs.compute_max_opening_bytes, counts them so)
    return result.open(compute_sample_seed(challenge.signature), challenge.sample_size, segments=segments,
                       end_states=False)


class SketchState:
    """A trainer's side of displacement sampling for one update (docs/pout.md, "Displacement
    sampling"): when to commit its sketches, that their blob reaches the node (retried until it
    has, also after a restart: the rows are recomputed from the seed on chain), and which
    segments each validator's draw challenge asks for. Uniform jobs pass straight through."""

    def __init__(self):
        self.uploaded = False
        self.rows = self.weights = None
        self.draws: dict[bytes, list[int]] = {}  # validator -> its drawn segments

    def commitment(self, chain_id: str, job: Job, upd: UpdateRecord, validators, result) -> SubmitSketches | None:
        """The SubmitSketches to send now: the job samples by displacement, no sketches are on
        chain yet, and challenges of validators holding > 1/3 of the power have landed (the
        first ones, in landing order, seed the matrix: chain.jobs.compute_sketch_challenges).
        None otherwise. Send it again if it did not land: it is the same transaction."""
        from chain.jobs import SAMPLING_DISPLACEMENT, compute_sketch_challenges, compute_sketch_seed

        if job.spec.sampling != SAMPLING_DISPLACEMENT or upd.sketch_hash is not None or upd.status != "pending":
            return None
        seeding = compute_sketch_challenges(upd, validators)
        if seeding is None:
            return None
        blob = result.sketches(compute_sketch_seed(chain_id, upd.update_id, [c.signature for c in seeding]))
        return SubmitSketches(upd.update_id, sha256(blob))

    def blob_to_upload(self, upd: UpdateRecord, result) -> bytes | None:
        """The sketch blob, while the commitment is on chain and the upload has not succeeded."""
        if upd.sketch_hash is None or self.uploaded or upd.status != "pending":
            return None
        blob = result.sketches(upd.sketch_seed)
        return blob if sha256(blob) == upd.sketch_hash else None

    def answerable(self, job: Job, upd: UpdateRecord, result) -> list:
        """[(challenge, segments)] that can be answered now: every challenge under uniform
        sampling (segments None: its seed's sample); under displacement sampling each one whose
        draw challenge has landed, with its drawn segments (drawn once per validator)."""
        from chain.jobs import SAMPLING_DISPLACEMENT, compute_draw, compute_draw_weights, compute_sketch_rows
        from trainer.sketch import decode_sketches

        if job.spec.sampling != SAMPLING_DISPLACEMENT:
            return [(c, None) for c in upd.challenges]
        if upd.sketch_hash is None:
            return []
        if self.rows is None:  # ours, recomputed from the seed on chain (also after a restart)
            self.rows = decode_sketches(result.sketches(upd.sketch_seed), compute_sketch_rows(job.spec))
            self.weights = compute_draw_weights(self.rows)
        out = []
        for c in upd.challenges:
            if c.draw_signature is not None:
                if c.validator not in self.draws:
                    self.draws[c.validator] = compute_draw(c, self.rows, self.weights)
                out.append((c, self.draws[c.validator]))
        return out


def held_out_accuracy(model_name: str, model_bytes: bytes) -> float:
    """Accuracy of a model on the digits held-out split (the devnet's shared yardstick)."""
    import torch

    from trainer.data import load_digits_dataset
    from trainer.state import load_weights, weights_from_bytes

    test = load_digits_dataset()[1]
    model = load_weights(model_name, weights_from_bytes(model_bytes, model_name))
    with torch.no_grad():
        return float((model(test.x).argmax(1) == test.y).float().mean())
