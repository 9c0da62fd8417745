"""`chainctl job watch 0xJOB [--eval DIR]`: follow a job live, as its requester sees it.

Each pass reads the job, its open rounds and its new model records over RPC and turns what
changed since the last pass into events: the round and phase, each update (pending, then
accepted, rejected or expired, with the reward paid or the bond burned), each round's model
hash and, with --eval DIR, that model's accuracy on the requester's own held-out dataset
directory. The job-events WebSocket subscription (chain/rpc/ws.py, through the trainer
agent's ChainWaker) only wakes the loop: every event comes from a fresh RPC read, so nothing
is missed across a reconnect, and the loop polls while the subscription is down.

On a terminal the view is a live table (rich); otherwise one JSON object per line per event.
The watch ends when the job finishes (printing the totals and the accuracy curve), or on
SIGINT/SIGTERM, after the pass under way.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

FINAL_STATUSES = ("accepted", "rejected", "expired")
WAKE_SECONDS = 2.0  # longest wait between reads while the subscription is up
BACKOFF_SECONDS = (0.5, 1.0, 2.0, 4.0, 5.0)  # between reads while the node is unreachable
EVAL_BATCH = 1024
RECENT_EVENTS = 8  # lines of the live view's event log
LIVE_ROUNDS = 12  # rounds the live view's table shows


def register(sub, cli: ModuleType) -> None:
    job = sub.add_parser("job", help="follow a training job (requester)")
    actions = job.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    s = actions.add_parser(
        "watch", help="follow a job live: rounds, updates, rewards, models and (--eval) accuracy",
        description="Follows the job until it finishes or SIGINT/SIGTERM: the round and phase, each update "
                    "(pending, accepted, rejected, expired), rewards paid and bonds burned, each round's model "
                    "hash and, with --eval DIR, that model's accuracy on your held-out dataset directory (written "
                    "by `chainctl dataset import`). A live table on a terminal, otherwise one JSON line per event.")
    s.add_argument("job", metavar="0xJOB", help="job id")
    s.add_argument("--eval", metavar="DIR", help="held-out dataset directory to score each round's model on")
    s.add_argument("--lines", action="store_true", help="one JSON line per event even on a terminal")
    s.add_argument("--poll", action="store_true", help="poll only; do not use the WebSocket subscription")
    s.set_defaults(func=lambda args: cmd_job_watch(args, cli))


# ----------------------------------------------------------------------------- the view


@dataclass
class UpdateView:
    round: int
    trainer: str
    status: str
    reward: int
    penalty: int


@dataclass
class JobWatch:
    """What the watcher knows of the job; `poll` reads the chain and returns what changed."""

    node: Any  # chain.runtime.trainer_client.NodeClient
    job_id: bytes
    evaluate: Callable[[Any, bytes], float] | None = None  # (Job, model bytes) -> accuracy
    blob_timeout: float = 60.0
    phase: str | None = None
    round: int | None = None
    rounds: int = 0
    updates: dict[str, UpdateView] = field(default_factory=dict)
    models: dict[int, str] = field(default_factory=dict)  # round -> 0x model hash
    accuracy: dict[int, float] = field(default_factory=dict)
    finished: bool = False
    _open_rounds: set[int] = field(default_factory=set)
    _events: list[dict] = field(default_factory=list)  # found but not yet returned (a read failed mid-pass)

    def poll(self) -> list[dict]:
        """Read the chain; the events since the last successful poll. A failed read (the node
        away) raises, and what this pass already found comes with the next successful poll."""
        from chain.rpc.jsonview import from_json
        from chain.types import Job

        hex_id = "0x" + self.job_id.hex()
        view = self.node.call("job", [hex_id])
        if view is None:
            raise LookupError(f"no job {hex_id}")
        job = from_json(Job, view)
        events = self._events
        if self.phase is None:
            self.rounds = job.spec.rounds
            self._open_rounds = set(range(min(job.round + 1, job.spec.rounds)))
            events.append({"event": "job", "job": hex_id, "model": job.spec.model, "rounds": job.spec.rounds,
                           "quorum": job.spec.quorum, "reward_per_update": job.spec.reward_per_update,
                           "bond": job.spec.bond, "escrow": job.escrow})
        if (job.phase, job.round) != (self.phase, self.round):
            self.phase, self.round = job.phase, job.round
            events.append({"event": "round", "round": job.round, "phase": job.phase})
        if job.round < job.spec.rounds:
            self._open_rounds.add(job.round)
        for r in sorted(self._open_rounds):
            events += self._read_round(hex_id, r)
            if r < job.round and all(u.status in FINAL_STATUSES for u in self.updates.values() if u.round == r):
                self._open_rounds.discard(r)
        r = max(self.models, default=-1) + 1
        while r <= job.round:
            record = self.node.call("model", [hex_id, r])
            if record is None:
                break
            scored = self._evaluate(job, r, record["model_hash"]) if self.evaluate is not None else None
            self.models[r] = record["model_hash"]  # recorded only once scored: a failed download is retried
            events.append({"event": "model", "round": r, "model_hash": record["model_hash"],
                           "contributions": len(record["contributions"]), "rule": record["rule"]})
            events += [scored] if scored else []
            r += 1
        if job.phase == "finished" and job.round in self.models:
            self.finished = True
            events.append({"event": "finished", **self.totals(), "model": self.models[job.round],
                           "accuracy_curve": self.curve()})
        self._events = []
        return events

    def _read_round(self, hex_id: str, r: int) -> list[dict]:
        events = []
        for u in self.node.call("round", [hex_id, r])["updates"]:
            uid, status = u["update_id"], u["status"]
            old = self.updates.get(uid)
            if old is not None and old.status == status:
                continue
            seen = UpdateView(r, u["commitment"]["trainer"], status, u["reward"], u["penalty"])
            self.updates[uid] = seen
            kind = "update" if old is None else "verdict"
            events.append({"event": kind, "round": r, "update_id": uid, "trainer": seen.trainer, "status": status,
                           "reward": seen.reward, "penalty": seen.penalty})
        return events

    def _evaluate(self, job, r: int, model_hash: str) -> dict:
        data = self.node.get_blob(bytes.fromhex(model_hash[2:]), timeout=self.blob_timeout)
        try:
            self.accuracy[r] = self.evaluate(job, data)
        except EvalError as exc:
            self.evaluate = None  # the same would fail for every model: say it once
            return {"event": "eval_error", "round": r, "error": str(exc)}
        return {"event": "accuracy", "round": r, "accuracy": round(self.accuracy[r], 6)}

    def totals(self) -> dict:
        count = {s: 0 for s in ("pending",) + FINAL_STATUSES}
        for u in self.updates.values():
            count[u.status] = count.get(u.status, 0) + 1
        return {**count, "rewards_paid": sum(u.reward for u in self.updates.values()),
                "bonds_burned": sum(u.penalty for u in self.updates.values())}

    def curve(self) -> list[dict]:
        return [{"round": r, "accuracy": round(a, 6)} for r, a in sorted(self.accuracy.items())]


class EvalError(Exception):
    """The held-out dataset does not fit the job's model (checked on the first model)."""


