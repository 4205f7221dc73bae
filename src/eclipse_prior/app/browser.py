"""Drive `eclipse-prior app` in a real headless Chromium (Playwright): the browser test and the README screenshot.

Playwright's own browser download is never used: it drives the system's Chromium (Debian's ``chromium``
package; ``CHROMIUM`` names another binary). The app runs as ``eclipse-prior app`` in a child process on a free
local port, exactly as a user starts it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    """The system Chromium: $CHROMIUM, or chromium / chromium-browser / google-chrome on PATH."""
    names = [os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"]
    return next((found for name in names if name and (found := shutil.which(name))), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningApp:
    """A child `eclipse-prior app` process and its URL; ``start_seconds`` = launch until the page answered."""

    process: subprocess.Popen
    url: str
    log: Path
    start_seconds: float

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_app(out: Path, extra: list[str] | None = None, timeout: float = 240.0,
              threads: int | None = 1) -> RunningApp:
    """Start the app on a free port with its images under ``out``; returns once the page answers."""
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if threads is not None:  # same thread count as the caller, so regenerated pixels match bit for bit
        env["OMP_NUM_THREADS"] = str(threads)
    argv = [sys.executable, "-m", "eclipse_prior", "app", "--port", str(port), "--out", str(out / "images"),
            "--offline", *(extra or [])]
    t0 = time.perf_counter()
    with open(log, "w") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return RunningApp(process, url, log, time.perf_counter() - t0)
        except OSError:
            pass
        if time.perf_counter() - t0 > timeout:
            process.kill()
            raise RuntimeError(f"the app did not answer within {timeout:.0f}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


@dataclass
class PageRun:
    """What one Generate click produced in the browser."""

    columns: list[list[tuple[int, int]]] = field(default_factory=list)  # natural (width, height) per image
    status: str = ""
    timings: list[str] = field(default_factory=list)
    seconds: float = 0.0  # click until every column showed its images
    console_errors: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)


def drive(url: str, prompt: str, num_images: int, screenshot: Path | None = None, timeout_s: float = 180.0,
          viewport: tuple[int, int] = (1360, 900)) -> PageRun:
    """Open the page, type the prompt, set the image count, click Generate, wait for every column's images."""
    from playwright.sync_api import sync_playwright

    run = PageRun()
    executable = chromium_path()
    if executable is None:
        raise RuntimeError("no Chromium found: apt-get install chromium (or set CHROMIUM)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.on("console", lambda m: run.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: run.console_errors.append(str(e)))
            page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:"))
                    else run.external_requests.append(r.url))
            page.goto(url, wait_until="networkidle")
            columns = page.locator("[id^=gallery-]").count()
            page.locator("#prompt textarea").fill(prompt)
            count = page.locator("#num-images input[type=number]")
            count.fill(str(num_images))
            count.press("Enter")
            t0 = time.perf_counter()
            page.locator("#generate").click()
            page.wait_for_function(
                """([columns, n]) => [...Array(columns).keys()].every(i => {
                       const imgs = document.querySelectorAll(`#gallery-${i} img`);
                       const error = document.querySelector(`#column-error-${i}`);
                       return error !== null || (imgs.length === n && [...imgs].every(im => im.complete
                                                                                      && im.naturalWidth > 0));
                   })""", arg=[columns, num_images], timeout=timeout_s * 1000)
            run.seconds = time.perf_counter() - t0
            for i in range(columns):
                sizes: Any = page.eval_on_selector_all(f"#gallery-{i} img",
                                                       "imgs => imgs.map(im => [im.naturalWidth, im.naturalHeight])")
                run.columns.append([tuple(s) for s in sizes])
                run.timings.append(page.locator(f"#timing-{i}").inner_text())
            run.status = page.locator("#status").inner_text()
            if screenshot is not None:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return run
