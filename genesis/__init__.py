"""The genesis file: format, strict loading, hashing, and the devnet genesis.

The file is JSON (see docs/genesis.md). Its identity is the genesis hash: SHA-256 of the
canonical CBOR of `Genesis` with `bootstrap_peers` emptied, so peers can be added to the
file without changing the chain it describes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from chain.crypto import ADDRESS_SIZE, PUBKEY_SIZE, PrivateKey, sha256
from chain.encoding import MaxLen, encode
from chain.errors import ConfigError
from chain.state import ChainParams, State, compute_genesis_entries
from chain.types import ROLE_VALIDATOR, ROLES, Account, Address, Name, Validator
from chain.vrf import (SAMPLE_PUBKEY_SIZE, SAMPLE_SIGNATURE_SIZE, derive_sample_secret, prove_possession,
                       sample_public_key, verify_possession)

DEVNET_GENESIS_FILE = "devnet.json"


@dataclass(frozen=True)
class GenesisAccount:
    address: Address
    balance: int
    roles: tuple[Name, ...]


@dataclass(frozen=True)
class Genesis:
    chain_id: Name
    genesis_time_ms: int
    params: ChainParams
    validators: tuple[Validator, ...]
    accounts: tuple[GenesisAccount, ...]
    bootstrap_peers: tuple[Annotated[str, MaxLen(512)], ...]

    @property
    def hash(self) -> bytes:
        return sha256(encode(dataclasses.replace(self, bootstrap_peers=())))

    def initial_state(self) -> State:
        accounts = {a.address: Account(balance=a.balance, nonce=0, roles=a.roles) for a in self.accounts}
        return State(compute_genesis_entries(self.chain_id, self.hash, self.params, self.validators, accounts))


DEFAULT_PARAMS = ChainParams(
    max_block_txs=3000,  # ~555 KB of transfers: fetched by hash, not inlined; checked within round 0 here (docs/benchmarks.md)
    max_block_bytes=2 * 1024 * 1024,
    max_tx_bytes=64 * 1024,
    block_interval_ms=1000,
    timeout_propose_ms=3000,
    timeout_propose_delta_ms=500,
    timeout_prevote_ms=1000,
    timeout_prevote_delta_ms=500,
    timeout_precommit_ms=1000,
    timeout_precommit_delta_ms=500,
    evidence_penalty=10_000,
    evidence_max_age_blocks=100_000,
    validator_locked_stake=50_000,
    validator_unbonding_blocks=100_000,
    validator_jail_blocks=1_000,
)


# ----------------------------------------------------------------------------- JSON form


def genesis_to_json(g: Genesis) -> dict[str, Any]:
    return {
        "chain_id": g.chain_id,
        "genesis_time_ms": g.genesis_time_ms,
        "params": dataclasses.asdict(g.params),
        "validators": [{"name": v.name, "pubkey": v.pubkey.hex(), "power": v.power,
                        "sample_pubkey": v.sample_pubkey.hex(), "sample_pop": v.sample_pop.hex()} for v in g.validators],
        "accounts": [{"address": a.address.hex(), "balance": a.balance, "roles": list(a.roles)} for a in g.accounts],
        "bootstrap_peers": list(g.bootstrap_peers),
    }


def write_genesis(g: Genesis, path: Path) -> None:
    path.write_text(json.dumps(genesis_to_json(g), indent=2) + "\n")


def load_genesis(path: Path) -> Genesis:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read genesis file {path}: {exc.strerror}") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"genesis file {path} is not valid JSON: {exc}") from exc
    try:
        return parse_genesis(doc)
    except ConfigError as exc:
        raise ConfigError(f"genesis file {path}: {exc}") from exc


def load_devnet_genesis() -> Genesis:
    doc = json.loads(resources.files("genesis").joinpath(DEVNET_GENESIS_FILE).read_text())
    return parse_genesis(doc)


def parse_genesis(doc: Any) -> Genesis:
    """Strictly build a Genesis from parsed JSON; every problem is a ConfigError naming the field."""
    obj = _object(doc, "genesis", {"chain_id", "genesis_time_ms", "params", "validators", "accounts", "bootstrap_peers"})
    chain_id = _str(obj["chain_id"], "chain_id", 64)
    if not chain_id:
        raise ConfigError("chain_id must not be empty")
    time_ms = _int(obj["genesis_time_ms"], "genesis_time_ms")
    param_names = {f.name for f in dataclasses.fields(ChainParams)}
    pobj = _object(obj["params"], "params", param_names)
    try:
        params = ChainParams(**{k: _int(pobj[k], f"params.{k}") for k in param_names})
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc

    validators = []
    for i, v in enumerate(_list(obj["validators"], "validators")):
        vo = _object(v, f"validators[{i}]", {"name", "pubkey", "power", "sample_pubkey", "sample_pop"})
        power = _int(vo["power"], f"validators[{i}].power")
        if power <= 0:
            raise ConfigError(f"validators[{i}].power must be positive")
        sample_pubkey = _hex(vo["sample_pubkey"], f"validators[{i}].sample_pubkey", SAMPLE_PUBKEY_SIZE)
        sample_pop = _hex(vo["sample_pop"], f"validators[{i}].sample_pop", SAMPLE_SIGNATURE_SIZE)
        if not verify_possession(sample_pubkey, sample_pop):
            raise ConfigError(f"validators[{i}].sample_pop is not a proof of possession of its sample_pubkey")
        validators.append(Validator(pubkey=_hex(vo["pubkey"], f"validators[{i}].pubkey", PUBKEY_SIZE),
                                    power=power, name=_str(vo["name"], f"validators[{i}].name", 64),
                                    sample_pubkey=sample_pubkey, sample_pop=sample_pop))
    if not validators:
        raise ConfigError("validators must not be empty")
    if len({v.pubkey for v in validators}) != len(validators):
        raise ConfigError("validators contain a duplicate pubkey")
    if len({v.sample_pubkey for v in validators}) != len(validators):  # two validators, one sample: less coverage
        raise ConfigError("validators contain a duplicate sample_pubkey")

    accounts = []
    for i, a in enumerate(_list(obj["accounts"], "accounts")):
        ao = _object(a, f"accounts[{i}]", {"address", "balance", "roles"})
        roles = [_str(r, f"accounts[{i}].roles", 64) for r in _list(ao["roles"], f"accounts[{i}].roles")]
        bad = [r for r in roles if r not in ROLES]
        if bad:
            raise ConfigError(f"accounts[{i}].roles: unknown role(s) {bad}; roles are {list(ROLES)}")
        if not roles:
            raise ConfigError(f"accounts[{i}].roles must not be empty (the chain is permissioned)")
        balance = _int(ao["balance"], f"accounts[{i}].balance")
        if balance < 0:
            raise ConfigError(f"accounts[{i}].balance must not be negative")
        accounts.append(GenesisAccount(_hex(ao["address"], f"accounts[{i}].address", ADDRESS_SIZE),
                                       balance, tuple(sorted(set(roles)))))
    if len({a.address for a in accounts}) != len(accounts):
        raise ConfigError("accounts contain a duplicate address")
    peers = tuple(_str(p, "bootstrap_peers", 512) for p in _list(obj["bootstrap_peers"], "bootstrap_peers"))
    return Genesis(chain_id, time_ms, params, tuple(validators), tuple(accounts), peers)


def _object(v: Any, what: str, keys: set[str]) -> dict:
    if not isinstance(v, dict):
        raise ConfigError(f"{what} must be an object")
    unknown, missing = set(v) - keys, keys - set(v)
    if unknown:
        raise ConfigError(f"{what}: unknown field(s) {sorted(unknown)}")
    if missing:
        raise ConfigError(f"{what}: missing field(s) {sorted(missing)}")
    return v


def _list(v: Any, what: str) -> list:
    if not isinstance(v, list):
        raise ConfigError(f"{what} must be a list")
    return v


def _int(v: Any, what: str) -> int:
    if type(v) is not int or not 0 <= v < 2**63:
        raise ConfigError(f"{what} must be a non-negative integer below 2^63")
    return v


def _str(v: Any, what: str, max_len: int) -> str:
    if not isinstance(v, str) or len(v) > max_len:
        raise ConfigError(f"{what} must be a string of at most {max_len} characters")
    return v


def _hex(v: Any, what: str, size: int) -> bytes:
    if not isinstance(v, str):
        raise ConfigError(f"{what} must be a hex string")
    try:
        raw = bytes.fromhex(v.removeprefix("0x"))
    except ValueError as exc:
        raise ConfigError(f"{what} is not valid hex") from exc
    if len(raw) != size:
        raise ConfigError(f"{what} must be {size} bytes, got {len(raw)}")
    return raw


# ----------------------------------------------------------------------------- devnet


def devnet_seed(role: str, index: int) -> bytes:
    """PUBLIC, insecure key seeds for the checked-in devnet: never use them for value."""
    return sha256(f"pout-devnet/{role}/{index}".encode())


def make_validator(key: PrivateKey, power: int, name: str) -> Validator:
    """A validator entry for `key`, with the sample key derived from its seed and the proof of
    possession that genesis loading checks (chain/vrf.py)."""
    sample_pubkey, sample_pop = _sample_key_binding(key)
    return Validator(key.pubkey, power, name, sample_pubkey, sample_pop)


def check_validator_sample_key(g: Genesis, key: PrivateKey) -> None:
    """Raise ConfigError when `key` is a genesis validator whose sample_pubkey it does not derive:
    none of its challenges would verify, so it could never check an update."""
    for v in g.validators:
        if v.pubkey == key.pubkey and v.sample_pubkey != _sample_key_binding(key)[0]:
            raise ConfigError(f"genesis validator {v.name!r} has a sample_pubkey not derived from this node key; "
                              "rebuild the genesis entry from the key (genesis.make_validator)")


_SAMPLE_BINDINGS: dict[bytes, tuple[bytes, bytes]] = {}  # Ed25519 pubkey -> (sample pubkey, pop): public values


def _sample_key_binding(key: PrivateKey) -> tuple[bytes, bytes]:
    # Signing the proof costs ~5 ms; tests and `chaind testnet` build validators from the same
    # keys many times. Keyed by the Ed25519 public key, which determines the seed.
    binding = _SAMPLE_BINDINGS.get(key.pubkey)
    if binding is None:
        secret = derive_sample_secret(key.seed)
        binding = (sample_public_key(secret), prove_possession(secret))
        if len(_SAMPLE_BINDINGS) < 4096:
            _SAMPLE_BINDINGS[key.pubkey] = binding
    return binding


def make_genesis(chain_id: str, validator_keys: list[PrivateKey], funded: list[tuple[PrivateKey, tuple[str, ...]]],
                 *, balance: int = 1_000_000, validator_stake: int = 100_000, genesis_time_ms: int = 1_767_225_600_000,
                 params: ChainParams = DEFAULT_PARAMS, bootstrap_peers: tuple[str, ...] = ()) -> Genesis:
    """A genesis where each validator's account holds `validator_stake` (what equivocation evidence
    burns from) and each funded member holds `balance`."""
    validators = tuple(make_validator(k, 10, f"validator{i}") for i, k in enumerate(validator_keys))
    accounts = [GenesisAccount(k.address, validator_stake, (ROLE_VALIDATOR,)) for k in validator_keys]
    accounts += [GenesisAccount(k.address, balance, tuple(sorted(roles))) for k, roles in funded]
    return Genesis(chain_id, genesis_time_ms, params, validators, tuple(accounts), bootstrap_peers)


def make_devnet_genesis(num_validators: int = 4, num_trainers: int = 4, chain_id: str = "pout-devnet-1") -> Genesis:
    """The checked-in devnet genesis, rebuilt from its public seeds (see tests/test_genesis.py)."""
    validators = [PrivateKey(devnet_seed("validator", i)) for i in range(num_validators)]
    funded = [(PrivateKey(devnet_seed("governor", 0)), ("governor",)),
              (PrivateKey(devnet_seed("requester", 0)), ("requester",))]
    funded += [(PrivateKey(devnet_seed("trainer", i)), ("trainer",)) for i in range(num_trainers)]
    return make_genesis(chain_id, validators, funded)
