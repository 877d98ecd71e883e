"""The Command UI end to end: the real API under uvicorn on 127.0.0.1 over a real run store,
driven in headless Chromium (Debian's chromium and chromedriver through Selenium; nothing is
downloaded, and the browser resolves no host but 127.0.0.1).

The page is asked for a token (a wrong one is refused), then shows the status bar (health,
workers per pool, queue depth, open alerts), a tab per crew, the command overview, a run
started from the form whose events stream while it runs and end in its result, thumbs up
stored as feedback, a cancelled run, a read-only token refused a run, the hardware display
(a GPU node's VRAM and temperature), and in cluster mode the workers that real Celery workers
report per pool. Every step's screenshot is kept under ``$TYPHON_TEST_ARTIFACTS`` (default
``.typhon-dev/test-artifacts/``) in ``command-ui/<test>/``."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from conftest import REPO, Cluster
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.options import Options as ChromeOptions
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait
from support.api import Server, quick_config

from typhon import RunContext, Typhon
from typhon.api import ApiConfig, create_app
from typhon.api._tokens import TokenStore
from typhon.api._ui import CSP, STATIC_FILES, ask_workers
from typhon.config import NodeConfig, PoolConfig, load_config
from typhon.crews import CrewRegistry, crew
from typhon.crews.monitoring import GPU_TEMP, Finding, apply_findings
from typhon.improve._activity import ingest
from typhon.store import RunStore, run_feedback
from typhon.testing import ScriptedModel, ScriptedModels

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_S = 60  # the bound of every wait for the page: a hung page fails, a slow one does not
BUILTIN = ["creative", "development", "monitoring", "research"]
GIB = 1024**3
RESULT = "A brief on {}: the tides follow the moon."


# -- the browser --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """Headless Chromium from Debian's packages, driven by their chromedriver. Selenium Manager
    is never asked (the driver's path is given, and SE_OFFLINE is set), and the browser resolves
    no name but 127.0.0.1, so nothing reaches the network."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(
                f"{path} is missing: scripts/test installs Debian's chromium and chromium-driver"
                " (apt-get install --no-install-recommends chromium chromium-driver)"
            )
    profile = tmp_path_factory.mktemp("chromium")
    options = ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
        "--window-size=1440,1000", f"--user-data-dir={profile / 'profile'}", "--lang=en-US",
        "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-extensions",
        "--disable-default-apps", "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = ChromeService(
        executable_path=CHROMEDRIVER, log_output=str(profile / "chromedriver.log")
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _artifacts(name: str) -> Path:
    root = os.environ.get("TYPHON_TEST_ARTIFACTS") or REPO / ".typhon-dev" / "test-artifacts"
    folder = Path(root) / "command-ui" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


