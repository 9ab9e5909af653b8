"""Integration: build debian-12 from its recipe through a real agent, boot it from its own
disk (GRUB, no -kernel), log in over SSH and look at what the image is made of; and boot
the test image (scripts/build-test-image: the same builder, the test recipe) from its own
disk too, with the kernel beside it being the image's own.

Slow the first time (debootstrap and every package from the mirror: several minutes);
the package download is cached in $VMCTL_BUILD_CACHE (default /var/cache/vmagent-build),
shared by all runs of this test, so later runs only install from the cache.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from agent_helpers import IMAGE_DIR, AgentProcess, keypair, require_test_image, ssh_retry
from vmagent.images.catalog import DEFAULT_APPEND

pytestmark = pytest.mark.integration

CACHE = Path(os.environ.get("VMCTL_BUILD_CACHE", "/var/cache/vmagent-build"))
BUILD_TIMEOUT = float(os.environ.get("VMCTL_BUILD_TIMEOUT", "2400"))
BOOT_TIMEOUT = float(os.environ.get("VMCTL_BOOT_TIMEOUT", "400"))


@pytest.fixture
def agent(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.fail("building images needs root (loop devices, mount, chroot)")
    monkeypatch.setenv("VMAGENT_BUILD_CACHE", str(CACHE))
    a = AgentProcess(tmp_path / "state").start()
    yield a
    a.stop()


def wait_build(agent: AgentProcess, image: str) -> dict:
    deadline = time.monotonic() + BUILD_TIMEOUT
    while True:
        doc = agent.ok("GET", f"/images/{image}/build")
        if doc["state"] != "running":
            return doc
        assert time.monotonic() < deadline, f"build not done in {BUILD_TIMEOUT:g}s: {doc}"
        time.sleep(2)


def test_build_debian_boot_it_from_its_own_disk_and_log_in(agent, tmp_path):
    t0 = time.monotonic()
    started = agent.ok("POST", "/images/debian-12/build", {})
    assert started["state"] == "running" and started["image"] == "debian-12"
    # one build at a time: another image is refused while this one runs
    status, doc = agent.call("POST", "/images/devel/build", {})
    assert status == 409 and "one build at a time" in doc["message"]
    build = wait_build(agent, "debian-12")
    assert build["state"] == "done", build["error"] + "\n" + build["log_tail"]
    print(f"\nbuild: {time.monotonic() - t0:.0f}s; steps: "
          + ", ".join(f"{s['name']} {s['seconds']:.0f}s" for s in build["steps"]))
    assert [s["name"] for s in build["steps"]] == build["all_steps"]

    img = build["result"]
    assert img["format"] == "qcow2" and img["boot"] == "disk" and img["kernel"] is None
    assert img["source"]["kind"] == "build" and len(img["sha256"]) == 64
    assert img["virtual_size"] == 3 << 30
    print(f"image: {img['actual_size'] / 2**20:.0f} MiB qcow2 (compressed)")
    directory = Path(img["path"]).parent
    assert json.loads((directory / "recipe.json").read_text())["suite"] == "bookworm"
    assert "== convert" in (directory / "build.log").read_text()
    assert not (agent.state_dir / "builds/debian-12/work").exists()
    # a second build of a stored image is refused unless it replaces it
    status, doc = agent.call("POST", "/images/debian-12/build", {})
    assert status == 409 and "already in the store" in doc["message"]

    key = keypair(tmp_path)
    agent.ok("POST", "/vms", {"name": "built", "image": "debian-12", "memory": "1G",
                              "cpus": 2, "disk": "5G",
                              "ssh_keys": [key.with_suffix(".pub").read_text()]})
    argv = json.loads((agent.state_dir / "vms/built/argv.json").read_text())
    assert "-kernel" not in argv and "-initrd" not in argv
    st = agent.wait_ready("built", timeout=BOOT_TIMEOUT, cloud_init=True)
    assert st["boot"]["kernel"] and st["cloud_init"] == "done"
    res = ssh_retry(st["ssh_port"], key, "set -e; cat /proc/cmdline; findmnt -no SOURCE /; "
                    "df -B1 --output=size / | tail -1; cat /etc/machine-id; "
                    "ls /etc/ssh/ssh_host_ed25519_key; cat /run/cloud-init/result.json; "
                    "test -x /etc/kernel/postinst.d/zz-update-grub; "
                    "sudo debconf-show grub-pc | grep 'grub-pc/install_devices:'; "
                    "ls /boot/vmlinuz-*")
    assert res.returncode == 0, res.stderr + res.stdout
    out = res.stdout.splitlines()
    assert "console=ttyS0" in out[0] and "root=UUID=" in out[0]
    assert out[1] == "/dev/vda1"
    assert int(out[2]) > 4 << 30          # cloud-init grew the partition to the 5G disk
    assert len(out[3]) == 32              # a machine-id made at first boot
    assert "DataSourceNoCloud" in res.stdout
    assert "/dev/vda" in res.stdout.split("grub-pc/install_devices:")[1]
    agent.ok("DELETE", "/vms/built")


def test_the_test_image_boots_from_its_own_disk_and_its_kernel_is_the_images(tmp_path):
    """Every other integration test boots the test image with -kernel/-initrd; here it
    boots from its own disk through GRUB, grows its root partition to the VM's disk, and
    the kernel and initrd beside it are the ones in the image."""
    require_test_image()
    doc = json.loads((IMAGE_DIR / "build.json").read_text())
    assert doc["image"] == "test" and doc["append"] == DEFAULT_APPEND
    a = AgentProcess(tmp_path / "state").start()
    try:
        a.ok("POST", "/images", {"image": "own", "path": str(IMAGE_DIR / doc["disk"])})
        key = keypair(tmp_path)
        a.ok("POST", "/vms", {"name": "own1", "image": "own", "memory": "1G", "cpus": 2,
                              "disk": "4G", "ssh_keys": [key.with_suffix(".pub").read_text()]})
        argv = json.loads((a.state_dir / "vms/own1/argv.json").read_text())
        assert "-kernel" not in argv and "-append" not in argv
        st = a.wait_ready("own1", timeout=BOOT_TIMEOUT, cloud_init=True)
        res = ssh_retry(st["ssh_port"], key, "set -e; cat /proc/cmdline; "
                        "findmnt -no SOURCE,LABEL /; df -B1 --output=size / | tail -1; "
                        "k=$(uname -r); sudo sha256sum /boot/vmlinuz-$k /boot/initrd.img-$k")
        assert res.returncode == 0, res.stderr + res.stdout
        out = res.stdout.splitlines()
        assert "root=UUID=" in out[0] and "console=ttyS0" in out[0]
        assert out[1].split() == ["/dev/vda1", "rootfs"]
        assert int(out[2]) > 3 << 30          # growpart: the 2G image on a 4G disk
        assert out[3].split()[0] == doc["sha256"]["vmlinuz"]
        assert out[4].split()[0] == doc["sha256"]["initrd.img"]
        a.ok("DELETE", "/vms/own1")
    finally:
        a.cleanup()
