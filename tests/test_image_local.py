"""Building an image into a directory without an agent (vmagent/images/build/local.py,
``vmagent build-image``, ``scripts/build-test-image``): the key of the inputs, the cache
(a second run with the same inputs builds nothing), rebuilds, failures and the command's
exit codes. The builder itself is replaced by a fake that writes small files: the real
build is tests/test_image_build.py's (and what scripts/test does first)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from vmagent import cli
from vmagent.images.build import builder, local, recipes
from vmagent.images.build.recipes import FileSpec
from vmagent.images.catalog import DEFAULT_APPEND, Catalog

SHARE = Path(__file__).resolve().parents[1] / "share" / "images"
MIRROR = "http://mirror.example/debian"


def shipped(catalog_dir: Path = SHARE) -> recipes.Recipe:
    r = Catalog.load(catalog_dir).get("test").recipe
    return dataclasses.replace(r, mirror=MIRROR)      # not the host's: a fixed input


# --- the key of the inputs --------------------------------------------------------------

def test_the_key_is_stable_and_ignores_name_description_and_other_entries(tmp_path):
    key = local.input_key(shipped())
    assert key == local.input_key(shipped()) and len(key) == 64
    # the same recipe under another name, with another description, next to other entries
    text = (SHARE / "test.toml").read_text()
    (tmp_path / "mine.toml").write_text(text.replace('name = "test"', 'name = "mine"')
                                        .replace("minimal test guest", "something else"))
    (tmp_path / "other.toml").write_text(
        'name = "other"\n[build]\ndistribution = "debian"\nsuite = "bookworm"\n'
        'disk_size = "3G"\npackages = ["vim"]\n')
    mine = Catalog.load(tmp_path).get("mine").recipe
    assert local.input_key(dataclasses.replace(mine, mirror=MIRROR)) == key


@pytest.mark.parametrize("change", [
    {"packages": ("cloud-init", "openssh-server", "vim")},
    {"disk_size": 3 << 30},
    {"kernel": "linux-image-amd64"},
    {"suite": "trixie"},
    {"mirror": "http://other.example/debian"},
    {"security_mirror": "http://security.example/debian-security"},
    {"components": ("main", "contrib")},
    {"commands": ("echo hi >/etc/motd",)},
    {"files": (FileSpec("/etc/motd", "hello\n"),)},
])
def test_the_key_changes_when_the_recipe_changes(change):
    r = shipped()
    assert local.input_key(dataclasses.replace(r, **change)) != local.input_key(r)


def test_the_key_changes_when_the_catalog_file_changes(tmp_path):
    text = (SHARE / "test.toml").read_text()
    (tmp_path / "test.toml").write_text(text.replace('"sudo",', '"sudo",\n    "vim",'))
    assert local.input_key(shipped(tmp_path)) != local.input_key(shipped())


def test_the_key_changes_when_the_builders_code_changes(tmp_path, monkeypatch):
    code = tmp_path / "builder.py"
    code.write_text("# one\n")
    monkeypatch.setattr(local, "CODE", [code])
    before = local.input_key(shipped())
    code.write_text("# two\n")
    assert local.input_key(shipped()) != before


# --- the cache ----------------------------------------------------------------------------

class FakeBuilder:
    """Writes a disk, a kernel and an initrd whose contents name the recipe's packages."""

    made: list[recipes.Recipe] = []
    fail_at: str | None = None

    def __init__(self, recipe, work, cache_dir, log, on_step, boot_files=None):
        self.recipe, self.work, self.on_step, self.boot = recipe, work, on_step, boot_files
        self.made.append(recipe)

    def run(self) -> Path:
        for step in builder.STEPS:
            self.on_step(step)
            if step == self.fail_at:
                raise builder.StepFailed(step, "apt-get install exited with 100")
        self.boot.mkdir(parents=True)
        what = " ".join(self.recipe.packages)
        (self.boot / "vmlinuz").write_text(f"kernel of {what}\n")
        (self.boot / "initrd.img").write_text(f"initrd of {what}\n")
        (self.work / "disk.qcow2").write_text(f"disk of {what}\n")
        return self.work / "disk.qcow2"


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(FakeBuilder, "made", [])
    monkeypatch.setattr(FakeBuilder, "fail_at", None)
    monkeypatch.setattr(builder, "Builder", FakeBuilder)
    monkeypatch.setattr(local.os, "geteuid", lambda: 0)
    return FakeBuilder


def build(out: Path, recipe: recipes.Recipe | None = None, **kw) -> local.Result:
    return local.build(recipe or shipped(), out, out.parent / "cache",
                       disk_name="debian-12-test.qcow2", **kw)


