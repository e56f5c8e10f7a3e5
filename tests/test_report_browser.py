"""The report's page in a real browser: Debian's Chromium, headless, loads index.html from a local HTTP
server and says, through the DevTools protocol, which images it decoded. `make test` installs chromium
when it is missing (scripts/ensure_chromium.sh); where that was impossible the test is skipped and says
why."""
from __future__ import annotations

import asyncio
import functools
import http.server
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from embedlib.report import write_report
from report_runs import write_dynamic_run, write_run

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH: `make test` installs Debian's chromium package "
                             "(scripts/ensure_chromium.sh), which needs root and the Debian package registry")

# Every <img> of the page: its src, whether the browser decoded it (naturalWidth > 0 only for a loaded
# image) and the size it has on the page.
IMAGES_JS = """Array.from(document.images).map(i => ({src: i.getAttribute("src"), complete: i.complete,
    width: i.naturalWidth, height: i.naturalHeight, shown: i.getBoundingClientRect().width}))"""


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws):
        self.ws, self.next_id, self.events = ws, 0, []

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json()
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    async def wait_for(self, event: str) -> None:
        while not any(e.get("method") == event for e in self.events):
            self.events.append(await self.ws.receive_json())
        self.events.clear()


async def _images(port: int, urls: list[str]) -> list[list[dict]]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
            page = next(t for t in await response.json() if t["type"] == "page")
        async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            tools = DevTools(ws)
            await tools.call("Page.enable")
            found = []
            for url in urls:
                await tools.call("Page.navigate", url=url)
                await tools.wait_for("Page.loadEventFired")  # fired once every image loaded or failed
                result = await tools.call("Runtime.evaluate", expression=IMAGES_JS, returnByValue=True)
                found.append(result["result"]["value"])
            return found


def images_in_chromium(urls: list[str], profile: Path) -> list[list[dict]]:
    """What headless Chromium shows of each URL's images, one fresh browser for all of them."""
    browser = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic", f"--user-data-dir={profile}",
         "--remote-debugging-port=0", "--window-size=1200,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        active = profile / "DevToolsActivePort"  # Chromium writes its port here once it listens
        deadline = time.monotonic() + 60
        while not (active.is_file() and len(active.read_text().splitlines()) >= 2):
            assert browser.poll() is None, f"chromium exited with status {browser.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port within 60 s"
            time.sleep(0.1)
        port = int(active.read_text().splitlines()[0])
        return asyncio.run(asyncio.wait_for(_images(port, urls), timeout=120))
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=20)
        except subprocess.TimeoutExpired:
            browser.kill()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[tuple[str, int]] = []

    def log_request(self, code="-", size="-"):
        self.requests.append((self.path, int(code)))

    def log_message(self, *args):
        pass


def test_every_image_of_the_page_shows_in_chromium(tmp_path):
    runs = [write_dynamic_run(tmp_path / "dyn"), write_run(tmp_path / "plain", 10),
            write_run(tmp_path / "cbb", 30, kinds=("retrieval", "sts"))]
    report = tmp_path / "report"
    write_report(runs, report)
    broken = tmp_path / "broken"  # the same page with one figure gone: the check must see it
    shutil.copytree(report, broken)
    (broken / "mining.png").unlink()
    figures = {f["file"]: f for f in json.loads((report / "report.json").read_text())["figures"]}

    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        shown, shown_broken = images_in_chromium([f"{base}/report/index.html", f"{base}/broken/index.html"],
                                                 tmp_path / "profile")
    finally:
        server.shutdown()
        server.server_close()

    assert sorted(image["src"] for image in shown) == sorted(figures)  # each figure once, nothing else
    for image in shown:
        figure = figures[image["src"]]
        assert image["complete"] and (image["width"], image["height"]) == (figure["width"], figure["height"]), image
        assert image["shown"] > 0, image
    assert all(code == 200 for path, code in _QuietHandler.requests if path.startswith("/report/")), \
        _QuietHandler.requests

    missing = [image["src"] for image in shown_broken if image["width"] == 0]
    assert missing == ["mining.png"]
    assert ("/broken/mining.png", 404) in _QuietHandler.requests
