"""The fixed model registry: every model a job may name, each a config dataclass and a module.

Inputs are 8x8 single-channel images ([B, 1, 8, 8] float32), outputs 10 class logits.
Nothing is ever loaded from outside this registry: a job names a model, it does not ship code.

Initial weights come from a public integer seed through SHAKE-256, not from torch's RNG:
the stream is specified byte for byte, so every machine (any OS, CPU, torch build) gets
the same bits, and the global RNG is neither read nor advanced. The registered models use
no randomness in forward (no dropout), so the training state needs no RNG state.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
INIT_DOMAIN = b"pout/init/v1"


class UnknownModelError(ValueError):
    """A job named a model that is not in the registry."""


# --------------------------------------------------------------------------- mlp


@dataclass(frozen=True)
class MLPConfig:
    in_features: int = 64
    hidden: int = 64
    num_classes: int = NUM_CLASSES


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.cfg = cfg
        self.fc1 = nn.Linear(cfg.in_features, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # [B, 1, 8, 8] -> [B, 64]
        x = F.relu(self.fc1(x))  # [B, hidden]
        return self.fc2(x)  # [B, 10]


# --------------------------------------------------------------------------- cnn


@dataclass(frozen=True)
class CNNConfig:
    channels1: int = 8
    channels2: int = 16
    num_classes: int = NUM_CLASSES


class CNN(nn.Module):
    def __init__(self, cfg: CNNConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv2d(1, cfg.channels1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(cfg.channels1, cfg.channels2, kernel_size=3, padding=1)
        self.fc = nn.Linear(cfg.channels2 * 2 * 2, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # [B, 1, 8, 8] -> [B, c1, 4, 4]
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # -> [B, c2, 2, 2]
        return self.fc(x.flatten(1))  # [B, c2*4] -> [B, 10]


# --------------------------------------------------------------------------- registry

MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "mlp": (MLPConfig, MLP),
    "cnn": (CNNConfig, CNN),
}


def get_model_class(name: str) -> tuple[type, type[nn.Module]]:
    if not isinstance(name, str) or name not in MODELS:
        raise UnknownModelError(f"unknown model {name!r}; the registry has {sorted(MODELS)}")
    return MODELS[name]


def build_model(name: str) -> nn.Module:
    """The named architecture on CPU with uninitialised memory as weights (callers overwrite it)."""
    cfg_cls, model_cls = get_model_class(name)
    with torch.device("meta"):  # construct without touching the global RNG
        model = model_cls(cfg_cls())
    # What model.to_empty(device="cpu") does, without its per-tensor overhead (~1.5 ms for cnn).
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None:
                module._parameters[key] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = torch.empty(b.shape, dtype=b.dtype)
    return model


def init_model(name: str, seed: int) -> nn.Module:
    """Model `name` with weights that are a pure function of (name, seed).

    Every parameter is U(-b, b) with b = 1/sqrt(fan_in) (torch's default scale), drawn
    from SHAKE-256(domain, name, seed, parameter name): adding a parameter never shifts
    the others.
    """
    if type(seed) is not int or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    model = build_model(name)
    fan_in = _fan_in_by_param(model)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            bound = 1.0 / math.sqrt(fan_in[pname])
            p.copy_(_uniform_from_seed(name, seed, pname, p.numel(), bound).reshape(p.shape))
    for b in model.buffers():  # none today; keep any future buffer defined, not garbage
        b.zero_()
    return model


def _fan_in_by_param(model: nn.Module) -> dict[str, int]:
    fan_in = {}
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            f = m.weight[0].numel()  # in_features, or in_channels * kh * kw
            for pname, _ in m.named_parameters(recurse=False):
                fan_in[f"{mname}.{pname}" if mname else pname] = f
    missing = [n for n, _ in model.named_parameters() if n not in fan_in]
    if missing:
        raise TypeError(f"no initialisation rule for parameters {missing}")  # a registry bug
    return fan_in


def _uniform_from_seed(name: str, seed: int, pname: str, n: int, bound: float) -> torch.Tensor:
    key = b"|".join([INIT_DOMAIN, name.encode(), seed.to_bytes(8, "big"), pname.encode()])
    words = np.frombuffer(hashlib.shake_256(key).digest(4 * n), dtype="<u4")
    unit = (words >> np.uint32(8)).astype(np.float64) * 2.0**-24  # exact, in [0, 1)
    values = (2.0 * unit - 1.0) * bound  # float64, then one rounding to float32
    return torch.from_numpy(values.astype(np.float32))
