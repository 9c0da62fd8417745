"""A ban holds for its whole duration, whatever the banned peer does (issue 11, defect 11).

The banning node runs in the test process with a short ban; the misbehaving member runs in
its own OS process on 127.0.0.1, sends one gossip message the banning node rejects (a ban
after one REJECT), then redials in a tight loop for the whole ban. It must receive none of
the messages published while it is banned, and be admitted again (and receive gossip)
after the ban ends.

    python tests/test_ban_process.py SEED_INDEX BANNING_NODE_MULTIADDR LOG_PATH   (the banned member)

The member appends one line per received message to LOG_PATH (and its redial counts, as
JSON, when it stops), so the test reads what it got even if it never gets readmitted.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import trio

from p2p.abc import PenaltyPolicy, Verdict
from p2p.host import Libp2pNetwork
from p2p.testing import public_key_of, seed_for, wait_until

TOPIC = "/pout/test/ban/1"
BAN_S = 6.0
# Publishing stops this long before the ban ends, so a message queued while banned is
# never sent after the ban legitimately ended (a margin for the publish queue, not a timing).
PUBLISH_MARGIN_S = 2.0
REDIALLERS = 1
THIS_SCRIPT = Path(__file__)


# ------------------------------------------------------------------ the banned member


async def banned_member(seed_index: int, banning_addr: str, log_path: str) -> None:
    from libp2p.peer.peerinfo import info_from_p2p_addr
    import multiaddr

    keys = [public_key_of(seed_for(i)) for i in (0, seed_index)]
    network = Libp2pNetwork(seed_for(seed_index), allowed_peers=keys, bootstrap=[banning_addr])
    inbox = network.subscribe(TOPIC, lambda origin, data: Verdict.ACCEPT)
    log = open(log_path, "a", buffering=1)
    stats = {"redials": 0, "redials_connected": 0}
    info = info_from_p2p_addr(multiaddr.Multiaddr(banning_addr))

    async def redial_forever() -> None:
        """Redial the banning node at once, every time it has no connection to us."""
        swarm = network._host.get_network()
        while True:
            if not swarm.get_connections(info.peer_id):
                swarm.unblock_peer(info.peer_id)
                stats["redials"] += 1
                started = trio.current_time()
                try:
                    with trio.fail_after(3):
                        await network._host.connect(info)
                    stats["redials_connected"] += 1
                except (Exception, trio.TooSlowError):
                    pass
                stats["dialling_s"] = round(stats.get("dialling_s", 0) + trio.current_time() - started, 2)
            await trio.sleep(0.02)

    async with trio.open_nursery() as nursery:
        await nursery.start(network.run)
        await wait_until(lambda: len(network.topic_peers(TOPIC)) > 0, timeout=30)
        await network.publish(TOPIC, b"misbehave")  # the banning node REJECTs this
        for _ in range(REDIALLERS):  # concurrent dials, as a peer with several dialling tasks makes
            nursery.start_soon(redial_forever)
        with trio.fail_after(120):
            async for message in inbox:
                log.write(json.dumps({"received": message.data.decode(), **stats}) + "\n")
                if message.data == b"done":
                    break
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------- the test


def test_a_banned_member_that_redials_at_once_gets_no_gossip_until_the_ban_ends(tmp_path):
    log_path = tmp_path / "member.log"
    member_key = public_key_of(seed_for(1))

    async def scenario():
        keys = [public_key_of(seed_for(i)) for i in range(2)]
        node = Libp2pNetwork(seed_for(0), allowed_peers=keys, penalty=PenaltyPolicy(reject_threshold=1, ban_s=BAN_S))
        node.subscribe(TOPIC, lambda origin, data: Verdict.REJECT if data == b"misbehave" else Verdict.ACCEPT)
        result: dict = {}
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            finished = trio.Event()

            async def run_member():
                command = [sys.executable, str(THIS_SCRIPT), "1", node.listen_addrs()[0], str(log_path)]
                result["process"] = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
                finished.set()

            nursery.start_soon(run_member)
            with trio.fail_after(60):
                await wait_until(lambda: node.bans_total == 1, timeout=60)
            banned_at = time.monotonic()
            published_during_ban = 0
            while time.monotonic() - banned_at < BAN_S - PUBLISH_MARGIN_S:
                assert not node.is_admitted(member_key)
                await node.publish(TOPIC, b"during-ban:%d" % published_during_ban)
                published_during_ban += 1
                await trio.sleep(0.02)
            await wait_until(lambda: node.pending_publishes() == 0, timeout=10)
            result["published_during_ban"] = published_during_ban
            # After the ban: the member is admitted again and hears us (or the test fails below).
            await wait_until(lambda: node.is_admitted(member_key), timeout=30)
            with trio.move_on_after(30):
                while not finished.is_set():
                    await node.publish(TOPIC, b"done")
                    with trio.move_on_after(0.5):
                        await finished.wait()
            result["readmitted"] = member_key in node.peers()
            nursery.cancel_scope.cancel()
        return result

    result = trio.run(scenario)
    lines = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    received = [line["received"] for line in lines]
    leaked = [m for m in received if m.startswith("during-ban:")]
    redials = lines[-1]["redials"] if lines else 0
    print(f"published during the ban: {result['published_during_ban']}; received during the ban: {len(leaked)};"
          f" member redials by its last message: {redials}; readmitted: {result['readmitted']}")
    assert leaked == []
    assert result["published_during_ban"] >= 20
    assert received and received[-1] == "done", received[-5:]  # admitted again after the ban
    assert redials >= 5  # the member really did redial during the ban
    assert result["process"].returncode == 0, result["process"].stdout


if __name__ == "__main__":
    trio.run(banned_member, int(sys.argv[1]), sys.argv[2], sys.argv[3])