class Page:
    """The Command UI in the browser: waits for what it should show, reads it, screenshots it
    into the test's tmp dir and the kept artifacts."""

    def __init__(self, driver: WebDriver, url: str, shots: Path, kept: Path):
        self.driver = driver
        self.url = url
        self.shots = shots
        self.kept = kept
        self.taken = 0

    def open(self) -> None:
        self.driver.get(self.url + "/")

    def wait(self, predicate: Callable[[], Any], what: str) -> Any:
        waiting = WebDriverWait(
            self.driver, WAIT_S, poll_frequency=0.1,
            ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
        )  # fmt: skip
        return waiting.until(lambda _: predicate(), message=f"the page never showed {what}")

    def el(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def els(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        return self.el(css).text

    def visible(self, css: str) -> bool:
        found = self.els(css)
        return bool(found) and found[0].is_displayed()

    def attr(self, css: str, name: str) -> str | None:
        return self.el(css).get_attribute(name)

    def type_into(self, css: str, text: str) -> None:
        field = self.el(css)
        field.clear()
        field.send_keys(text)

    def snap(self, name: str) -> Path:
        self.taken += 1
        shot = self.shots / f"{self.taken:02d}-{name}.png"
        size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        png = self.driver.execute_cdp_cmd(  # the whole page, not only the window's part
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
        )
        shot.write_bytes(base64.b64decode(png["data"]))
        shutil.copy2(shot, self.kept / shot.name)
        return shot

    def console(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.driver.get_log("browser")
        return entries

    def connect(self, token: str) -> None:
        self.wait(lambda: self.visible("#token-input"), "the token form")
        self.type_into("#token-input", token)
        self.el("#token-submit").click()


@pytest.fixture
def page_for(
    browser: WebDriver, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[str], Page]]:
    """A Page on a given base URL; its console is kept with the screenshots and must hold no
    script error and no Content-Security-Policy refusal."""
    shots = tmp_path / "screenshots"
    shots.mkdir()
    kept = _artifacts(request.node.name)
    pages: list[Page] = []

    def make(url: str) -> Page:
        pages.append(Page(browser, url, shots, kept))
        return pages[-1]

    yield make
    logs = [entry for page in pages for entry in page.console()]
    (kept / "console.log").write_text("".join(f"{e['level']} {e['message']}\n" for e in logs))
    errors = [
        e["message"] for e in logs if re.search(r"Uncaught|Refused to|TypeError", e["message"])
    ]
    browser.get("about:blank")  # leave no polling page behind for the next test
    assert not errors, errors


# -- the API under test -------------------------------------------------------------------------


@dataclass
class UiApi:
    typhon: Typhon
    store: RunStore
    url: str
    tokens: dict[str, str]
    release: threading.Event  # the `drafts` crew waits for it before it polishes

    def auth(self, scope: str = "read") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[scope]}"}


def _registry(release: threading.Event) -> CrewRegistry:
    """The built-in crews, and one of this test's own."""
    registry = CrewRegistry()

    @crew("drafts", registry=registry, description="Outlines, drafts, then polishes a brief.")
    def drafts(ctx: RunContext) -> str:
        ctx.step("outline", points=["moon", "sun", "coastline"])
        ctx.step("draft", words=120)
        while not release.wait(0.05):  # until the test lets it go (or it is cancelled)
            ctx.check_cancelled()
        ctx.step("polish")
        return RESULT.format(ctx.input)

    return registry


@contextlib.contextmanager
def serving(
    home: Path, store: RunStore, *, nodes: list[NodeConfig] | None = None
) -> Iterator[UiApi]:
    """The API on a free loopback port over ``store``, embedded; the research pool runs one
    run at a time, so that a second one waits in its queue."""
    release = threading.Event()
    pools = [
        PoolConfig(name="research", cap=1),
        PoolConfig(name="development", cap=2),
        PoolConfig(name="creative", cap=2),
        PoolConfig(name="monitoring", cap=4),
    ]
    config = quick_config(home, pools=pools, nodes=nodes or [])
    models = ScriptedModels(config, ScriptedModel("ok"))
    typhon = Typhon(config, registry=_registry(release), store=store, models=models)
    tokens = TokenStore(store)
    issued = {scope: tokens.create(scope, f"ui-{scope}")[1] for scope in ("read", "submit")}
    server = Server(create_app(typhon, settings=ApiConfig(), hooks={})).start()
    try:
        yield UiApi(typhon, store, server.url, issued, release)
    finally:
        release.set()
        server.stop()
        typhon.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[RunStore]:
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    yield store
    store.close()


class GpuNode:
    """Another node's ``/hardware/summary`` on loopback: two GPUs, the first hot and nearly
    out of VRAM."""

    SUMMARY: dict[str, Any] = {  # noqa: RUF012
        "host": "gpu-a",
        "cpu": {"model": "AMD Ryzen 9 9950X", "cores": 16, "threads": 32, "affinity": "0-31"},
        "memory": {"total_bytes": 128 * GIB, "available_bytes": 96 * GIB},
        "disks": [{"device": "/dev/nvme0n1p2", "mount": "/", "total_bytes": 2000 * GIB,
                   "used_bytes": 1900 * GIB, "free_bytes": 100 * GIB, "percent": 95.0}],
        "gpus": [
            {"index": 0, "name": "NVIDIA GeForce RTX 5090", "vram_total_bytes": 32 * GIB,
             "vram_used_bytes": int(30.9 * GIB), "temperature_c": 83, "utilization_percent": 97},
            {"index": 1, "name": "NVIDIA GeForce RTX 4090", "vram_total_bytes": 24 * GIB,
             "vram_used_bytes": 6 * GIB, "temperature_c": 55, "utilization_percent": 12},
        ],
        "gpu_note": None,
    }  # fmt: skip

    def __init__(self) -> None:
        body = json.dumps(self.SUMMARY).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = self.path == "/hardware/summary"
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) if found else 2))
                self.end_headers()
                self.wfile.write(body if found else b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def gpu_node() -> Iterator[GpuNode]:
    node = GpuNode()
    yield node
    node.close()


def _row(page: Page, run_id: str) -> str:
    return f'#runs-body tr[data-run-id="{run_id}"]'


def _stream_kinds(page: Page) -> list[str]:
    return [
        f"{li.get_attribute('data-kind')}:{li.get_attribute('data-step') or ''}".rstrip(":")
        for li in page.els("#stream-events li")
    ]


def _run_ids(store: RunStore, crew_name: str) -> list[str]:
    return [r.id for r in store.list_runs(crew=crew_name)]


# -- the page and its files ---------------------------------------------------------------------


def test_the_page_and_its_files_need_no_token_and_load_nothing_from_elsewhere(
    sqlite_store: RunStore, home: Path
) -> None:
    with serving(home, sqlite_store) as api, httpx.Client(base_url=api.url) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == CSP
        assert page.headers["x-content-type-options"] == "nosniff"
        html = page.text
        for name in STATIC_FILES:
            r = client.get(f"/ui/{name}")
            assert r.status_code == 200, name
            assert r.headers["content-type"] == STATIC_FILES[name]
            text = r.text.replace("http://www.w3.org/2000/svg", "")  # a namespace, not a fetch
            assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text), name
            assert "@import" not in text and "url(" not in text, name
        assert set(re.findall(r'(?:src|href)="([^"]+)"', html)) == {
            "/ui/favicon.svg", "/ui/app.css", "/ui/app.js",
        }  # fmt: skip
        for bad in ("/ui/nothing.js", "/ui/..%2F_app.py", "/ui/%2E%2E%2F_ui.py", "/ui/"):
            r = client.get(bad)
            assert r.status_code == 404, bad
            assert r.json()["error"]["code"] == "not_found", bad
        # the page holds no data: the routes it reads still need a token
        assert client.post("/").status_code == 401  # only reading the page is open
        for path in ("/v1/crews", "/v1/cluster"):
            r = client.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", path
        spec = client.get("/openapi.json", headers=api.auth()).json()["paths"]
        assert "/v1/crews" in spec and "/v1/cluster" in spec
        assert "/" not in spec and "/ui/{name}" not in spec


