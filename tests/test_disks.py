"""Tests of vmagent.disks against the real qemu-img: info, overlays, resize, snapshots,
and the sparse writer/copy."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

from vmagent.qemu import disks
from vmagent.errors import BadRequest, Conflict, ImageError

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

MiB = 1 << 20
GiB = 1 << 30


def run(coro):
    return asyncio.run(coro)


def qemu_img(*args) -> str:
    return subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True,
                          text=True).stdout


def info(path: Path) -> dict:
    return json.loads(qemu_img("info", "--output=json", "-U", path))


def make_raw(path: Path, size: int, data: bytes = b"", offset: int = 0) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(offset)
        f.write(data)
    return path


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture
def raw_base(tmp_path) -> Path:
    """A 64 MiB raw disk with 8 MiB of real data at its start."""
    return make_raw(tmp_path / "base.raw", 64 * MiB, os.urandom(8 * MiB))


@pytest.fixture
def qcow2_base(tmp_path, raw_base) -> Path:
    dest = tmp_path / "base.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw_base, dest)
    return dest


# --- qemu_img_info / run_qemu_img ---------------------------------------------------

def test_info_probes_or_takes_the_format(raw_base, qcow2_base):
    raw = run(disks.qemu_img_info(raw_base))
    assert raw["format"] == "raw" and raw["virtual-size"] == 64 * MiB
    qcow = run(disks.qemu_img_info(qcow2_base, "qcow2", force_share=True))
    assert qcow["format"] == "qcow2" and qcow["virtual-size"] == 64 * MiB
    # a declared format is trusted: a qcow2 read as raw is just bytes
    assert run(disks.qemu_img_info(qcow2_base, "raw"))["format"] == "raw"


def test_info_of_a_missing_file_is_a_qemu_img_error(tmp_path):
    missing = tmp_path / "nope.qcow2"
    with pytest.raises(disks.QemuImgError) as exc:
        run(disks.qemu_img_info(missing))
    err = exc.value
    assert isinstance(err, ImageError) and err.status == 400
    assert err.message.startswith("qemu-img info failed: ")
    assert str(missing) in err.message and str(missing) in err.output
    assert err.exitcode not in (0, None)
    assert err.command[:2] == ["qemu-img", "info"] and err.command[-1] == str(missing)
    assert err.details["command"] == err.command


def test_missing_qemu_img_binary(monkeypatch, raw_base):
    monkeypatch.setattr(disks, "QEMU_IMG", "/nonexistent/qemu-img")
    with pytest.raises(disks.QemuImgError, match="cannot run /nonexistent/qemu-img") as exc:
        run(disks.qemu_img_info(raw_base))
    assert exc.value.exitcode is None


@pytest.mark.parametrize("name", ["-f", "nbd:127.0.0.1:1", "json:{}", "file:x"])
def test_odd_relative_names_are_files(tmp_path, monkeypatch, name):
    # never an option (after '--') nor a qemu protocol such as nbd: or json:
    make_raw(tmp_path / name, MiB)
    monkeypatch.chdir(tmp_path)
    assert run(disks.qemu_img_info(Path(name)))["virtual-size"] == MiB
    run(disks.resize(Path(name), 2 * MiB))
    assert os.path.getsize(tmp_path / name) == 2 * MiB
    run(disks.create_overlay(Path(name), "raw", Path(f"{name}.ov"), 2 * MiB))
    assert info(tmp_path / f"{name}.ov")["backing-filename"] == str(tmp_path / name)


# --- create_overlay ------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_overlay_is_backed_by_the_base_and_grown(tmp_path, raw_base, qcow2_base, fmt):
    base = raw_base if fmt == "raw" else qcow2_base
    dest = tmp_path / "vm" / "disk.qcow2"
    dest.parent.mkdir()
    run(disks.create_overlay(base, fmt, dest, GiB))
    got = info(dest)
    assert got["format"] == "qcow2"
    assert got["backing-filename"] == str(base.absolute())
    assert got["backing-filename-format"] == fmt
    assert got["virtual-size"] == GiB
    # an overlay, not a copy: it holds metadata only, whatever the base's data
    assert got["actual-size"] < MiB and allocated(dest) < MiB
    assert allocated(base) >= 8 * MiB
    # the guest sees the base's data through the overlay
    assert subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw_base,
                           dest], capture_output=True).returncode == 0


def test_overlay_of_a_relative_base_path_records_an_absolute_one(tmp_path, qcow2_base,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(disks.create_overlay(Path("base.qcow2"), "qcow2", Path("ov.qcow2"), 64 * MiB))
    assert info(tmp_path / "ov.qcow2")["backing-filename"] == str(qcow2_base)


def test_overlay_on_a_large_base_is_tiny(tmp_path):
    base = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "100G")
    dest = tmp_path / "ov.qcow2"
    run(disks.create_overlay(base, "qcow2", dest, 100 * GiB))
    assert info(dest)["virtual-size"] == 100 * GiB
    assert info(dest)["actual-size"] < MiB


def test_overlay_of_the_same_size_is_allowed(tmp_path, qcow2_base):
    run(disks.create_overlay(qcow2_base, "qcow2", tmp_path / "ov.qcow2", 64 * MiB))
    assert info(tmp_path / "ov.qcow2")["virtual-size"] == 64 * MiB


def test_overlay_smaller_than_the_base_is_refused(tmp_path, qcow2_base):
    dest = tmp_path / "ov.qcow2"
    with pytest.raises(BadRequest, match="smaller than the base image .64M.; a disk can "
                                         "only grow"):
        run(disks.create_overlay(qcow2_base, "qcow2", dest, 32 * MiB))
    assert not dest.exists()


def test_overlay_never_overwrites(tmp_path, qcow2_base):
    dest = tmp_path / "ov.qcow2"
    dest.write_bytes(b"precious")
    with pytest.raises(Conflict, match="already exists"):
        run(disks.create_overlay(qcow2_base, "qcow2", dest, GiB))
    assert dest.read_bytes() == b"precious"
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(Conflict):
        run(disks.create_overlay(qcow2_base, "qcow2", link, GiB))
    assert not (tmp_path / "nowhere").exists()


def test_overlay_of_a_missing_base(tmp_path):
    dest = tmp_path / "ov.qcow2"
    with pytest.raises(ImageError, match="base image .* does not exist"):
        run(disks.create_overlay(tmp_path / "gone.qcow2", "qcow2", dest, GiB))
    assert not dest.exists()


def test_overlay_with_the_wrong_base_format_fails_cleanly(tmp_path, raw_base):
    dest = tmp_path / "ov.qcow2"
    with pytest.raises(disks.QemuImgError):
        run(disks.create_overlay(raw_base, "qcow2", dest, GiB))
    assert not dest.exists()


def test_overlay_create_failure_leaves_nothing(tmp_path, qcow2_base):
    dest = tmp_path / "no-such-dir" / "ov.qcow2"
    with pytest.raises(disks.QemuImgError, match="qemu-img create failed"):
        run(disks.create_overlay(qcow2_base, "qcow2", dest, GiB))
    assert not dest.exists()


# --- resize / snapshot_list ------------------------------------------------------------

def test_resize_grows_qcow2_and_raw(tmp_path, qcow2_base, raw_base):
    run(disks.resize(qcow2_base, 2 * GiB))
    assert info(qcow2_base)["virtual-size"] == 2 * GiB
    run(disks.resize(raw_base, 128 * MiB))
    assert os.path.getsize(raw_base) == 128 * MiB


def test_resize_to_the_same_size_is_a_no_op(qcow2_base):
    before = qcow2_base.read_bytes()
    run(disks.resize(qcow2_base, 64 * MiB))
    assert qcow2_base.read_bytes() == before


def test_resize_refuses_to_shrink(qcow2_base):
    with pytest.raises(BadRequest, match="smaller than the current 64M"):
        run(disks.resize(qcow2_base, MiB))
    assert info(qcow2_base)["virtual-size"] == 64 * MiB


def test_snapshot_list(tmp_path, qcow2_base):
    assert run(disks.snapshot_list(qcow2_base)) == []
    qemu_img("snapshot", "-c", "first", qcow2_base)
    qemu_img("snapshot", "-c", "second", qcow2_base)
    snaps = run(disks.snapshot_list(qcow2_base))
    assert [s["name"] for s in snaps] == ["first", "second"]
    for s in snaps:
        assert s["vm-state-size"] == 0
        created = datetime.strptime(s["created"], "%Y-%m-%dT%H:%M:%SZ")
        assert created.replace(tzinfo=timezone.utc).timestamp() == s["date-sec"]


def test_snapshot_list_of_a_missing_disk(tmp_path):
    with pytest.raises(disks.QemuImgError):
        run(disks.snapshot_list(tmp_path / "gone.qcow2"))


# --- SparseWriter / sparse_copy ----------------------------------------------------------

def test_sparse_writer_keeps_zero_blocks_as_holes_and_hashes(tmp_path):
    data = b"head" + bytes(8 * MiB) + b"tail" + bytes(3 * disks.BLOCK + 17)
    dest = tmp_path / "out"
    with disks.SparseWriter(dest, ("sha512",)) as w:
        for i in range(0, len(data), 300_000):          # odd, unaligned pieces
            w.write(memoryview(data)[i:i + 300_000])
    assert w.size == len(data) == os.path.getsize(dest)
    assert dest.read_bytes() == data
    assert allocated(dest) < MiB
    assert w.digest("sha256") == hashlib.sha256(data).hexdigest()
    assert w.digest("sha512") == hashlib.sha512(data).hexdigest()


def test_sparse_writer_big_zero_writes_stay_holes(tmp_path):
    # downloads hand over buffers larger than CHUNK
    dest = tmp_path / "out"
    with disks.SparseWriter(dest) as w:
        w.write(bytes(5 * disks.CHUNK))
        w.write(b"x" + bytes(5 * disks.CHUNK))
    assert os.path.getsize(dest) == 10 * disks.CHUNK + 1
    assert allocated(dest) < MiB
    with open(dest, "rb") as f:
        f.seek(5 * disks.CHUNK)
        assert f.read(2) == b"x\0"


def test_sparse_writer_aborts_on_error(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with disks.SparseWriter(dest) as w:
            w.write(b"partial")
            raise RuntimeError("boom")
    assert w._fd == -1
    w.close()                       # closing again is harmless
    w.abort()


def test_sparse_copy_of_a_1g_sparse_file_keeps_holes(tmp_path):
    src = make_raw(tmp_path / "src.raw", GiB, b"start")
    with open(src, "r+b") as f:
        f.seek(GiB - 3)
        f.write(b"end")
    if allocated(src) > 4 * MiB:
        pytest.skip("the test file system does not support sparse files")
    dest = tmp_path / "dest.raw"
    w = disks.sparse_copy(src, dest)
    assert w.size == GiB == os.path.getsize(dest)
    assert allocated(dest) < MiB
    with open(dest, "rb") as f:
        assert f.read(5) == b"start"
        f.seek(GiB // 2)
        assert f.read(4096) == bytes(4096)
        f.seek(GiB - 3)
        assert f.read() == b"end"


def test_sparse_copy_digests_match_the_data(tmp_path):
    data = os.urandom(MiB + 5) + bytes(2 * MiB) + os.urandom(100)
    src = tmp_path / "src"
    src.write_bytes(data)
    w = disks.sparse_copy(src, tmp_path / "dest", ("sha256", "sha512"))
    assert (tmp_path / "dest").read_bytes() == data
    assert w.digest("sha256") == hashlib.sha256(data).hexdigest()
    assert w.digest("sha512") == hashlib.sha512(data).hexdigest()


def test_sparse_copy_of_a_qcow2_is_still_a_valid_image(tmp_path, qcow2_base):
    w = disks.sparse_copy(qcow2_base, tmp_path / "copy.qcow2")
    assert w.digest("sha256") == hashlib.sha256(qcow2_base.read_bytes()).hexdigest()
    assert subprocess.run(["qemu-img", "compare", qcow2_base, tmp_path / "copy.qcow2"],
                          capture_output=True).returncode == 0
