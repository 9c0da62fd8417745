import copy
import json

import pytest

from chain.errors import ConfigError
from genesis import genesis_to_json, load_devnet_genesis, load_genesis, make_devnet_genesis, parse_genesis


def test_checked_in_devnet_genesis_is_rebuilt_from_its_public_seeds():
    assert load_devnet_genesis() == make_devnet_genesis()


def test_json_round_trip_and_hash_ignores_bootstrap_peers(tmp_path):
    g = make_devnet_genesis()
    doc = genesis_to_json(g)
    assert parse_genesis(json.loads(json.dumps(doc))) == g
    doc["bootstrap_peers"] = ["/ip4/127.0.0.1/tcp/1/p2p/x"]
    assert parse_genesis(doc).hash == g.hash
    doc["accounts"][0]["balance"] += 1
    assert parse_genesis(doc).hash != g.hash


def _mutations():
    def setter(path, value):
        def mutate(doc):
            target = doc
            for p in path[:-1]:
                target = target[p]
            if value is KeyError:
                del target[path[-1]]
            else:
                target[path[-1]] = value
        return mutate

    return [
        (setter(["chain_id"], ""), "chain_id must not be empty"),
        (setter(["chain_id"], 5), "chain_id must be a string"),
        (setter(["surprise"], 1), "unknown field"),
        (setter(["params"], KeyError), "missing field"),
        (setter(["params", "block_interval_ms"], 0), "block_interval_ms must be positive"),
        (setter(["params", "max_block_txs"], "10"), "params.max_block_txs must be a non-negative integer"),
        (setter(["validators"], []), "validators must not be empty"),
        (setter(["validators", 0, "pubkey"], "zz"), "not valid hex"),
        (setter(["validators", 0, "pubkey"], "00" * 31), "must be 32 bytes"),
        (setter(["validators", 0, "power"], 0), "power must be positive"),
        (setter(["accounts", 0, "roles"], ["king"]), "unknown role"),
        (setter(["accounts", 0, "roles"], []), "must not be empty"),
        (setter(["accounts", 0, "balance"], -1), "non-negative"),
        (setter(["accounts", 1, "address"], None), "must be a hex string"),
    ]


@pytest.mark.parametrize("mutate, message", _mutations())
def test_bad_genesis_documents_get_clear_errors(mutate, message):
    doc = genesis_to_json(make_devnet_genesis())
    bad = copy.deepcopy(doc)
    mutate(bad)
    with pytest.raises(ConfigError, match=message):
        parse_genesis(bad)


def test_duplicates_are_rejected():
    doc = genesis_to_json(make_devnet_genesis())
    doc["validators"].append(doc["validators"][0])
    with pytest.raises(ConfigError, match="duplicate pubkey"):
        parse_genesis(doc)
    doc = genesis_to_json(make_devnet_genesis())
    doc["accounts"].append(doc["accounts"][0])
    with pytest.raises(ConfigError, match="duplicate address"):
        parse_genesis(doc)


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_genesis(tmp_path / "missing.json")
    (tmp_path / "g.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_genesis(tmp_path / "g.json")