def test_crews_and_cluster_routes(store: RunStore, home: Path) -> None:
    with serving(home, store) as api, httpx.Client(base_url=api.url, timeout=60) as client:
        crews = client.get("/v1/crews", headers=api.auth()).json()["crews"]
        assert [c["name"] for c in crews] == sorted([*BUILTIN, "drafts"])
        by_name = {c["name"]: c for c in crews}
        assert by_name["drafts"] == {
            "name": "drafts", "description": "Outlines, drafts, then polishes a brief.",
            "pool": "research", "category": None, "model": None, "available": True, "error": None,
        }  # fmt: skip
        assert by_name["development"]["pool"] == "development"
        assert all(by_name[name]["available"] and by_name[name]["description"] for name in BUILTIN)

        quiet = client.get("/v1/cluster", headers=api.auth()).json()
        assert quiet["mode"] == "embedded" and quiet["store"] == store.dialect
        pools = {p["name"]: p for p in quiet["pools"]}
        assert set(pools) == set(BUILTIN)
        assert all(p["workers"] is None and p["worker_names"] == [] for p in pools.values())
        assert quiet["workers"] == {
            "answered": False, "note": "embedded: runs execute in the API's own process",
        }  # fmt: skip
        assert (quiet["queued"], quiet["running"], quiet["crews"]) == (0, 0, {})
        assert quiet["alerts"] == {"open": 0, "items": []}

        # two runs of a pool that runs one at a time: one running, one queued
        first = client.post("/v1/runs", json={"crew": "drafts", "input": "one",
                                              "options": {"no_memory": True}},
                            headers=api.auth("submit")).json()["run_id"]  # fmt: skip
        _until(lambda: api.store.status(first).value == "running", "the first run running")
        second = client.post("/v1/runs", json={"crew": "drafts", "input": "two",
                                               "options": {"no_memory": True}},
                             headers=api.auth("submit")).json()["run_id"]  # fmt: skip
        apply_findings(api.store, [Finding(GPU_TEMP, "gpu-a/gpu0", 83.0, 80.0, True,
                                           "gpu-a GPU 0 is at 83 °C")])  # fmt: skip
        apply_findings(api.store, [Finding(GPU_TEMP, "gpu-b/gpu1", 81.0, 80.0, True, "hot")])
        apply_findings(api.store, [Finding(GPU_TEMP, "gpu-b/gpu1", 60.0, 80.0, False, "ok")])
        busy = client.get("/v1/cluster", headers=api.auth()).json()
        research = next(p for p in busy["pools"] if p["name"] == "research")
        assert (research["running"], research["queued"]) == (1, 1)
        assert (busy["running"], busy["queued"]) == (1, 1)
        assert busy["crews"] == {"drafts": {"queued": 1, "running": 1, "waiting": 0}}
        assert busy["alerts"]["open"] == 1  # the resolved one is not counted
        [alert] = busy["alerts"]["items"]
        assert (alert["kind"], alert["subject"], alert["message"]) == (
            GPU_TEMP, "gpu-a/gpu0", "gpu-a GPU 0 is at 83 °C",
        )  # fmt: skip
        assert alert["action"] == "Check cooling, reduce power limit"
        api.release.set()
        _until(lambda: api.store.status(second).finished, "the second run finished")
        done = client.get("/v1/cluster", headers=api.auth()).json()
        assert (done["queued"], done["running"], done["crews"]) == (0, 0, {})


