"""A real browser for the integration tests: Debian's Chromium, headless, driven by
Selenium through Debian's chromedriver. Screenshots go to the test artifacts directory
(``$VMCTL_TEST_ARTIFACTS``, default ``test-artifacts/`` in the checkout)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from agent_helpers import ROOT

ARTIFACTS = Path(os.environ.get("VMCTL_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "browser"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


def require_browser() -> None:
    """Browser tests need Chromium, its driver and Selenium (scripts/deps --test)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        pytest.fail(f"browser tests need {', '.join(missing)}: run scripts/deps --test")


class Browser:
    """One headless Chromium with a new empty profile; ``quit`` ends it (and its
    chromedriver, which Selenium started and stops by its own handle)."""

    def __init__(self, base_url: str, width: int = 1280, height: int = 900) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        self.base = base_url
        self.profile = tempfile.mkdtemp(prefix="vmctl-chromium-")
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in FLAGS:
            opts.add_argument(flag)
        opts.add_argument(f"--user-data-dir={self.profile}")
        opts.add_argument(f"--window-size={width},{height}")
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        self.driver.set_page_load_timeout(60)
        self.driver.set_script_timeout(60)

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    # --- pages ------------------------------------------------------------------------

    def get(self, path: str) -> None:
        self.driver.get(path if "://" in path else self.base + path)

    def find(self, css: str):
        from selenium.webdriver.common.by import By
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def finds(self, css: str) -> list:
        from selenium.webdriver.common.by import By
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str = "main") -> str:
        return self.find(css).text

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def js_async(self, script: str, *args: Any) -> Any:
        return self.driver.execute_async_script(script, *args)

    def wait(self, what: Callable[[], Any], timeout: float = 30, interval: float = 0.2,
             message: str = "") -> Any:
        """Poll ``what`` until it returns something true; its value."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = what()
                if value:
                    return value
            except Exception as e:  # noqa: BLE001 - an element not there yet
                last_error = e
            time.sleep(interval)
        self.shot("timeout")
        raise AssertionError(f"timed out after {timeout:g}s waiting for "
                             f"{message or what}: {last_error!r}; page {self.driver.current_url}:"
                             f"\n{self.page_text()[:1500]}")

    def page_text(self) -> str:
        try:
            return self.text("body")
        except Exception:  # noqa: BLE001
            return ""

    def shot(self, name: str, css: str | None = None) -> Path:
        """A screenshot of the window (or of one element: ``body`` is the page cut to
        its content, as docs/img/ shows it)."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        if css:
            self.find(css).screenshot(str(path))
        else:
            self.driver.save_screenshot(str(path))
        return path

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser")
                if e["level"] == "SEVERE"]

    # --- the UI -----------------------------------------------------------------------

    def sign_in(self, token: str) -> None:
        self.driver.delete_all_cookies()
        self.get("/ui/login")
        self.find("#token").send_keys(token)
        self.find("form[action='/ui/login'] button").click()
        self.wait(lambda: self.finds("#vms"), message="the list after sign-in")

    def sign_out(self) -> None:
        self.find("form[action='/ui/logout'] button").click()
        self.wait(lambda: self.finds("#token"), message="the sign-in form")

    def page_figures(self) -> dict:
        """What the current page cost: bytes over the wire and decoded, requests, first
        contentful paint (ms from navigation start)."""
        return self.js("""
            const nav = performance.getEntriesByType('navigation')[0];
            const res = performance.getEntriesByType('resource');
            const paint = performance.getEntriesByType('paint')
                .find(p => p.name === 'first-contentful-paint');
            return {bytes: nav.transferSize + res.reduce((s, r) => s + r.transferSize, 0),
                    decoded: nav.decodedBodySize + res.reduce((s, r) => s + r.decodedBodySize, 0),
                    requests: 1 + res.length,
                    first_contentful_paint_ms: paint ? Math.round(paint.startTime) : null,
                    dom_content_loaded_ms: Math.round(nav.domContentLoadedEventEnd)};""")

    def canvas_stats(self) -> dict:
        """The noVNC canvas: size, distinct colours in a sample, and a digest."""
        return self.js("""
            const c = document.querySelector('#screen canvas');
            if (!c || !c.width) return null;
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const colours = new Set(); let hash = 0;
            for (let i = 0; i < d.length; i += 4 * 7) {
              colours.add((d[i] << 16) | (d[i+1] << 8) | d[i+2]);
              hash = (hash * 31 + d[i] + d[i+1] * 3 + d[i+2] * 7) | 0;
            }
            return {width: c.width, height: c.height, colours: colours.size, hash: hash};
        """)

    def term_text(self) -> str:
        """What the xterm.js terminal holds (scrollback and screen)."""
        return self.js("""
            const b = window.vmagentTerm.buffer.active; const out = [];
            for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));
            return out.join('\\n');
        """)


def tcp_call(port: int, token: str, method: str, path: str,
             body: dict | None = None, timeout: float = 600) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, "/v1" + path, body=json.dumps(body) if body else None,
                     headers={"Authorization": f"Bearer {token}",
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def add_token(state_dir: Path, user: str, role: str = "user") -> str:
    res = subprocess.run([sys.executable, "-m", "vmagent.cli", "token", "add", user,
                          "--role", role, "--state-dir", str(state_dir)],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return res.stdout.strip()