def test_a_second_run_with_the_same_inputs_builds_nothing(tmp_path, fake):
    out = tmp_path / "img"
    first = build(out)
    assert first.built and len(fake.made) == 1
    assert first.disk == out / "debian-12-test.qcow2" and first.disk.read_text().startswith(
        "disk of cloud-init")
    assert first.kernel.is_file() and first.initrd.is_file()
    assert first.append == DEFAULT_APPEND == "root=LABEL=rootfs console=ttyS0 rw no_timer_check"
    doc = json.loads((out / "build.json").read_text())
    assert doc["key"] == first.key and doc["disk"] == "debian-12-test.qcow2"
    assert doc["inputs"]["recipe"]["mirror"] == MIRROR
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert sorted(line.split()[1] for line in sums) == [
        "debian-12-test.qcow2", "initrd.img", "vmlinuz"]
    assert "== done" in (out / "build.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock", "SHA256SUMS", "build.json", "build.log", "debian-12-test.qcow2",
        "initrd.img", "vmlinuz"]

    again = build(out)
    assert not again.built and len(fake.made) == 1 and again.key == first.key
    assert again.seconds < 5


def test_a_changed_recipe_rebuilds(tmp_path, fake):
    out = tmp_path / "img"
    first = build(out)
    changed = dataclasses.replace(shipped(), packages=("cloud-init", "vim"))
    second = build(out, changed)
    assert second.built and second.key != first.key and len(fake.made) == 2
    assert second.disk.read_text() == "disk of cloud-init vim\n"
    assert not build(out, changed).built and len(fake.made) == 2


def test_a_changed_file_or_force_rebuilds(tmp_path, fake):
    out = tmp_path / "img"
    build(out)
    (out / "vmlinuz").write_text("tampered\n")
    assert build(out).built and len(fake.made) == 2
    assert (out / "vmlinuz").read_text().startswith("kernel of")
    assert build(out, force=True).built and len(fake.made) == 3


def test_a_failed_build_says_the_step_and_leaves_no_stamp(tmp_path, fake):
    out = tmp_path / "img"
    build(out)
    fake.fail_at = "packages"
    with pytest.raises(local.BuildError, match="failed at step packages: apt-get install "
                       "exited with 100") as exc:
        build(out, force=True)
    assert str(out / "build.log") in str(exc.value)
    assert not (out / "build.json").exists() and not (out / ".work").exists()
    assert "== FAILED at step packages" in (out / "build.log").read_text()
    fake.fail_at = None
    assert build(out).built                     # no stamp: the next run builds


def test_building_needs_root_but_an_up_to_date_directory_does_not(tmp_path, fake,
                                                                  monkeypatch):
    out = tmp_path / "img"
    build(out)
    monkeypatch.setattr(local.os, "geteuid", lambda: 1000)
    assert not build(out).built
    with pytest.raises(local.BuildError, match="needs root"):
        build(out, force=True)


# --- the command ------------------------------------------------------------------------

def test_the_command_builds_then_reports_up_to_date(tmp_path, fake, monkeypatch, capsys):
    monkeypatch.setattr(recipes, "apt_sources", lambda root=None: [(MIRROR, ["bookworm"])])
    argv = ["build-image", "test", str(tmp_path / "img"), "--disk-name",
            "debian-12-test.qcow2", "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    assert "test: built" in out.out and "append  root=LABEL=rootfs" in out.out
    assert "packages: " in out.err                     # progress by step on stderr
    assert cli.main(argv) == 0
    assert "test: up to date (inputs unchanged)" in capsys.readouterr().out
    assert len(fake.made) == 1


def test_the_command_refuses_bad_input_with_a_message(tmp_path, fake, capsys):
    (tmp_path / "cat").mkdir()
    shutil.copy(SHARE / "debian-12.toml", tmp_path / "cat")
    (tmp_path / "cat" / "pulled.toml").write_text(
        'name = "pulled"\nurl = "https://example.org/x.qcow2"\nformat = "qcow2"\n'
        f'sha256 = "{"0" * 64}"\n')
    base = ["--catalog", str(tmp_path / "cat")]
    assert cli.main(["build-image", "nope", str(tmp_path / "o"), *base]) == 2
    assert "image 'nope' is not in the catalog (available: debian-12, pulled)" in \
        capsys.readouterr().err
    assert cli.main(["build-image", "pulled", str(tmp_path / "o"), *base]) == 2
    assert "has no [build] recipe" in capsys.readouterr().err
    assert cli.main(["build-image", "debian-12", str(tmp_path / "o"), *base,
                     "--disk-name", "../x.qcow2"]) == 2
    assert "must be a plain file name" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and fake.made == []