def _until(predicate: Callable[[], bool], what: str) -> None:
    """Wait for ``predicate`` (the test's bound, not an assertion on time)."""
    event = threading.Event()
    for _ in range(WAIT_S * 50):
        if predicate():
            return
        event.wait(0.02)
    raise AssertionError(f"never happened: {what}")


# -- the page in Chromium -----------------------------------------------------------------------


def test_command_ui_in_chromium(
    page_for: Callable[[str], Page], sqlite_store: RunStore, home: Path, gpu_node: GpuNode
) -> None:
    store = sqlite_store
    nodes = [NodeConfig(name="gpu-a", url=gpu_node.url)]
    with serving(home, store, nodes=nodes) as api:
        ingest(store, {"agent": "n8n-sync", "status": "success", "input": "nightly sync",
                       "output": "synced 12 notes", "duration_s": 4.2})  # fmt: skip
        page = page_for(api.url)
        page.open()

        # -- the token: a wrong one is refused, the right one kept
        page.connect("typhon_nope_0123456789abcdef")
        page.wait(lambda: page.visible("#token-error"), "the refusal of a wrong token")
        assert "refused" in page.text("#token-error")
        assert "unknown or revoked" in page.text("#token-error")
        assert not page.visible("#console")
        page.snap("wrong-token")
        page.connect(api.tokens["submit"])
        page.wait(lambda: page.visible("#console"), "the console")
        assert not page.visible("#login")

        # -- the status bar
        page.wait(lambda: page.attr("#health", "data-state") == "ok", "health")
        assert f"embedded · {store.dialect}" in page.text("#health")
        page.wait(lambda: len(page.els("#pools .pool")) == 4, "the four pools")
        research = '#pools .pool[data-pool="research"]'
        assert "embedded" in page.text(research)
        assert page.attr(research, "data-queued") == "0"
        assert page.attr("#queue-depth", "data-depth") == "0"
        assert page.attr("#alerts-count", "data-open") == "0"
        assert page.text("#alerts-count") == "no alerts"

        # -- the hardware: this server and the GPU node
        local = httpx.get(f"{api.url}/hardware/summary", headers=api.auth()).json()["local"]
        here = f'#hardware-hosts .host[data-host="{local["host"]}"]'
        page.wait(lambda: page.visible(here) and page.visible('.host[data-host="gpu-a"]'),
                  "both hosts")  # fmt: skip
        assert f"{local['cpu']['cores']} cores" in page.text(f"{here} .cpu")
        assert "GiB" in page.text(f"{here} .memory")
        assert page.els(f'{here} .disk[data-mount="/"]')
        if not local["gpus"]:
            assert "No GPUs" in page.text(f"{here} .no-gpus")
        gpu0 = '.host[data-host="gpu-a"] [data-gpu="0"]'
        gpu1 = '.host[data-host="gpu-a"] [data-gpu="1"]'
        assert "NVIDIA GeForce RTX 5090" in page.text(gpu0)
        assert "30.9 / 32.0 GiB VRAM" in page.text(gpu0)
        assert page.text(f"{gpu0} .temp") == "83 °C"
        assert page.attr(f"{gpu0} .temp", "data-level") == "bad"
        assert page.attr(f"{gpu0} .bar", "data-level") == "bad"  # 96.6 % of its VRAM
        assert "util 97%" in page.text(gpu0)
        assert "6.0 / 24.0 GiB VRAM" in page.text(gpu1) and page.text(f"{gpu1} .temp") == "55 °C"
        assert page.attr(f"{gpu1} .temp", "data-level") == ""
        assert "16 cores / 32 threads" in page.text('.host[data-host="gpu-a"] .cpu')
        page.snap("status-bar-and-hardware")

        # -- the domain tabs and the command overview
        tabs = page.wait(lambda: [t.get_attribute("data-crew") for t in page.els(".tab")] or None,
                         "the tabs")  # fmt: skip
        assert tabs == ["", *sorted([*BUILTIN, "drafts"])]
        assert page.attr("#tab-all", "aria-selected") == "true"
        [external] = _run_ids(store, "n8n-sync")
        page.wait(lambda: page.els(_row(page, external)), "the external agent's run")
        assert page.text(f"{_row(page, external)} .status") == "succeeded"
        assert page.text(f"{_row(page, external)} .duration") == "4.2 s"
        page.el("#tab-drafts").click()
        page.wait(lambda: page.attr("#tab-drafts", "aria-selected") == "true", "the drafts tab")
        assert page.attr("#tab-all", "aria-selected") == "false"
        assert page.text("#overview-scope") == "crew drafts"
        assert Select(page.el("#run-crew")).first_selected_option.text == "drafts"
        assert "Outlines, drafts, then polishes a brief." in page.text("#run-crew-about")
        page.wait(lambda: page.visible("#runs-empty"), "an empty drafts overview")
        assert not page.els(_row(page, external))
        page.snap("drafts-tab")

        # -- a run from the form: its events stream while it runs
        page.type_into("#run-input", "tides")
        page.el("details summary").click()
        page.type_into("#run-options", '{"no_memory": true}')
        page.el("#run-submit").click()
        page.wait(lambda: "step:draft" in _stream_kinds(page), "the draft step streamed")
        [first] = _run_ids(store, "drafts")
        assert page.text("#stream-run") == first
        assert _stream_kinds(page) == ["queued", "running", "step:outline", "step:draft"]
        assert page.text("#stream-status") == "running"
        assert 'points=["moon","sun","coastline"]' in page.text(
            '#stream-events [data-step="outline"]'
        )
        assert not page.visible("#stream-output") and page.visible("#stream-cancel")
        assert store.status(first).value == "running"  # the page showed it before it ended
        page.wait(lambda: page.attr(f"{_row(page, first)} td.status", "data-status") == "running",
                  "the run in the overview")  # fmt: skip
        page.snap("run-streaming")

        # a second run waits in the research pool's queue: the status bar counts it
        page.type_into("#run-input", "currents")
        page.el("#run-submit").click()
        page.wait(lambda: len(_run_ids(store, "drafts")) == 2, "the second run")
        second = next(r for r in _run_ids(store, "drafts") if r != first)
        page.wait(lambda: page.text("#stream-run") == second, "the second run followed")
        page.wait(lambda: page.attr("#queue-depth", "data-depth") == "1", "a queue depth of 1")
        assert page.attr(research, "data-queued") == "1"
        assert page.attr(research, "data-running") == "1"
        page.wait(lambda: page.text("#stream-status") == "queued", "the second run queued")
        page.wait(lambda: page.text("#tab-drafts .badge") == "2", "two live runs on the tab")
        assert page.text("#tab-all .badge") == "2"
        page.snap("queue-depth")

        api.release.set()
        page.wait(lambda: page.text("#stream-status") == "succeeded", "the second run's result")
        assert page.text("#stream-output") == RESULT.format("currents")
        page.wait(lambda: page.attr("#queue-depth", "data-depth") == "0", "an empty queue")
        page.wait(lambda: page.text("#tab-drafts .badge") == "", "no live runs left")

        # the first run, picked from the overview: its whole stream, then its result
        page.wait(lambda: page.attr(f"{_row(page, first)} td.status", "data-status")
                  == "succeeded", "the first run finished in the overview")  # fmt: skip
        page.el(f"{_row(page, first)} td.input").click()
        shown = ("#stream-run", "#stream-status")
        page.wait(lambda: [page.text(css) for css in shown] == [first, "succeeded"],
                  "the first run's result")  # fmt: skip
        assert _stream_kinds(page) == [
            "queued", "running", "step:outline", "step:draft", "step:polish", "succeeded",
        ]  # fmt: skip
        assert page.text("#stream-output") == RESULT.format("tides")
        assert "model " in page.text("#stream-meta")
        assert page.text(f"{_row(page, first)} td.model") == store.get(first).model
        assert re.fullmatch(r"\d+\.\d s|\d+ min \d\d s|\d+ h \d\d min",
                            page.text(f"{_row(page, first)} td.duration"))  # fmt: skip
        page.snap("run-finished")

        # -- thumbs up: stored as the run's feedback
        up = "#stream-votes .vote.up"
        assert page.attr(up, "aria-pressed") == "false"
        page.el(up).click()
        page.wait(lambda: page.attr(up, "aria-pressed") == "true", "the vote pressed")
        assert "Recorded: thumbs up" in page.text("#stream-feedback-note")
        with store.engine.connect() as conn:
            rows = conn.execute(sa.select(run_feedback)).mappings().all()
        assert [(r["run_id"], r["vote"], r["by"]) for r in rows] == [
            (first, "up", "token:ui-submit")
        ]
        page.wait(lambda: page.attr(f"{_row(page, first)} .vote.up", "aria-pressed") == "true",
                  "the vote in the overview")  # fmt: skip
        page.snap("thumbs-up")

        # -- an alert opened by the monitoring checks is counted and listed
        apply_findings(store, [Finding(GPU_TEMP, "gpu-a/gpu0", 83.0, 80.0, True,
                                       "gpu-a GPU 0 is at 83 °C (over 80 °C)")])  # fmt: skip
        page.wait(lambda: page.attr("#alerts-count", "data-open") == "1", "one open alert")
        assert page.text("#alerts-count") == "1 open alert"
        assert page.attr("#alerts-count", "data-state") == "firing"
        assert "gpu-a GPU 0 is at 83 °C (over 80 °C)" in page.text("#alerts-list li")
        assert "Check cooling" in page.text("#alerts-list li .action")
        assert not page.visible("#alerts-none")
        page.snap("open-alert")

        # -- the token is kept: a reload goes straight to the console
        page.driver.refresh()
        page.wait(lambda: page.visible("#console"), "the console after a reload")
        page.wait(lambda: page.attr("#alerts-count", "data-open") == "1", "the alert again")
        assert not page.visible("#login")


