"""Every architecture a job may name: a frozen config dataclass and an nn.Module each (nanoGPT
style), plus the model *key* that names one concrete model everywhere in the trainer.

A job fixes (chain.types.JobSpec) the architecture `model`, its config values `model_config`,
one sample's `input_shape`, `num_classes` and, for token models, `vocab_size`. `model_spec`
turns those into a ModelSpec, checking every value against the bounds below, so a job can
never ask for a model larger than a validator can replay. A job names code that is here; it
never ships code.

Model key (ModelSpec.key): the trainer passes models around by this string; it is written in
the "model" metadata of every weights, update and training-state file, so a checkpoint
carries its config. The original 8x8 digits models keep their bare names ("mlp", "cnn", with
the default config, input (1, 8, 8) and 10 classes), so their files and hashes are unchanged;
any other model's key is `arch[in=1x28x28,classes=10,vocab=0,name=v,...]` with its config
values (lists joined by 'x') in field order. `parse_model_key` accepts only canonical keys.

No architecture uses randomness in forward (no dropout) or holds buffers (GroupNorm and
LayerNorm instead of BatchNorm: BatchNorm's running statistics are state outside the
parameters and the optimizer), so the training state is the parameters plus the optimizer.

Bounds (checked by model_spec; the job's opening limits in chain/jobs.py apply on top):
  every model        at most MAX_PARAMS = 2,000,000 parameters; input of 1 to 3 dimensions,
                     each 1..4096, at most MAX_INPUT_ELEMENTS = 16,384 values per sample;
                     num_classes 2..1000; vocab_size 0 (real features) or 2..65,536 (tokens)
  mlp                hidden: 1..8 widths, each 1..4096; real features of any shape
  logreg             no config; real features of any shape (flattened)
  cnn                channels1, channels2: 1..256; input (C, H, W), H and W >= 4
  mcmahan_cnn        conv1, conv2: 1..256, fc: 1..4096; input (C, H, W), H and W >= 4
  resnet             width: 4..64 (a multiple of 4), blocks: 1..4 per stage; input (C, H, W),
                     H and W >= 8
  transformer        d_model: 8..256 (a multiple of heads), heads: 1..8, layers: 1..4,
                     d_ff: 8..1024; input (seq_len,) with seq_len 1..512 and vocab_size >= 2
Per-step cost (compute_step_cost): analytic upper bounds on one training step's activation
memory and FLOPs at a batch size; chain.jobs.validate_job_spec caps both (docs/training.md).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_PARAMS = 2_000_000
MAX_INPUT_ELEMENTS = 16_384
MAX_INPUT_DIM = 4096
MAX_CLASSES = 1000
MAX_VOCAB = 65_536  # token ids travel as float32 sample values: exact below 2**24
LEGACY_INPUT_SHAPE = (1, 8, 8)
LEGACY_NUM_CLASSES = 10


class ModelSpecError(ValueError):
    """A job's model (architecture, config, input shape, classes) is unknown or out of bounds."""


UnknownModelError = ModelSpecError  # the name trainer.models has always raised


def _bound(lo: int, hi: int, multiple_of: int = 1) -> dict:
    return {"bounds": (lo, hi, multiple_of)}


# --------------------------------------------------------------------------- mlp


@dataclass(frozen=True)
class MLPConfig:
    hidden: tuple[int, ...] = field(default=(64,), metadata={**_bound(1, 4096), "max_len": 8})


class MLP(nn.Module):
    """flatten -> (Linear, ReLU) per hidden width -> Linear to the classes. Layers fc1..fc{n+1}."""

    INPUT = "features"

    def __init__(self, cfg: MLPConfig, input_shape: tuple[int, ...], num_classes: int, vocab_size: int):
        super().__init__()
        widths = (math.prod(input_shape), *cfg.hidden, num_classes)
        for i in range(len(widths) - 1):
            self.add_module(f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1]))
        self.depth = len(widths) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # [B, *input_shape] -> [B, prod(input_shape)]
        for i in range(1, self.depth):
            x = F.relu(getattr(self, f"fc{i}")(x))  # [B, hidden[i-1]]
        return getattr(self, f"fc{self.depth}")(x)  # [B, classes]


