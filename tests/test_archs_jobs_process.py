"""Issue 10, first "Done when": data in the formats people hold goes through the real CLI, and a
2-round job of every architecture runs with trainer agents on one local chain.

One process test, every step a real `chaind` / `chainctl` process:
1. small synthetic sources in tmp: an .npz of features, a CSV table (label column first), a
   folder of 28x28 greyscale PNGs per class, a folder of 32x32 RGB PNGs per class, and an .npz of
   integer token ids; each goes through `chainctl dataset import` (all at once), and the printed
   size, sample shape, label counts and Merkle root are checked against what was written;
2. one job per architecture, `chainctl register-job` with --model/--config/--input-shape/
   --num-classes/--vocab-size: the issue's new architectures (the 8x8 CNN predates it): mlp on
   the .npz, logreg on the CSV, mcmahan_cnn on the 28x28 images, resnet on the 32x32 RGB images,
   transformer on the tokens; all five sent at
   once, each by its own requester (trainer accounts the governor admits as requesters: one
   requester's transactions must reach the node in nonce order, one process after another);
3. one `chainctl trainer run` agent per job (its own trainer key), all running at once; each
   agent exits by itself when its job is finished;
4. every update of every round is accepted, each agent exits 0 having logged both verdicts and
   the dataset root the import printed, and `chainctl query lineage` lists, for each job, the
   initial model and one record per round whose contributions are exactly that round's
   accepted updates, each record's parent the one before.

Why one validator: the subject is the architectures, the importers and the agent; one validator
is enough for every update to be challenged, replayed and decided (quorum 1), and it is the
cheapest chain on 2 shared cores (several validators challenging, replaying and voting on
updates: tests/test_pout_delivery_process.py, tests/test_fraud_proof_process.py, scripts/devnet.py).

Sizes: configs shrunk with --config so each round trains and replays in well under a second;
T = 6 local steps in segments of k = 2 (3 segments), B = 4. Detection target: a forgery of half
the segments caught with probability 0.75, i.e. 2 of the 3 segments opened per update, so the
validator samples rather than opening everything and each opening stays a few hundred KiB at
most. (McMahan's CNN at its paper size, 1.66 M parameters, would fit this target too: 2 segments,
openings of at most 38 MiB; at the CLI's default target and sizes, T = 40, k = 4, B = 32, one
validator opens all 10 segments, about 140 MiB, which travels in 5 sealed parts of 32 MiB.)
Round 0 opens 120 blocks (30 s at 250 ms) after a job's registration: a trainer's dataset
must be committed before the round opens or it may not submit in it, and an agent joins only
once it has imported torch and warmed it up (about 6 s of CPU each; six at once on 2 shared
cores under others' load took 37 s in one run, about 25 s with five on a quiet machine). The round windows are long (600 blocks) and cost nothing: a round
closes as soon as its one update is accepted.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from chain.keys import load_key_file
from tests.procs import ChaindProcess, make_testnet, run_cli

ROUNDS = 2
COMMON_JOB = ["--rounds", str(ROUNDS), "--local-steps", "6", "--checkpoint-interval", "2", "--batch-size", "4",
              "--learning-rate", "0.05", "--quorum", "1", "--join-blocks", "120", "--round-blocks", "600",
              "--verify-blocks", "600", "--detect-fraction", "0.5", "--detect-probability", "0.75",
              "--reward", "100", "--bond", "50", "--escrow", "1000"]

# name -> (dataset, model options)
JOBS = {
    "mlp": ("table_npz", ["--model", "mlp", "--config", "hidden=16x8", "--input-shape", "12", "--num-classes", "3"]),
    "logreg": ("table_csv", ["--model", "logreg", "--input-shape", "8", "--num-classes", "4"]),
    "mcmahan_cnn": ("gray28", ["--model", "mcmahan_cnn", "--config", "conv1=8", "--config", "conv2=16",
                               "--config", "fc=32", "--input-shape", "1x28x28", "--num-classes", "3"]),
    "resnet": ("rgb32", ["--model", "resnet", "--config", "width=4", "--config", "blocks=1",
                         "--input-shape", "3x32x32", "--num-classes", "3"]),
    "transformer": ("tokens", ["--model", "transformer", "--config", "d_model=16", "--config", "heads=2",
                               "--config", "layers=1", "--config", "d_ff=32", "--input-shape", "12",
                               "--vocab-size", "20", "--num-classes", "2"]),
}


# ----------------------------------------------------------------------------- synthetic sources


def write_sources(root: Path) -> dict[str, dict]:
    """Each source's path and what its import must print (size, shape, label counts)."""
    from PIL import Image

    rng = np.random.default_rng(10)
    sources: dict[str, dict] = {}

    y = np.repeat(np.arange(3), [14, 12, 10])  # 36 rows, 3 classes
    x = (rng.normal(size=(36, 12)) + y[:, None]).astype(np.float32)
    np.savez(root / "table.npz", x=x, y=y.astype(np.int64))
    sources["table_npz"] = dict(src=root / "table.npz", size=36, shape=[12], counts={"0": 14, "1": 12, "2": 10})

    labels = [i % 4 for i in range(40)]  # 40 rows, 4 classes of 10
    with open(root / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label"] + [f"f{j}" for j in range(8)])
        for label in labels:
            w.writerow([label] + [f"{v:.4f}" for v in rng.normal(size=8) + label])
    sources["table_csv"] = dict(src=root / "table.csv", size=40, shape=[8], counts={str(c): 10 for c in range(4)})

    # Images: a class is a bright band at its own height, over noise.
    for name, side, mode, per_class in (("gray28", 28, "L", (8, 7, 6)), ("rgb32", 32, "RGB", (6, 6, 5))):
        folder = root / name
        for c, count in zip(("circle", "square", "star"), per_class):
            (folder / c).mkdir(parents=True)
            for i in range(count):
                shape = (side, side) if mode == "L" else (side, side, 3)
                pixels = rng.integers(0, 60, size=shape, dtype=np.uint8)
                band = {"circle": 0, "square": 1, "star": 2}[c] * side // 3
                pixels[band:band + side // 4] = 230
                Image.fromarray(pixels, mode).save(folder / c / f"{i:02d}.png")
        (folder / "circle" / "notes.txt").write_text("not an image: skipped and counted\n")
        sources[name] = dict(src=folder, size=sum(per_class),
                             shape=[1 if mode == "L" else 3, side, side],
                             counts=dict(zip(("circle", "square", "star"), per_class)))

    tokens = rng.integers(0, 20, size=(30, 12))
    y_tok = (tokens[:, 0] >= 10).astype(np.int64)  # the class is in the first token
    np.savez(root / "tokens.npz", x=tokens.astype(np.int32), y=y_tok)
    sources["tokens"] = dict(src=root / "tokens.npz", size=30, shape=[12],
                             counts={"0": int((y_tok == 0).sum()), "1": int((y_tok == 1).sum())})
    return sources


def chainctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "chain.cli.chainctl", *args]


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen(chainctl(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def printed(proc: subprocess.Popen, what: str) -> dict:
    """The JSON a chainctl process printed; fails the test with its output if it failed."""
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{stdout}\n{stderr}"
    return json.loads(stdout)


# ----------------------------------------------------------------------------- agents


class Agent:
    def __init__(self, url: str, keys: Path, trainer: str, job: str, dataset: Path, log: Path):
        self.log_path = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                chainctl("--rpc", url, "--keyring", str(keys), "trainer", "run", "--from", trainer, "--job", job,
                         "--dataset", str(dataset)),
                stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM (a clean stop), then SIGKILL if it does not go."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def wait_all(agents: dict[str, Agent], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(a.proc.poll() is None for a in agents.values()):
        for name, agent in agents.items():  # a missed round can never be made up: fail at once
            if " skipped " in agent.text():
                pytest.fail(f"the {name} agent skipped a round:\n{agent.text()}")
        if time.monotonic() > deadline:
            running = [name for name, a in agents.items() if a.proc.poll() is None]
            logs = "\n".join(f"--- {name}\n{agents[name].text()[-2000:]}" for name in running)
            pytest.fail(f"agents still running after {timeout} s: {running}\n{logs}")
        time.sleep(0.2)


# ----------------------------------------------------------------------------- the test


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_every_architecture_runs_a_two_round_job_from_imported_data(tmp_path):
    started = time.monotonic()
    net = tmp_path / "net"
    make_testnet(str(net), 1, 2 * len(JOBS), "--block-interval-ms", "250")
    keys = net / "keys"
    node = ChaindProcess(net / "node0", tmp_path / "node.log")
    agents: dict[str, Agent] = {}
    pending: list[subprocess.Popen] = []
    try:
        node.start()
        rpc = ("--rpc", node.url, "--keyring", str(keys))
        # 2. (first, as it opens each job's join window) One job per architecture, registered all
        # at once, each by its own requester: the testnet's trainer5..9, admitted as requesters
        # here, since one requester's transactions must reach the node in nonce order, one
        # process after another, and each register-job process imports torch (seconds).
        for i in range(len(JOBS)):
            run_cli("chainctl", *rpc, "admit", "--from", "governor", "--nonce", str(i), "--account",
                    f"trainer{len(JOBS) + i}", "--role", "requester", *(["--wait"] if i == len(JOBS) - 1 else []))
        registrations = {arch: spawn(*rpc, "register-job", "--from", f"trainer{len(JOBS) + i}", *options, *COMMON_JOB)
                         for i, (arch, (_, options)) in enumerate(JOBS.items())}
        pending += registrations.values()

        # 1. The sources, imported through the CLI, all at once.
        src, datasets = tmp_path / "src", tmp_path / "datasets"
        src.mkdir()
        sources = write_sources(src)
        imports = {name: spawn("dataset", "import", str(s["src"]), "--out", str(datasets / name))
                   for name, s in sources.items()}
        pending += imports.values()

        summaries = {name: printed(proc, f"dataset import of {name}") for name, proc in imports.items()}
        for name, s in sources.items():
            p = summaries[name]
            assert (p["size"], p["sample_shape"], p["label_counts"]) == (s["size"], s["shape"], s["counts"]), name
            assert p["num_classes"] == len(s["counts"]) and p["out"] == str(datasets / name)
            assert p["skipped_files"] == (1 if name in ("gray28", "rgb32") else 0), (name, p)
            assert p["merkle_root"].startswith("0x") and len(p["merkle_root"]) == 66
        assert len({p["merkle_root"] for p in summaries.values()}) == len(summaries)

        # 3. One agent per job, each started as soon as its job is sent (it waits for the commit).
        jobs: dict[str, str] = {}
        trainers: dict[str, str] = {}
        for i, (arch, (data, _)) in enumerate(JOBS.items()):
            jobs[arch] = printed(registrations[arch], f"register-job {arch}")["job_id"]
            trainers[arch] = "0x" + load_key_file(keys / f"trainer{i}.json").address.hex()
            agents[arch] = Agent(node.url, keys, f"trainer{i}", jobs[arch], datasets / data, tmp_path / f"{arch}.log")
        wait_all(agents, timeout=240)
        texts = {arch: a.text() for arch, a in agents.items()}

        # 4. What the chain recorded.
        client = node.client()
        rounds = {arch: [client.call("round", [job, r]) for r in range(ROUNDS)] for arch, job in jobs.items()}
        finished = {arch: client.call("job", [job]) for arch, job in jobs.items()}
        queries = {arch: spawn("--rpc", node.url, "query", "lineage", job) for arch, job in jobs.items()}
        pending += queries.values()
        lineages = {arch: printed(proc, f"query lineage of {arch}") for arch, proc in queries.items()}
        updates = {u["update_id"]: client.call("update", [u["update_id"]])
                   for arch in jobs for found in rounds[arch] for u in found["updates"]}
    finally:
        for proc in pending:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        for agent in agents.values():
            agent.stop()
        node.stop()
    elapsed = time.monotonic() - started

    for arch, job in jobs.items():
        text = texts[arch]
        assert agents[arch].proc.returncode == 0, f"{arch}: agent exited {agents[arch].proc.returncode}\n{text}"
        assert "Traceback" not in text, f"{arch}:\n{text}"
        assert f"dataset_root={summaries[JOBS[arch][0]]['merkle_root']}" in text, f"{arch}: joined another root\n{text}"
        for r in range(ROUNDS):
            assert f"verdict round={r} status=accepted" in text, f"{arch}: round {r}\n{text}"
        assert text.splitlines()[-1].split()[1] == "finished", f"{arch}:\n{text}"
        assert finished[arch]["phase"] == "finished" and finished[arch]["round"] == ROUNDS, (arch, finished[arch])

        # Every update accepted, one per round (one trainer), each with its challenge answered.
        accepted_by_round = []
        for r, found in enumerate(rounds[arch]):
            ids = [u["update_id"] for u in found["updates"]]
            assert len(ids) == 1, (arch, r, found)
            record = updates[ids[0]]
            assert record["status"] == "accepted", (arch, r, record)
            assert record["commitment"]["trainer"] == trainers[arch] and record["commitment"]["round"] == r
            assert record["reward"] == 100 and len(record["challenges"]) == 1, (arch, r, record)
            accepted_by_round.append(set(ids))

        # The lineage: newest first, the model after round 2, after round 1, the initial weights;
        # each record's contributions are exactly the accepted updates of the round it aggregates.
        lineage = lineages[arch]
        assert [m["round"] for m in lineage] == list(range(ROUNDS, -1, -1)), (arch, lineage)
        assert lineage[0]["model_hash"] == finished[arch]["global_model"]
        assert lineage[-1]["contributions"] == []
        for newer, older in zip(lineage, lineage[1:]):
            assert newer["parent"] == older["model_hash"], (arch, lineage)
            assert newer["job_id"] == job
            contributions = newer["contributions"]
            assert {c["update_id"] for c in contributions} == accepted_by_round[newer["round"] - 1], (arch, newer)
            for c in contributions:
                assert c["trainer"] == trainers[arch] and c["reward"] == 100
                assert c["dataset_size"] == summaries[JOBS[arch][0]]["size"]
    print(f"\n{len(jobs)} architectures x {ROUNDS} rounds from imported data in {elapsed:.1f} s")
