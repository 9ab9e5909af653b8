"""Tests of vmagent.catalog: the shipped catalog, entry validation, and error messages
that name the offending file."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmagent.images import catalog as catalog_mod
from vmagent.images.catalog import DEFAULT_APPEND, Catalog, CatalogError, default_catalog_dir
from vmagent.errors import InternalError, NotFound

SHARE = Path(__file__).resolve().parents[1] / "share" / "images"
SHA256 = "ab" * 32
SHA512 = "cd" * 64
URL = "https://example.org/images/disk.qcow2"


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def disk_entry(name: str = "img", extra: str = f'sha256 = "{SHA256}"\n') -> str:
    return f'name = "{name}"\nurl = "{URL}"\nformat = "qcow2"\n' + extra


def load_one(tmp_path: Path, text: str, name: str = "img"):
    write(tmp_path, name, text)
    return Catalog.load(tmp_path).get(name)


# --- the shipped catalog -------------------------------------------------------------

def test_shipped_catalog_loads_with_complete_entries():
    cat = Catalog.load(SHARE)
    assert {"debian-12", "ubuntu-24.04", "devel"} <= set(cat.names())
    assert cat.names() == sorted(cat.names())
    for name in cat.names():
        entry = cat.get(name)
        assert entry.name == name
        assert entry.file == SHARE / f"{name}.toml"
        assert entry.description
        if entry.derived or not entry.downloadable:
            assert entry.derived or entry.recipe is not None
            continue
        assert entry.url.startswith("https://")
        assert entry.format in ("qcow2", "raw")
        assert entry.boot in ("disk", "kernel")
        assert entry.sha256 or entry.sha512 or entry.checksum_url


def test_shipped_disk_images_pin_a_build_and_a_sums_file():
    cat = Catalog.load(SHARE)
    debian, ubuntu = cat.get("debian-12"), cat.get("ubuntu-24.04")
    assert debian.format == ubuntu.format == "qcow2"
    assert debian.boot == ubuntu.boot == "disk"
    assert debian.checksum_url.endswith("/SHA512SUMS")
    assert ubuntu.checksum_url.endswith("/SHA256SUMS")
    # the sums file lives in the same (dated) directory as the disk
    for entry in (debian, ubuntu):
        assert entry.checksum_url.rsplit("/", 1)[0] == entry.url.rsplit("/", 1)[0]


def test_shipped_devel_is_built_from_the_debian_recipe_with_build_tools():
    cat = Catalog.load(SHARE)
    devel = cat.get("devel")
    assert not devel.derived and not devel.downloadable
    assert devel.recipe.chain == ("debian-12",)
    assert {"build-essential", "git", "cloud-init"} <= set(devel.recipe.packages)
    assert devel.url is None and devel.format is None
    out = devel.to_json()
    assert "boot" not in out and "url" not in out and "base" not in out
    assert "build-essential" in out["build"]["packages"]
    assert "packages" not in cat.get("debian-12").to_json()


def test_derived_entries_still_work(tmp_path):
    write(tmp_path, "base", disk_entry("base"))
    write(tmp_path, "dev", 'name = "dev"\nbase = "base"\npackages = ["git"]\n')
    dev = Catalog.load(tmp_path).get("dev")
    assert dev.derived and dev.downloadable and dev.packages == ("git",)


def test_default_catalog_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VMAGENT_CATALOG", str(tmp_path))
    assert default_catalog_dir() == tmp_path
    monkeypatch.setenv("VMAGENT_CATALOG", str(tmp_path / "missing"))
    assert default_catalog_dir() == SHARE       # falls back to the source tree
    monkeypatch.delenv("VMAGENT_CATALOG")
    assert default_catalog_dir() == SHARE


# --- valid entries -------------------------------------------------------------------

def test_disk_entry_fields_and_defaults(tmp_path):
    entry = load_one(tmp_path, disk_entry(extra=f'sha256 = "{SHA256.upper()}"\n'))
    assert (entry.name, entry.url, entry.format, entry.boot) == ("img", URL, "qcow2", "disk")
    assert entry.sha256 == SHA256             # normalized to lower case
    assert not entry.derived and entry.packages == () and entry.append is None
    assert entry.to_json() == {"name": "img", "url": URL, "format": "qcow2",
                               "boot": "disk", "sha256": SHA256, "description": ""}


@pytest.mark.parametrize("extra", [f'sha512 = "{SHA512}"\n',
                                   'checksum_url = "https://example.org/images/SHA256SUMS"\n'])
def test_other_digest_kinds(tmp_path, extra):
    entry = load_one(tmp_path, disk_entry(extra=extra))
    assert (entry.sha512 or entry.checksum_url) and entry.sha256 is None


def test_kernel_entry_gets_default_append(tmp_path):
    entry = load_one(tmp_path, disk_entry(extra=(
        f'sha256 = "{SHA256}"\nboot = "kernel"\n'
        f'kernel_url = "https://example.org/vmlinuz"\nkernel_sha256 = "{SHA256}"\n'
        f'initrd_url = "https://example.org/initrd"\ninitrd_sha256 = "{SHA256}"\n')))
    assert entry.boot == "kernel" and entry.append == DEFAULT_APPEND
    assert entry.kernel_url == "https://example.org/vmlinuz"
    assert entry.initrd_sha256 == SHA256


def test_kernel_digests_may_come_from_checksum_url(tmp_path):
    entry = load_one(tmp_path, disk_entry(extra=(
        'checksum_url = "https://example.org/SHA256SUMS"\nboot = "kernel"\n'
        'kernel_url = "https://example.org/vmlinuz"\nappend = "root=/dev/vda1"\n')))
    assert entry.kernel_sha256 is None and entry.append == "root=/dev/vda1"


def test_derived_entry(tmp_path):
    write(tmp_path, "base", disk_entry("base"))
    write(tmp_path, "dev", 'name = "dev"\nbase = "base"\npackages = ["git", "g++"]\n'
          '[cloud_config]\nruncmd = [["true"]]\n')
    (tmp_path / "README.txt").write_text("not an entry")
    cat = Catalog.load(tmp_path)
    assert cat.names() == ["base", "dev"] and "dev" in cat and "nope" not in cat
    dev = cat.get("dev")
    assert dev.derived and dev.base == "base" and dev.packages == ("git", "g++")
    assert dev.cloud_config == {"runcmd": [["true"]]}
    assert dev.to_json()["cloud_config"] == {"runcmd": [["true"]]}


def test_get_unknown_lists_what_is_available(tmp_path):
    write(tmp_path, "one", disk_entry("one"))
    with pytest.raises(NotFound) as exc:
        Catalog.load(tmp_path).get("two")
    assert "'two'" in exc.value.message and "available: one" in exc.value.message
    with pytest.raises(NotFound, match="available: none"):
        Catalog().get("x")


# --- invalid entries: every error names the file --------------------------------------

BAD = [
    (disk_entry() + 'colour = "red"\n', "unknown key(s): colour"),
    ('name = 3\n', "name must be a string, got int"),
    (f'url = "{URL}"\nformat = "qcow2"\n', "missing required field 'name'"),
    (disk_entry("Img"), "name 'Img' is not a valid image name"),
    (disk_entry("other"), "does not match the file name 'img.toml'"),
    (f'name = "img"\nformat = "qcow2"\nsha256 = "{SHA256}"\n', "missing required field 'url'"),
    (f'name = "img"\nurl = "{URL}"\nsha256 = "{SHA256}"\n', "missing required field 'format'"),
    (disk_entry().replace("qcow2", "vmdk"), "format must be one of qcow2, raw, got 'vmdk'"),
    (disk_entry().replace("https://", "ftp://"), "url must be an http(s) URL"),
    (disk_entry(extra=""), "exactly one of sha256, sha512 or checksum_url is required"),
    (disk_entry(extra=f'sha256 = "{SHA256}"\nsha512 = "{SHA512}"\n'), "(got sha256, sha512)"),
    (disk_entry(extra='sha256 = "abc"\n'), "sha256 is not a hex sha256 digest"),
    (disk_entry(extra=f'sha512 = "{SHA256}"\n'), "sha512 is not a hex sha512 digest"),
    (disk_entry(extra='checksum_url = "SHA256SUMS"\n'), "checksum_url must be an http(s) URL"),
    (disk_entry() + 'packages = ["git"]\n', "'packages' is only allowed in a derived image"),
    (disk_entry() + 'boot = "pxe"\n', "boot must be 'disk' or 'kernel', got 'pxe'"),
    (disk_entry() + 'append = "quiet"\n', "append only apply to boot = 'kernel'"),
    (disk_entry() + 'boot = "kernel"\n', "boot = 'kernel' needs kernel_url"),
    (disk_entry() + 'boot = "kernel"\nkernel_url = "https://e.org/k"\n',
     "kernel_url needs kernel_sha256 or checksum_url"),
    (f'name = "img"\nbase = "b"\nurl = "{URL}"\npackages = ["git"]\n', "remove url"),
    ('name = "img"\nbase = "b"\npackages = "git"\n', "packages must be a list"),
    ('name = "img"\nbase = "b"\npackages = ["Git; rm -rf /"]\n', "packages must be a list"),
    ('name = "img"\nbase = "b"\ncloud_config = 1\n', "cloud_config must be a table"),
    ('name = "img"\nbase = "b"\n[cloud_config]\npackages = "vim"\n',
     "cloud_config.packages must be a list"),
    ('name = "img"\nbase = "b"\n', "needs packages or cloud_config"),
    ('name = "img"\nurl = \n', "invalid TOML"),
]


@pytest.mark.parametrize("text,problem", BAD, ids=[p for _, p in BAD])
def test_invalid_entry_is_reported_with_its_file(tmp_path, text, problem):
    path = write(tmp_path, "img", text)
    with pytest.raises(CatalogError) as exc:
        Catalog.load(tmp_path)
    assert exc.value.message.startswith(f"catalog file {path}: ")
    assert problem in exc.value.message
    assert exc.value.details["file"] == str(path)
    assert isinstance(exc.value, InternalError) and exc.value.status == 500


def test_non_utf8_file_is_reported_with_its_file(tmp_path):
    path = tmp_path / "img.toml"
    path.write_bytes(b'name = "img"\ndescription = "caf\xe9"\n')
    with pytest.raises(CatalogError, match="not UTF-8") as exc:
        Catalog.load(tmp_path)
    assert str(path) in exc.value.message


def test_unreadable_entry_is_reported(tmp_path):
    (tmp_path / "img.toml").mkdir()
    with pytest.raises(CatalogError, match="cannot read"):
        Catalog.load(tmp_path)


def test_derived_needs_a_disk_base_in_the_catalog(tmp_path):
    dev = write(tmp_path, "dev", 'name = "dev"\nbase = "gone"\npackages = ["git"]\n')
    with pytest.raises(CatalogError, match="base 'gone' is not in the catalog") as exc:
        Catalog.load(tmp_path)
    assert str(dev) in exc.value.message
    write(tmp_path, "gone", 'name = "gone"\nbase = "dev"\npackages = ["vim"]\n')
    with pytest.raises(CatalogError, match="is itself derived"):
        Catalog.load(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(CatalogError, match="does not exist"):
        Catalog.load(tmp_path / "nope")


def test_parse_entry_directly_rejects_wrong_types(tmp_path):
    with pytest.raises(CatalogError, match="description must be a string"):
        catalog_mod.parse_entry(tmp_path / "x.toml", {"name": "x", "description": ["a"]})
