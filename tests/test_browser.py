"""The MLflow UI, rendered by a real headless Chromium against a real `mlflow server`, shows sdd's runs as a
runs table (the dense runs with their pruning chain nested under them), not MLflow 3's GenAI overview.

MLflow 3.17.2's UI picks the view of an experiment from its workflow type: the `workflowType` query
parameter, else the sidebar's "GenAI / Model training" switch remembered in the browser (localStorage
`mlflow.workflowType_v1`, set only by clicking the switch), else "genai". The `mlflow.experimentKind`
experiment tag that sdd sets is not read by this UI (its workflow-type switch is always on), so the
experiment page as clicked in a fresh browser opens the GenAI overview; the link sdd prints
(`tracking.ui_link`) carries `workflowType=machine_learning` and opens the runs table.

Set SDD_RUNS_TREE_PNG=docs/runs-tree.png to refresh the screenshot in the docs.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port, shared_store, start_mlflow_server, stop_group, tiny_train, wait_for_port

from sdd import tracking
from sdd.chain import run_prune
from sdd.config import PruneConfig
from sdd.dense import run_train

pytestmark = pytest.mark.slow

WIDTHS = (8, 16)
WINDOW = (1400, 900)
BROWSER_S = 90.0  # one page load; ends as soon as Chromium is done
# Visible text of each view (MLflow 3.17.2), found by rendering both; neither view has any of the other's.
RUNS_TABLE = ("Run Name", "Created", "matching runs")
GENAI_OVERVIEW = ("Token Usage", "Tokens per Trace", "Cost Breakdown")


def _chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def _visible_text(html: str) -> str:
    """The page's text as a person reads it: no scripts, styles or markup."""
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S | re.I)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).replace("&amp;", "&")


def _headless(binary: str, profile: Path) -> list[str]:
    return [binary, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", f"--user-data-dir={profile}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}"]


