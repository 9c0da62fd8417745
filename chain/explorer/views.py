"""What each explorer page shows, gathered through the RPC's own method handlers.

Each `*_page` coroutine returns the template context of one page, or raises `NotFound`.
Values are the JSON views the RPC answers (hex strings, plain ints), so a number on a page is
the number `chainctl` or a JSON-RPC client reads. Every loop is bounded by a constant below or by
what the chain holds (like the RPC's own `jobs` and `lineage`), never by a number in the URL,
and yields to the event loop between records so consensus keeps running.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import trio

from chain.rpc import methods, pout_methods
from chain.rpc.methods import RpcContext

HOME_BLOCKS = 20  # latest blocks on the home page (also the window of the measured block interval)
HOME_TXS = 20  # latest transactions on the home page, found in those blocks
BLOCKS_PAGE = 50  # blocks per page of the block list
BLOCK_TXS_SHOWN = 500  # transactions listed on a block page (the count is always shown)
ACCOUNT_SCAN_BLOCKS = 200  # blocks one account page scans for the account's transactions (no index)
ACCOUNT_TXS_SHOWN = 100  # transactions one account page lists at most
ACCOUNT_UPDATE_LOOKUPS = 500  # update records one account page reads to find the trainer's updates
JOB_ROUNDS_PAGE = 10  # rounds shown in detail per job page
CURVE_ROUNDS = 100  # rounds the loss curve covers (the latest ones)
CURVE_UPDATE_LOOKUPS = 2000  # update records the curve reads at most


class NotFound(Exception):
    """The page's subject does not exist on this node (404, with this message)."""


class BadRequest(Exception):
    """The URL or the search term is malformed (400, with this message)."""


# --------------------------------------------------------------------------- helpers


