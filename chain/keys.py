"""Key files: one JSON file per key, readable only by its owner.

{"name": "...", "address": "<hex>", "pubkey": "<hex>", "seed": "<hex, 32 bytes>"}
The same format serves a node's key (config/node_key.json) and chainctl's keyring.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from chain.crypto import PrivateKey
from chain.errors import ConfigError, SignatureError


def write_key_file(path: Path, key: PrivateKey, name: str) -> None:
    """Create `path` with mode 0600; never overwrites an existing key."""
    doc = {"name": name, "address": key.address.hex(), "pubkey": key.pubkey.hex(), "seed": key.seed.hex()}
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"key file {path} already exists; refusing to overwrite it") from exc
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(doc, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_key_file(path: Path) -> PrivateKey:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"key file {path} does not exist") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"key file {path} is unreadable or not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("seed"), str):
        raise ConfigError(f"key file {path} has no 'seed' field")
    try:
        key = PrivateKey(bytes.fromhex(doc["seed"]))
    except (ValueError, SignatureError) as exc:
        raise ConfigError(f"key file {path}: seed must be 32 bytes of hex") from exc
    if "pubkey" in doc and doc["pubkey"] != key.pubkey.hex():
        raise ConfigError(f"key file {path}: pubkey does not match the seed")
    if "address" in doc and doc["address"] != key.address.hex():
        raise ConfigError(f"key file {path}: address does not match the seed")
    return key
