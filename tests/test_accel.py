"""Choosing the accelerator with a real probe on this host."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from agent_helpers import IMAGE_DIR, require_test_image
from vmagent import accel


def test_override_skips_the_probe(tmp_path):
    for name in ("kvm", "tcg"):
        choice = asyncio.run(accel.choose(tmp_path, [], override=name))
        assert choice.name == name and not choice.probed
    assert not (tmp_path / "accel.json").exists()


def test_no_kernel_means_tcg_with_a_reason(tmp_path):
    choice = asyncio.run(accel.choose(tmp_path, [tmp_path / "missing-vmlinuz"]))
    assert choice.name == "tcg" and choice.reason


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="this host has no /dev/kvm")
def test_probe_boots_a_real_kernel_and_caches_the_result(tmp_path):
    """On a host where KVM works this picks kvm; where /dev/kvm opens but guests do not
    run (nested PVM, as on the CI machines) it picks tcg and says why. Either way the
    answer is cached and the second call does not probe again."""
    require_test_image()
    kernel = IMAGE_DIR / "vmlinuz"
    first = asyncio.run(accel.choose(tmp_path, [kernel]))
    assert first.probed and first.name in ("kvm", "tcg") and first.reason
    ok, _ = asyncio.run(accel.probe_kvm(kernel))
    assert first.name == ("kvm" if ok else "tcg")
    cache = tmp_path / "accel.json"
    assert cache.exists()
    start = time.monotonic()
    second = asyncio.run(accel.choose(tmp_path, [kernel]))
    assert second == first and time.monotonic() - start < 2


def test_probe_argv_boots_without_root(tmp_path):
    argv = accel.probe_argv(Path("/k"))
    assert argv[argv.index("-accel") + 1] == "kvm" and "-no-reboot" in argv
    assert "panic=-1" in argv[argv.index("-append") + 1]
