"""The image store, the catalog and instance disks, with real qemu-img and a real local
HTTP server for downloads."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vmagent import disks, errors
from vmagent.catalog import Catalog, default_catalog_dir
from vmagent.images import ImageStore

run = asyncio.run


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def store(tmp_path) -> ImageStore:
    return ImageStore(tmp_path / "images", Catalog.load(default_catalog_dir()))


@pytest.fixture
def files(tmp_path) -> Path:
    d = tmp_path / "files"
    d.mkdir()
    qemu_img("create", "-f", "qcow2", str(d / "base.qcow2"), "64M")
    (d / "SHA256SUMS").write_text(f"{sha256(d / 'base.qcow2')} *base.qcow2\n")
    return d


@pytest.fixture
def http_url(files):
    """A real HTTP server on 127.0.0.1 serving ``files``."""
    handler = partial(SimpleHTTPRequestHandler, directory=str(files))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def store_is_clean(store: ImageStore) -> bool:
    return list(store.staging.iterdir()) == [] and [
        p.name for p in store.root.iterdir() if p.name != ".staging"] == []


def test_shipped_catalog_has_the_images():
    cat = Catalog.load(default_catalog_dir())
    assert {"debian-12", "ubuntu-24.04", "devel"} <= set(cat.names())
    for name in ("debian-12", "ubuntu-24.04"):
        e = cat.get(name)
        assert e.url.startswith("https://") and e.format == "qcow2" and e.boot == "disk"
        assert e.checksum_url or e.sha256
    devel = cat.get("devel")
    assert devel.base == "debian-12"
    assert {"build-essential", "git", "gdb", "python3-venv"} <= set(devel.packages)


def test_import_qcow2_and_kernel_boot(store, files, tmp_path):
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    img = run(store.import_file("mine", files / "base.qcow2", kernel=tmp_path / "vmlinuz",
                                append="root=/dev/vda"))
    assert img.format == "qcow2" and img.virtual_size == 64 << 20
    assert img.sha256 == sha256(files / "base.qcow2")
    assert img.boot == "kernel" and img.kernel.read_bytes() == b"kernel"
    assert img.append == "root=/dev/vda"
    assert [i.name for i in store.list()] == ["mine"]
    assert store.get("mine").path.is_file() and list(store.staging.iterdir()) == []


def test_import_refuses_backing_file_data_file_and_other_formats(store, files):
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", str(files / "base.qcow2"),
             str(files / "overlay.qcow2"))
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={files / 'data.raw'}",
             str(files / "external.qcow2"), "16M")
    qemu_img("create", "-f", "vmdk", str(files / "disk.vmdk"), "16M")
    for name, match in (("overlay.qcow2", "backing"), ("external.qcow2", "data"),
                        ("disk.vmdk", "vmdk")):
        with pytest.raises(errors.ImageError, match=match):
            run(store.import_file("bad", files / name))
    with pytest.raises(errors.BadRequest, match="does not exist"):
        run(store.import_file("bad", files / "missing.qcow2"))
    assert store_is_clean(store)


def test_pull_verifies_sha256_then_renames(store, files, http_url):
    digest = sha256(files / "base.qcow2")
    img = run(store.pull("web", url=f"{http_url}/base.qcow2", sha256=digest))
    assert img.sha256 == digest and img.source["location"].endswith("/base.qcow2")
    assert store.exists("web") and list(store.staging.iterdir()) == []


def test_pull_with_wrong_digest_leaves_nothing(store, files, http_url):
    with pytest.raises(errors.ImageError, match="mismatch|sha256"):
        run(store.pull("web", url=f"{http_url}/base.qcow2", sha256="0" * 64))
    assert store_is_clean(store)


def test_pull_404_and_refused_connection_are_clear(store, http_url):
    with pytest.raises(errors.ImageError, match="404"):
        run(store.pull("web", url=f"{http_url}/nothing.qcow2", sha256="0" * 64))
    with pytest.raises(errors.ImageError):
        run(store.pull("web", url="http://127.0.0.1:9/x.qcow2", sha256="0" * 64))
    with pytest.raises(errors.BadRequest, match="sha256"):
        run(store.pull("web", url=f"{http_url}/base.qcow2"))
    assert store_is_clean(store)


def test_pull_catalog_entry_with_checksum_file_and_derived_image(tmp_path, files, http_url):
    cat_dir = tmp_path / "catalog"
    cat_dir.mkdir()
    (cat_dir / "base.toml").write_text(
        f'name = "base"\nurl = "{http_url}/base.qcow2"\nformat = "qcow2"\nboot = "disk"\n'
        f'checksum_url = "{http_url}/SHA256SUMS"\n')
    (cat_dir / "dev.toml").write_text('name = "dev"\nbase = "base"\npackages = ["git"]\n')
    store = ImageStore(tmp_path / "images", Catalog.load(cat_dir))
    dev = run(store.pull("dev"))                     # pulls the base first
    assert store.exists("base") and dev.path == store.get("base").path
    assert store.resolve("dev").cloud_config["packages"] == ["git"]
    with pytest.raises(errors.VMAgentError):
        run(store.remove("base", in_use=[]))         # "dev" is derived from it
    with pytest.raises(errors.Conflict):
        run(store.remove("dev", in_use=["vm1"]))
    run(store.remove("dev", in_use=[]))
    run(store.remove("base", in_use=[]))
    assert store.list() == []


def test_overlay_is_backed_by_the_base_and_grown(tmp_path, files):
    dest = tmp_path / "disk.qcow2"
    run(disks.create_overlay(files / "base.qcow2", "qcow2", dest, 1 << 30))
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(dest)],
                                     capture_output=True, check=True).stdout)
    assert info["backing-filename"] == str(files / "base.qcow2")
    assert info["virtual-size"] == 1 << 30
    assert dest.stat().st_size < 1 << 20           # an overlay, not a copy
    with pytest.raises(errors.BadRequest, match="only grow"):
        run(disks.create_overlay(files / "base.qcow2", "qcow2", tmp_path / "small.qcow2",
                                 1 << 20))
    assert not (tmp_path / "small.qcow2").exists()


def test_sparse_copy_keeps_holes(tmp_path):
    src = tmp_path / "sparse.raw"
    with open(src, "wb") as f:
        f.truncate(1 << 30)
        f.seek(1 << 29)
        f.write(b"data")
    w = disks.sparse_copy(src, tmp_path / "copy.raw")
    copy = tmp_path / "copy.raw"
    assert copy.stat().st_size == 1 << 30
    assert copy.stat().st_blocks * 512 < 16 << 20
    assert w.digest("sha256") == sha256(src)