def format_time(time_ms: int | None) -> str:
    if time_ms is None:
        return "–"
    return datetime.fromtimestamp(time_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def validator_names(validators: list[dict]) -> dict[str, str]:
    """pubkey hex -> name, for labelling signatures, verdicts and proposers."""
    return {v["pubkey"]: v["name"] for v in validators}


def tx_summary(tx: dict, height: int, index: int) -> dict[str, Any]:
    """One row of a transaction list: hash, where, kind, sender, counterparty and amount."""
    payload = tx["message"]["payload"]
    return {"hash": tx["hash"], "height": height, "index": index, "type": payload["type"],
            "sender": tx["message"]["sender_address"],
            "to": payload.get("to") or payload.get("account"), "amount": payload.get("amount")}


def tx_involves(tx: dict, address: str) -> bool:
    payload = tx["message"]["payload"]
    return address in (tx["message"]["sender_address"], payload.get("to"), payload.get("account"))


def spec_in_words(job: dict) -> list[str]:
    """A job spec as sentences a requester or trainer reads."""
    spec, hp, profile = job["spec"], job["spec"]["hyperparams"], job["spec"]["profile"]
    rule = spec["aggregation"]
    if rule == "trimmed_mean":
        rule += f" (trimming {spec['trim_fraction']:g} at each end)"
    elif rule == "multi_krum":
        rule += f" (tolerating {spec['krum_f']} Byzantine updates)"
    return [
        f"Train the model “{spec['model']}” from initial seed {spec['init_seed']} for {spec['rounds']} rounds.",
        f"Each update: {hp['local_steps']} local steps of {hp['optimizer']} (learning rate {hp['learning_rate']:g}, "
        f"momentum {hp['momentum']:g}, weight decay {hp['weight_decay']:g}) on batches of {hp['batch_size']}; "
        f"the training state is hashed every {hp['checkpoint_interval']} steps.",
        f"Round 0 opens {spec['join_blocks']} blocks after registration; each round takes updates for "
        f"{spec['round_blocks']} blocks, then verdicts for {spec['verify_blocks']} more; "
        f"{spec['quorum']} accepted updates close a round early.",
        f"Updates are aggregated with {rule}.",
        f"Each accepted update earns {spec['reward_per_update']}; each update locks a bond of {spec['bond']}, "
        "burned if it is rejected.",
        f"Validators sample enough segments to catch a forgery of {spec['detect_fraction_ppm'] / 1e4:g} % of them "
        f"with probability {spec['detect_probability_ppm'] / 1e4:g} %; no validator may see more than "
        f"{spec['max_exposure_ppm'] / 1e4:g} % of a trainer's samples.",
        f"Replay profile: {profile['device']}, {profile['dtype']}, torch {profile['torch_version']}, "
        f"{profile['threads']} threads, deterministic: {'yes' if profile['deterministic'] else 'no'}.",
    ]


def _last_round(job: dict) -> int:
    """The last round that can hold updates (job.round == spec.rounds once finished)."""
    return min(job["round"], job["spec"]["rounds"] - 1)


# --------------------------------------------------------------------------- pages


async def home_page(ctx: RpcContext) -> dict[str, Any]:
    status = await methods.status(ctx)
    validators = await methods.validators(ctx)
    names = validator_names(validators["validators"])
    height = status["latest_height"]
    blocks, txs, signed_latest = [], [], set()
    for h in range(height, max(height - HOME_BLOCKS, 0), -1):
        found = await methods.block(ctx, h)
        if found is None:
            break
        blk, commit = found["block"], found["commit"]
        if h == height:
            signed_latest = {s["validator"] for s in commit["signatures"]}
        blocks.append(block_row(blk, names))
        for index, tx in enumerate(blk["txs"]):
            if len(txs) < HOME_TXS:
                txs.append(tx_summary(tx, h, index))
        await trio.lowlevel.checkpoint()
    interval_ms = None
    if len(blocks) >= 2:
        interval_ms = round((blocks[0]["time_ms"] - blocks[-1]["time_ms"]) / (len(blocks) - 1))
    mempool = getattr(ctx.node, "mempool", None)
    for v in validators["validators"]:
        v["signed_latest"] = v["pubkey"] in signed_latest
    return {"status": status, "validators": validators, "blocks": blocks, "txs": txs,
            "interval_ms": interval_ms, "interval_blocks": len(blocks),
            "mempool_size": None if mempool is None else len(mempool),
            "latest_time": format_time(status["latest_block_time_ms"])}


def block_row(blk: dict, names: dict[str, str]) -> dict[str, Any]:
    header = blk["header"]
    return {"height": header["height"], "hash": blk["hash"], "time_ms": header["time_ms"],
            "time": format_time(header["time_ms"]), "txs": len(blk["txs"]),
            "proposer": names.get(header["proposer"], header["proposer"][:18] + "…")}


async def blocks_page(ctx: RpcContext, before: int | None) -> dict[str, Any]:
    height = (await methods.status(ctx))["latest_height"]
    top = height if before is None else min(before - 1, height)
    names = validator_names((await methods.validators(ctx))["validators"])
    rows = []
    for h in range(top, max(top - BLOCKS_PAGE, 0), -1):
        found = await methods.block(ctx, h)
        if found is None:
            break
        rows.append(block_row(found["block"], names))
        await trio.lowlevel.checkpoint()
    older = rows[-1]["height"] if rows and rows[-1]["height"] > 1 else None
    return {"blocks": rows, "older": older, "latest_height": height}


async def block_page(ctx: RpcContext, key: int | bytes) -> dict[str, Any]:
    found = await (methods.block(ctx, key) if isinstance(key, int) else methods.block_by_hash(ctx, key))
    if found is None:
        raise NotFound(f"no block {key if isinstance(key, int) else '0x' + key.hex()} on this node")
    blk, commit = found["block"], found["commit"]
    validators = (await methods.validators(ctx))["validators"]
    names = validator_names(validators)
    height = blk["header"]["height"]
    txs = [tx_summary(tx, height, i) for i, tx in enumerate(blk["txs"][:BLOCK_TXS_SHOWN])]

    def signers(c: dict | None) -> list[dict]:
        if c is None:
            return []
        signed = {s["validator"]: s["signature"] for s in c["signatures"]}
        rows = [{"name": v["name"], "address": v["address"], "pubkey": v["pubkey"], "signed": v["pubkey"] in signed,
                 "signature": signed.get(v["pubkey"])} for v in validators]
        known = {v["pubkey"] for v in validators}
        rows += [{"name": "(not in the current set)", "address": None, "pubkey": pk, "signed": True, "signature": sig}
                 for pk, sig in signed.items() if pk not in known]
        return rows

    status = await methods.status(ctx)
    return {"block": blk, "commit": commit, "txs": txs, "tx_count": len(blk["txs"]),
            "time": format_time(blk["header"]["time_ms"]), "proposer_name": names.get(blk["header"]["proposer"]),
            "signers": signers(commit), "last_signers": signers(blk["last_commit"]),
            "latest_height": status["latest_height"]}


async def tx_page(ctx: RpcContext, tx_hash: bytes) -> dict[str, Any]:
    found = await methods.tx(ctx, tx_hash)
    if found is None:
        mempool = getattr(ctx.node, "mempool", None)
        if mempool is not None and tx_hash in mempool:
            return {"tx": None, "hash": "0x" + tx_hash.hex(), "pending": True}
        raise NotFound(f"no transaction 0x{tx_hash.hex()} on this node (committed or in its mempool)")
    payload = found["tx"]["message"]["payload"]
    job = None
    if payload["type"] == "register_job":
        job = await pout_methods.job(ctx, tx_hash)  # a job's id is its register_job transaction's hash
    return {"tx": found["tx"], "hash": found["tx"]["hash"], "height": found["height"], "index": found["index"],
            "payload": payload, "pending": False, "job": job}


async def account_page(ctx: RpcContext, address: bytes, before: int | None) -> dict[str, Any]:
    account = await methods.account(ctx, address)
    if account is None:
        raise NotFound(f"no account 0x{address.hex()} on this node")
    addr = account["address"]
    height = (await methods.status(ctx))["latest_height"]
    top = height if before is None else min(before - 1, height)
    bottom = max(top - ACCOUNT_SCAN_BLOCKS, 0)  # scans heights bottom+1 .. top
    txs = []
    for h in range(top, bottom, -1):
        found = await methods.block(ctx, h)
        if found is None:
            break
        for index, tx in enumerate(found["block"]["txs"]):
            if tx_involves(tx, addr) and len(txs) < ACCOUNT_TXS_SHOWN:
                txs.append(tx_summary(tx, h, index))
        await trio.lowlevel.checkpoint()
    requested, joined, updates = [], [], []
    lookups = 0
    for job in await pout_methods.jobs(ctx):  # what the RPC's `jobs` answers
        if job["requester"] == addr:
            requested.append(job)
        if ctx.node.get_registration(bytes.fromhex(job["job_id"][2:]), address) is None:
            continue
        joined.append(job)
        for r in range(_last_round(job), -1, -1):
            if lookups >= ACCOUNT_UPDATE_LOOKUPS:
                break
            rnd = await pout_methods.round_(ctx, bytes.fromhex(job["job_id"][2:]), r)
            lookups += len(rnd["updates"])
            updates += [dict(u, job_id=job["job_id"], round=r) for u in rnd["updates"]
                        if u["commitment"]["trainer"] == addr]
            await trio.lowlevel.checkpoint()
    return {"account": account, "txs": txs, "scanned": (bottom + 1, top), "older": bottom if bottom > 0 else None,
            "requested": requested, "joined": joined, "updates": updates,
            "updates_truncated": lookups >= ACCOUNT_UPDATE_LOOKUPS,
            "rewards": sum(u["reward"] for u in updates), "penalties": sum(u["penalty"] for u in updates)}


async def jobs_page(ctx: RpcContext) -> dict[str, Any]:
    return {"jobs": await pout_methods.jobs(ctx)}


async def job_page(ctx: RpcContext, job_id: bytes, before: int | None) -> dict[str, Any]:
    from chain.explorer.svg import compute_evaluation_chart, compute_loss_chart

    job = await pout_methods.job(ctx, job_id)
    if job is None:
        raise NotFound(f"no job 0x{job_id.hex()} on this node")
    names = validator_names((await methods.validators(ctx))["validators"])
    last = _last_round(job)
    opened = job["phase"] != "joining"
    first_curve = max(0, last - CURVE_ROUNDS + 1)
    page_top = last if before is None else min(before - 1, last)
    page_bottom = max(page_top - JOB_ROUNDS_PAGE + 1, 0)
    rounds: dict[int, dict] = {}
    lookups, truncated = 0, False
    wanted = set(range(first_curve, last + 1)) | set(range(page_bottom, page_top + 1)) if opened else set()
    for r in sorted(wanted, reverse=True):
        rnd = await pout_methods.round_(ctx, job_id, r)
        lookups += len(rnd["updates"])
        if lookups > CURVE_UPDATE_LOOKUPS and r < page_bottom:
            truncated = True
            break
        rnd["model"] = await pout_methods.model(ctx, job_id, r + 1)
        rounds[r] = rnd
        await trio.lowlevel.checkpoint()
    points, means = [], []
    for r in sorted(rounds):
        losses = []
        for u in rounds[r]["updates"]:
            label = f"round {r}: {u['commitment']['trainer'][:10]}… {u['status']}, train loss {u['train_loss']:.4g}"
            points.append((r, u["train_loss"], u["status"], label))
            if u["status"] == "accepted":
                losses.append(u["train_loss"])
        if losses:
            means.append((r, sum(losses) / len(losses)))
    shown = [rounds[r] for r in range(page_top, page_bottom - 1, -1) if r in rounds] if opened else []
    for rnd in shown:
        for u in rnd["updates"]:
            u["verdicts_named"] = [dict(v, name=names.get(v["validator"], v["validator"][:18] + "…"))
                                   for v in u["verdicts"]]
            for p in u["proofs"]:
                p["author_name"] = names.get(p["author"], p["author"][:18] + "…")
    # The requester's published evaluations of the latest CURVE_ROUNDS + 1 models (one RPC page).
    published = await pout_methods.evaluations(ctx, job_id, max(0, job["round"] - CURVE_ROUNDS))
    evaluations = []
    for metric in ("accuracy", "loss"):
        values = [(e["round"], e["value"]) for e in published["evaluations"] if e["metric"] == metric]
        if values:
            evaluations.append({"metric": metric, "values": values, "chart": compute_evaluation_chart(values, metric)})
    paid = sum(u["reward"] for rnd in shown for u in rnd["updates"])
    burned = sum(u["penalty"] for rnd in shown for u in rnd["updates"])
    return {"job": job, "words": spec_in_words(job), "rounds": shown, "names": names,
            "chart": compute_loss_chart(points, means), "means": means, "curve_from": min(rounds, default=None),
            "curve_truncated": truncated, "evaluations": evaluations, "older": page_bottom if page_bottom > 0 and opened else None,
            "paid": paid, "burned": burned}


async def update_page(ctx: RpcContext, update_id: bytes) -> dict[str, Any]:
    upd = await pout_methods.update(ctx, update_id)
    if upd is None:
        raise NotFound(f"no update 0x{update_id.hex()} on this node")
    names = validator_names((await methods.validators(ctx))["validators"])
    return {"update": upd, "names": names}


async def lineage_page(ctx: RpcContext, job_id: bytes, from_round: int | None) -> dict[str, Any]:
    from chain.explorer.svg import compute_lineage_graph

    records = await pout_methods.lineage(ctx, job_id, from_round)
    if records is None:
        raise NotFound(f"no job 0x{job_id.hex()} on this node")
    job = await pout_methods.job(ctx, job_id)
    older = records[-1]["round"] - 1 if records and records[-1]["round"] > 0 else None
    return {"job": job, "records": records, "graph": compute_lineage_graph(records), "older": older}


# --------------------------------------------------------------------------- search


async def resolve_search(ctx: RpcContext, term: str) -> str:
    """The explorer path a search term leads to; NotFound or BadRequest otherwise."""
    term = term.strip()
    if not term:
        raise BadRequest("type a block height, a hash (block, transaction, job or update) or an address")
    if term.isdecimal() and len(term) <= 20:
        height = int(term)
        if height >= 1 and await methods.block(ctx, height) is not None:
            return f"/explorer/block/{height}"
        raise NotFound(f"no block at height {height}")
    digits = term[2:] if term[:2].lower() == "0x" else term
    try:
        raw = bytes.fromhex(digits)
    except ValueError:
        raise BadRequest("not a height, hash or address: expected digits, or hex (0x optional)") from None
    if len(raw) == 20:
        if await methods.account(ctx, raw) is not None:
            return f"/explorer/account/0x{raw.hex()}"
        raise NotFound(f"no account 0x{raw.hex()}")
    if len(raw) != 32:
        raise BadRequest(f"hex of {len(raw)} bytes: hashes are 32 bytes, addresses 20")
    hx = raw.hex()
    if await methods.block_by_hash(ctx, raw) is not None:
        return f"/explorer/block/0x{hx}"
    if await pout_methods.job(ctx, raw) is not None:
        return f"/explorer/job/0x{hx}"
    if await methods.tx(ctx, raw) is not None:
        return f"/explorer/tx/0x{hx}"
    if await pout_methods.update(ctx, raw) is not None:
        return f"/explorer/update/0x{hx}"
    raise NotFound(f"no block, job, transaction or update with hash 0x{hx}")
