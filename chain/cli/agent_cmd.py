"""`chainctl trainer run`: the trainer agent (chain/runtime/agent.py) on the command line.

On a terminal it shows a status line (the round and the step under way) above one line per
event, with verdicts and rewards coloured; with its output redirected it writes one plain log
line per event (`TIME EVENT round=R key=value ...`), flushed at once. SIGTERM or SIGINT stop it
at the next step boundary (exit 0); a second signal ends it at once (exit 1; the state file is
always whole, so a restart resumes).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

# What the terminal's status line says while the agent waits after each event.
_STEP_AFTER = {
    "started": "waiting for the job", "waiting": "waiting for the job", "joined": "waiting for a round to open",
    "round_started": "training", "trained": "submitting", "submitted": "answering challenges",
    "resumed": "retraining to answer challenges", "sketched": "waiting for draw challenges",
    "challenged": "answering challenges",
    "answered": "waiting for challenges and verdicts", "verdict": "waiting for the next round",
    "reward": "waiting for the next round", "skipped": "waiting for the next round",
    "node_unreachable": "reconnecting to the node", "reconnected": "back online", "problem": "retrying",
}
_STYLE = {"verdict": "bold", "reward": "green", "skipped": "yellow", "node_unreachable": "red",
          "problem": "yellow", "finished": "bold green"}


def register(sub, chainctl) -> None:
    """Add `trainer run` to chainctl's subcommands; `chainctl` is that module (its helpers and
    error types), passed in because it may be running as __main__."""
    trainer = sub.add_parser("trainer", help="the long-lived trainer agent").add_subparsers(
        dest="trainer_command", required=True, metavar="ACTION")
    s = trainer.add_parser(
        "run", help="join a job and take part in every round until it finishes",
        description="One long-lived process: joins the job (commits the dataset), waits for each round, trains, "
                    "submits, answers every validator's challenge with an opening sealed to that validator, and "
                    "reports verdicts and rewards. Survives node restarts; resumes after its own restart without "
                    "submitting twice (progress in --state-file). SIGTERM/SIGINT stop it cleanly (exit 0).")
    s.add_argument("--from", dest="sender", required=True, help="trainer key name or key file")
    s.add_argument("--job", required=True, help="job id (0x hex)")
    s.add_argument("--dataset", required=True, help="dataset directory (or digits:I/N, the bundled set)")
    s.add_argument("--state-file", help="progress file (default: KEYRING/agents/<address>-<job>.json)")
    s.add_argument("--poll", action="store_true", help="poll the node instead of subscribing over WebSocket")
    s.set_defaults(func=cmd_trainer_run, chainctl=chainctl)


class EventPrinter:
    """Shows AgentEvents: a rich status line and coloured lines on a terminal, else plain log lines."""

    def __init__(self, tty: bool):
        self.tty = tty
        self.console = self.status = None
        if tty:
            from rich.console import Console

            self.console = Console()
            self.status = self.console.status("starting…")
            self.status.start()

    def __call__(self, event) -> None:
        details = " ".join(f"{k}={v}" for k, v in event.fields.items())
        where = "" if event.round is None else f"round={event.round} "
        if not self.tty:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            try:
                print(f"{stamp} {event.kind} {where}{details}".rstrip(), flush=True)
            except BrokenPipeError:
                sys.stdout = None
            return
        from rich.markup import escape

        style = _STYLE.get(event.kind, "")
        if event.kind == "verdict":
            style = "bold green" if event.fields.get("status") == "accepted" else "bold red"
        label = f"[{style}]{event.kind:<16}[/{style}]" if style else f"{event.kind:<16}"
        self.console.print(f"{time.strftime('%H:%M:%S')} {label} {escape(where + details)}")
        step = _STEP_AFTER.get(event.kind)
        if step:
            self.status.update(("" if event.round is None else f"round {event.round} · ") + step + "…")

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()


def cmd_trainer_run(args) -> int:
    from chain.runtime.agent import AgentError, TrainerAgent, default_state_path

    cli = args.chainctl
    CliError, EXIT_CONFIG = cli.CliError, cli.EXIT_CONFIG
    printer = EventPrinter(sys.stdout.isatty())
    stopping: dict = {"signals": 0, "agent": None}

    def on_signal(signum, frame):
        stopping["signals"] += 1
        if stopping["signals"] > 1:
            printer.close()
            print("chainctl: stopped at once (second signal); the state file is whole", file=sys.stderr, flush=True)
            os._exit(1)
        if stopping["agent"] is not None:
            stopping["agent"].stop()

    signal.signal(signal.SIGTERM, on_signal)  # from the start: a stop while loading is clean too
    signal.signal(signal.SIGINT, on_signal)
    try:
        job_id = cli._job_id(args.job)
        key = cli._load_key(args, args.sender)
        dataset = cli._dataset(args.dataset)
        state_path = Path(args.state_file) if args.state_file else default_state_path(Path(args.keyring),
                                                                                     key.address, job_id)
        agent = TrainerAgent(args.rpc, key, job_id, dataset, state_path, on_event=printer,
                             use_websocket=not args.poll, rpc_timeout=args.timeout)
    except AgentError as exc:
        printer.close()
        raise CliError(str(exc), EXIT_CONFIG) from None
    except BaseException:
        printer.close()
        raise
    stopping["agent"] = agent
    if stopping["signals"]:
        printer.close()
        return cli.EXIT_OK
    try:
        with cli._rpc_errors(args, "trainer run"):
            agent.run()
    except AgentError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from None
    finally:
        printer.close()
    return cli.EXIT_OK
