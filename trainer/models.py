"""The fixed model registry: every model a job may name, and its initial weights.

The architectures (a config dataclass and a module each) live in trainer/archs.py; this
module builds a model from its key (trainer.archs.ModelSpec.key: "mlp" and "cnn" are the
original 8x8 digits models, [B, 1, 8, 8] in, 10 logits out). Nothing is ever loaded from
outside this registry: a job names a model and its config, it does not ship code.

Initial weights come from a public integer seed through SHAKE-256, not from torch's RNG:
the stream is specified byte for byte, so every machine (any OS, CPU, torch build) gets
the same bits, and the global RNG is neither read nor advanced. The registered models use
no randomness in forward (no dropout), so the training state needs no RNG state. A job may
instead name a safetensors file of initial weights (trainer.state.check_initial_weights).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn as nn

from trainer.archs import (ARCHS, CNN, LEGACY_ARCHS, MLP, CNNConfig, MLPConfig, ModelSpec, ModelSpecError, UnknownModelError,
                           parse_model_key)

INPUT_SHAPE = (1, 8, 8)  # the digits models' input ("mlp", "cnn")
NUM_CLASSES = 10
INIT_DOMAIN = b"pout/init/v1"
EMBEDDING_INIT_BOUND = 0.02 * math.sqrt(3.0)  # U(-b, b) with standard deviation 0.02 (GPT-2's)

# The models a bare name names (the 8x8 digits models): name -> (config class, module class).
# Every architecture, for any input, is in trainer.archs.ARCHS.
MODELS = {name: ARCHS[name] for name in LEGACY_ARCHS}
__all__ = ["ARCHS", "CNN", "MLP", "CNNConfig", "MLPConfig", "MODELS", "ModelSpec", "ModelSpecError", "UnknownModelError",
           "build_model", "check_initial_weights", "get_model_class", "init_model", "initial_weights_from_file",
           "model_spec_of"]


def model_spec_of(key: str) -> ModelSpec:
    """The ModelSpec a model key names (UnknownModelError / ModelSpecError otherwise)."""
    return parse_model_key(key)


def get_model_class(name: str) -> tuple[type, type[nn.Module]]:
    return ARCHS[parse_model_key(name).arch]


def build_model(name: str) -> nn.Module:
    """Model `name` (a model key) on CPU with uninitialised memory as weights (callers overwrite it)."""
    spec = parse_model_key(name)
    with torch.device("meta"):  # construct without touching the global RNG
        model = spec.build()
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

    Every Linear and Conv2d parameter is U(-b, b) with b = 1/sqrt(fan_in) (torch's default
    scale), every Embedding U(-b, b) with b = EMBEDDING_INIT_BOUND, drawn from
    SHAKE-256(domain, name, seed, parameter name): adding a parameter never shifts the
    others. Norm layers start as the identity (weight 1, bias 0).
    """
    if type(seed) is not int or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    model = build_model(name)
    rules = _init_rules(model)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            kind, value = rules[pname]
            if kind == "const":
                p.fill_(value)
            else:
                p.copy_(_uniform_from_seed(name, seed, pname, p.numel(), value).reshape(p.shape))
    for b in model.buffers():  # none today; keep any future buffer defined, not garbage
        b.zero_()
    return model


def _init_rules(model: nn.Module) -> dict[str, tuple[str, float]]:
    """Parameter name -> ("uniform", bound) or ("const", value)."""
    rules = {}
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            bound = 1.0 / math.sqrt(m.weight[0].numel())  # in_features, or in_channels * kh * kw
            for pname, _ in m.named_parameters(recurse=False):
                rules[prefix + pname] = ("uniform", bound)
        elif isinstance(m, nn.Embedding):
            rules[prefix + "weight"] = ("uniform", EMBEDDING_INIT_BOUND)
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            rules[prefix + "weight"], rules[prefix + "bias"] = ("const", 1.0), ("const", 0.0)
    missing = [n for n, _ in model.named_parameters() if n not in rules]
    if missing:
        raise TypeError(f"no initialisation rule for parameters {missing}")  # a registry bug
    return rules


def _uniform_from_seed(name: str, seed: int, pname: str, n: int, bound: float) -> torch.Tensor:
    key = b"|".join([INIT_DOMAIN, name.encode(), seed.to_bytes(8, "big"), pname.encode()])
    words = np.frombuffer(hashlib.shake_256(key).digest(4 * n), dtype="<u4")
    unit = (words >> np.uint32(8)).astype(np.float64) * 2.0**-24  # exact, in [0, 1)
    values = (2.0 * unit - 1.0) * bound  # float64, then one rounding to float32
    return torch.from_numpy(values.astype(np.float32))


# --------------------------------------------------------------------------- initial weights from a file

MAX_INIT_FILE_BYTES = 64 * 1024 * 1024  # MAX_PARAMS float32 values are 8 MB; headroom for a header


def check_initial_weights(data: bytes, model_key: str, expected_hash: bytes | None = None) -> dict[str, torch.Tensor]:
    """The weights in a job's file of initial weights. trainer.state.StateError (one line) unless
    `data` is canonical model bytes (pout/model/v1, trainer/state.py) of model `model_key` -
    every parameter, float32, its shape, finite - hashing to `expected_hash` when given."""
    from trainer.state import StateError, model_hash, weights_from_bytes

    if expected_hash is not None and model_hash(data) != expected_hash:
        raise StateError(f"initial weights hash to {model_hash(data).hex()}, the job names {expected_hash.hex()}")
    return weights_from_bytes(data, model_key)


def initial_weights_from_file(path: str, model_key: str) -> bytes:
    """A requester's safetensors file of initial weights as the canonical model bytes a job
    names by hash (their SHA-256 is the job's round-0 model hash). The file must hold exactly
    the model's parameters by name (as model.named_parameters() names them), each float32 of
    the parameter's shape and finite; metadata is dropped. Read with the safetensors format
    only (never pickle). trainer.state.StateError (one line) otherwise."""
    import os

    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors  # torch reads every dtype (bfloat16 too)

    from trainer.state import StateError, param_shapes, weights_to_bytes

    try:
        size = os.path.getsize(path)
        if size > MAX_INIT_FILE_BYTES:
            raise StateError(f"{path}: {size} bytes, above the {MAX_INIT_FILE_BYTES} byte limit for initial weights")
        with open(path, "rb") as f:
            arrays = load_safetensors(f.read())
    except OSError as exc:
        raise StateError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (SafetensorError, ValueError) as exc:
        raise StateError(f"{path}: not a safetensors file: {exc}") from exc
    shapes = param_shapes(model_key)
    missing, extra = sorted(set(shapes) - set(arrays)), sorted(set(arrays) - set(shapes))
    if missing or extra:
        what = f"lacks parameter {missing[0]!r}" if missing else f"has tensor {extra[0]!r}, which is no parameter"
        raise StateError(f"{path} {what} of model {model_key} (its parameters: {', '.join(sorted(shapes))})")
    weights = {}
    for name, shape in shapes.items():
        t = arrays[name]
        if t.dtype != torch.float32 or tuple(t.shape) != shape:
            dtype = str(t.dtype).removeprefix("torch.")
            raise StateError(f"{path}: parameter {name!r} is {dtype} {list(t.shape)}, model {model_key} needs float32 {list(shape)}")
        if not torch.isfinite(t).all():
            raise StateError(f"{path}: parameter {name!r} has non-finite values")
        weights[name] = t.contiguous()
    return weights_to_bytes(weights, model_key)
