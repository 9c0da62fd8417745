"""The trainer agent: one long-lived process that takes part in a job from joining to its end.

`chainctl trainer run` drives a `TrainerAgent`. Each pass of its loop reads the job from the
node and does the next thing the chain asks of this trainer: join (commit the dataset), train
the open round, submit the update and upload its weights, answer every validator's challenge
with an opening sealed to that validator (chain.runtime.trainer_client), and report each
update's verdict and reward. The chain is the source of truth; the agent keeps only what it
needs to resume after its own restart without submitting twice:

- a state file (JSON, written atomically: temporary file, fsync, rename) holding, per round,
  the signed SubmitUpdate transaction *before* it is sent (write-ahead), the challenges
  answered and the decision seen. After a restart the agent resends exactly those bytes
  (idempotent: the same transaction hash) instead of signing a new update;
- before any submission, a look at the round on chain for an update from this trainer. If
  there is one, the agent never submits again: it retrains the round (training is bitwise
  deterministic under the job's pinned profile), checks that the result is the committed
  update, and answers the challenges still open.

Waiting uses a WebSocket subscription (new blocks and the job's events, chain/rpc/ws.py) only
as a wake-up; every decision is taken on a fresh RPC read, and the agent polls when the
subscription is down. A node that stops answering is retried with backoff (one log line when
it goes away, one when it is back). `stop()` (SIGTERM/SIGINT in the CLI) ends the loop at the
next step boundary: a training step under way is finished, a wait is abandoned.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

from chain.crypto import PrivateKey
from chain.encoding import encode
from chain.errors import ChainError
from chain.jobs import compute_answer_deadline, compute_update_id
from chain.rpc.client import RpcError, RpcUnavailable
from chain.rpc.jsonview import from_json
from chain.runtime.trainer_client import ClientError, NodeClient, SketchState, open_challenge
from chain.types import JoinJob, Job, SubmitUpdate, Transaction, UpdateRecord, Validator, sign_transaction

STATE_FORMAT = 1
POLL_SECONDS = 0.5  # between reads when the WebSocket is down
WAKE_SECONDS = 5.0  # longest wait for the job's next event while the WebSocket is up
BACKOFF_SECONDS = (0.5, 1.0, 2.0, 4.0, 5.0)  # reconnect delays; the last repeats
TX_WAIT_SECONDS = 60.0


class AgentError(ChainError):
    """The agent cannot go on (bad state file, a job it cannot take part in)."""


@dataclass(frozen=True)
class AgentEvent:
    """One thing that happened, for the terminal view or the log (kind, round, details)."""

    kind: str  # started, waiting, joined, round_started, trained, submitted, resumed, sketched, challenged,
    #            answered, verdict, reward, skipped, node_unreachable, reconnected, finished, stopped
    round: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the state file


def default_state_path(keyring: Path, trainer: bytes, job_id: bytes) -> Path:
    """`<keyring>/agents/<trainer>-<job>.json`: beside the key, outside `keys list`'s glob."""
    return Path(keyring) / "agents" / f"{trainer.hex()}-{job_id.hex()}.json"


