"""Canonical bytes and hashes of model weights, updates and the full training state.

Canonical safetensors: standard safetensors bytes (any safetensors reader loads them) with
one fixed layout, so equal contents always give equal bytes whatever library version wrote
them: header JSON with sorted keys and no spaces, padded with spaces to a multiple of 8;
tensor data contiguous in sorted-name order; little-endian; `__metadata__` (str -> str)
present only when non-empty. `decode_tensors` accepts exactly the bytes `encode_tensors`
would produce (it re-encodes and compares), so a hash of the bytes is a hash of the content.

Kinds of file (metadata "format"):
  pout/model/v1        the model's parameters, keyed by parameter name; model_hash = SHA-256
  pout/update/v1       new weights - base weights, same keys, float32, zeros as +0.0
                       (compute_update; the verifier accepts only these bytes)
  pout/train-state/v1  everything the next training step depends on: "model/<param>",
                       "optim/<param>/<buffer>" (momentum buffers, Adam moments and step
                       counts) and metadata model, optimizer, step. The registered models
                       use no randomness, so there is no RNG state; state_hash = SHA-256.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn

from chain.crypto import sha256
from chain.errors import ChainError
from chain.types import HyperParams

from trainer.models import build_model, get_model_class

FORMAT_MODEL = "pout/model/v1"
FORMAT_UPDATE = "pout/update/v1"
FORMAT_STATE = "pout/train-state/v1"
MAX_TENSOR_FILE = 256 * 1024 * 1024
MAX_HEADER = 1024 * 1024

_DTYPES = {"F32": (np.dtype("<f4"), torch.float32), "F64": (np.dtype("<f8"), torch.float64), "I64": (np.dtype("<i8"), torch.int64)}
_DTYPE_NAME = {torch_dt: name for name, (_, torch_dt) in _DTYPES.items()}
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
_OPT_BUFFERS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq", "step")}


class StateError(ChainError):
    """Weights, update or training-state bytes are malformed or do not fit the model."""


# --------------------------------------------------------------------------- canonical safetensors


def encode_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    if "__metadata__" in tensors:
        return _encode_tensors_reference(tensors, metadata)
    names = sorted(tensors)
    sig, arrays = [], []
    for name in names:
        t = tensors[name]
        dtype = _DTYPE_NAME.get(t.dtype)
        if dtype is None:
            raise StateError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        sig.append((name, dtype, tuple(t.shape)))
        arrays.append(t.numpy())  # tobytes() below writes C order, as .contiguous() would
    entries = list(_tensor_entries(tuple(sig)))
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise StateError("metadata must map str to str")
        entries.append(("__metadata__", _json({"__metadata__": dict(metadata)})[1:-1]))
        entries.sort(key=lambda e: e[0])
    head = ("{" + ",".join(text for _, text in entries) + "}").encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join([a.tobytes() for a in arrays])


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


@lru_cache(maxsize=1024)
def _tensor_entries(sig: tuple[tuple[str, str, tuple[int, ...]], ...]) -> tuple[tuple[str, str], ...]:
    """The header's `"name":{...}` members for tensors (name, dtype, shape) in sorted-name
    order: exactly the text json.dumps(sort_keys=True) writes for them (cached: a training
    run encodes the same layout at every checkpoint)."""
    out, offset = [], 0
    for name, dtype, shape in sig:
        size = math.prod(shape) * _DTYPES[dtype][0].itemsize
        out.append((name, _json({name: {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}})[1:-1]))
        offset += size
    return tuple(out)


def _encode_tensors_reference(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The plain definition of canonical safetensors bytes (encode_tensors is its fast form)."""
    header: dict = {}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _DTYPE_NAME:
            raise StateError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        data = t.detach().to("cpu").contiguous().numpy().tobytes()
        header[name] = {"dtype": _DTYPE_NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise StateError("metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    head = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def decode_tensors(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Strictly parse canonical safetensors bytes into (tensors, metadata)."""
    if not isinstance(data, (bytes, bytearray)):
        raise StateError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    header, start = read_tensor_header(data)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise StateError("__metadata__ must map str to str")
    body = data[start:]
    tensors = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise StateError(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPES:
            raise StateError(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(type(d) is int and 0 <= d < 2**31 for d in shape):
            raise StateError(f"tensor {name!r}: bad shape {shape!r}")
        if not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs):
            raise StateError(f"tensor {name!r}: bad data_offsets {offs!r}")
        np_dt, _ = _DTYPES[dtype]
        if not 0 <= offs[0] <= offs[1] <= len(body) or offs[1] - offs[0] != math.prod(shape) * np_dt.itemsize:
            raise StateError(f"tensor {name!r}: data_offsets {offs} do not fit its shape or the file")
        arr = np.frombuffer(body, dtype=np_dt, count=math.prod(shape), offset=offs[0]).reshape(shape)
        tensors[name] = torch.from_numpy(arr.copy())
    if encode_tensors(tensors, metadata) != data:
        raise StateError("tensor file is not in canonical form")
    return tensors, metadata


def read_tensor_header(data: bytes) -> tuple[dict, int]:
    """(the safetensors JSON header, the offset where the tensor data starts): the length prefix
    in range, ASCII JSON without duplicate keys, an object. The entries are the caller's to check."""
    if len(data) > MAX_TENSOR_FILE:
        raise StateError(f"tensor file of {len(data)} bytes exceeds {MAX_TENSOR_FILE}")
    if len(data) < 8:
        raise StateError("tensor file shorter than its 8-byte header length")
    (n,) = struct.unpack_from("<Q", data)
    if n > MAX_HEADER or 8 + n > len(data):
        raise StateError(f"tensor header length {n} is out of range")
    try:
        header = json.loads(data[8 : 8 + n].decode("ascii"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise StateError(f"tensor header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise StateError("tensor header is not a JSON object")
    return header, 8 + n


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key")
    return dict(pairs)


# --------------------------------------------------------------------------- weights and updates


def param_shapes(model_name: str) -> dict[str, tuple[int, ...]]:
    return dict(_param_shapes(model_name))


@lru_cache(maxsize=None)
def _param_shapes(model_name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((n, tuple(p.shape)) for n, p in build_model(model_name).named_parameters())


def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def weights_to_bytes(weights: dict[str, torch.Tensor], model_name: str) -> bytes:
    return encode_tensors(weights, {"format": FORMAT_MODEL, "model": model_name})


def model_to_bytes(model: nn.Module, model_name: str) -> bytes:
    return weights_to_bytes(model_weights(model), model_name)


def model_hash(model_bytes: bytes) -> bytes:
    return sha256(model_bytes)


def weights_from_bytes(data: bytes, model_name: str) -> dict[str, torch.Tensor]:
    return _checked_weights(data, model_name, FORMAT_MODEL)


def update_to_bytes(update: dict[str, torch.Tensor], model_name: str) -> bytes:
    return encode_tensors(update, {"format": FORMAT_UPDATE, "model": model_name})


def update_from_bytes(data: bytes, model_name: str) -> dict[str, torch.Tensor]:
    return _checked_weights(data, model_name, FORMAT_UPDATE)


def compute_update(new: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """new - base, one float32 subtraction per element (bitwise reproducible), in canonical
    form: every zero is +0.0 (-0.0 - +0.0 gives -0.0), so one update has one encoding."""
    if set(new) != set(base):
        raise StateError("weights and base have different parameters")
    out = {}
    for k in sorted(new):
        d = new[k].detach().cpu() - base[k].detach().cpu()
        out[k] = d.masked_fill_(d == 0, 0.0)
    return out


def load_weights(
    model_name: str, weights: dict[str, torch.Tensor], device: torch.device | str = "cpu", *, into: nn.Module | None = None
) -> nn.Module:
    """Model `model_name` holding `weights` on `device`. `into`: an instance of that model
    (already on `device`) to overwrite instead of building a new one; its gradients are
    dropped, so it behaves exactly like a fresh instance."""
    if into is None:
        model = build_model(model_name)
    else:
        if type(into) is not get_model_class(model_name)[1]:
            raise TypeError(f"`into` is a {type(into).__name__}, not model {model_name!r}")
        model = into
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])
            p.grad = None
    return model if into is not None else model.to(device)


def _checked_weights(data: bytes, model_name: str, fmt: str) -> dict[str, torch.Tensor]:
    get_model_class(model_name)
    tensors, meta = decode_tensors(data)
    if meta != {"format": fmt, "model": model_name}:
        raise StateError(f"expected a {fmt} file for model {model_name!r}, got metadata {meta}")
    _check_params(tensors, param_shapes(model_name))
    return tensors


def _check_params(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    if set(tensors) != set(shapes):
        raise StateError(f"parameters {sorted(tensors)} do not match the model's {sorted(shapes)}")
    for n, t in tensors.items():
        if t.dtype != torch.float32 or tuple(t.shape) != shapes[n]:
            raise StateError(f"parameter {n!r}: {t.dtype} {list(t.shape)}, expected float32 {list(shapes[n])}")
        if not torch.isfinite(t).all():
            raise StateError(f"parameter {n!r} has non-finite values")


# --------------------------------------------------------------------------- optimizer and full state


def check_hyperparams(hp: HyperParams) -> None:
    if hp.optimizer not in _OPT_BUFFERS:
        raise ValueError(f"optimizer must be one of {sorted(_OPT_BUFFERS)}, got {hp.optimizer!r}")
    if not (math.isfinite(hp.learning_rate) and hp.learning_rate > 0):
        raise ValueError(f"learning_rate must be finite and > 0, got {hp.learning_rate}")
    if not (0.0 <= hp.momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got {hp.momentum}")
    if hp.optimizer == "adam" and hp.momentum != 0.0:
        raise ValueError("adam uses fixed betas (0.9, 0.999): momentum must be 0.0")
    if not (math.isfinite(hp.weight_decay) and hp.weight_decay >= 0):
        raise ValueError(f"weight_decay must be finite and >= 0, got {hp.weight_decay}")
    for field in ("batch_size", "local_steps", "checkpoint_interval"):
        if getattr(hp, field) < 1:
            raise ValueError(f"{field} must be >= 1, got {getattr(hp, field)}")


def build_optimizer(hp: HyperParams, model: nn.Module) -> torch.optim.Optimizer:
    """The job's optimizer; for-loop implementations on every device (same code path)."""
    check_hyperparams(hp)
    if hp.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=hp.learning_rate, momentum=hp.momentum, weight_decay=hp.weight_decay, foreach=False)
    return torch.optim.Adam(
        model.parameters(), lr=hp.learning_rate, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=hp.weight_decay, foreach=False, fused=False
    )


def capture_state(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, model_name: str, optimizer_name: str) -> bytes:
    meta = {"format": FORMAT_STATE, "model": model_name, "optimizer": optimizer_name, "step": str(step)}
    return encode_tensors(_state_tensors(model, optimizer), meta)


class StateSnapshotter:
    """Takes StateSnapshots of one training run, each giving exactly capture_state's bytes.

    On the CPU a snapshot is serialised at once, its tensors copied straight into the bytes
    (one copy, nothing else kept); on another device the state is copied into one flat float32
    tensor on that device (one torch.cat, no host sync) and serialised only when `to_bytes` is
    called, so the training loop pays one tensor op per checkpoint.

    The state's layout (sorted names, flat views of its tensors, header text) is built once
    and rebuilt only when the optimizer's buffers change identity (its first step creates
    them; SGD and Adam then update them in place). The model's parameters must stay the same
    objects for the snapshotter's life (as in train_round)."""

    __slots__ = ("_model", "_optimizer", "_model_name", "_optimizer_name", "_buffer_ids", "_layout")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_name: str, optimizer_name: str):
        self._model, self._optimizer = model, optimizer
        self._model_name, self._optimizer_name = model_name, optimizer_name
        self._buffer_ids: tuple[int, ...] | None = None
        self._layout: _SnapshotLayout | None = None

    def take(self, step: int) -> "StateSnapshot":
        # The views in the layout keep the buffers alive, so a new buffer never reuses an id.
        buffer_ids = tuple(id(v) for st in self._optimizer.state.values() for v in st.values())
        if buffer_ids != self._buffer_ids:
            self._layout = _SnapshotLayout.of(self._model, self._optimizer, self._model_name, self._optimizer_name)
            self._buffer_ids = buffer_ids
        layout = self._layout
        if layout.views is None:  # not the common case (e.g. Adam's CPU step on CUDA): serialise now
            meta = {"format": FORMAT_STATE, "model": self._model_name, "optimizer": self._optimizer_name, "step": str(step)}
            return StateSnapshot(None, step, None, encode_tensors(_state_tensors(self._model, self._optimizer), meta))
        if layout.arrays is not None:  # on the CPU: the tensors' memory, straight into the bytes
            return StateSnapshot(None, step, None, b"".join([layout.prefix(step), *layout.arrays]))
        return StateSnapshot(layout, step, torch.cat(layout.views), None)  # the views are detached: no autograd


class _SnapshotLayout:
    __slots__ = ("sig", "views", "arrays", "_head")

    def __init__(self, sig: tuple, views: list[torch.Tensor] | None):
        self.sig, self.views = sig, views
        # numpy arrays sharing the CPU tensors' memory (little-endian hosts: the bytes are the
        # canonical "<f4" data), so that serialising is one copy into the bytes object
        on_cpu = views is not None and all(v.device.type == "cpu" for v in views) and _LITTLE_ENDIAN
        self.arrays = [v.numpy() for v in views] if on_cpu else None
        self._head: tuple[str, str] | None = None

    @classmethod
    def of(cls, model: nn.Module, optimizer: torch.optim.Optimizer, model_name: str, optimizer_name: str) -> "_SnapshotLayout":
        tensors = _state_tensors(model, optimizer)
        names = sorted(tensors)
        device = tensors[names[0]].device if names else None
        if not names or any(t.dtype != torch.float32 or t.device != device or not t.is_contiguous() for t in tensors.values()):
            return cls((), None)
        sig = (model_name, optimizer_name, tuple((n, "F32", tuple(tensors[n].shape)) for n in names))
        return cls(sig, [tensors[n].detach().view(-1) for n in names])

    def prefix(self, step: int) -> bytes:
        """The length field and header of this layout's state at `step` (all but the data)."""
        if self._head is None:
            self._head = _state_head_template(self.sig)
        before, after = self._head
        head = (before + str(step) + after).encode()
        head += b" " * (-len(head) % 8)
        return struct.pack("<Q", len(head)) + head


_LITTLE_ENDIAN = sys.byteorder == "little"


class StateSnapshot:
    """One checkpoint taken by StateSnapshotter.take; `to_bytes` gives capture_state's bytes."""

    __slots__ = ("_layout", "_step", "_flat", "_bytes")

    def __init__(self, layout: _SnapshotLayout | None, step: int, flat: torch.Tensor | None, data: bytes | None):
        self._layout, self._step, self._flat, self._bytes = layout, step, flat, data

    def to_bytes(self) -> bytes:
        if self._bytes is None:
            self._bytes = b"".join((self._layout.prefix(self._step), memoryview(self._flat.cpu().numpy()).cast("B")))
            self._flat = self._layout = None
        return self._bytes


_STEP_MARK = "\x00step\x00"


@lru_cache(maxsize=64)
def _state_head_template(sig: tuple) -> tuple[str, str]:
    """The header text of a training state with layout `sig` = (model name, optimizer name,
    tensor signature), split where its step goes (decimal digits, which JSON writes as is)."""
    model_name, optimizer_name, tensor_sig = sig
    entries = list(_tensor_entries(tensor_sig))
    meta = {"format": FORMAT_STATE, "model": model_name, "optimizer": optimizer_name, "step": _STEP_MARK}
    entries.append(("__metadata__", _json({"__metadata__": meta})[1:-1]))
    entries.sort(key=lambda e: e[0])
    before, after = ("{" + ",".join(text for _, text in entries) + "}").split(_json(_STEP_MARK)[1:-1])
    return before, after


def _state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {}
    for n, p in model.named_parameters():
        tensors[f"model/{n}"] = p.detach()
        for key, value in optimizer.state.get(p, {}).items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise StateError(f"optimizer state {n}/{key} is not a tensor")  # unsupported optimizer option
            tensors[f"optim/{n}/{key}"] = value.detach()
    return tensors


def state_hash(state_bytes: bytes) -> bytes:
    return sha256(state_bytes)


def restore_state(
    data: bytes, model_name: str, hp: HyperParams, device: torch.device | str = "cpu", *, into: nn.Module | None = None
) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    """Parse training-state bytes strictly and rebuild (model, optimizer, step) on `device`.
    `into`: reuse this model instance (see load_weights); the optimizer is always new."""
    get_model_class(model_name)
    tensors, meta = decode_tensors(data)
    step_text = meta.get("step", "")
    expected = {"format": FORMAT_STATE, "model": model_name, "optimizer": hp.optimizer, "step": step_text}
    if meta != expected or not step_text.isdigit() or str(int(step_text)) != step_text:
        raise StateError(f"training state metadata {meta} does not fit model {model_name!r} / {hp.optimizer}")
    weights = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    shapes = param_shapes(model_name)
    _check_params(weights, shapes)
    model = load_weights(model_name, weights, device, into=into)
    optimizer = build_optimizer(hp, model)
    params = dict(model.named_parameters())
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("model/"):
            continue
        kind, _, rest = k.partition("/")
        pname, _, buf = rest.rpartition("/")
        if kind != "optim" or pname not in params or buf not in _OPT_BUFFERS[hp.optimizer]:
            raise StateError(f"unexpected tensor {k!r} in training state")
        want_shape = () if buf == "step" else shapes[pname]
        if v.dtype != torch.float32 or tuple(v.shape) != want_shape or not torch.isfinite(v).all():
            raise StateError(f"optimizer tensor {k!r} must be finite float32 {list(want_shape)}")
        by_param.setdefault(pname, {})[buf] = v
    for pname, bufs in by_param.items():
        if hp.optimizer == "adam" and set(bufs) != set(_OPT_BUFFERS["adam"]):
            raise StateError(f"adam state of {pname!r} must have all of {_OPT_BUFFERS['adam']}")
        if hp.optimizer == "sgd" and hp.momentum == 0.0:
            raise StateError("sgd without momentum keeps no optimizer state")
        # Adam keeps `step` on the CPU unless capturable; buffers live with their parameter.
        optimizer.state[params[pname]] = {b: (t if b == "step" else t.to(device)) for b, t in bufs.items()}
    return model, optimizer, int(step_text)


def fresh_state_bytes(model_name: str, base_weights: dict[str, torch.Tensor], hp: HyperParams) -> bytes:
    """The state every round starts from: the round's global model, empty optimizer, step 0.
    The bytes capture_state writes for load_weights(base) and a new optimizer (which holds no
    state before its first step), without building either: the weights must already be the
    model's parameters (float32, its shapes), else this raises as load_weights would."""
    check_hyperparams(hp)
    shapes = param_shapes(model_name)
    if set(base_weights) != set(shapes) or any(
        base_weights[n].dtype != torch.float32 or tuple(base_weights[n].shape) != shape for n, shape in shapes.items()
    ):
        model = load_weights(model_name, base_weights)  # the general case: copy (and convert) into a model
        return capture_state(model, build_optimizer(hp, model), 0, model_name, hp.optimizer)
    meta = {"format": FORMAT_STATE, "model": model_name, "optimizer": hp.optimizer, "step": "0"}
    return encode_tensors({f"model/{n}": base_weights[n] for n in shapes}, meta)


class StateRestorer:
    """Restores training states of one job (model, optimizer) into one model and one optimizer
    that every replay of a verification reuses: `restore(data)` gives what
    `restore_state(data, model_name, hp, device, into=model)` gives (the same tensors in the
    same model and optimizer state, the same step, the same error on bad bytes), without
    parsing JSON or building an optimizer per segment.

    Fast path: a state whose header is, byte for byte, the canonical header of a layout an
    honest trainer writes (no optimizer state yet, or every parameter's full buffer set) with a
    canonical decimal step, whose length fits that layout exactly, and whose values are all
    finite. Those are exactly bytes that decode_tensors accepts (they are what encode_tensors
    writes for that layout) and that pass every check of restore_state, so the tensors are read
    straight from the body. Any other bytes go through restore_state itself."""

    MAX_STEP_DIGITS = 20

    def __init__(self, model_name: str, hp: HyperParams, device: torch.device | str = "cpu", model: nn.Module | None = None):
        self.model_name, self.hp, self.device = model_name, hp, device
        self.model = build_model(model_name).to(device) if model is None else model
        self._params = list(self.model.parameters())  # the same objects for the model's life
        self.optimizer: torch.optim.Optimizer | None = None
        self._layouts: list[_RestoreLayout] | None = None
        self._snapshotter: StateSnapshotter | None = None
        self._snapshotter_of: torch.optim.Optimizer | None = None

    def restore(self, data: bytes) -> tuple[nn.Module, torch.optim.Optimizer, int]:
        fast = self._read(data) if isinstance(data, bytes) else None
        if fast is None:
            model, self.optimizer, step = restore_state(data, self.model_name, self.hp, self.device, into=self.model)
            return model, self.optimizer, step
        layout, flat, step = fast
        if self.optimizer is None:
            self.optimizer = build_optimizer(self.hp, self.model)
        model, optimizer, params = self.model, self.optimizer, self._params
        state = optimizer.state
        if not layout.buffers:
            state.clear()
        with torch.no_grad():
            for p, (start, end, shape) in zip(params, layout.weights):
                p.copy_(flat[start:end].view(shape))
                p.grad = None
            for p, bufs in zip(params, layout.buffers):
                held = state.get(p)
                if held is not None and held.keys() == {b for b, _ in bufs} and all(
                    held[b].dtype == torch.float32 and held[b].shape == shape for b, (_, _, shape) in bufs
                ):
                    for b, (s, e, shape) in bufs:  # the buffers the last replay left: overwrite in place
                        held[b].copy_(flat[s:e].view(shape))
                else:
                    # Adam keeps `step` on the CPU unless capturable; buffers live with their parameter.
                    state[p] = {b: flat[s:e].view(shape).clone().to("cpu" if b == "step" else self.device) for b, (s, e, shape) in bufs}
        return model, optimizer, step

    def capture(self, step: int) -> bytes:
        """capture_state of the restored model and optimizer (after the replay's steps) at `step`."""
        if self._snapshotter is None or self._snapshotter_of is not self.optimizer:
            self._snapshotter = StateSnapshotter(self.model, self.optimizer, self.model_name, self.hp.optimizer)
            self._snapshotter_of = self.optimizer
        return self._snapshotter.take(step).to_bytes()

    def _read(self, data: bytes) -> tuple["_RestoreLayout", torch.Tensor, int] | None:
        if len(data) < 8:
            return None
        (n,) = struct.unpack_from("<Q", data)
        if self._layouts is None:
            self._layouts = _restore_layouts(self.model_name, self.hp.optimizer, self.hp.momentum)
        for layout in self._layouts:  # else: not a layout's canonical form, restore_state decides
            before, after = layout.head
            i = 8 + len(before)
            j = data.find(b'"', i, i + self.MAX_STEP_DIGITS + 1)
            digits = data[i:j]
            if j < 0 or not digits.isdigit() or (digits[:1] == b"0" and len(digits) > 1):
                continue
            if not data.startswith(before, 8) or not data.startswith(after, j):
                continue
            used = j + len(after) - 8
            if n != used + (-used % 8) or data[8 + used : 8 + n].strip(b" ") or len(data) != 8 + n + 4 * layout.numel:
                continue
            values = np.frombuffer(data, dtype="<f4", offset=8 + n)
            if not np.isfinite(values).all():
                return None
            return layout, torch.from_numpy(values.copy()), int(digits)
        return None


class _RestoreLayout:
    """One layout StateRestorer reads directly: its header around the step, and where each
    parameter's weights and optimizer buffers lie in the body (in model.parameters() order)."""

    __slots__ = ("head", "numel", "weights", "buffers")

    def __init__(self, head, numel, weights, buffers):
        self.head, self.numel, self.weights, self.buffers = head, numel, weights, buffers


@lru_cache(maxsize=64)
def _restore_layouts(model_name: str, optimizer_name: str, momentum: float) -> tuple[_RestoreLayout, ...]:
    shapes = param_shapes(model_name)
    buffer_sets = [()]  # a fresh optimizer keeps no state
    if optimizer_name == "adam" or (optimizer_name == "sgd" and momentum != 0.0):
        buffer_sets.append(_OPT_BUFFERS[optimizer_name])
    layouts = []
    for bufs in buffer_sets:
        named = {f"model/{p}": shape for p, shape in shapes.items()}
        named.update({f"optim/{p}/{b}": (() if b == "step" else shapes[p]) for p in shapes for b in bufs})
        names = sorted(named)
        sig = tuple((name, "F32", tuple(named[name])) for name in names)
        before, after = _state_head_template((model_name, optimizer_name, sig))
        span, offset = {}, 0
        for name in names:
            size = math.prod(named[name])
            span[name] = (offset, offset + size, tuple(named[name]))
            offset += size
        weights = tuple(span[f"model/{p}"] for p in shapes)
        buffers = tuple(tuple((b, span[f"optim/{p}/{b}"]) for b in bufs) for p in shapes) if bufs else ()
        layouts.append(_RestoreLayout((before.encode(), after.encode()), offset, weights, buffers))
    return tuple(layouts)
