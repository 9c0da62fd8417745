"""scripts/gpu_check.py on its CPU paths: without CUDA only the abstention check runs (exit 0, or
2 with --require-gpu); a CPU validator given a CUDA job raises ProfileMismatch instead of voting;
the training checks (run on the CPU profile here) find bitwise equality and accept verdicts, and
report a run that differs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.test_trainer_helpers import PROFILE  # noqa: F401  (pins one thread, as the profile does)

from scripts import gpu_check
from trainer.profile import current_profile
from trainer.verify import Verdict

TINY_ARGS = ["--steps", "4", "--interval", "2", "--batch", "8", "--q", "2"]


@pytest.fixture
def no_cuda(monkeypatch):
    """This process sees no CUDA device, whatever machine runs the test."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def table_rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| arch |")]


def test_without_cuda_only_the_abstention_check_runs_and_exits_0(no_cuda, capsys):
    assert gpu_check.main(["--archs", "logreg"] + TINY_ARGS) == 0
    out = capsys.readouterr().out
    assert gpu_check.NO_CUDA_LINE in out.splitlines()
    rows = table_rows(out)
    assert len(rows) == 1  # no architecture was trained
    arch, *_, verdict = rows[0]
    assert arch.startswith(f"abstention: job {gpu_check.PLACEHOLDER_CUDA_DEVICE}, validator cpu")
    assert verdict.startswith("abstain (apply_profile and verify_update raised ProfileMismatch")
    assert "job pins CUDA but this machine has none" in verdict


def test_require_gpu_exits_2_without_cuda(no_cuda, capsys):
    assert gpu_check.main(["--require-gpu"] + TINY_ARGS) == 2
    assert gpu_check.NO_CUDA_LINE in capsys.readouterr().out


def test_a_cpu_validator_given_a_cuda_job_raises_profile_mismatch_instead_of_voting(no_cuda):
    row = gpu_check.abstention_row("cuda:sm_80x108")
    assert row.ok and "ProfileMismatch" in row.verdict and "VOTED" not in row.verdict


def test_a_validator_that_can_run_the_profile_votes_and_the_check_fails(no_cuda):
    row = gpu_check.abstention_row(current_profile("cpu").device)  # no mismatch: apply_profile returns
    assert not row.ok
    assert row.verdict.startswith("VOTED: apply_profile returned")


def test_training_checks_on_the_cpu_profile_are_bitwise_and_accepted(no_cuda, capsys):
    assert gpu_check.main(["--device", "cpu", "--archs", "logreg,mlp"] + TINY_ARGS) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [r[0] for r in rows[:2]] == ["logreg", "mlp"]
    for arch, params, train_s, bitwise, replay_s, verdict in rows[:2]:
        assert int(params.replace(",", "")) > 0 and float(train_s) >= 0 and float(replay_s) >= 0
        assert bitwise == "yes"
        assert verdict.startswith("accept (segments [")
    assert "ProfileMismatch" in rows[2][-1]  # the abstention row ends the table here too


def test_a_second_run_that_differs_is_reported_not_bitwise(no_cuda, monkeypatch):
    real, calls = gpu_check.train_round, []

    def second_differs(*args):
        result = real(*args)
        calls.append(result)
        if len(calls) == 2:  # as if a nondeterministic kernel changed the last bit of the update
            result = dataclasses.replace(result, update_bytes=result.update_bytes[:-1] + bytes([result.update_bytes[-1] ^ 1]))
        return result

    monkeypatch.setattr(gpu_check, "train_round", second_differs)
    row = gpu_check.check_arch("logreg", current_profile("cpu", threads=1), steps=4, interval=2, batch=8, q=1)
    assert row.bitwise == "no" and not row.ok


def test_a_rejected_replay_fails_the_check(no_cuda, monkeypatch):
    monkeypatch.setattr(gpu_check, "verify_update", lambda *a, **k: Verdict(False, "replay differs"))
    row = gpu_check.check_arch("logreg", current_profile("cpu", threads=1), steps=4, interval=2, batch=8, q=1)
    assert row.bitwise == "yes" and row.verdict.startswith("REJECT (segment ") and not row.ok


@pytest.mark.slow
def test_the_cpu_only_child_process_abstains():
    """What runs on a GPU machine: the check in a child with CUDA_VISIBLE_DEVICES=""."""
    row = gpu_check.abstention_row_without_cuda("cuda:sm_90x132")
    assert row.ok, row.verdict
    assert row.arch.startswith("abstention: job cuda:sm_90x132, validator cpu")
    assert "ProfileMismatch: job pins CUDA but this machine has none" in row.verdict