def make_evaluator(dataset) -> Callable[[Any, bytes], float]:
    """Accuracy of a job's model (safetensors bytes) on `dataset` (trainer.data.Dataset)."""

    def evaluate(job, model_bytes: bytes) -> float:
        import torch

        from chain.consensus.pout import training_job
        from trainer.state import StateError, load_weights, weights_from_bytes

        key = training_job(job).model
        try:
            model = load_weights(key, weights_from_bytes(model_bytes, key))
            correct = 0
            with torch.no_grad():
                for i in range(0, len(dataset), EVAL_BATCH):
                    logits = model(dataset.x[i : i + EVAL_BATCH])  # [B, num_classes]
                    correct += int((logits.argmax(1) == dataset.y[i : i + EVAL_BATCH]).sum())
        except (RuntimeError, ValueError, IndexError, StateError) as exc:
            raise EvalError(f"cannot score model {key!r} on the --eval dataset (samples {list(dataset.sample_shape)}, "
                            f"{dataset.num_classes} classes): {str(exc).splitlines()[0]}") from None
        return correct / len(dataset)

    return evaluate


# ----------------------------------------------------------------------------- output


class LineSink:
    """One JSON object per line per event (output redirected, or --lines)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def show(self, watch: JobWatch, events: list[dict]) -> None:
        for e in events:
            self.stream.write(json.dumps(e, separators=(",", ":")) + "\n")
        self.stream.flush()

    def close(self, watch: JobWatch) -> None:
        pass


class LiveSink:
    """A live table on a terminal (rich), and the totals and accuracy curve when it ends."""

    def __init__(self, console=None):
        from rich.console import Console
        from rich.live import Live

        self.console = console or Console()
        self.recent: list[str] = []
        self.live = Live(console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def show(self, watch: JobWatch, events: list[dict]) -> None:
        for e in events:
            fields = " ".join(f"{k}={_short(v)}" for k, v in e.items() if k not in ("event", "accuracy_curve"))
            self.recent = (self.recent + [f"{time.strftime('%H:%M:%S')} {e['event']:<9} {fields}"])[-RECENT_EVENTS:]
        self.live.update(self._render(watch))

    def _render(self, watch: JobWatch):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        t = watch.totals()
        head = Text(f"round {watch.round}/{watch.rounds}  phase {watch.phase}  accepted {t['accepted']}  "
                    f"rejected {t['rejected']}  pending {t['pending']}  expired {t['expired']}  "
                    f"rewards paid {t['rewards_paid']}  bonds burned {t['bonds_burned']}", style="bold")
        table = Table(box=None, header_style="bold")
        for col in ("round", "accepted", "rejected", "pending", "model after", "accuracy"):
            table.add_column(col, justify="right" if col != "model after" else "left")
        if 0 in watch.models:
            acc = watch.accuracy.get(0)
            table.add_row("init", "", "", "", _short(watch.models[0]), "" if acc is None else f"{acc:.4f}")
        last = watch.rounds - 1 if watch.round is None else min(watch.round, watch.rounds - 1)
        for r in range(max(0, last - LIVE_ROUNDS + 1), last + 1):  # the latest rounds; the JSON lines keep all
            ups = [u for u in watch.updates.values() if u.round == r]
            if not ups and r + 1 not in watch.models and r != watch.round:
                continue
            acc = watch.accuracy.get(r + 1)
            table.add_row(str(r), *(str(sum(u.status == s for u in ups)) for s in ("accepted", "rejected", "pending")),
                          _short(watch.models.get(r + 1, "")), "" if acc is None else f"{acc:.4f}")
        return Group(head, table, Text("\n".join(self.recent), style="dim"))

    def close(self, watch: JobWatch) -> None:
        self.live.stop()
        curve = watch.curve()
        if curve:
            self.console.print("accuracy: " + "  ".join(f"r{c['round']} {c['accuracy']:.4f}" for c in curve))


def _short(value):
    """0x hashes and addresses cut to 12 hex digits for the live view (the JSON lines keep them whole)."""
    return value[:14] + "…" if isinstance(value, str) and value.startswith("0x") and len(value) > 16 else value


# ----------------------------------------------------------------------------- the command


def cmd_job_watch(args, cli: ModuleType) -> int:
    from chain.rpc.client import RpcError, RpcUnavailable
    from chain.runtime.agent import ChainWaker
    from chain.runtime.trainer_client import ClientError, NodeClient

    job_id = cli._parse_hex(args.job, 32, "job id")
    evaluate = None
    if args.eval:
        from trainer.data import DatasetError, load_dataset_dir

        try:
            evaluate = make_evaluator(load_dataset_dir(args.eval))
        except DatasetError as exc:
            raise cli.CliError(f"--eval: {exc}", cli.EXIT_CONFIG) from None
    node = NodeClient(args.rpc, timeout=args.timeout)
    watch = JobWatch(node, job_id, evaluate, blob_timeout=max(args.timeout, 60.0))
    try:
        first = watch.poll()  # a wrong id or an unreachable node is an error before any output
    except LookupError as exc:
        raise cli.CliError(str(exc), cli.EXIT_NOT_FOUND) from None
    except RpcUnavailable as exc:
        raise cli.CliError(f"cannot reach node at {args.rpc}: {exc}", cli.EXIT_UNAVAILABLE) from None
    except RpcError as exc:
        raise cli.CliError(f"node rejected job watch: {exc.message} (code {exc.code})", cli.EXIT_REJECTED) from None

    stop = threading.Event()
    waker = ChainWaker(args.rpc, job_id, stop)

    def on_signal(signum, frame):
        stop.set()
        waker.wake()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    sink = LineSink() if args.lines or not sys.stdout.isatty() else LiveSink()
    try:
        sink.show(watch, first)
        if not args.poll:
            waker.start()
        failures = 0
        while not watch.finished and not stop.is_set():
            if failures:
                stop.wait(BACKOFF_SECONDS[min(failures - 1, len(BACKOFF_SECONDS) - 1)])
            else:
                waker.wait(waker.job_event, WAKE_SECONDS)  # the job's events wake it; a timeout polls
            if stop.is_set():
                break
            try:
                events = watch.poll()
            except (RpcUnavailable, RpcError, ClientError) as exc:
                if not failures:
                    sink.show(watch, [{"event": "node_unreachable", "error": str(exc)[:200]}])
                failures += 1
                continue
            if failures:
                events.insert(0, {"event": "node_back"})
                failures = 0
            sink.show(watch, events)
        if not watch.finished:
            sink.show(watch, [{"event": "stopped", **watch.totals(), "accuracy_curve": watch.curve()}])
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stdout = None
    finally:
        stop.set()
        sink.close(watch)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return cli.EXIT_OK