def _dump_dom(binary: str, url: str, profile: Path) -> str:
    """The visible text of the page Chromium renders for `url`, once it shows one of the two views.

    The UI renders asynchronously (bundle, then experiment, then runs or overview queries); a page still
    loading shows neither view's text, and is loaded again with a longer virtual-time budget.
    """
    text = ""
    for budget_ms in (5_000, 15_000, 40_000):
        proc = subprocess.Popen([*_headless(binary, profile), f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            html = proc.communicate(timeout=BROWSER_S)[0]
        except subprocess.TimeoutExpired:
            html = ""
        finally:
            stop_group(proc)
        text = _visible_text(html)
        if "matching runs" in text or any(s in text for s in GENAI_OVERVIEW):
            return text
    pytest.fail(f"{url} rendered neither the runs table nor the GenAI overview: {text[:2000]!r}")


class _Cdp:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4): no library needed."""

    def __init__(self, binary: str, profile: Path):
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{to_chrome} 4>&{from_chrome}', "chromium",
             *_headless(binary, profile), "--remote-debugging-pipe", "about:blank"],
            pass_fds=(to_chrome, from_chrome), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buf, self._id, self.session = b"", 0, None

    def call(self, method: str, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + BROWSER_S
        while True:
            while b"\0" not in self._buf:
                remaining = deadline - time.time()
                assert remaining > 0, f"no answer from Chromium to {method}"
                if select.select([self._in], [], [], min(remaining, 1.0))[0]:
                    chunk = os.read(self._in, 1 << 20)
                    assert chunk, f"Chromium exited ({self.proc.poll()}) during {method}"
                    self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:  # events (no id) are skipped
                assert "error" not in reply, (method, reply["error"])
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1], deviceScaleFactor=1,
                  mobile=False)
        self.call("Page.navigate", url=url)

    def drag(self, x: float, y: float, dx: float, steps: int = 10) -> None:
        """Press the left button at (x, y), move it by dx in a few steps, release it."""
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        self.call("Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button="left", buttons=1, clickCount=1)
        for i in range(1, steps + 1):
            self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x + dx * i / steps, y=y, button="left",
                      buttons=1)
        self.call("Input.dispatchMouseEvent", type="mouseReleased", x=x + dx, y=y, button="left", buttons=0,
                  clickCount=1)

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait(self, expression: str, what: str) -> None:
        deadline = time.time() + BROWSER_S
        while not self.js(expression):
            assert time.time() < deadline, f"the page never showed {what}: {self.js('document.body.innerText')!r}"
            time.sleep(0.2)

    def close(self) -> None:
        stop_group(self.proc)
        os.close(self._in)
        os.close(self._out)


def _tidy_for_screenshot(cdp: _Cdp) -> None:
    """Cosmetic, as a person would: close the assistant panel, widen the Run Name column to whole names."""
    close = '[data-component-id="mlflow.assistant.chat_panel.close"]'
    if cdp.js(f"document.querySelector('{close}')?.click() ?? false") is not False:
        cdp.wait(f"!document.querySelector('{close}')", "the assistant panel closed")
        time.sleep(0.5)  # the table takes the freed width
    # The handle's right half lies under the next header, so it is grabbed at its left edge.
    handle = cdp.js("""(() => {
        const r = document.querySelector('[role=columnheader][col-id*="Run Name"] .ag-header-cell-resize')
            ?.getBoundingClientRect();
        return r ? [r.x + 1, r.y + r.height / 2] : null;
    })()""")
    if handle:
        cdp.drag(*handle, 160)


def _has_text(s: str) -> str:
    return f"document.body.innerText.includes({json.dumps(s)})"


def _expand(run_name: str) -> str:
    """JS: click the expander in the runs-table row of the run named `run_name`."""
    return f"""(() => {{
        for (const a of document.querySelectorAll('a[href*="/runs/"]')) {{
            if (a.textContent.trim() !== {json.dumps(run_name)}) continue;
            const button = a.closest('[role=gridcell]')?.querySelector('button');
            if (button) {{ button.click(); return true; }}
        }}
        return false;
    }})()"""


@pytest.fixture(scope="module")
def ui(request, tmp_path_factory):
    """A small real store (two dense runs, one 2-level chain under the first) served by `mlflow server`."""
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium binary (chromium, chromium-browser or google-chrome) on PATH; "
                    "install one, e.g. `apt-get install -y chromium`, to test the MLflow UI")
    folder = tmp_path_factory.mktemp("browser")
    with shared_store(folder, request.getfixturevalue("empty_store")) as world:
        port = free_port()
        # Started first: it boots (seconds) while the steps train in this process.
        server = start_mlflow_server(world["uri"], folder / "artifacts", port)
        try:
            dense = {w: run_train(tiny_train(width=w, epochs=10), tracking_uri=world["uri"], experiment="browser")
                     for w in WIDTHS}
            chain = run_prune(PruneConfig(parent=dense[WIDTHS[0]].run_id, levels=2, epochs=3, register=False,
                                          device="cpu"), tracking_uri=world["uri"])
            client = tracking.get_client(world["uri"])
            runs = {r.info.run_id: r for r in client.search_runs([client.get_run(chain.run_id).info.experiment_id])}
            wait_for_port(server, port)
            yield {
                "binary": binary, "folder": folder, "profile": folder / "profile", "client": client,
                "uri": f"http://127.0.0.1:{port}",
                "exp_id": runs[chain.run_id].info.experiment_id,
                "dense": {w: runs[r.run_id].info.run_name for w, r in dense.items()},
                "chain": runs[chain.run_id].info.run_name,
                "levels": sorted(r.info.run_name for r in runs.values() if r.data.tags.get("sdd.step") == "level"),
            }
        finally:
            stop_group(server)


def test_printed_link_opens_the_runs_table_and_the_plain_page_of_an_untagged_experiment_the_overview(ui):
    client = ui["client"]
    assert client.get_experiment(ui["exp_id"]).tags.get(tracking.EXPERIMENT_KIND_TAG) == tracking.EXPERIMENT_KIND
    link = tracking.ui_link(ui["uri"], ui["exp_id"])
    assert link == f"{ui['uri']}/#/experiments/{ui['exp_id']}/runs?workflowType=machine_learning"

    text = _dump_dom(ui["binary"], link, ui["profile"])
    assert all(s in text for s in RUNS_TABLE), text
    assert all(name in text for name in ui["dense"].values()), (ui["dense"], text)
    assert not any(s in text for s in GENAI_OVERVIEW), text

    # The check discriminates: an experiment that sdd did not create opens on the GenAI overview.
    untagged = client.create_experiment("made-without-sdd")
    text = _dump_dom(ui["binary"], f"{ui['uri']}/#/experiments/{untagged}", ui["profile"])
    assert all(s in text for s in GENAI_OVERVIEW), text
    assert not any(s in text for s in RUNS_TABLE), text

    cdp = _Cdp(ui["binary"], ui["folder"] / "profile-cdp")
    try:
        # What a person clicks in the experiment list is the plain experiment page (no workflowType).
        cdp.open(f"{ui['uri']}/#/experiments")
        listed = f'document.querySelector(\'a[href^="#/experiments/{ui["exp_id"]}"]\')?.getAttribute("href")'
        cdp.wait(listed, "the experiment in the experiment list")
        assert cdp.js(listed) == f"#/experiments/{ui['exp_id']}"
        # The nested tree, as a person expands it: dense run > chain > levels.
        cdp.call("Page.navigate", url=link)
        cdp.wait(_has_text("matching runs") + " && " + " && ".join(_has_text(n) for n in ui["dense"].values()),
                 "the dense runs")
        _tidy_for_screenshot(cdp)
        assert cdp.js(_expand(ui["dense"][WIDTHS[0]])), "no expander on the dense parent of the chain"
        cdp.wait(_has_text(ui["chain"]), "the chain under its dense run")
        assert cdp.js(_expand(ui["chain"])), "no expander on the chain"
        cdp.wait(" && ".join(_has_text(n) for n in ui["levels"]), "the levels under their chain")
        time.sleep(0.5)  # let the grid finish painting the new rows
        png = base64.b64decode(cdp.call("Page.captureScreenshot", format="png")["data"])
    finally:
        cdp.close()
    assert png.startswith(b"\x89PNG") and (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) \
        == WINDOW
    (ui["folder"] / "runs-tree.png").write_bytes(png)
    if os.environ.get("SDD_RUNS_TREE_PNG"):
        copy = ROOT / os.environ["SDD_RUNS_TREE_PNG"]
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(png)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="MLflow 3.17.2's UI ignores the mlflow.experimentKind tag: with no workflowType in the URL "
                   "and a fresh browser it opens every experiment on the GenAI overview")
def test_experiment_page_as_clicked_opens_the_runs_table(ui):
    # What a person reaches by clicking the experiment in the UI's experiment list, in a browser whose
    # "GenAI / Model training" switch was never touched (no profile here ever sets it).
    text = _dump_dom(ui["binary"], f"{ui['uri']}/#/experiments/{ui['exp_id']}", ui["profile"])
    assert not any(s in text for s in GENAI_OVERVIEW), text
    assert all(s in text for s in RUNS_TABLE), text
    assert all(name in text for name in ui["dense"].values()), (ui["dense"], text)