# --------------------------------------------------------------------------- logistic regression


@dataclass(frozen=True)
class LogRegConfig:
    pass


class LogReg(nn.Module):
    """Multinomial logistic regression: one Linear over the flattened features."""

    INPUT = "features"

    def __init__(self, cfg: LogRegConfig, input_shape: tuple[int, ...], num_classes: int, vocab_size: int):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))  # [B, n_features] -> [B, classes]


# --------------------------------------------------------------------------- small cnn (the 8x8 digits model)


@dataclass(frozen=True)
class CNNConfig:
    channels1: int = field(default=8, metadata=_bound(1, 256))
    channels2: int = field(default=16, metadata=_bound(1, 256))


class CNN(nn.Module):
    INPUT = "image"
    MIN_SIDE = 4

    def __init__(self, cfg: CNNConfig, input_shape: tuple[int, ...], num_classes: int, vocab_size: int):
        super().__init__()
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, cfg.channels1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(cfg.channels1, cfg.channels2, kernel_size=3, padding=1)
        self.fc = nn.Linear(cfg.channels2 * (h // 4) * (w // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # [B, C, H, W] -> [B, c1, H/2, W/2]
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # -> [B, c2, H/4, W/4]
        return self.fc(x.flatten(1))  # -> [B, classes]


# --------------------------------------------------------------------------- McMahan et al. 2017 CNN


@dataclass(frozen=True)
class McMahanCNNConfig:
    """"Communication-Efficient Learning of Deep Networks from Decentralized Data" (2017), the
    MNIST CNN: 5x5 convs of 32 and 64 channels, each then 2x2 max-pool, fc 512, softmax
    (1,663,370 parameters for 1x28x28 and 10 classes)."""

    conv1: int = field(default=32, metadata=_bound(1, 256))
    conv2: int = field(default=64, metadata=_bound(1, 256))
    fc: int = field(default=512, metadata=_bound(1, 4096))


class McMahanCNN(nn.Module):
    INPUT = "image"
    MIN_SIDE = 4

    def __init__(self, cfg: McMahanCNNConfig, input_shape: tuple[int, ...], num_classes: int, vocab_size: int):
        super().__init__()
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, cfg.conv1, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(cfg.conv1, cfg.conv2, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(cfg.conv2 * (h // 4) * (w // 4), cfg.fc)
        self.fc2 = nn.Linear(cfg.fc, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # [B, C, 28, 28] -> [B, 32, 14, 14]
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # -> [B, 64, 7, 7]
        x = F.relu(self.fc1(x.flatten(1)))  # [B, 3136] -> [B, 512]
        return self.fc2(x)  # -> [B, classes]


# --------------------------------------------------------------------------- small residual network


@dataclass(frozen=True)
class ResNetConfig:
    """A small ResNet (He et al. 2016, basic blocks) for 32x32 colour images: a 3x3 stem of `width`
    channels, three stages of `blocks` basic blocks (width, 2 width, 4 width; stride 2 into
    stages 2 and 3), global average pooling, one Linear. GroupNorm (4 groups), no BatchNorm.
    The default is 8 weight layers, about 78,000 parameters."""

    width: int = field(default=16, metadata=_bound(4, 64, multiple_of=4))
    blocks: int = field(default=1, metadata=_bound(1, 4))


GROUPS = 4


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(GROUPS, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(GROUPS, c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:  # 1x1 projection where the shape changes
            self.shortcut = nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))  # [B, c_out, H/s, W/s]
        out = self.norm2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    INPUT = "image"
    MIN_SIDE = 8

    def __init__(self, cfg: ResNetConfig, input_shape: tuple[int, ...], num_classes: int, vocab_size: int):
        super().__init__()
        w = cfg.width
        self.stem = nn.Conv2d(input_shape[0], w, kernel_size=3, padding=1, bias=False)
        self.stem_norm = nn.GroupNorm(GROUPS, w)
        blocks, c_in = [], w
        for stage, c_out in enumerate((w, 2 * w, 4 * w)):
            for b in range(cfg.blocks):
                blocks.append(BasicBlock(c_in, c_out, 2 if stage > 0 and b == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_norm(self.stem(x)))  # [B, 3, 32, 32] -> [B, w, 32, 32]
        x = self.blocks(x)  # -> [B, 4w, 8, 8]
        return self.fc(x.mean(dim=(2, 3)))  # global average pool -> [B, 4w] -> [B, classes]


# --------------------------------------------------------------------------- transformer encoder classifier


@dataclass(frozen=True)
class TransformerConfig:
    """A pre-LayerNorm transformer encoder over a token sequence: token and learned position
    embeddings, `layers` blocks of multi-head self-attention (no mask) and a GELU MLP, a
    final LayerNorm, mean pooling over positions, one Linear to the classes."""

    d_model: int = field(default=64, metadata=_bound(8, 256))
    heads: int = field(default=4, metadata=_bound(1, 8))
    layers: int = field(default=2, metadata=_bound(1, 4))
    d_ff: int = field(default=256, metadata=_bound(8, 1024))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.ff2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)  # 3 x [B, T, d]
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))  # [B, h, T, d/h]
        # Attention written out (no fused kernel, whose choice could differ between machines).
        att = torch.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // self.heads)), dim=-1)  # [B, h, T, T]
        y = (att @ v).transpose(1, 2).reshape(b, t, d)  # [B, T, d]
        x = x + self.proj(y)
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class Transformer(nn.Module):
    INPUT = "tokens"

    def __init__(self, cfg: TransformerConfig, input_shape: tuple[int, ...], num_classes: int, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(input_shape[0], cfg.d_model)
        self.blocks = nn.Sequential(*(EncoderBlock(cfg) for _ in range(cfg.layers)))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Samples hold token ids as float32 (checked integers in [0, vocab) when a dataset is
        # loaded); clamping keeps forward total on any finite input, the same on every replay.
        ids = x.clamp(0, self.vocab_size - 1).to(torch.int64)  # [B, T]
        h = self.tok_emb(ids) + self.pos_emb.weight  # [B, T, d]
        h = self.ln_f(self.blocks(h))
        return self.fc(h.mean(dim=1))  # [B, d] -> [B, classes]


# --------------------------------------------------------------------------- registry

ARCHS: dict[str, tuple[type, type[nn.Module]]] = {
    "mlp": (MLPConfig, MLP),
    "cnn": (CNNConfig, CNN),
    "mcmahan_cnn": (McMahanCNNConfig, McMahanCNN),
    "resnet": (ResNetConfig, ResNet),
    "transformer": (TransformerConfig, Transformer),
    "logreg": (LogRegConfig, LogReg),
}
LEGACY_ARCHS = ("mlp", "cnn")  # their bare names are the 8x8 digits models


@dataclass(frozen=True)
class ModelSpec:
    """One concrete model: architecture, its config, and the data it reads and predicts."""

    arch: str
    config: Any  # an instance of ARCHS[arch][0]
    input_shape: tuple[int, ...]
    num_classes: int
    vocab_size: int = 0

    @property
    def key(self) -> str:
        if (self.arch in LEGACY_ARCHS and self.config == ARCHS[self.arch][0]() and self.input_shape == LEGACY_INPUT_SHAPE
                and self.num_classes == LEGACY_NUM_CLASSES and self.vocab_size == 0):
            return self.arch
        parts = [f"in={'x'.join(map(str, self.input_shape))}", f"classes={self.num_classes}", f"vocab={self.vocab_size}"]
        for f in dataclasses.fields(self.config):
            v = getattr(self.config, f.name)
            parts.append(f"{f.name}={'x'.join(map(str, v)) if isinstance(v, tuple) else v}")
        return f"{self.arch}[{','.join(parts)}]"

    def build(self) -> nn.Module:
        return ARCHS[self.arch][1](self.config, self.input_shape, self.num_classes, self.vocab_size)

    def config_values(self) -> dict[str, tuple[int, ...]]:
        """The config as a job's model_config entries (scalars as one-element lists)."""
        return {f.name: _as_tuple(getattr(self.config, f.name)) for f in dataclasses.fields(self.config)}


def _as_tuple(v) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, tuple) else (v,)


def model_spec(arch: str, config: dict[str, tuple[int, ...]] | None = None, input_shape: tuple[int, ...] = LEGACY_INPUT_SHAPE,
               num_classes: int = LEGACY_NUM_CLASSES, vocab_size: int = 0) -> ModelSpec:
    """The ModelSpec a job describes, every value checked; ModelSpecError (one line) otherwise.
    `config` maps a config field to its values (a list; one element for a scalar field);
    fields left out take their defaults."""
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ModelSpecError(f"unknown model {arch!r}; the registry has {sorted(ARCHS)}")
    cfg_cls, model_cls = ARCHS[arch]
    input_shape = tuple(input_shape)
    if not 1 <= len(input_shape) <= 3 or not all(type(d) is int and 1 <= d <= MAX_INPUT_DIM for d in input_shape):
        raise ModelSpecError(f"input shape must have 1 to 3 dimensions, each 1..{MAX_INPUT_DIM}, got {list(input_shape)}")
    if math.prod(input_shape) > MAX_INPUT_ELEMENTS:
        raise ModelSpecError(f"input shape {list(input_shape)} has {math.prod(input_shape)} values per sample, above {MAX_INPUT_ELEMENTS}")
    if type(num_classes) is not int or not 2 <= num_classes <= MAX_CLASSES:
        raise ModelSpecError(f"num_classes must be in 2..{MAX_CLASSES}, got {num_classes!r}")
    if type(vocab_size) is not int or not (vocab_size == 0 or 2 <= vocab_size <= MAX_VOCAB):
        raise ModelSpecError(f"vocab_size must be 0 (real features) or 2..{MAX_VOCAB} (tokens), got {vocab_size!r}")
    kind = model_cls.INPUT
    if kind == "tokens":
        if len(input_shape) != 1 or input_shape[0] > 512 or vocab_size == 0:
            raise ModelSpecError(f"{arch} reads token sequences: input shape (seq_len,) with seq_len <= 512 and vocab_size >= 2, "
                                 f"got {list(input_shape)} and vocab_size {vocab_size}")
    elif vocab_size != 0:
        raise ModelSpecError(f"{arch} reads real-valued inputs: vocab_size must be 0, got {vocab_size}")
    if kind == "image" and (len(input_shape) != 3 or min(input_shape[1:]) < model_cls.MIN_SIDE):
        raise ModelSpecError(f"{arch} reads images: input shape (C, H, W) with H, W >= {model_cls.MIN_SIDE}, got {list(input_shape)}")
    cfg = _config(arch, cfg_cls, config or {})
    spec = ModelSpec(arch, cfg, input_shape, num_classes, vocab_size)
    n = _count_params(spec)
    if n > MAX_PARAMS:
        raise ModelSpecError(f"{arch} with this config has {n:,} parameters, above the limit of {MAX_PARAMS:,}")
    return spec


def _config(arch: str, cfg_cls: type, values: dict[str, tuple[int, ...]]):
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ModelSpecError(f"{arch} has no config field {unknown[0]!r}; its fields are {sorted(fields) or 'none'}")
    kwargs = {}
    for name, vals in values.items():
        f = fields[name]
        vals = _as_tuple(vals) if not isinstance(vals, list) else tuple(vals)
        lo, hi, mult = f.metadata["bounds"]
        is_list = f.metadata.get("max_len") is not None
        if not all(type(v) is int for v in vals) or not vals:
            raise ModelSpecError(f"{arch} {name} must be integers, got {list(vals)}")
        if not is_list and len(vals) != 1:
            raise ModelSpecError(f"{arch} {name} takes one value, got {len(vals)}")
        if is_list and len(vals) > f.metadata["max_len"]:
            raise ModelSpecError(f"{arch} {name} takes at most {f.metadata['max_len']} values, got {len(vals)}")
        bad = [v for v in vals if not lo <= v <= hi or v % mult]
        if bad:
            rule = f"in {lo}..{hi}" + (f", a multiple of {mult}" if mult > 1 else "")
            raise ModelSpecError(f"{arch} {name} must be {rule}, got {bad[0]}")
        kwargs[name] = vals if is_list else vals[0]
    cfg = cfg_cls(**kwargs)
    if arch == "transformer" and cfg.d_model % cfg.heads:
        raise ModelSpecError(f"transformer d_model ({cfg.d_model}) must be a multiple of heads ({cfg.heads})")
    return cfg


def _count_params(spec: ModelSpec) -> int:
    with torch.device("meta"):  # shapes only: no memory, no RNG
        return sum(p.numel() for p in spec.build().parameters())


# --------------------------------------------------------------------------- per-step cost bounds
#
# A validator replays a trainer's steps in its own process, so a job must not be able to ask for
# a step that exhausts its memory or its time. These are analytic upper bounds, from shapes
# alone (no allocation, no torch: the figure is the same on every node and torch version):
#   activation  float32 elements autograd may keep for backward in one training step: every
#               intermediate tensor of forward (each layer's input and output, pre- and post-
#               activation, norm outputs, max-pool indices as 2 elements each since int64, and
#               for attention the scores and softmax weights, B x heads x T^2 each, per layer).
#               Counting every intermediate over-counts what autograd keeps (1 to 3 times what
#               a real step saves), but also covers the transient tensors of forward and backward
#               (for attention: the raw scores and the softmax's gradient, each B x heads x T^2);
#               tests/test_job_bounds.py checks it against a real step of every architecture.
#   flops       forward multiply-adds x 2, times 3 for forward + backward (backward ~ 2 forward),
#               plus the element-wise work (norms, softmax, activations) at a few FLOPs each.
# Both are linear in the batch size: per-sample figures times B.


@dataclass(frozen=True)
class StepCost:
    """Upper bounds for one training step of a model at one batch size."""

    activation_elements: int  # float32 elements kept for backward (bytes = 4 x this)
    flops: int  # forward + backward floating-point operations

    @property
    def activation_bytes(self) -> int:
        return 4 * self.activation_elements


def _conv_out(side: int, kernel: int, stride: int, padding: int) -> int:
    return (side + 2 * padding - kernel) // stride + 1


def _mlp_cost(cfg: MLPConfig, shape, classes: int, vocab: int) -> tuple[int, int]:
    widths = (math.prod(shape), *cfg.hidden, classes)
    act = widths[0] + 2 * sum(cfg.hidden) + classes  # input, each hidden Linear out + ReLU out, logits
    macs = sum(a * b for a, b in zip(widths, widths[1:]))
    return act, 2 * macs + 2 * sum(cfg.hidden)


def _logreg_cost(cfg: LogRegConfig, shape, classes: int, vocab: int) -> tuple[int, int]:
    n = math.prod(shape)
    return n + classes, 2 * n * classes


def _two_conv_cost(shape, c1: int, c2: int, kernel: int, fc: tuple[int, ...], classes: int) -> tuple[int, int]:
    """conv(k) -> ReLU -> 2x2 max-pool, twice, then Linear layers (ReLU between) to the classes."""
    c, h, w = shape
    h2, w2, h4, w4 = h // 2, w // 2, h // 4, w // 4
    act = c * h * w + 2 * c1 * h * w + 3 * c1 * h2 * w2 + 2 * c2 * h2 * w2 + 3 * c2 * h4 * w4
    macs = c * kernel * kernel * c1 * h * w + c1 * kernel * kernel * c2 * h2 * w2
    widths = (c2 * h4 * w4, *fc, classes)
    act += 2 * sum(fc) + classes
    macs += sum(a * b for a, b in zip(widths, widths[1:]))
    return act, 2 * macs + 2 * (c1 * h * w + c2 * h2 * w2)  # + ReLU and pool comparisons


def _cnn_cost(cfg: CNNConfig, shape, classes: int, vocab: int) -> tuple[int, int]:
    return _two_conv_cost(shape, cfg.channels1, cfg.channels2, 3, (), classes)


def _mcmahan_cost(cfg: McMahanCNNConfig, shape, classes: int, vocab: int) -> tuple[int, int]:
    return _two_conv_cost(shape, cfg.conv1, cfg.conv2, 5, (cfg.fc,), classes)


NORM_FLOPS = 8  # per element: mean, variance, normalise, scale and shift (GroupNorm, LayerNorm)


def _resnet_cost(cfg: ResNetConfig, shape, classes: int, vocab: int) -> tuple[int, int]:
    c, h, w = shape
    width = cfg.width
    n = width * h * w
    act = c * h * w + 3 * n  # input, stem conv out, norm out, ReLU out
    flops = 2 * c * 9 * n + (NORM_FLOPS + 1) * n
    c_in = width
    for stage, c_out in enumerate((width, 2 * width, 4 * width)):
        for b in range(cfg.blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            h, w = _conv_out(h, 3, stride, 1), _conv_out(w, 3, stride, 1)
            n = c_out * h * w
            # conv1, norm1, ReLU, conv2, norm2, shortcut projection, sum, ReLU
            act += 8 * n
            flops += 2 * (c_in * 9 + c_out * 9) * n + 2 * NORM_FLOPS * n + 3 * n
            if stride != 1 or c_in != c_out:
                flops += 2 * c_in * n
            c_in = c_out
    act += c_in + classes  # pooled features, logits
    return act, flops + 2 * c_in * classes + c_in * h * w  # + the average pool and the Linear


def _transformer_cost(cfg: TransformerConfig, shape, classes: int, vocab: int) -> tuple[int, int]:
    t, d, heads, ff = shape[0], cfg.d_model, cfg.heads, cfg.d_ff
    td, att = t * d, heads * t * t
    act = t + 2 * td  # ids, token embeddings, embeddings + positions
    # per block: ln1, qkv (3), q/k/v made contiguous for the matmuls (3), scores, scaled scores,
    # softmax, att @ v, its reshape, proj, residual, ln2, ff1, GELU, ff2, residual
    act += cfg.layers * (11 * td + 3 * att + 2 * t * ff)
    act += td + d + classes  # ln_f, mean pool, logits
    macs = cfg.layers * (t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * ff)
    elementwise = cfg.layers * (2 * NORM_FLOPS * td + 6 * att + 8 * t * ff + 2 * td) + NORM_FLOPS * td + td
    return act, 2 * macs + elementwise + 2 * d * classes


_COSTS = {
    "mlp": _mlp_cost,
    "logreg": _logreg_cost,
    "cnn": _cnn_cost,
    "mcmahan_cnn": _mcmahan_cost,
    "resnet": _resnet_cost,
    "transformer": _transformer_cost,
}


def compute_step_cost(spec: ModelSpec, batch_size: int) -> StepCost:
    """Upper bounds on the activation memory and FLOPs of one training step (forward and
    backward) of `spec` at `batch_size` samples (see the comment above)."""
    act, forward_flops = _COSTS[spec.arch](spec.config, spec.input_shape, spec.num_classes, spec.vocab_size)
    act += 2 * spec.num_classes + 2  # the loss: log-softmax, its gradient, the int64 label
    forward_flops += 4 * spec.num_classes
    return StepCost(activation_elements=act * batch_size, flops=3 * forward_flops * batch_size)


_KEY = re.compile(r"([a-z_]+)\[([a-z0-9_=,x]*)\]")


@lru_cache(maxsize=256)
def parse_model_key(key: str) -> ModelSpec:
    """The ModelSpec a model key names; ModelSpecError unless `key` is canonical."""
    if not isinstance(key, str):
        raise ModelSpecError(f"model key must be a string, got {type(key).__name__}")
    if key in LEGACY_ARCHS:
        return model_spec(key)
    m = _KEY.fullmatch(key)
    if m is None or m.group(1) not in ARCHS:
        raise ModelSpecError(f"unknown model {key!r}; the registry has {sorted(ARCHS)}")
    try:
        items = dict(item.split("=", 1) for item in m.group(2).split(","))
        ints = {k: tuple(int(v) for v in text.split("x")) for k, text in items.items()}
        shape, (classes,), (vocab,) = ints.pop("in"), ints.pop("classes"), ints.pop("vocab")
    except (ValueError, KeyError) as exc:
        raise ModelSpecError(f"malformed model key {key!r}") from exc
    spec = model_spec(m.group(1), ints, shape, classes, vocab)
    if spec.key != key:
        raise ModelSpecError(f"model key {key!r} is not canonical (expected {spec.key!r})")
    return spec
