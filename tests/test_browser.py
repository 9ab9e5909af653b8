"""The web UI in a real browser (headless Chromium through Selenium) against the real
session agent and real guests under TCG (warm clones of the session template): sign in,
the list, noVNC showing the guest's screen, the serial console in xterm.js, a reboot
seen live, a create from the form with its phases, a second person who sees nothing of
the first's VM, CSRF, single-use and expired VNC links. Screenshots and the measured
figures go to the test artifacts (tests/browser_helpers.py)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time

import pytest

from agent_helpers import ROOT
from browser_helpers import ARTIFACTS, Browser, add_token, require_browser, tcp_call

pytestmark = pytest.mark.integration

ALICE, BOB = "uialice", "uibob"
_names = itertools.count(1)
FIGURES: dict = {}


@pytest.fixture(scope="module")
def people(session_agent):
    """Two people with tokens; alice has an SSH key, so she may create VMs."""
    a = session_agent
    tokens = {u: add_token(a.state_dir, u) for u in (ALICE, BOB)}
    a.ok("POST", "/keys", {"user": ALICE, "keys": a.key.with_suffix(".pub").read_text()})
    return tokens


@pytest.fixture(scope="module")
def alice_vm(session_agent, session_template, people):
    """A running warm clone that alice created (over TCP, with her token)."""
    name = f"ui{next(_names)}"
    status, st = tcp_call(session_agent.port, people[ALICE], "POST", "/vms",
                          {"name": name, "template": session_template})
    assert status == 201, st
    try:
        yield st
    finally:
        session_agent.call("DELETE", f"/vms/{name}")


@pytest.fixture(scope="module")
def browser(session_agent):
    require_browser()
    b = Browser(f"http://127.0.0.1:{session_agent.port}")
    try:
        yield b
    finally:
        b.quit()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "figures.json").write_text(json.dumps(FIGURES, indent=2) + "\n")


def _vmctl(agent, token: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VMCTL_TOKEN": token, "VMCTL_CONFIG": os.devnull}
    return subprocess.run([sys.executable, "-m", "vmctl", "--host", agent.http, *args],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)


def serial_login_prompt(agent, name: str, timeout: float = 120) -> str:
    """Press Enter on the VM's serial console (the API's console websocket, as vmctl
    console does) and return the console log from there on once it shows a login
    prompt."""
    import asyncio

    import aiohttp
    offset = agent.ok("GET", f"/vms/{name}/console/log?tail=0")["offset"]

    async def enter() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(
                path=str(agent.socket))) as s:
            async with s.ws_connect(f"http://agent/v1/vms/{name}/console") as ws:
                await ws.send_bytes(b"\r")
                await asyncio.sleep(0.5)
    deadline = time.monotonic() + timeout
    while True:
        asyncio.run(enter())
        poll_until = time.monotonic() + 15
        while time.monotonic() < poll_until:
            data = agent.ok("GET", f"/vms/{name}/console/log?offset={offset}")["data"]
            if "login:" in data:
                return data
            time.sleep(0.3)
        assert time.monotonic() < deadline, f"no login prompt on the serial console: {data!r}"


def _state(browser: Browser) -> str:
    """The state the VM page shows (read in one go: the poll replaces the element)."""
    return browser.js("const e = document.getElementById('state');"
                      "return e ? e.textContent.trim() : '';")


def test_sign_in_see_the_vm_and_its_screen_in_novnc(session_agent, browser, people,
                                                    alice_vm):
    name = alice_vm["name"]
    browser.sign_in(people[ALICE])
    row = browser.wait(lambda: browser.finds(f"tr[data-vm='{name}']"), message="the row")[0]
    browser.wait(lambda: "running" in row.text, message="running in the list")
    # link: the guest agent answers the monitor's ping (vmagent/monitor/), which a
    # just-restored clone does a round or a few after it runs; the page updates itself
    row = browser.wait(lambda: next((r for r in browser.finds(f"tr[data-vm='{name}']")
                                     if "link up" in r.text), None),
                       timeout=60, message="link up in the list")
    assert ALICE in row.text and f"vmctl ssh {name}" in row.text
    FIGURES["list"] = browser.page_figures()     # weight of the list page, first paint
    browser.shot("list")
    browser.shot("page-list", "body")
    browser.find(f"tr[data-vm='{name}'] a").click()
    browser.wait(lambda: browser.finds("#do-reboot"), message="the VM page")
    browser.wait(lambda: browser.finds("#snapshots table, #snapshots .empty"))
    assert "test" in browser.text("#spec") and ALICE in browser.text("#status")
    browser.shot("vm")
    browser.shot("page-vm", "body")
    browser.find("#open-vnc").click()
    browser.wait(lambda: browser.find("#screen").get_attribute("data-connected"),
                 timeout=60, message="noVNC connected")
    # the guest's screen: a real picture (not one colour), of a real size
    stats = browser.wait(lambda: (s := browser.canvas_stats()) and s["colours"] > 1 and s,
                         timeout=60, message="a non-uniform canvas")
    assert stats["width"] >= 640 and stats["height"] >= 400, stats
    FIGURES["vnc_page"] = browser.page_figures()
    FIGURES["vnc_page"]["connected_ms"] = int(browser.find("#screen").get_attribute(
        "data-connected"))                       # from navigation to the RFB handshake
    # the guest's login prompt, read through its serial console
    assert "login:" in serial_login_prompt(session_agent, name)
    browser.shot("vnc")
    browser.shot("page-vnc", "body")
    # typing into noVNC reaches the guest: its tty1 echoes and the canvas changes
    before = browser.canvas_stats()["hash"]
    t0 = time.monotonic()
    browser.js("window.vmagentRFB.sendKey(0x61, 'KeyA');")     # 'a' at tty1's login
    browser.wait(lambda: browser.canvas_stats()["hash"] != before, timeout=30,
                 interval=0.02, message="the typed key on the guest's screen")
    FIGURES["vnc_key_to_screen_ms"] = round((time.monotonic() - t0) * 1000)
    browser.js("window.vmagentRFB.sendKey(0xff08, 'Backspace');")


def test_the_serial_console_echoes_what_is_typed(browser, people, alice_vm):
    name = alice_vm["name"]
    browser.sign_in(people[ALICE])
    browser.get(f"/ui/vms/{name}/console")
    browser.wait(lambda: browser.text("#term-status") == "connected", timeout=30)
    # the scrollback starts with the recent console log (the boot)
    assert "login:" in browser.term_text() or "Linux" in browser.term_text()
    textarea = browser.find("#term textarea")      # xterm.js takes the keys here
    textarea.send_keys("\r")
    browser.wait(lambda: browser.term_text().rstrip().endswith("login:"), timeout=60,
                 message="a fresh login prompt")
    textarea.send_keys("uiecho")
    browser.wait(lambda: browser.term_text().rstrip().endswith("login: uiecho"), timeout=30,
                 message="the user name echoed by the guest")
    browser.shot("console")
    FIGURES["console_page"] = browser.page_figures()
    textarea.send_keys("\x15")                      # Ctrl-U: the line is taken back


def test_reboot_goes_through_stopping_and_starting_back_to_running(browser, people,
                                                                  alice_vm):
    name = alice_vm["name"]
    browser.sign_in(people[ALICE])
    browser.get(f"/ui/vms/{name}")
    browser.wait(lambda: _state(browser) == "running", timeout=120)
    url = browser.driver.current_url
    browser.find("#do-reboot").click()
    seen: list[str] = []
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        state = _state(browser)
        if not seen or seen[-1] != state:
            seen.append(state)
        if state == "running" and len(seen) > 1:
            break
        time.sleep(0.1)
    assert browser.driver.current_url == url           # no reload
    assert seen[0] == "running" and seen[-1] == "running", seen
    middle = seen[1:-1]
    assert "stopping" in middle and "starting" in middle, seen
    assert middle.index("stopping") < middle.index("starting"), seen
    assert "reboot: done" in browser.text("#result")
    assert "stopping" not in seen[seen.index("starting"):], seen


def test_create_from_the_form_shows_the_phases_then_delete(session_agent, session_template,
                                                          browser, people):
    name = f"ui{next(_names)}"
    browser.sign_in(people[ALICE])
    browser.get("/ui/new")
    browser.find("#name").send_keys(name)
    browser.find("input[name=source][value=template]").click()
    from selenium.webdriver.support.ui import Select
    Select(browser.find("#template")).select_by_visible_text(session_template)
    browser.find("#create-submit").click()
    try:
        for phase in ("qemu", "kernel", "ssh"):
            browser.wait(lambda: "done" in browser.find(
                f"li[data-phase={phase}]").get_attribute("class"), timeout=300,
                message=f"phase {phase}")
        result = browser.wait(lambda: "is ready" in browser.text("#p-result") and
                              browser.text("#p-result"), timeout=300)
        assert f"vmctl ssh {name}" in result
        times = [li.text for li in browser.finds("#phases li.done")]
        assert len(times) >= 6 and all(t.endswith(" s") for t in times), times
        browser.shot("create")
        # and delete it from its page, with the confirmation
        browser.find("#p-result a").click()
        browser.wait(lambda: browser.finds("#do-delete"))
        browser.find("#do-delete").click()           # unticked: the browser refuses
        assert browser.finds("#do-delete") and "/ui/vms/" in browser.driver.current_url
        browser.find("#confirm-delete").click()
        browser.find("#do-delete").click()
        browser.wait(lambda: browser.driver.current_url.endswith("/ui/"), timeout=120)
        browser.wait(lambda: name not in browser.text("#vms"), timeout=30)
        assert session_agent.call("GET", f"/vms/{name}")[0] == 404
    finally:
        session_agent.call("DELETE", f"/vms/{name}")


def test_a_second_person_sees_no_trace_of_the_first_persons_vm(browser, people, alice_vm):
    name = alice_vm["name"]
    browser.sign_in(people[BOB])
    assert name not in browser.driver.page_source
    doc = browser.js_async("""const done = arguments[arguments.length - 1];
        fetch('/ui/api/vms').then(r => r.json()).then(done);""")
    assert doc["vms"] == [] and name not in json.dumps(doc)
    browser.get(f"/ui/vms/{name}")
    assert "Not allowed" in browser.text("h1")
    browser.get(f"/ui/vms/{name}/vnc")
    assert "Not allowed" in browser.text("h1") and not browser.finds("#screen")
    browser.sign_out()


def test_a_request_without_the_csrf_token_is_refused(browser, people, alice_vm):
    name = alice_vm["name"]
    browser.sign_in(people[ALICE])
    refused = browser.js_async("""const done = arguments[arguments.length - 1];
        fetch('/ui/api/op/poweroff', {method: 'POST', body: JSON.stringify({name: arguments[0]}),
              headers: {'Content-Type': 'application/json'}})
          .then(async r => done({status: r.status, doc: await r.json()}));""", name)
    assert refused["status"] == 403 and "CSRF" in refused["doc"]["message"]
    st = browser.js_async("""const done = arguments[arguments.length - 1];
        fetch('/ui/api/vms/' + arguments[0]).then(r => r.json()).then(d => done(d.status));""",
                          name)
    assert st["state"] == "running"                  # the power-off did not happen


def test_vmctl_vnc_link_works_once_and_an_expired_one_is_refused(session_agent, browser,
                                                                 people, alice_vm):
    name = alice_vm["name"]
    res = _vmctl(session_agent, people[ALICE], "vnc", name)
    assert res.returncode == 0, res.stderr
    url = res.stdout.strip()
    assert url.startswith(f"http://127.0.0.1:{session_agent.port}/ui/link/vml_")
    browser.driver.delete_all_cookies()
    browser.get(url)
    browser.wait(lambda: browser.find("#screen").get_attribute("data-connected"),
                 timeout=60, message="noVNC through the link")
    assert "vml_" not in browser.driver.current_url           # no token after sign-in
    assert browser.driver.current_url.endswith(f"/ui/vms/{name}/vnc")
    browser.get("/ui/")                                        # the link opens one screen
    assert "Not allowed" in browser.text("h1")
    browser.get(url)
    assert "already used" in browser.text("main")
    res = _vmctl(session_agent, people[ALICE], "--json", "vnc", name, "--ttl", "1")
    doc = json.loads(res.stdout)
    time.sleep(doc["expires_in"] + 0.2)            # the link's lifetime is the point
    browser.driver.delete_all_cookies()
    browser.get(doc["url"])
    assert "expired" in browser.text("main") and not browser.finds("#screen")
    # another person's VM: no link at all
    res = _vmctl(session_agent, people[BOB], "vnc", name)
    assert res.returncode == 8 and "may not" in res.stderr


def test_vmctl_ui_signs_in_as_the_caller(session_agent, browser, people):
    res = _vmctl(session_agent, people[BOB], "ui")
    assert res.returncode == 0, res.stderr
    browser.driver.delete_all_cookies()
    browser.get(res.stdout.strip())
    browser.wait(lambda: browser.finds("#vms"))
    assert BOB in browser.text("header") and "vml_" not in browser.driver.current_url


def test_the_list_is_usable_at_phone_width(session_agent, people, alice_vm):
    require_browser()
    phone = Browser(f"http://127.0.0.1:{session_agent.port}", width=390, height=844)
    try:
        # a phone's viewport (a headless window is at least 500 px wide)
        phone.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
        phone.sign_in(people[ALICE])
        assert phone.js("return window.innerWidth") == 390
        phone.wait(lambda: alice_vm["name"] in phone.text("#vms"))
        assert phone.js("return document.documentElement.scrollWidth <= window.innerWidth")
        phone.shot("list-phone")
    finally:
        phone.quit()


def test_the_api_vnc_stream_speaks_rfb(session_agent, people, alice_vm):
    """The ``vnc`` operation for programs: a websocket with a bearer token, RFB inside."""
    import asyncio

    import aiohttp
    name = alice_vm["name"]

    async def greet(token: str) -> tuple[int | None, bytes]:
        async with aiohttp.ClientSession() as s:
            try:
                async with s.ws_connect(f"{session_agent.http}/v1/vms/{name}/vnc",
                                        headers={"Authorization": f"Bearer {token}"}) as ws:
                    msg = await asyncio.wait_for(ws.receive(), 30)
                    return 101, msg.data
            except aiohttp.WSServerHandshakeError as e:
                return e.status, b""
    status, data = asyncio.run(greet(people[ALICE]))
    assert status == 101 and data.startswith(b"RFB 003."), data
    assert asyncio.run(greet(people[BOB]))[0] == 403
