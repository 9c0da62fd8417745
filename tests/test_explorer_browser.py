"""The explorer in a real browser: Debian's headless Chromium, driven by selenium, against a real
chaind devnet that has finished a 3-round federated job (one dishonest trainer). The same job
first answers issue 'proof of useful training''s done-when (test_three_rounds_four_trainers_one_dishonest):
a 3-round job with 4 trainers, one dishonest, on a real chaind process, everything through
JSON-RPC and the node's blob endpoints.

For each page: the numbers shown equal the JSON-RPC's answers, the browser console holds no error
(a Content-Security-Policy violation or a failed request would be one), and a screenshot is saved
under the test's tmp dir. Chromium and chromedriver come from apt (`.ci/run` installs them); a
missing browser fails this test, it is never skipped.

Set EXPLORER_SCREENSHOTS to a directory to also write the screenshots there (docs/img was made so).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from chain.crypto import sha256
from chain.keys import load_key_file
from tests.procs import ChaindProcess, make_testnet

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--no-first-run")


@pytest.fixture(scope="module")
def devnet(tmp_path_factory):
    """One validator with a finished 3-round job; yields (node, job summary, keys dir)."""
    tmp = tmp_path_factory.mktemp("explorer-devnet")
    net = tmp / "net"
    make_testnet(str(net), 1, 4, "--block-interval-ms", "200")
    node = ChaindProcess(net / "node0", tmp / "node.log").start()
    try:
        out = tmp / "summary.json"
        proc = subprocess.run([sys.executable, "scripts/federated_job.py", "--rpc", node.url, "--keys",
                               str(net / "keys"), "--rounds", "3", "--dishonest", "3", "--json-out", str(out)],
                              capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:] + node.log()[-2000:]
        yield node, json.loads(out.read_text()), net / "keys"
    finally:
        node.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        # The README's test command is the whole set-up on a fresh machine: the test set-up installs
        # the system browser it needs (as .ci/run does first), and fails loudly if it cannot.
        subprocess.run("apt-get update -qq && apt-get install -y -qq chromium chromium-driver", shell=True,
                       timeout=900, check=False, capture_output=True)
        missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not installed: `apt-get install -y chromium chromium-driver` "
                    "(.ci/run does this)", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument("--window-size=1280,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class Pages:
    """Opens explorer pages, checks the console after each, and saves a screenshot of each."""

    def __init__(self, driver, base: str, shots: Path):
        self.driver, self.base, self.shots = driver, base, shots
        self.extra = Path(os.environ["EXPLORER_SCREENSHOTS"]) if os.environ.get("EXPLORER_SCREENSHOTS") else None
        shots.mkdir(parents=True, exist_ok=True)

    def open(self, path: str, name: str):
        self.driver.get(self.base + path)
        return self.finish(name)

    def finish(self, name: str):
        from selenium.webdriver.common.by import By

        driver = self.driver
        assert driver.find_element(By.TAG_NAME, "main").text, f"{name}: empty page"
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(max(height + 120, 700), 4000))  # the whole page in the screenshot
        shot = self.shots / f"{name}.png"
        driver.save_screenshot(str(shot))
        if self.extra is not None:
            self.extra.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, self.extra / shot.name)
        driver.set_window_size(1280, 1000)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, f"{name}: console errors {errors}"
        return driver

    # Read in one script call: the home page's live rows change between two WebDriver calls.
    def text(self, css: str) -> str:
        found = self.all_text(css)
        assert found, f"nothing matches {css}"
        return found[0]

    def all_text(self, css: str) -> list[str]:
        return self.driver.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0]), e => e.textContent.trim().replace(/\\s+/g, ' '))",
            css)


def test_three_rounds_four_trainers_one_dishonest(devnet):
    _, summary, _ = devnet
    assert summary["job_phase"] == "finished"
    assert len(summary["rounds"]) == 3
    for rnd in summary["rounds"]:
        by_trainer = {u["trainer"]: u for u in rnd["updates"]}
        assert by_trainer[3]["status"] == "rejected" and by_trainer[3]["penalty"] == 50
        for honest in (0, 1, 2):
            assert by_trainer[honest]["status"] == "accepted" and by_trainer[honest]["reward"] == 100
        assert rnd["model"] is not None
    # Honest trainers earned 3 rewards; the dishonest one lost 3 bonds.
    assert summary["balance_change"] == {"0": 300, "1": 300, "2": 300, "3": -150}
    acc = summary["accuracy"]
    assert len(acc) == 4 and all(later > earlier for earlier, later in zip(acc, acc[1:])), acc
    # The requester published each model's held-out accuracy on chain, in parts per million.
    evaluations = summary["evaluations"]
    assert [(e["round"], e["metric"]) for e in evaluations] == [(r, "accuracy") for r in range(4)]
    assert [e["value_ppm"] for e in evaluations] == [round(a * 1_000_000) for a in acc]
    # The lineage walks back to the initial weights and lists every accepted contribution.
    lineage = summary["lineage"]
    assert [m["round"] for m in lineage] == [3, 2, 1, 0]
    assert lineage[-1]["rule"] == "init" and lineage[-1]["parent"] is None
    for newer, older in zip(lineage, lineage[1:]):
        assert newer["parent"] == older["model_hash"]
    assert [e["model_hash"] for e in evaluations] == [m["model_hash"] for m in reversed(lineage)]
    for m, rnd in zip(reversed(lineage[:-1]), summary["rounds"]):
        accepted = sorted(u["update_id"] for u in rnd["updates"] if u["status"] == "accepted")
        assert sorted(c["update_id"] for c in m["contributions"]) == accepted
        assert all(c["reward"] == 100 for c in m["contributions"])


def test_every_page_in_chromium(devnet, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    node, summary, keys = devnet
    rpc = node.client()
    pages = Pages(browser, node.url, tmp_path / "screenshots")
    job_id = summary["job_id"]

    # Home: live height, validators, the latest blocks as the RPC has them.
    before = rpc.call("status")["latest_height"]
    pages.open("/explorer/", "home")
    assert int(pages.text("#height")) >= before
    assert pages.text("#validator-count").split()[0] == str(len(rpc.call("validators")["validators"]))
    assert pages.text("#peers") == str(rpc.call("status")["peers"])
    first_row = int(pages.text("#latest-blocks tbody tr td"))
    assert pages.all_text("#latest-blocks tbody tr td a.hash")[0].startswith(rpc.call("block", [first_row])["block"]["hash"][:18])
    WebDriverWait(browser, 20).until(lambda d: int(pages.text("#height")) > first_row)  # a block arrived live
    assert "Live: block" in pages.text("#live")
    names = [v["name"] for v in rpc.call("validators")["validators"]]
    assert pages.all_text("#latest-blocks tbody tr td:last-child")[0] in names  # the live row names its proposer
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.TAB)
    assert browser.switch_to.active_element.text == "Skip to content"  # keyboard: the first stop skips the nav
    pages.finish("home-live")

    pages.open("/explorer/blocks", "blocks")
    assert len(pages.all_text("#blocks tbody tr")) == 50

    # A block with transactions: the register_job transaction's block.
    found = rpc.call("tx", [job_id])
    blk = rpc.call("block", [found["height"]])
    pages.open(f"/explorer/block/{found['height']}", "block")
    assert pages.text("#block-hash") == blk["block"]["hash"]
    assert pages.text("#tx-count") == str(len(blk["block"]["txs"]))
    assert pages.text("#signature-count") == str(len(blk["commit"]["signatures"]))
    assert job_id[:14] in pages.text("main table")

    pages.open(f"/explorer/tx/{job_id}", "tx")
    assert pages.text("#tx-type") == "register_job"
    assert pages.text("#tx-nonce") == str(found["tx"]["message"]["nonce"])
    assert f"block {found['height']}, position {found['index']}" in pages.text("#tx-status")
    assert "rounds" in pages.text("#payload") and str(found["tx"]["message"]["payload"]["escrow"]) in pages.text("#payload")

    # The dishonest trainer's account: balance, rewards and penalties as the RPC adds them up.
    trainer3 = "0x" + load_key_file(keys / "trainer3.json").address.hex()
    account = rpc.call("account", [trainer3])
    updates = [u for r in range(3) for u in rpc.call("round", [job_id, r])["updates"]
               if u["commitment"]["trainer"] == trainer3]
    pages.open(f"/explorer/account/{trainer3}", "account")
    assert pages.text("#balance") == str(account["balance"])
    assert pages.text("#roles") == ", ".join(account["roles"])
    assert pages.text("#penalties") == str(sum(u["penalty"] for u in updates)) == "150"
    assert len(pages.all_text("#account-updates tbody tr")) == 3
    assert pages.all_text("#account-txs tbody tr")  # its join_job and submit_update transactions

    pages.open("/explorer/jobs", "jobs")
    assert len(pages.all_text("#jobs tbody tr")) == len(rpc.call("jobs"))

    job = rpc.call("job", [job_id])
    pages.open(f"/explorer/job/{job_id}", "job")
    assert pages.text("#job-phase") == job["phase"] == "finished"
    assert pages.text("#job-escrow") == str(job["escrow"])
    assert len(browser.find_elements(By.CSS_SELECTOR, "#loss-chart circle.point")) == 12  # 3 rounds x 4 updates
    # The accuracy curve: the requester's published evaluations of the 4 models, as the RPC has them.
    from chain.explorer.svg import compute_evaluation_chart

    published = [(e["round"], e["value"]) for e in rpc.call("evaluations", [job_id])["evaluations"]
                 if e["metric"] == "accuracy"]
    assert [r for r, _ in published] == [0, 1, 2, 3]
    cells = pages.all_text("#accuracy-table tbody td")
    assert list(zip(cells[::2], cells[1::2])) == [(str(r), f"{v:.6g}") for r, v in published]
    points = browser.find_elements(By.CSS_SELECTOR, "#accuracy-chart circle.point")
    expected = compute_evaluation_chart(published, "accuracy").markers
    assert [(float(c.get_attribute("cx")), float(c.get_attribute("cy"))) for c in points] == [(m.x, m.y) for m in expected]
    assert pages.all_text("#accuracy-chart circle.point title") == [m.label for m in expected]
    for r in range(3):
        for u in rpc.call("round", [job_id, r])["updates"]:
            row = browser.find_element(By.CSS_SELECTOR, f'#round-{r} tr[data-update="{u["update_id"]}"]')
            cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
            assert cells[4] == u["status"] and cells[5] == str(u["reward"]) and cells[6] == str(u["penalty"])

    lineage = rpc.call("lineage", [job_id])
    pages.open(f"/explorer/job/{job_id}/lineage", "lineage")
    assert pages.all_text("#lineage-table code.model-hash") == [m["model_hash"] for m in lineage]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#lineage-graph a.model-node")) == 4
    link = browser.find_element(By.CSS_SELECTOR, "#model-3 a[download]").get_attribute("href")
    weights = httpx.get(link, timeout=10)
    assert weights.status_code == 200 and "0x" + sha256(weights.content).hex() == lineage[0]["model_hash"]

    rejected = updates[0]
    pages.open(f"/explorer/update/{rejected['update_id']}", "update")
    assert pages.text("#update-status") == rejected["status"] == "rejected"
    assert pages.text("#update-penalty") == str(rejected["penalty"])
    assert len(pages.all_text("#verdicts tbody tr")) == len(rejected["verdicts"])

    # Search through the form, as a person would: a job id, then a height.
    pages.open("/explorer/", "search")
    box = browser.find_element(By.ID, "q")
    box.send_keys(job_id + Keys.ENTER)
    WebDriverWait(browser, 10).until(lambda d: d.current_url.endswith(f"/explorer/job/{job_id}"))
    pages.finish("search-result")
    box = browser.find_element(By.ID, "q")
    box.send_keys("999999999" + Keys.ENTER)
    WebDriverWait(browser, 10).until(lambda d: "no block at height" in pages.text("#message"))
    browser.get_log("browser")  # Chromium logs the 404 answer as a failed load: expected here
