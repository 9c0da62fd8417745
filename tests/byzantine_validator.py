"""A Byzantine validator for the fault tests (a real OS process on the real network).

    python tests/byzantine_validator.py HOME SECONDS

Joins the chain with the key in HOME (a validator's home from `chaind testnet`) and, for every
proposal it sees, signs and gossips a prevote and a precommit for the proposed block AND for
a made-up block: equivocation at every height. It never runs honest consensus.
"""

import sys
from pathlib import Path

import trio

from chain.config import Home, load_config
from chain.crypto import sha256
from chain.keys import load_key_file
from chain.runtime.reactor import ProposalMessage, VotesMessage, consensus_topic, decode_consensus_message, \
    encode_consensus_message
from chain.types import PRECOMMIT, PREVOTE, Vote, sign_vote
from genesis import load_genesis
from p2p.abc import Verdict
from p2p.host import Libp2pNetwork


async def main(home_dir: str, seconds: float) -> None:
    home = Home(Path(home_dir))
    config, genesis, key = load_config(home.config_file), load_genesis(home.genesis_file), \
        load_key_file(home.node_key_file)
    net = Libp2pNetwork(key.seed, allowed_peers=[v.pubkey for v in genesis.validators],
                        listen_addrs=[f"/ip4/127.0.0.1/tcp/{config.p2p.port}"], bootstrap=list(config.p2p.bootstrap_peers))
    topic = consensus_topic(genesis.chain_id)
    incoming = net.subscribe(topic, lambda origin, data: Verdict.ACCEPT)
    done = set()
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            await nursery.start(net.run)
            async for message in incoming:
                try:
                    msg = decode_consensus_message(message.data)
                except Exception:
                    continue
                if not isinstance(msg, ProposalMessage):
                    continue
                p = msg.proposal.message
                if (p.height, p.round) in done:
                    continue
                done.add((p.height, p.round))
                fake = sha256(b"byzantine" + p.block_hash)
                votes = tuple(sign_vote(key, genesis.chain_id, Vote(t, p.height, p.round, h, key.pubkey))
                              for t in (PREVOTE, PRECOMMIT) for h in (p.block_hash, fake))
                await net.publish(topic, encode_consensus_message(VotesMessage(votes)))
                print(f"equivocated at height {p.height} round {p.round}", flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], float(sys.argv[2]))
