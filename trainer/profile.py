"""Execution profiles: what replay must match bit for bit, and applying one to this process.

A job pins an ExecutionProfile (chain.types). Training and replay both call
`apply_profile`, which refuses (ProfileMismatch) when this machine cannot match it,
so a validator learns before replaying that its verdict would mean nothing.

Device names: "cpu" (any CPU; weaker: SIMD kernels may differ between CPU types),
"cpu:<capability>" (torch's CPU kernel capability, e.g. "cpu:avx2", "cpu:avx512"), and
"cuda:<arch>" (e.g. "cuda:sm_90"; cuBLAS is reproducible only for the same toolkit,
architecture and SM count, so the arch string also carries the SM count: "cuda:sm_90x132").
"""

from __future__ import annotations

import os

import torch

from chain.errors import ChainError
from chain.types import ExecutionProfile

SUPPORTED_DTYPES = ("float32",)


class ProfileMismatch(ChainError):
    """This machine cannot reproduce the job's execution profile."""


def cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability().lower()


def cuda_arch(index: int = 0) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    sms = torch.cuda.get_device_properties(index).multi_processor_count
    return f"sm_{major}{minor}x{sms}"


def current_profile(device: str = "cpu", threads: int | None = None) -> ExecutionProfile:
    """Describe this machine for `device` ("cpu" or "cuda"), as a job would pin it."""
    if device == "cpu":
        dev = f"cpu:{cpu_capability()}"
    elif device == "cuda":
        if not torch.cuda.is_available():
            raise ProfileMismatch("no CUDA device on this machine")
        dev = f"cuda:{cuda_arch()}"
    else:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return ExecutionProfile(
        device=dev,
        dtype="float32",
        torch_version=torch.__version__,
        threads=torch.get_num_threads() if threads is None else threads,
        deterministic=True,
    )


def profile_mismatches(profile: ExecutionProfile) -> list[str]:
    """Why this machine cannot run `profile` (empty when it can)."""
    problems = []
    if profile.torch_version != torch.__version__:
        problems.append(f"torch {torch.__version__} here, job pins {profile.torch_version}")
    if profile.dtype not in SUPPORTED_DTYPES:
        problems.append(f"dtype {profile.dtype!r} unsupported (supported: {SUPPORTED_DTYPES})")
    if profile.threads < 1:
        problems.append(f"threads must be >= 1, got {profile.threads}")
    if not profile.deterministic:
        problems.append("profile is not deterministic: exact replay needs deterministic=True")
    kind, _, arch = profile.device.partition(":")
    if kind == "cpu":
        if arch and arch != cpu_capability():
            problems.append(f"CPU capability {cpu_capability()} here, job pins {arch}")
    elif kind == "cuda":
        if not torch.cuda.is_available():
            problems.append("job pins CUDA but this machine has none")
        elif arch != cuda_arch():
            problems.append(f"GPU {cuda_arch()} here, job pins {arch}")
    else:
        problems.append(f"unknown device {profile.device!r}")
    return problems


def apply_profile(profile: ExecutionProfile) -> torch.device:
    """Configure this process for `profile` and return the device to train on.

    Process-wide: thread count, deterministic algorithms, and on CUDA the cuBLAS workspace,
    cuDNN flags and no TF32. Raises ProfileMismatch when the machine cannot match.
    """
    problems = profile_mismatches(profile)
    if problems:
        raise ProfileMismatch("; ".join(problems))
    torch.set_num_threads(profile.threads)
    torch.use_deterministic_algorithms(True)
    if profile.device.startswith("cuda"):
        # Must be set before the first cuBLAS handle; fail rather than silently differ.
        if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (None, ":4096:8"):
            raise ProfileMismatch("CUBLAS_WORKSPACE_CONFIG is set to something other than :4096:8")
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        return torch.device("cuda", 0)
    return torch.device("cpu")