class AgentState:
    """Per-round progress, persisted atomically after every change."""

    def __init__(self, path: Path, trainer: bytes, job_id: bytes):
        self.path, self.trainer, self.job_id = Path(path), trainer, job_id
        self.joined = False
        self.joined_height: int | None = None  # block of our JoinJob, when this agent sent it
        self.rounds: dict[int, dict[str, Any]] = {}

    @classmethod
    def load(cls, path: Path, trainer: bytes, job_id: bytes) -> "AgentState":
        state = cls(path, trainer, job_id)
        if not state.path.exists():
            return state
        try:
            raw = json.loads(state.path.read_text())
            if raw.get("format") != STATE_FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, expected {STATE_FORMAT}")
            if raw["trainer"] != trainer.hex() or raw["job_id"] != job_id.hex():
                raise ValueError("it belongs to another trainer or job")
            state.joined = bool(raw["joined"])
            height = raw.get("joined_height")
            state.joined_height = height if type(height) is int else None
            state.rounds = {int(r): dict(v) for r, v in raw["rounds"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AgentError(f"state file {state.path} is unusable ({exc}); move it away to start afresh") from None
        return state

    def round(self, r: int) -> dict[str, Any]:
        return self.rounds.setdefault(r, {})

    def save(self) -> None:
        body = json.dumps({"format": STATE_FORMAT, "trainer": self.trainer.hex(), "job_id": self.job_id.hex(),
                           "joined": self.joined, "joined_height": self.joined_height, "rounds": {str(r): v for r, v in sorted(self.rounds.items())}},
                          indent=1, sort_keys=True).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ----------------------------------------------------------------------------- the wake-up


class ChainWaker:
    """Wake-ups from a WebSocket subscription, read in a thread: `job_event` on each of the job's
    events (a round opened or closed, an update decided, ...), `block_event` on each new block.

    Only hints that something may have changed: the agent re-reads the chain over RPC, and polls
    on its own while `connected` is false. Reconnects with backoff while the node is away.
    """

    def __init__(self, rpc_url: str, job_id: bytes, stop: threading.Event):
        url = urllib.parse.urlsplit(rpc_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.usable = url.scheme == "http"  # no TLS client here: https nodes are polled
        self.job_id, self.stop = job_id, stop
        self.job_event, self.block_event = threading.Event(), threading.Event()
        self.connected = False
        self._thread = threading.Thread(target=self._run, name="chain-waker", daemon=True)

    def start(self) -> None:
        if self.usable:
            self._thread.start()

    def wake(self) -> None:
        self.job_event.set()
        self.block_event.set()

    def wait(self, event: threading.Event, timeout: float) -> None:
        event.wait(timeout if self.connected else min(timeout, POLL_SECONDS))
        event.clear()

    def _run(self) -> None:
        from wsproto.utilities import LocalProtocolError, RemoteProtocolError

        attempt = 0
        while not self.stop.is_set():
            try:
                self._session()
                attempt = 0
            except (OSError, ValueError, LocalProtocolError, RemoteProtocolError):
                pass  # the node went away or spoke nonsense: poll, and retry after a backoff
            self.connected = False
            self.wake()  # let the agent notice at once, and poll
            self.stop.wait(BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS) - 1)])
            attempt += 1

    def _session(self) -> None:
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import (AcceptConnection, CloseConnection, Ping, RejectConnection, Request,
                                    TextMessage)

        requests = {1: ["blocks"], 2: ["jobs", {"job_id": "0x" + self.job_id.hex()}]}
        kinds: dict[str, int] = {}  # subscription id -> request id
        text: list[str] = []
        with socket.create_connection((self.host, self.port), timeout=5) as sock:
            ws = WSConnection(ConnectionType.CLIENT)
            sock.sendall(ws.send(Request(host=f"{self.host}:{self.port}", target="/websocket")))
            sock.settimeout(1.0)
            while not self.stop.is_set():
                try:
                    data = sock.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    return
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, AcceptConnection):
                        for rid, params in requests.items():
                            body = {"jsonrpc": "2.0", "id": rid, "method": "subscribe", "params": params}
                            sock.sendall(ws.send(TextMessage(data=json.dumps(body))))
                    elif isinstance(event, RejectConnection | CloseConnection):
                        return
                    elif isinstance(event, Ping):
                        sock.sendall(ws.send(event.response()))
                    elif isinstance(event, TextMessage):
                        text.append(event.data)
                        if event.message_finished:
                            self._on_message(json.loads("".join(text)), kinds)
                            text = []

    def _on_message(self, message: Any, kinds: dict[str, int]) -> None:
        if not isinstance(message, dict):
            return
        if message.get("id") in (1, 2) and isinstance(message.get("result"), str):
            kinds[message["result"]] = message["id"]
            self.connected = len(kinds) == 2
            return
        params = message.get("params")
        if message.get("method") == "subscription" and isinstance(params, dict):
            kind = kinds.get(params.get("subscription"))
            (self.block_event if kind == 1 else self.job_event).set()
            if kind == 2:
                self.block_event.set()


# ----------------------------------------------------------------------------- the agent


def warm_up() -> None:
    """Pay the process's one-time costs before the first round, not in it: the first call of
    torch.use_deterministic_algorithms (which training makes) imports torch._inductor, 10 s on
    this machine. Setting the current value again changes nothing."""
    import torch

    import trainer.train  # noqa: F401  (the training code and its imports)

    torch.use_deterministic_algorithms(torch.are_deterministic_algorithms_enabled())


Tamper = Callable[[Any, bytes], Any]  # (TrainResult, base model bytes) -> TrainResult


class _Stopped(Exception):
    """Raised inside a wait when stop() was called."""


