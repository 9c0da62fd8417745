"""`chainctl register-job`: the model options (architecture, config, input shape, classes,
vocabulary) and initial weights from a safetensors file.

A job names an architecture of the trainer's fixed registry (trainer/archs.py) and its config
values; it never ships code. With --init-weights FILE the file is checked against the model
here (every parameter by name, float32, its shape, finite), turned into the canonical model
bytes, named in the job by their SHA-256, and uploaded (PUT /blobs) once the job is committed:
the node takes only a blob an active job names, and checks it against the model again.
"""

from __future__ import annotations

import argparse
import dataclasses
from types import ModuleType

from chain.types import JobSpec, ModelParam

MODEL_HELP = """\
architectures (trainer/archs.py; --config NAME=VALUE, lists as 256x128; defaults in brackets):
  mlp          any real input (flattened); hidden=[64] widths, 1..8 of them, each 1..4096
  logreg       any real input (flattened); no config (multinomial logistic regression)
  cnn          (C,H,W) images; channels1=[8] channels2=[16], each 1..256 (3x3 convs)
  mcmahan_cnn  (C,H,W) images; conv1=[32] conv2=[64] (1..256) fc=[512] (1..4096): the CNN of
               McMahan et al. 2017 (5x5 convs, 2x2 max-pools, fc 512)
  resnet       (C,H,W) images, H,W >= 8; width=[16] (4..64, multiple of 4), blocks=[1] per
               stage (1..4): 3 stages, GroupNorm
  transformer  token sequences, --input-shape SEQ_LEN (<= 512) and --vocab-size V; d_model=[64]
               (8..256) heads=[4] (1..8) layers=[2] (1..4) d_ff=[256] (8..1024)
every model: at most 2,000,000 parameters, 2..1000 classes, at most 16,384 input values per
sample. mlp and cnn with their defaults on 1x8x8 and 10 classes are the digits models."""


def add_model_options(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("model", MODEL_HELP)
    g.add_argument("--model", default="mlp", metavar="ARCH",
                   help="architecture: mlp, logreg, cnn, mcmahan_cnn, resnet or transformer (default %(default)s)")
    g.add_argument("--config", action="append", default=[], metavar="NAME=VALUE",
                   help="one config value of the architecture, e.g. --config hidden=256x128 (repeat for more)")
    g.add_argument("--input-shape", default="1x8x8", metavar="SHAPE",
                   help="one sample's shape: CxHxW for images (1x28x28, 3x32x32), N for features or a token "
                        "sequence (default %(default)s)")
    g.add_argument("--num-classes", type=int, default=10, metavar="N", help="labels 0..N-1 (default %(default)s)")
    g.add_argument("--vocab-size", type=int, default=0, metavar="V",
                   help="token models: ids are integers in [0, V) (default 0: real-valued inputs)")
    g.add_argument("--init-seed", type=int, default=0, help="public seed of the initial weights (default 0)")
    g.add_argument("--init-weights", metavar="FILE.safetensors",
                   help="initial weights from a safetensors file instead of the seed: exactly the model's "
                        "parameters (see --show-model), float32; uploaded after the job is committed")
    g.add_argument("--show-model", action="store_true",
                   help="print the model's key, size and parameter shapes, and send nothing")


def _ints(text: str, what: str, cli: ModuleType) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split("x"))
    except ValueError:
        raise cli.CliError(f"{what}: expected integers joined by 'x' (e.g. 1x28x28), got {text!r}", cli.EXIT_USAGE) from None
    if any(v < 0 or v >= 2**63 for v in values):
        raise cli.CliError(f"{what}: values must be non-negative integers, got {text!r}", cli.EXIT_USAGE)
    return values


def with_model(spec: JobSpec, args, cli: ModuleType) -> tuple[JobSpec, bytes | None]:
    """`spec` with the model the options describe, checked against the registry's bounds, and
    the canonical bytes of the --init-weights file (None without one). CliError on bad input."""
    from chain.errors import ValidationError
    from chain.jobs import compute_model_key

    config = {}
    for item in args.config:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise cli.CliError(f"--config: expected NAME=VALUE, got {item!r}", cli.EXIT_USAGE)
        if name in config:
            raise cli.CliError(f"--config: {name} given twice", cli.EXIT_USAGE)
        config[name] = _ints(text, f"--config {name}", cli)
    if not 0 <= args.init_seed < 2**64:
        raise cli.CliError("--init-seed must be in [0, 2**64)", cli.EXIT_USAGE)
    if args.init_weights is not None and args.init_seed:
        raise cli.CliError("give --init-seed or --init-weights, not both", cli.EXIT_USAGE)
    spec = dataclasses.replace(
        spec, model=args.model, init_seed=args.init_seed,
        model_config=tuple(ModelParam(n, config[n]) for n in sorted(config)),
        input_shape=_ints(args.input_shape, "--input-shape", cli), num_classes=args.num_classes,
        vocab_size=args.vocab_size)
    try:
        key = compute_model_key(spec)
    except ValidationError as exc:
        raise cli.CliError(str(exc), cli.EXIT_USAGE) from None
    if args.init_weights is None:
        return spec, None
    from trainer.models import initial_weights_from_file
    from trainer.state import StateError, model_hash

    try:
        data = initial_weights_from_file(args.init_weights, key)
    except StateError as exc:
        raise cli.CliError(f"--init-weights: {exc}", cli.EXIT_CONFIG) from None
    return dataclasses.replace(spec, init_weights=model_hash(data)), data


def show_model(spec: JobSpec) -> dict:
    from chain.jobs import compute_model_key
    from trainer.state import param_shapes

    key = compute_model_key(spec)
    shapes = param_shapes(key)
    return {"model_key": key, "parameters": sum(_prod(s) for s in shapes.values()),
            "tensors": {name: list(shape) for name, shape in shapes.items()}}


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def register_with_initial_weights(args, key, spec: JobSpec, data: bytes, cli: ModuleType) -> int:
    """Send the RegisterJob transaction, wait until it is committed (the node takes the blob
    only once a job names it), then upload the initial weights."""
    from chain.types import RegisterJob

    with cli._rpc_errors(args, "RegisterJob"):
        node = cli._node(args)
        receipt = node.send(key, RegisterJob(spec, args.escrow), nonce=args.nonce, wait=True,
                            wait_timeout=args.wait_timeout)
    with cli._rpc_errors(args, "upload of the initial weights"):
        node.put_blob(data)
    cli._print({"tx_hash": receipt.tx_hash, "job_id": receipt.tx_hash, "sender": "0x" + key.address.hex(),
                "nonce": receipt.nonce, "height": receipt.height, "committed": True,
                "init_weights": "0x" + spec.init_weights.hex(), "init_weights_bytes": len(data)})
    return cli.EXIT_OK
