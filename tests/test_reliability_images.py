"""Reliability: hostile images and hostile downloads. Imports go through a real agent
(as root and as a non-root operator, who may read only what they may read); downloads
through the image store against local servers that stall, trickle, lie about the length
or serve the wrong bytes. Nothing refused ever appears in the store."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from access_helpers import GROUP, OPERATORS, People, SharedAgent, ensure_group
from agent_helpers import require_test_image
from vmagent.errors import ImageError
from vmagent.images.catalog import Catalog
from vmagent.images.download import Limits
from vmagent.images.store import ImageStore

OPS = "vmrel-olga"


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    require_test_image()
    base = tmp_path_factory.mktemp("rel-img")
    for g in (GROUP, OPERATORS):
        ensure_group(g)
    people = People(base)
    people.add(OPS, GROUP, OPERATORS)
    a = SharedAgent(base).start()
    try:
        yield a
    finally:
        a.cleanup()
        people.remove()


def _qcow2(path: Path, mib: int = 10) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"], check=True)
    subprocess.run(["qemu-io", "-c", f"write -P 0xab 0 {mib}M", str(path)], check=True,
                   capture_output=True)
    return path


def _assert_refused(agent, status: int, doc: dict, match: str, name: str) -> None:
    assert status == 400, doc
    assert match in doc["message"], doc["message"]
    assert agent.call("GET", "/images")[1]["images"] == [] or name not in [
        i["name"] for i in agent.ok("GET", "/images")["images"]]
    assert not (agent.state_dir / "images" / name).exists()
    assert os.listdir(agent.state_dir / "images" / ".staging") == []


@pytest.fixture
def work(tmp_path):
    os.chmod(tmp_path, 0o755)            # other users may look in (not at root's files)
    return tmp_path


def test_a_caller_cannot_import_what_they_may_not_read(agent, work):
    """Promise: paths are opened with the caller's rights (shadow, through a symlink
    too); a non-root operator gets 'Permission denied'."""
    link = work / "innocent.qcow2"
    link.symlink_to("/etc/shadow")
    for path in ("/etc/shadow", str(link)):
        status, doc = agent.as_user(OPS, "POST", "/images", {"image": "shadow",
                                                              "path": path})
        _assert_refused(agent, status, doc, "Permission denied", "shadow")
        assert "caller's rights" in doc["message"]
    status, doc = agent.as_user(OPS, "POST", "/images", {
        "image": "k", "path": str(_qcow2(work / "ok.qcow2")), "kernel": "/etc/shadow"})
    _assert_refused(agent, status, doc, "Permission denied", "k")


def test_root_still_cannot_import_a_file_that_is_not_a_disk(agent):
    """Promise: a raw image must look like a disk (shadow is refused even for root)."""
    status, doc = agent.call("POST", "/images", {"image": "shadow", "path": "/etc/shadow"})
    _assert_refused(agent, status, doc, "raw image is refused", "shadow")


def test_kernels_and_initrds_must_be_what_they_claim(agent, work):
    disk = _qcow2(work / "d.qcow2")
    status, doc = agent.call("POST", "/images", {"image": "k", "path": str(disk),
                                                 "kernel": "/etc/passwd"})
    _assert_refused(agent, status, doc, "not a Linux kernel", "k")
    kernel = work / "vmlinuz"
    kernel.write_bytes(b"MZ" + bytes(0x200) + b"HdrS")
    status, doc = agent.call("POST", "/images", {"image": "k", "path": str(disk),
                                                 "kernel": str(kernel),
                                                 "initrd": "/etc/hostname"})
    _assert_refused(agent, status, doc, "not an initrd", "k")


@pytest.mark.parametrize("how", ["truncated", "header-only", "empty", "zeros"])
def test_corrupt_images_are_refused_at_import(agent, work, how):
    """Promise: qemu-img check and content checks run before an image is stored."""
    good = _qcow2(work / "good.qcow2")
    bad = work / f"{how}.img"
    data = good.read_bytes()
    bad.write_bytes({"truncated": data[:len(data) // 2], "header-only": data[:512],
                     "empty": b"", "zeros": bytes(4 << 20)}[how])
    status, doc = agent.call("POST", "/images", {"image": how, "path": str(bad)})
    match = {"truncated": "corrupt or truncated", "header-only": "corrupt or truncated",
             "empty": "empty", "zeros": "neither a partition table"}[how]
    _assert_refused(agent, status, doc, match, how)


def test_a_good_image_still_imports(agent, work):
    doc = agent.ok("POST", "/images", {"image": "fine", "path": str(_qcow2(work / "f.qcow2"))})
    assert doc["name"] == "fine" and doc["format"] == "qcow2"
    agent.ok("DELETE", "/images/fine")


# --- hostile downloads -------------------------------------------------------------------

class Hostile(BaseHTTPRequestHandler):
    """``/good`` the file; ``/stall`` headers then nothing; ``/trickle`` one byte a
    tenth of a second; ``/liar`` a Content-Length larger than what it sends."""
    payload = b""

    def do_GET(self):
        data = self.payload
        if self.path == "/good":
            self._head(len(data))
            self.wfile.write(data)
        elif self.path == "/stall":
            self._head(len(data))
            time.sleep(30)
        elif self.path == "/trickle":
            self._head(len(data))
            for b in data[:200]:
                self.wfile.write(bytes([b]))
                self.wfile.flush()
                time.sleep(0.1)
        elif self.path == "/liar":
            self._head(len(data) * 2)
            self.wfile.write(data)
        else:
            self.send_response(404)
            self.end_headers()

    def _head(self, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    Hostile.payload = _qcow2(d / "disk.qcow2", 2).read_bytes()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _store(tmp_path: Path, **kw) -> ImageStore:
    cat = tmp_path / "catalog"
    cat.mkdir()
    return ImageStore(tmp_path / "store", Catalog.load(cat), allow_local_urls=True, **kw)


def _pull(store: ImageStore, url: str, limits: Limits = Limits()) -> None:
    digest = hashlib.sha256(Hostile.payload).hexdigest()
    asyncio.run(store.pull("h", url=url, sha256=digest, limits=limits))


def _clean(store: ImageStore) -> None:
    assert sorted(p.name for p in store.root.iterdir()) == [".staging"]
    assert os.listdir(store.staging) == []


@pytest.mark.parametrize("path,limits,kw,match", [
    ("/stall", Limits(), {"read_timeout": 1.0}, "stalled"),
    ("/trickle", Limits(min_rate=1024, window=2.0), {}, "too slow"),
    ("/trickle", Limits(deadline=1.5), {}, "deadline"),
    ("/liar", Limits(), {}, "failed"),
], ids=["stall", "trickle-rate", "trickle-deadline", "short-body"])
def test_hostile_servers_end_a_pull_with_a_clear_error(tmp_path, hostile, path, limits,
                                                       kw, match):
    """Promise: every download is bounded (stall, rate, deadline) and a body shorter than
    announced is an error; nothing is stored."""
    store = _store(tmp_path, **kw)
    t0 = time.monotonic()
    with pytest.raises(ImageError, match=match):
        _pull(store, hostile + path, limits)
    assert time.monotonic() - t0 < 20
    _clean(store)


def test_the_wrong_bytes_are_refused(tmp_path, hostile):
    store = _store(tmp_path)
    with pytest.raises(ImageError, match="sha256 mismatch"):
        asyncio.run(store.pull("h", url=hostile + "/good", sha256="0" * 64))
    _clean(store)
    _pull(store, hostile + "/good")
    assert store.get("h").format == "qcow2"


@pytest.mark.parametrize("url,allow,match", [
    ("http://169.254.169.254/latest/meta-data", True, "link-local"),
    ("http://[fe80::1]/disk", True, "link-local"),
    ("http://127.0.0.1/disk", False, "loopback or private"),
    ("http://localhost/disk", False, "loopback or private"),
    ("http://10.0.0.1/disk", False, "loopback or private"),
])
def test_pull_address_policy(tmp_path, url, allow, match):
    """Promise: pulls never reach link-local addresses (a cloud's metadata service), and
    loopback or private ones only where the operator allows them."""
    cat = tmp_path / "catalog"
    cat.mkdir()
    store = ImageStore(tmp_path / "store", Catalog.load(cat), allow_local_urls=allow)
    with pytest.raises(ImageError, match=match):
        asyncio.run(store.pull("p", url=url, sha256="0" * 64))
    _clean(store)


def test_a_pull_job_can_be_followed_and_cancelled_and_never_blocks_a_new_one(agent,
                                                                             hostile):
    """Promise: a pull is a job the client follows; asking again follows the same job
    (no wait on its lock); cancelling leaves nothing."""
    digest = hashlib.sha256(Hostile.payload).hexdigest()
    body = {"url": hostile + "/trickle", "sha256": digest, "wait": False}
    # this agent refuses loopback URLs by default: the policy says so at once
    status, doc = agent.call("POST", "/images/slow/pull", body)
    assert status == 200 and doc["state"] in ("running", "failed")
    deadline = time.monotonic() + 10
    while (doc := agent.ok("GET", "/images/slow/pull"))["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert doc["state"] == "failed" and "loopback" in doc["error"]


def test_pull_jobs_through_an_agent_that_allows_local_urls(tmp_path, hostile):
    a = SharedAgent(tmp_path, "--allow-local-urls").start()
    try:
        digest = hashlib.sha256(Hostile.payload).hexdigest()
        body = {"url": hostile + "/trickle", "sha256": digest, "wait": False}
        first = a.ok("POST", "/images/slow/pull", body)
        assert first["state"] == "running" and first["kind"] == "image_pull"
        t0 = time.monotonic()
        again = a.ok("POST", "/images/slow/pull", body)      # follows, does not wait
        assert time.monotonic() - t0 < 5 and again["started"] == first["started"]
        gone = a.ok("DELETE", "/images/slow/pull")
        assert gone["state"] == "cancelled"
        assert "slow" not in [i["name"] for i in a.ok("GET", "/images")["images"]]
        assert os.listdir(a.state_dir / "images" / ".staging") == []
        done = a.ok("POST", "/images/good/pull", {"url": hostile + "/good",
                                                  "sha256": digest})
        assert done["state"] == "done" and done["result"]["name"] == "good"
        assert done["progress"]["done"] == len(Hostile.payload)
    finally:
        a.cleanup()