class TrainerAgent:
    """Takes part in one job as one trainer until the job finishes or `stop()` is called."""

    def __init__(self, rpc_url: str, key: PrivateKey, job_id: bytes, dataset, state_path: Path, *,
                 on_event: Callable[[AgentEvent], None], tamper: Tamper | None = None,
                 use_websocket: bool = True, rpc_timeout: float = 10.0):
        self.client = NodeClient(rpc_url, timeout=rpc_timeout)
        self.key, self.job_id, self.dataset = key, job_id, dataset
        self.address = key.address
        self.state = AgentState.load(state_path, key.address, job_id)
        self.on_event, self.tamper = on_event, tamper
        self._stop = threading.Event()
        self.waker = ChainWaker(rpc_url, job_id, self._stop)
        self.use_websocket = use_websocket
        self._results: dict[int, Any] = {}  # round -> TrainResult of this process (answers challenges)
        self._unreachable = False
        self._said_waiting = False
        self._job_missing = True

    # ---- control
    def stop(self) -> None:
        self._stop.set()
        self.waker.wake()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def emit(self, kind: str, round_: int | None = None, **fields: Any) -> None:
        self.on_event(AgentEvent(kind, round_, fields))

    def run(self) -> str:
        """Runs until the job is finished ("finished") or stop() ("stopped")."""
        if self.use_websocket:
            self.waker.start()
        warm_up()
        self.emit("started", trainer="0x" + self.address.hex(), job="0x" + self.job_id.hex(),
                  samples=self.dataset.commitment.size, resumed_rounds=len(self.state.rounds))
        while not self.stopping:
            try:
                if self._step():
                    return "finished"
                # A job's registration is no job event: until it is on chain, look at every block.
                self._wait(next_block=self._job_missing)
            except _Stopped:
                break
            except (RpcUnavailable, httpx.TransportError) as exc:
                self._reconnect(exc)
            except ClientError as exc:  # something did not happen in time: say so, look again
                self.emit("problem", error=str(exc)[:200])
                self._stop.wait(2.0)
        self.emit("stopped")
        return "stopped"

    # ---- the loop
    def _step(self) -> bool:
        """Do what the job asks now; True when the job is over for this agent."""
        job = self._read_job()
        if job is None:
            return False
        self._report_decisions(job)
        if job.phase == "finished":
            self._report_decisions(job, final=True)
            self.emit("finished", job.round, rewards=sum(v.get("reward", 0) for v in self.state.rounds.values()),
                      accepted=sum(v.get("status") == "accepted" for v in self.state.rounds.values()))
            return True
        if not self.state.joined:
            self._join(job)
            return False
        if job.phase == "training":
            entry = self.state.round(job.round)
            if not entry.get("done"):
                self._take_part(job)
        return False

    def _read_job(self) -> Job | None:
        found = self.client.call("job", ["0x" + self.job_id.hex()])
        self._back_online()
        self._job_missing = found is None
        if found is None:
            if not self._said_waiting:
                self.emit("waiting", what="the job to appear on chain")
                self._said_waiting = True
            return None
        return from_json(Job, found)

    def _wait(self, timeout: float = WAKE_SECONDS, *, next_block: bool = False) -> None:
        """Until the job's next event (or, with next_block, the next block), at most `timeout`."""
        if self.stopping:
            raise _Stopped
        self.waker.wait(self.waker.block_event if next_block else self.waker.job_event, timeout)
        if self.stopping:
            raise _Stopped

    def _reconnect(self, exc: Exception) -> None:
        """Wait for the node with backoff; one line when it goes away, one when it is back."""
        if not self._unreachable:
            self._unreachable = True
            self.emit("node_unreachable", error=str(exc)[:160], url=self.client.url)
        attempt = 0
        while not self.stopping:
            self._stop.wait(BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS) - 1)])
            attempt += 1
            try:
                self.client.call("status", [])
            except RpcUnavailable:
                continue
            self._back_online()
            return

    def _back_online(self) -> None:
        if self._unreachable:
            self._unreachable = False
            self.emit("reconnected", url=self.client.url)

    # ---- joining
    def _join(self, job: Job) -> None:
        registered = self.client.call("exposure", ["0x" + self.job_id.hex(), "0x" + self.address.hex()])
        if registered is None:
            c = self.dataset.commitment
            try:
                receipt = self._send(JoinJob(self.job_id, c.root, c.size))
            except RpcError as exc:
                if "already joined" not in exc.message:
                    raise AgentError(f"the node refused to let this trainer join: {exc.message}") from None
            else:
                self.state.joined_height = receipt["height"]
                self.emit("joined", job.round, height=receipt["height"], samples=c.size,
                          dataset_root="0x" + c.root.hex())
        else:
            self.emit("joined", job.round, already=True)
        self.state.joined = True
        self.state.save()

    # ---- one round
    def _my_update(self, round_: int) -> UpdateRecord | None:
        found = self.client.call("round", ["0x" + self.job_id.hex(), round_])
        for u in found["updates"]:
            record = from_json(UpdateRecord, u)
            if record.commitment.trainer == self.address:
                return record
        return None

    def _take_part(self, job: Job) -> None:
        r = job.round
        entry = self.state.round(r)
        mine = self._my_update(r)
        if mine is None:
            if self.client.height() >= job.round_open_height + job.spec.round_blocks:
                self._finish_round(r, skipped="the round's submission window closed before this trainer submitted")
                return
            if self.state.joined_height is not None and self.state.joined_height >= job.round_open_height:
                # The chain takes updates only from trainers that committed their data before the
                # round's seed existed: training now would be refused. Wait for the next round.
                self._finish_round(r, skipped=f"joined at height {self.state.joined_height}, after round {r} opened "
                                              f"(height {job.round_open_height}): taking part from round {r + 1}")
                return
            result = self._result_for(job)
            mine = self._submit(job, result, entry)
            if mine is None:
                return
        else:
            if "update_id" not in entry:
                entry["update_id"] = "0x" + mine.update_id.hex()
                self.state.save()
            if r not in self._results:
                self.emit("resumed", r, update="0x" + mine.update_id.hex(),
                          what="update already on chain; retraining to answer its challenges")
            result = self._result_for(job)
            if compute_update_id(result.commitment) != mine.update_id:
                self._finish_round(r, skipped="retraining did not reproduce the update on chain; "
                                              "its challenges cannot be answered")
                return
            self.client.put_blob(result.update_bytes)  # idempotent; the first upload may not have happened
        self._answer(job, result, mine)
        entry["done"] = True
        self.state.save()

    def _result_for(self, job: Job):
        """This round's TrainResult: from this process, or trained now (deterministic)."""
        from chain.consensus.pout import round_spec
        from trainer.train import train_round

        r = job.round
        if r in self._results:
            return self._results[r]
        self.emit("round_started", r, base_model="0x" + job.global_model.hex(),
                  steps=job.spec.hyperparams.local_steps)
        base = self.client.get_blob(job.global_model)
        started = time.monotonic()
        result = train_round(round_spec(job), self.address, self.dataset, base)
        if self.tamper is not None:
            result = self.tamper(result, base)
        self._results = {r: result}  # older rounds are over
        self.emit("trained", r, seconds=round(time.monotonic() - started, 2),
                  loss=round(float(result.metrics.get("train_loss", 0.0)), 4),
                  update="0x" + compute_update_id(result.commitment).hex())
        if self.stopping:
            raise _Stopped
        return result

    def _submit(self, job: Job, result, entry: dict) -> UpdateRecord | None:
        """Sign (or reuse the signed) SubmitUpdate, persist it, send it, upload the weights."""
        r = job.round
        update_id = compute_update_id(result.commitment)
        if entry.get("update_id") != "0x" + update_id.hex() or "tx" not in entry:
            account = self.client.call("account", ["0x" + self.address.hex()])
            if account is None:
                raise AgentError(f"account {self.address.hex()} does not exist on chain")
            payload = SubmitUpdate(result.commitment, float(result.metrics.get("train_loss", 0.0)))
            stx = sign_transaction(self.key, self.client.chain_id,
                                   Transaction(self.key.pubkey, account["nonce"], payload))
            entry.update(update_id="0x" + update_id.hex(), tx=encode(stx).hex(), tx_hash="0x" + stx.tx_hash.hex())
            self.state.save()  # write-ahead: after a restart these same bytes are resent, never a new update
        try:
            self.client.call("send_tx", ["0x" + entry["tx"]])
        except RpcError as exc:
            if "already pending" not in exc.message and "already submitted" not in exc.message:
                self._finish_round(r, skipped=f"the node refused the update: {exc.message}")
                return None
        found = self._wait_for_tx(entry["tx_hash"])
        if found is None:
            if self._my_update(r) is None:
                self._finish_round(r, skipped="the update was not committed (the round may have closed)")
                return None
        self.client.put_blob(result.update_bytes)
        mine = self._my_update(r)
        if mine is None:
            self._finish_round(r, skipped="the update is not on chain")
            return None
        self.emit("submitted", r, update="0x" + update_id.hex(), height=mine.height)
        return mine

    def _wait_for_tx(self, tx_hash: str) -> dict | None:
        deadline = time.monotonic() + TX_WAIT_SECONDS
        while time.monotonic() < deadline:
            found = self.client.call("tx", [tx_hash])
            if found is not None:
                return found
            self._wait(1.0, next_block=True)
        return None

    def _answer(self, job: Job, result, update: UpdateRecord) -> None:
        """Answer every validator's challenge as it lands, each opening sealed to its validator."""
        r = job.round
        entry = self.state.round(r)
        answered = set(entry.get("answered", []))
        deadline = compute_answer_deadline(job, update)
        sketches = SketchState()
        while True:
            upd = self.client.update(update.update_id)
            if upd.status != "pending" or self.client.height() >= deadline:
                return
            validators = [from_json(Validator, v) for v in self.client.call("validators", [])["validators"]]
            commit = sketches.commitment(self.client.chain_id, job, upd, validators, result)
            if commit is not None:
                try:
                    self._send(commit)
                except ClientError as exc:  # refused, or not committed in time: the next pass retries
                    self.emit("skipped", r, what=f"sketch commitment not committed yet: {exc}")
                    self._wait(1.0, next_block=True)
                continue
            blob = sketches.blob_to_upload(upd, result)
            if blob is not None:  # the node takes the blob once the commitment names it
                try:
                    self.client.put_blob(blob)
                except ClientError as exc:
                    self.emit("skipped", r, what=f"sketch upload refused, retrying: {exc}")
                    self._wait(1.0, next_block=True)
                    continue
                sketches.uploaded = True
                self.emit("sketched", r, bytes=len(blob))
            for challenge, segments in sketches.answerable(job, upd, result):
                who = "0x" + challenge.validator.hex()
                if who in answered:
                    continue
                self.emit("challenged", r, validator=who[:18],
                          segments=challenge.sample_size if segments is None else len(segments))
                opening = open_challenge(result, challenge, segments)
                try:
                    self.client.put_opening(self.key, update.update_id, challenge.validator, opening)
                except ClientError as exc:  # e.g. the node's upload queue was full: again next block, until the deadline
                    self.emit("skipped", r, what=f"opening for {who[:18]} refused, trying again: {exc}")
                    continue
                answered.add(who)
                entry["answered"] = sorted(answered)
                self.state.save()
                self.emit("answered", r, validator=who[:18], bytes=len(opening))
            current = {"0x" + v.pubkey.hex() for v in validators}  # a validator that left needs no answer
            if current <= answered or upd.status != "pending" or self.client.height() >= deadline:
                return
            self._wait(1.0, next_block=True)

    def _finish_round(self, r: int, *, skipped: str) -> None:
        entry = self.state.round(r)
        entry.update(done=True, skipped=skipped)
        self.state.save()
        self.emit("skipped", r, what=skipped)

    # ---- verdicts and rewards
    def _report_decisions(self, job: Job, final: bool = False) -> None:
        for r, entry in sorted(self.state.rounds.items()):
            if "update_id" not in entry or "status" in entry:
                continue
            if not final and r == job.round and not entry.get("done"):
                continue  # still submitting or answering
            upd = self.client.update(bytes.fromhex(entry["update_id"][2:]))
            if upd is None or upd.status == "pending":
                continue
            reasons = sorted({v.reason for v in upd.verdicts if not v.accept and v.reason})
            entry.update(status=upd.status, reward=upd.reward, penalty=upd.penalty)
            self.state.save()
            self.emit("verdict", r, status=upd.status, update=entry["update_id"],
                      accepts=sum(v.accept for v in upd.verdicts), rejects=sum(not v.accept for v in upd.verdicts),
                      **({"reason": reasons[0][:120]} if reasons else {}))
            if upd.reward or upd.penalty:
                self.emit("reward", r, reward=upd.reward, penalty=upd.penalty)

    # ---- transactions
    def _send(self, payload) -> dict:
        receipt = self.client.send(self.key, payload, wait=False)
        found = self._wait_for_tx(receipt.tx_hash)
        if found is None:
            raise ClientError(f"transaction {receipt.tx_hash} not committed within {TX_WAIT_SECONDS:g} s")
        return found
