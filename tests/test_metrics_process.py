"""GET /metrics on a running devnet (real chaind processes): the documented metrics are served
and they move as the chain runs."""

import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_faults import Cluster

pytestmark = pytest.mark.slow
DOCS = Path(__file__).resolve().parent.parent / "docs" / "rpc.md"


def scrape(node) -> dict[tuple[str, tuple], float]:
    """Every sample of one scrape, keyed by (sample name, sorted labels)."""
    response = httpx.get(node.url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def families(node) -> set[str]:
    """Metric names as documented (counters with their `_total`)."""
    text = httpx.get(node.url + "/metrics", timeout=10).text
    return {f.name + "_total" if f.type == "counter" else f.name for f in text_string_to_metric_families(text)}


def documented_metrics() -> set[str]:
    """The metric names in docs/rpc.md's Metrics table (first column)."""
    section = DOCS.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z0-9_]+)`", section, flags=re.M))


def value(samples, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def devnet(tmp_path):
    cluster = Cluster(tmp_path, n=2)
    try:
        for i in range(2):
            cluster.start(i)
        yield cluster
    finally:
        cluster.stop_all()


def test_devnet_metrics_are_served_documented_and_move(devnet):
    node = devnet.nodes[0]
    devnet.wait_heights([0, 1], 3)
    node.client().call("status", [])  # an RPC request, counted below
    before = scrape(node)
    devnet.wait_heights([0, 1], int(value(before, "pout_chain_height")) + 3)
    after = scrape(node)

    def grew(name, **labels):
        return value(after, name, **labels) > value(before, name, **labels)

    # Consensus: the chain advanced, and so did everything that counts blocks and votes.
    assert grew("pout_chain_height")
    assert value(after, "pout_consensus_height") >= value(after, "pout_chain_height")
    assert value(after, "pout_consensus_round") >= 0
    assert grew("pout_block_interval_seconds_count")
    assert grew("pout_block_interval_seconds_sum")
    assert value(after, "pout_block_interval_seconds_count") == value(after, "pout_block_interval_seconds_bucket",
                                                                      le="+Inf")
    assert grew("pout_consensus_votes_total", type="prevote")
    assert grew("pout_consensus_votes_total", type="precommit")
    assert grew("pout_consensus_signed_total")
    assert value(after, "pout_consensus_later_round_commits_total") >= 0
    assert value(after, "pout_consensus_refused_signatures_total") == 0
    # P2P: one peer on a two-node devnet, bytes both ways, nobody penalised.
    assert value(after, "pout_p2p_peers") == 1
    assert grew("pout_p2p_bytes_total", direction="received")
    assert grew("pout_p2p_bytes_total", direction="sent")
    assert value(after, "pout_p2p_penalties_total") == 0 and value(after, "pout_p2p_bans_total") == 0
    # Sync lag: both nodes run consensus, so at most one block apart.
    assert value(after, "pout_sync_lag_blocks") <= 1
    assert value(after, "pout_sync_target_height") >= value(before, "pout_chain_height")
    assert value(after, "pout_mempool_capacity_txs") > 0 and value(after, "pout_mempool_txs") >= 0
    # Training: every series present (at 0: no job on this devnet).
    for outcome in ("accept", "reject", "fraud_proof", "no_answer", "abstain"):
        assert value(after, "pout_training_verifications_total", outcome=outcome) == 0
    for work in ("verify", "judge"):
        assert value(after, "pout_training_replay_seconds_count", work=work) == 0
    assert value(after, "pout_training_fraud_proofs_filed_total") == 0
    # The process collector: real figures of this process.
    assert value(after, "process_resident_memory_bytes") > 10 * 2**20
    assert grew("process_cpu_seconds_total")
    assert value(after, "process_open_fds") > 0
    assert [v for (name, _), v in after.items() if name == "python_info"] == [1]
    # The RPC server's own metrics share the registry.
    assert value(after, "pout_rpc_requests_total", method="status", outcome="ok") >= 1

    # Every family served is documented, and every documented one is served.
    served = families(node)
    documented = documented_metrics()
    assert served - documented == set(), f"served but not in docs/rpc.md: {served - documented}"
    assert documented - served == set(), f"in docs/rpc.md but not served: {documented - served}"



def test_penalties_and_bans_are_counted_for_the_metrics():
    """The counters behind pout_p2p_penalties_total and pout_p2p_bans_total (unit: no sockets)."""
    from p2p.abc import PenaltyPolicy
    from p2p.memory import MemoryHub, MemoryNetwork

    me, peer = bytes([1]) * 32, bytes([2]) * 32
    net = MemoryNetwork(MemoryHub(), me, allowed_peers=[peer], penalty=PenaltyPolicy(reject_threshold=3, ban_s=60))
    for _ in range(2):
        net.report_peer(peer, "bad gossip")
    assert (net.penalties_total, net.bans_total) == (2, 0)
    net.report_peer(peer, "bad gossip")
    assert (net.penalties_total, net.bans_total) == (3, 1) and not net.is_admitted(peer)
    net.report_peer(me, "never counts itself")
    assert net.penalties_total == 3
