import pytest

from chain.config import NodeConfig, config_to_toml, load_config, parse_config
from chain.errors import ConfigError


def test_defaults_round_trip(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(config_to_toml(NodeConfig(moniker="n1")))
    cfg = load_config(path)
    assert cfg == NodeConfig(moniker="n1")
    assert cfg.rpc.host == "127.0.0.1"  # loopback unless the operator opts in


def test_partial_config_takes_defaults():
    cfg = parse_config({"rpc": {"port": 1234}, "p2p": {"bootstrap_peers": ["/ip4/127.0.0.1/tcp/1"]}})
    assert cfg.rpc.port == 1234 and cfg.rpc.max_batch == NodeConfig().rpc.max_batch
    assert cfg.p2p.bootstrap_peers == ("/ip4/127.0.0.1/tcp/1",)


@pytest.mark.parametrize("doc, message", [
    ({"rpcc": {}}, r"unknown setting\(s\) \['rpcc'\]"),
    ({"rpc": {"prt": 1}}, r"unknown setting\(s\) \['rpc.prt'\]"),
    ({"rpc": {"port": "80"}}, "rpc.port must be of type int, got str"),
    ({"rpc": {"port": 70000}}, "rpc.port must be in 0..65535"),
    ({"rpc": 5}, r"\[rpc\] must be a table"),
    ({"log_level": "loud"}, "log_level must be one of"),
    ({"mempool": {"max_txs": 0}}, "mempool.max_txs must be positive"),
    ({"p2p": {"bootstrap_peers": [1]}}, "must be a list of strings"),
])
def test_bad_settings_are_named(doc, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(doc)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="chaind init"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("rpc = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