def test_a_read_token_watches_but_cannot_start_and_a_run_is_cancelled(
    page_for: Callable[[str], Page], sqlite_store: RunStore, home: Path
) -> None:
    store = sqlite_store
    with serving(home, store) as api:
        page = page_for(api.url)
        page.open()
        page.connect(api.tokens["read"])
        page.wait(lambda: page.visible("#console"), "the console")
        page.wait(lambda: page.els("#tab-drafts"), "the tabs")
        page.el("#tab-drafts").click()
        page.type_into("#run-input", "tides")
        page.el("#run-submit").click()
        page.wait(lambda: page.visible("#run-error"), "the refusal")
        assert "The run was not started" in page.text("#run-error")
        assert "scope submit" in page.text("#run-error")
        assert store.list_runs() == []
        page.snap("read-token-refused")

        # another token: the change button forgets the first one
        page.el("#token-change").click()
        page.connect(api.tokens["submit"])
        page.wait(lambda: page.visible("#console"), "the console again")
        page.wait(lambda: page.els("#tab-drafts"), "the tabs")
        page.el("#tab-drafts").click()
        page.type_into("#run-input", "a run to stop")
        page.el("#run-submit").click()
        page.wait(lambda: "step:draft" in _stream_kinds(page), "the run going")
        [run_id] = _run_ids(store, "drafts")
        page.el("#stream-cancel").click()
        page.wait(lambda: page.text("#stream-status") == "cancelled", "the run cancelled")
        assert store.status(run_id).value == "cancelled"
        assert not page.visible("#stream-cancel")
        assert _stream_kinds(page)[-1] == "cancelled"
        page.wait(lambda: page.attr(f"{_row(page, run_id)} td.status", "data-status")
                  == "cancelled", "the cancelled run in the overview")  # fmt: skip
        page.snap("run-cancelled")

        # a read token may not vote either: the page says so, nothing is stored
        page.el("#token-change").click()
        page.connect(api.tokens["read"])
        page.wait(lambda: page.els(_row(page, run_id)), "the run for the read token")
        page.el(f"{_row(page, run_id)} .vote.down").click()
        page.wait(lambda: page.visible("#feedback-error"), "the refused vote")
        assert "The vote was not recorded" in page.text("#feedback-error")
        assert "scope submit" in page.text("#feedback-error")
        with store.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(run_feedback)).scalar() == 0
        page.snap("read-token-vote-refused")


