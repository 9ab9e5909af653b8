"""Tests of vmagent.images (the image store) with the real qemu-img and a real local HTTP
server: import, pull with digest checks, refusal of unsafe images, derived images, remove."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from vmagent.images import download
from vmagent.images.catalog import DEFAULT_APPEND, Catalog
from vmagent.errors import BadRequest, Conflict, ImageError, NotFound
from vmagent.images.download import parse_sums
from vmagent.images.store import ImageStore

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
MiB = 1 << 20


def run(coro):
    return asyncio.run(coro)


def qemu_img(*args) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def sha(path: Path, algo: str = "sha256") -> str:
    return hashlib.new(algo, Path(path).read_bytes()).hexdigest()


# what a kernel and an initrd look like to the store (the x86 boot header, cpio)
KERNEL = b"MZ" + bytes(0x200) + b"HdrS" + b"KERNEL"
INITRD = b"070701" + b"INITRD"


def make_raw(path: Path, size: int = 4 * MiB) -> Path:
    """A raw disk: random data with an MBR signature (what a partitioned disk has)."""
    data = bytearray(os.urandom(64 * 1024))
    data[510:512] = b"\x55\xaa"
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)
    return path


def make_qcow2(path: Path) -> Path:
    raw = make_raw(path.with_suffix(".src"))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, path)
    raw.unlink()
    return path


def make_bad(kind: str, path: Path) -> Path:
    """An image the store must refuse: with a backing file, an external data file, or
    in a format other than qcow2/raw."""
    if kind == "backing":
        base = make_qcow2(path.with_name("backing.qcow2"))
        qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, path)
    elif kind == "data_file":
        qemu_img("create", "-q", "-f", "qcow2", "-o",
                 f"data_file={path.with_name('data.raw')}", path, "4M")
    else:
        qemu_img("create", "-q", "-f", "vmdk", path, "4M")
    return path


BAD_KINDS = {"backing": "has a backing file", "data_file": "uses an external data file",
             "vmdk": "format 'vmdk' is not supported"}


def toml(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def make_store(tmp_path: Path, **entries: dict) -> ImageStore:
    """A store whose catalog holds ``entries`` (name -> TOML fields, None = left out)."""
    cat = tmp_path / "catalog"
    cat.mkdir(exist_ok=True)
    for name, fields in entries.items():
        lines = [f"{k} = {toml(v)}" for k, v in dict(fields, name=name).items() if v is not None]
        (cat / f"{name}.toml").write_text("\n".join(lines) + "\n")
    # the test servers are on loopback: allowed here, refused by default
    return ImageStore(tmp_path / "store", Catalog.load(cat), allow_local_urls=True)


def assert_clean(store: ImageStore, *names: str) -> None:
    """Only ``names`` are in the store and nothing is left in staging."""
    assert sorted(p.name for p in store.root.iterdir()) == sorted([".staging", *names])
    assert list(store.staging.iterdir()) == []


class Handler(SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if self.path == "/truncated":       # promises 1 MiB, sends 100 bytes, hangs up
            self.send_response(200)
            self.send_header("Content-Length", str(MiB))
            self.end_headers()
            self.wfile.write(b"x" * 100)
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = type("H", (Handler,), {"requests": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield SimpleNamespace(root=root, url=f"http://127.0.0.1:{httpd.server_port}",
                          requests=handler.requests)
    httpd.shutdown()
    httpd.server_close()
    thread.join()


# --- import ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_import_lands_read_only_in_the_store(tmp_path, fmt):
    src = make_raw(tmp_path / "d.raw") if fmt == "raw" else make_qcow2(tmp_path / "d.qcow2")
    store = make_store(tmp_path)
    img = run(store.import_file("mine", src, sha256=sha(src).upper()))
    assert img.path == store.root / "mine" / f"disk.{fmt}"
    assert img.path.read_bytes() == src.read_bytes()
    assert (img.format, img.sha256, img.boot, img.base) == (fmt, sha(src), "disk", None)
    assert img.virtual_size == 4 * MiB and img.kernel is None and img.append is None
    assert img.source == {"kind": "file", "location": str(src)}
    assert img.description == f"imported from {src}"
    assert stat.S_IMODE(img.path.stat().st_mode) == 0o444
    assert stat.S_IMODE((store.root / "mine").stat().st_mode) == 0o755
    assert store.exists("mine") and not store.exists("other")
    assert store.get("mine") == img == store.resolve("mine")
    with pytest.raises(Conflict, match="'mine' already exists"):
        run(store.import_file("mine", src))
    assert [i.name for i in store.list()] == ["mine"]
    assert_clean(store, "mine")
    # the record names the files in the store; a restarted store reads the same image
    record = json.loads((store.root / "mine" / "image.json").read_text())
    assert record["path"] == str(img.path) and record["sha256"] == sha(src)
    assert ImageStore(store.root, store.catalog).get("mine") == img


def test_import_with_kernel_initrd_and_append(tmp_path):
    src, kernel, initrd = make_raw(tmp_path / "d.raw"), tmp_path / "bz", tmp_path / "rd"
    kernel.write_bytes(KERNEL)
    initrd.write_bytes(INITRD)
    store = make_store(tmp_path)
    img = run(store.import_file("k", src, kernel=kernel, initrd=initrd,
                                append="root=/dev/vda quiet", description="mine"))
    assert (img.boot, img.append, img.description) == ("kernel", "root=/dev/vda quiet", "mine")
    assert img.kernel == store.root / "k" / "vmlinuz" and img.kernel.read_bytes() == KERNEL
    assert img.initrd == store.root / "k" / "initrd.img"
    assert img.initrd.read_bytes() == INITRD
    assert stat.S_IMODE(img.kernel.stat().st_mode) == 0o444
    assert ImageStore(store.root, store.catalog).get("k") == img
    record = json.loads((store.root / "k" / "image.json").read_text())
    assert (record["kernel"], record["initrd"]) == (str(img.kernel), str(img.initrd))
    plain = run(store.import_file("k2", src, kernel=kernel))
    assert plain.append == DEFAULT_APPEND and plain.initrd is None


@pytest.mark.parametrize("name,path,kwargs,problem", [
    ("img", "d.raw", {"initrd": "rd"}, "initrd given without kernel"),
    ("img", "d.raw", {"append": "quiet"}, "append is only used with kernel"),
    ("img", "d.raw", {"sha256": "abc"}, "sha256: expected 64 hex digits"),
    ("img", "d.raw", {"kernel": "gone"}, "kernel: .*/gone: No such file or directory"),
    ("img", "nope.raw", {}, "path: .*/nope.raw: No such file or directory"),
    ("img", ".", {}, "path: .* is not a regular file"),
    ("Bad/Name", "d.raw", {}, "image name 'Bad/Name' is invalid"),
])
def test_import_argument_errors(tmp_path, name, path, kwargs, problem):
    make_raw(tmp_path / "d.raw")
    (tmp_path / "rd").write_bytes(b"x")
    kwargs = {k: tmp_path / v if k in ("initrd", "kernel") else v for k, v in kwargs.items()}
    store = make_store(tmp_path)
    with pytest.raises(BadRequest, match=problem):
        run(store.import_file(name, tmp_path / path, **kwargs))
    assert_clean(store)


def test_import_with_the_wrong_digest_leaves_nothing(tmp_path):
    store = make_store(tmp_path)
    with pytest.raises(ImageError, match="sha256 mismatch: expected 0000"):
        run(store.import_file("img", make_raw(tmp_path / "d.raw"), sha256="0" * 64))
    assert_clean(store)


@pytest.mark.parametrize("how", ["import", "pull"])
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_unsafe_images_are_refused(tmp_path, server, kind, how):
    bad = make_bad(kind, server.root / "bad.img")
    store = make_store(tmp_path)
    with pytest.raises(ImageError, match=BAD_KINDS[kind]):
        if how == "import":
            run(store.import_file("img", bad))
        else:
            run(store.pull("img", url=f"{server.url}/bad.img", sha256=sha(bad)))
    assert_clean(store)


# --- pull -----------------------------------------------------------------------------

def test_pull_a_catalog_entry(tmp_path, server):
    disk = make_qcow2(server.root / "disk.qcow2")
    url = f"{server.url}/disk.qcow2"
    store = make_store(tmp_path, img={"url": url, "format": "qcow2", "sha256": sha(disk),
                                      "description": "test image"})
    calls = []
    img = run(store.pull("img", progress=lambda done, total: calls.append((done, total))))
    size = disk.stat().st_size
    assert calls[-1] == (size, size)
    assert img.path == store.root / "img" / "disk.qcow2"
    assert img.path.read_bytes() == disk.read_bytes()
    assert (img.sha256, img.format, img.description) == (sha(disk), "qcow2", "test image")
    assert img.source == {"kind": "url", "location": url, "catalog": "img"}
    assert stat.S_IMODE(img.path.stat().st_mode) == 0o444
    assert_clean(store, "img")
    disk.unlink()                        # idempotent: no second download
    assert run(store.pull("img")) == img


def test_concurrent_pulls_download_once(tmp_path, server):
    disk = make_raw(server.root / "disk.raw")
    store = make_store(tmp_path, img={"url": f"{server.url}/disk.raw", "format": "raw",
                                      "sha256": sha(disk)})

    async def both():
        return await asyncio.gather(store.pull("img"), store.pull("img"))

    a, b = run(both())
    assert a == b and server.requests.count("/disk.raw") == 1
    assert_clean(store, "img")


@pytest.mark.parametrize("sums_name,algo,line", [
    ("SHA256SUMS", "sha256", "{digest} *{name}\n"),
    ("SHA512SUMS", "sha512", "{digest}  {name}\n"),
    ("SHA256SUMS", "sha256", "SHA256 ({name}) = {digest}\n"),
])
def test_pull_verifies_with_a_checksum_file(tmp_path, server, sums_name, algo, line):
    disk = make_raw(server.root / "disk.raw")
    (server.root / sums_name).write_text(
        line.format(digest="f" * len(sha(disk, algo)), name="other.raw")
        + line.format(digest=sha(disk, algo), name="disk.raw"))
    store = make_store(tmp_path, img={"url": f"{server.url}/disk.raw", "format": "raw",
                                      "checksum_url": f"{server.url}/{sums_name}"})
    assert run(store.pull("img")).sha256 == sha(disk)
    assert_clean(store, "img")


@pytest.mark.parametrize("fmt,digest,sums,problem", [
    ("raw", "0" * 64, None, "sha256 mismatch for .*disk.raw: expected 0{64}"),
    ("qcow2", "good", None, "the image is raw, not qcow2 as declared"),
    ("raw", None, "{bad}  disk.raw\n", "sha512 mismatch for http"),
    ("raw", None, "{good}  another.raw\n", "disk.raw is not listed in http"),
    ("raw", None, "404", "SUMS failed: HTTP 404"),
])
def test_pull_of_a_wrong_file_leaves_nothing(tmp_path, server, fmt, digest, sums, problem):
    disk = make_raw(server.root / "disk.raw")
    good, bad = sha(disk), sha(disk, "sha512")[::-1]
    if sums and sums != "404":
        (server.root / "SUMS").write_text(sums.format(bad=bad, good=good))
    store = make_store(tmp_path, img={
        "url": f"{server.url}/disk.raw", "format": fmt,
        "sha256": good if digest == "good" else digest,
        "checksum_url": f"{server.url}/SUMS" if sums else None})
    with pytest.raises(ImageError, match=problem):
        run(store.pull("img"))
    assert_clean(store)


def test_pull_http_failures_are_clear_errors(tmp_path, server):
    with socket.socket() as s:          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    store = make_store(
        tmp_path, gone={"url": f"{server.url}/gone.raw", "format": "raw", "sha256": "0" * 64},
        refused={"url": f"http://127.0.0.1:{closed}/d.raw", "format": "raw",
                 "sha256": "0" * 64},
        cut={"url": f"{server.url}/truncated", "format": "raw", "sha256": "0" * 64})
    with pytest.raises(ImageError, match=r"download of .*/gone.raw failed: HTTP 404") as exc:
        run(store.pull("gone"))
    assert exc.value.details["status"] == 404 and exc.value.status == 400
    with pytest.raises(ImageError, match=f"download of .*:{closed}/d.raw failed: .*connect"):
        run(store.pull("refused"))
    with pytest.raises(ImageError, match="download of .*/truncated failed"):
        run(store.pull("cut"))
    assert_clean(store)


def test_pull_from_a_url(tmp_path, server):
    disk = make_qcow2(server.root / "d.qcow2")
    url = f"{server.url}/d.qcow2"
    store = make_store(tmp_path)
    seen = []

    async def progress(done, total):
        seen.append(done)

    img = run(store.pull("adhoc", url=url, sha256=sha(disk), progress=progress))
    assert img.source == {"kind": "url", "location": url} and seen[-1] == disk.stat().st_size
    assert run(store.pull("adhoc", url=url, sha256=sha(disk))) == img
    with pytest.raises(Conflict, match="already exists"):
        run(store.pull("adhoc", url=f"{server.url}/other.qcow2", sha256=sha(disk)))
    with pytest.raises(BadRequest, match="sha256 is required"):
        run(store.pull("x", url=url))
    with pytest.raises(BadRequest, match="expected an http"):
        run(store.pull("x", url="file:///etc/passwd", sha256=sha(disk)))
    with pytest.raises(NotFound, match="'nope' is not in the catalog"):
        run(store.pull("nope"))
    assert_clean(store, "adhoc")


def test_pull_a_kernel_boot_entry(tmp_path, server):
    disk = make_raw(server.root / "root.raw")
    (server.root / "vmlinuz").write_bytes(KERNEL)
    (server.root / "initrd").write_bytes(INITRD)
    sums = "".join(f"{sha(server.root / n)}  {n}\n" for n in ("root.raw", "vmlinuz", "initrd"))
    (server.root / "SHA256SUMS").write_text(sums)
    entry = {"url": f"{server.url}/root.raw", "format": "raw", "boot": "kernel",
             "checksum_url": f"{server.url}/SHA256SUMS",
             "kernel_url": f"{server.url}/vmlinuz", "initrd_url": f"{server.url}/initrd"}
    store = make_store(tmp_path, k=entry,
                       bad=dict(entry, checksum_url=None, sha256=sha(disk),
                                kernel_sha256="0" * 64, initrd_url=None))
    img = run(store.pull("k"))
    assert (img.boot, img.append) == ("kernel", DEFAULT_APPEND)
    assert img.kernel.read_bytes() == KERNEL and img.initrd.read_bytes() == INITRD
    with pytest.raises(ImageError, match="sha256 mismatch for .*/vmlinuz"):
        run(store.pull("bad"))
    assert_clean(store, "k")


# --- derived images, get/resolve/list, remove --------------------------------------------

def test_derived_image_shares_the_base_disk(tmp_path, server):
    disk = make_qcow2(server.root / "base.qcow2")
    store = make_store(
        tmp_path, base={"url": f"{server.url}/base.qcow2", "format": "qcow2",
                        "sha256": sha(disk)},
        dev={"base": "base", "packages": ["build-essential", "git", "vim"],
             "description": "dev box", "cloud_config": {"packages": ["vim"],
                                                        "runcmd": [["true"]]}})
    dev = run(store.pull("dev"))                 # pulls the base first
    base = store.get("base")
    assert (dev.base, dev.path, dev.format, dev.sha256) == ("base", base.path, "qcow2",
                                                            base.sha256)
    assert dev.actual_size == 0 and dev.description == "dev box"
    assert dev.cloud_config == {"packages": ["vim", "build-essential", "git"],
                                "runcmd": [["true"]]}
    assert dev.source == {"kind": "base", "location": "base", "catalog": "dev"}
    assert sorted(os.listdir(store.root / "dev")) == ["image.json"]
    assert store.resolve("dev").path == base.path and base.path.is_file()
    assert [i.name for i in store.list()] == ["base", "dev"]
    with pytest.raises(Conflict, match="'base' is the base of dev") as exc:
        run(store.remove("base", []))
    assert exc.value.details == {"images": ["dev"]}
    shutil.rmtree(store.root / "base")           # the base vanished behind our back
    assert store.get("dev").base == "base"
    with pytest.raises(ImageError, match="derived from 'base', which is missing"):
        store.resolve("dev")
    run(store.remove("dev", []))
    assert_clean(store)


def test_remove(tmp_path):
    store = make_store(tmp_path, img={"url": "https://example.org/d.raw", "format": "raw",
                                      "sha256": "0" * 64})
    run(store.import_file("img", make_raw(tmp_path / "d.raw")))
    with pytest.raises(Conflict, match=r"'img' is used by VM\(s\): a, b") as exc:
        run(store.remove("img", ["b", "a"]))
    assert exc.value.details == {"vms": ["a", "b"]} and store.exists("img")
    run(store.remove("img", []))
    assert not store.exists("img")
    assert_clean(store)
    with pytest.raises(NotFound, match="pull it with 'vmctl image pull img'"):
        run(store.remove("img", []))
    with pytest.raises(NotFound, match="'zz' is not in the store$"):
        store.get("zz")


def test_store_start_clears_staging_and_list_skips_broken_records(tmp_path, caplog):
    store = make_store(tmp_path)
    (store.staging / "leftover").mkdir()
    (store.root / "broken").mkdir()
    (store.root / "broken" / "image.json").write_text("{not json")
    store = ImageStore(store.root, store.catalog)
    assert list(store.staging.iterdir()) == []
    assert store.list() == []
    assert "skipping unreadable image" in caplog.text


def test_parse_sums_formats():
    a, b = "a" * 64, "B" * 128
    text = (f"{a}  plain.img\n{a} *star.img\n{b}  ./dot.img\nSHA256 (bsd.img) = {a}\n"
            f"SHA512 (short.img) = {a}\n# comment\n\n{a[:40]}  truncated.img\n")
    assert parse_sums(text) == {"plain.img": a, "star.img": a, "dot.img": b.lower(),
                                "bsd.img": a}
    assert download.basename("http://h/dir/my%20disk.img?x=1") == "my disk.img"
