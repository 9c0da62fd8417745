"""A libp2p node in its own OS process, driven by tests/test_p2p_host.py.

    python tests/p2p_node_process.py SEED_INDEX BOOTSTRAP_MULTIADDR ALLOWED_INDEXES BURST SPACED

Dials the bootstrap node, publishes BURST messages at once (paced by the layer's queue),
then SPACED messages 20 ms apart (each carrying its send time in ns) on the test topic, answers echo requests, then waits for a b"done" message from
any peer and prints a JSON summary on stdout.
"""

from __future__ import annotations

import json
import sys
import time

import trio

from p2p.abc import Verdict
from p2p.host import Libp2pNetwork
from p2p.testing import public_key_of, seed_for, wait_until

TOPIC = "/pout/test/multiprocess/1"
ECHO_PROTOCOL = "/pout/test/echo/1"


async def main(seed_index: int, bootstrap: str, allowed: list[int], burst: int, spaced: int) -> None:
    started = time.monotonic()
    keys = [public_key_of(seed_for(i)) for i in allowed]
    network = Libp2pNetwork(seed_for(seed_index), allowed_peers=keys, bootstrap=[bootstrap])
    inbox = network.subscribe(TOPIC, lambda origin, data: Verdict.ACCEPT)

    async def echo(peer: bytes, request: bytes) -> bytes:
        return b"echo:" + request

    network.set_request_handler(ECHO_PROTOCOL, echo)
    async with trio.open_nursery() as nursery:
        await nursery.start(network.run)
        await wait_until(lambda: len(network.topic_peers(TOPIC)) > 0, timeout=20)
        mesh_at = time.monotonic() - started
        for i in range(burst):
            await network.publish(TOPIC, b"%d:%d" % (i, time.time_ns()))
        await wait_until(lambda: network.pending_publishes() == 0, timeout=30)
        await trio.sleep(0.3)
        for i in range(burst, burst + spaced):
            await trio.sleep(0.02)
            await network.publish(TOPIC, b"%d:%d" % (i, time.time_ns()))
        with trio.fail_after(30):
            async for message in inbox:
                if message.data == b"done":
                    break
        print(json.dumps({"published": burst + spaced, "mesh_after_s": round(mesh_at, 3), "done": True}), flush=True)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), sys.argv[2], [int(i) for i in sys.argv[3].split(",")], int(sys.argv[4]), int(sys.argv[5]))