# -- cluster mode -------------------------------------------------------------------------------


@pytest.mark.integration
def test_workers_per_pool_from_celery(
    make_cluster: Callable[..., Cluster],
    page_for: Callable[[str], Page],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = make_cluster("", pools={"research": "cap: 2", "creative": "cap: 1"})
    monkeypatch.syspath_prepend(str(cluster.dir))
    cluster.start_worker(pool="research")
    with Typhon(load_config(cluster.config_path, environ={})) as typhon:
        tokens = TokenStore(typhon.store)
        token = tokens.create("read", "ui-cluster")[1]
        server = Server(create_app(typhon, settings=ApiConfig(), hooks={})).start()
        try:
            headers = {"Authorization": f"Bearer {token}"}
            seen: dict[str, Any] = {}

            def research_worker() -> bool:
                seen.update(httpx.get(f"{server.url}/v1/cluster", headers=headers).json())
                pools = {p["name"]: p for p in seen["pools"]}
                return bool(pools["research"]["workers"])

            _until(research_worker, "the research worker in /v1/cluster")
            pools = {p["name"]: p for p in seen["pools"]}
            assert seen["mode"] == "cluster" and seen["workers"]["answered"] is True
            assert pools["research"]["workers"] == 1
            [name] = pools["research"]["worker_names"]
            assert name.startswith("research@")
            assert (pools["creative"]["workers"], pools["creative"]["worker_names"]) == (0, [])

            page = page_for(server.url)
            page.open()
            page.connect(token)
            research = '#pools .pool[data-pool="research"]'
            page.wait(lambda: page.visible(research), "the research pool")
            assert "1 worker ·" in page.text(research)
            assert page.attr(research, "data-workers") == "1"
            assert "0 workers" in page.text('#pools .pool[data-pool="creative"]')
            assert "cluster" in page.text("#health")
            page.snap("cluster-workers")
        finally:
            server.stop()


def test_a_broker_that_does_not_answer_is_said(home: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = quick_config(home, broker_url=f"redis://127.0.0.1:{port}/0")
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    with Typhon(config, store=store) as typhon:
        workers = ask_workers(typhon)
    store.close()
    assert not workers.answered and workers.by_queue == {}
    assert workers.note is not None and workers.note.startswith("the broker did not answer")
