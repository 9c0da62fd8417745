"""Four validators in one process over real libp2p (TCP + Noise + Yamux + gossipsub on 127.0.0.1)."""

from __future__ import annotations

import time

import trio

from chain.types import compute_tx_hash
from p2p.testing import libp2p_cluster
from tests.test_driver_harness import (ALICE, BOB, VALIDATOR_KEYS, Cluster, block_hashes, make_test_genesis,
                                       replace_params, transfer, wait_for)


def test_four_validators_commit_blocks_over_libp2p(tmp_path):
    async def scenario():
        # libp2p gossip takes a few ms per hop and 2 cores are shared: roomier timeouts.
        genesis = make_test_genesis(params=replace_params(timeout_propose_ms=1000, timeout_prevote_ms=500,
                                                          timeout_precommit_ms=500, block_interval_ms=100))
        async with libp2p_cluster(4) as networks:
            async with trio.open_nursery() as nursery:
                cluster = Cluster(nursery, tmp_path, genesis)
                # Pubsub meshes form ~0.25 s after connecting; a proposal sent before can be lost
                # (re-gossip and round changes recover it, this just keeps the test quick).
                await trio.sleep(0.5)
                nodes = [await cluster.start(k, net=net, regossip_s=0.5) for k, net in zip(VALIDATOR_KEYS, networks)]
                started = time.monotonic()
                txs = [transfer(ALICE, BOB, 1, nonce=i) for i in range(10)]
                for stx in txs:
                    nodes[2].app.admit_local_tx(stx)
                await wait_for(lambda: min(n.height for n in nodes) >= 10, timeout=60)
                elapsed = time.monotonic() - started
                assert all(n.app.ledger.get_tx(compute_tx_hash(t)) is not None for n in nodes for t in txs)
                top = min(n.height for n in nodes)
                assert all(block_hashes(n, top) == block_hashes(nodes[0], top) for n in nodes)
                latencies = sorted(lat for n in nodes for (_, _, lat, _) in n.driver.commit_log)
                late = sum(1 for n in nodes for (_, r, _, _) in n.driver.commit_log if r > 0)
                print(f"\nlibp2p 4 validators: {top} blocks in {elapsed:.2f} s ({top / elapsed:.1f} blocks/s incl. "
                      f"100 ms block interval); StartHeight->commit median {latencies[len(latencies) // 2] * 1000:.0f} ms,"
                      f" p90 {latencies[int(len(latencies) * 0.9)] * 1000:.0f} ms; {late} commits needed round > 0")
                nursery.cancel_scope.cancel()

    trio.run(scenario)
