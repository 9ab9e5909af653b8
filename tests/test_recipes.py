"""Build recipes (vmagent/recipes.py, the [build] tables of share/images/*.toml): the
shipped recipes, validation errors that name the file, the host's apt mirror, and a
check that the recipes' packages resolve against the mirror's package lists."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from vmagent.images.build import aptindex

from vmagent.images.build import recipes
from vmagent.images.catalog import Catalog, CatalogError
from vmagent.errors import ImageError
from vmagent.images.store import ImageStore
from vmagent.images.build.recipes import host_mirror

SHARE = Path(__file__).resolve().parents[1] / "share" / "images"
DEBIAN = ('[build]\ndistribution = "debian"\nsuite = "bookworm"\ndisk_size = "3G"\n'
          'packages = ["openssh-server"]\n')


def load(tmp_path: Path, **files: str) -> Catalog:
    for name, body in files.items():
        (tmp_path / f"{name}.toml").write_text(f'name = "{name}"\ndescription = "x"\n{body}')
    return Catalog.load(tmp_path)


def error(tmp_path: Path, **files: str) -> str:
    with pytest.raises(CatalogError) as exc:
        load(tmp_path, **files)
    return exc.value.message


# --- the shipped recipes ----------------------------------------------------------------

def test_shipped_debian_recipe_is_the_minimal_cloud_image():
    r = Catalog.load(SHARE).get("debian-12").recipe
    assert (r.distribution, r.suite, r.mirror) == ("debian", "bookworm", None)
    assert {"cloud-init", "openssh-server", "sudo", "qemu-guest-agent"} <= set(r.packages)
    assert r.kernel == "linux-image-cloud-amd64" and r.all_packages()[:2] == [
        "linux-image-cloud-amd64", "grub-pc"]
    assert r.disk_size == 3 << 30


def test_shipped_devel_recipe_inherits_debian_and_adds_a_toolset():
    cat = Catalog.load(SHARE)
    devel, debian = cat.get("devel").recipe, cat.get("debian-12").recipe
    assert devel.chain == ("debian-12",) and devel.suite == debian.suite
    assert list(devel.packages[:len(debian.packages)]) == list(debian.packages)
    assert {"build-essential", "git", "python3-venv", "python3-pip", "gdb", "strace", "tmux",
            "vim", "curl", "jq", "cmake"} <= set(devel.packages)
    assert devel.disk_size == 6 << 30
    assert [f.path for f in devel.files] == ["/etc/motd"] and devel.commands


def test_shipped_test_recipe_is_the_small_guest_of_the_test_suite():
    """What scripts/build-test-image bakes: the packages the test suite's guest needs, on
    its own (not inheriting debian-12's locales, dbus, ...), a 2G disk."""
    entry = Catalog.load(SHARE).get("test")
    r = entry.recipe
    assert not entry.downloadable and r.chain == ()
    assert (r.distribution, r.suite, r.mirror, r.kernel) == (
        "debian", "bookworm", None, "linux-image-cloud-amd64")
    assert set(r.packages) == {
        "cloud-init", "openssh-server", "sudo", "qemu-guest-agent", "ifupdown",
        "isc-dhcp-client", "netbase", "iproute2", "iputils-ping", "python3-cffi-backend",
        "cloud-guest-utils"}
    assert r.all_packages()[:2] == ["linux-image-cloud-amd64", "grub-pc"]
    assert r.disk_size == 2 << 30 and not r.files and not r.commands


def test_shipped_ubuntu_recipe_parses():
    r = Catalog.load(SHARE).get("ubuntu-24.04").recipe
    assert (r.distribution, r.suite, r.debootstrap_script) == ("ubuntu", "noble", "gutsy")
    assert r.components == ("main", "universe") and r.kernel == "linux-image-virtual"
    assert r.suites()[2] == ("http://archive.ubuntu.com/ubuntu", "noble-security")


# --- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    ('[build]\nsuite = "bookworm"\ndisk_size = "3G"\npackages = ["a1"]\n',
     "build.distribution is required"),
    (DEBIAN.replace('"debian"', '"gentoo"'), "build.distribution must be one of debian"),
    (DEBIAN.replace('"openssh-server"', '"Bad Name"'), "'Bad Name' is not a package name"),
    (DEBIAN.replace('packages = ["openssh-server"]', 'packages = "sudo"'),
     "build.packages must be a list"),
    (DEBIAN.replace('packages = ["openssh-server"]', 'packages = []'),
     "at least one package"),
    (DEBIAN.replace('"3G"', '"100M"'), "build.disk_size 100M is out of range"),
    (DEBIAN.replace('"3G"', '"lots"'), "cannot parse 'lots' as a size"),
    (DEBIAN + 'colour = "red"\n', "unknown key(s) in [build]: colour"),
    (DEBIAN + 'mirror = "ftp://x"\n', "build.mirror must be an http(s) URL"),
    (DEBIAN + 'components = []\n', "build.components must not be empty"),
    (DEBIAN + 'commands = ["  "]\n', "a command is empty"),
    (DEBIAN + '[[build.files]]\npath = "etc/motd"\ncontent = "hi"\n',
     "build.files[0].path must be an absolute path"),
    (DEBIAN + '[[build.files]]\npath = "/etc/../x"\ncontent = "hi"\n', "without '..'"),
    (DEBIAN + '[[build.files]]\npath = "/etc/x"\ncontent = "hi"\nmode = "rw"\n',
     "mode must be an octal string"),
    (DEBIAN + '[[build.files]]\npath = "/etc/x"\n', "content must be a string"),
    ('build = "yes"\n', "build must be a table"),
    ('format = "qcow2"\n' + DEBIAN, "format only apply to a downloaded image"),
])
def test_recipe_errors_name_the_file_and_the_problem(tmp_path, body, message):
    text = error(tmp_path, img=body)
    assert message in text and str(tmp_path / "img.toml") in text


def test_inheritance_errors(tmp_path):
    assert "build.from 'nope' is not an entry with a [build] recipe" in error(
        tmp_path, img='[build]\nfrom = "nope"\npackages = ["git"]\n')
    for f in tmp_path.glob("*.toml"):
        f.unlink()
    text = error(tmp_path, a='[build]\nfrom = "b"\npackages = ["git"]\n',
                 b='[build]\nfrom = "a"\npackages = ["git"]\n')
    assert "build.from forms a cycle: a -> b -> a" in text
    for f in tmp_path.glob("*.toml"):
        f.unlink()
    assert "cannot also have 'base'" in error(tmp_path, img='base = "x"\n' + DEBIAN)


def test_inheritance_merges_lists_and_overrides_settings(tmp_path):
    cat = load(tmp_path, base=DEBIAN + 'commands = ["true"]\n',
               mid='[build]\nfrom = "base"\npackages = ["git", "openssh-server"]\n'
                   'disk_size = "5G"\n',
               top='[build]\nfrom = "mid"\npackages = ["vim"]\ncommands = ["echo"]\n'
                   'mirror = "http://mirror.example/debian/"\n')
    top = cat.get("top").recipe
    assert top.packages == ("openssh-server", "git", "vim")
    assert top.commands == ("true", "echo") and top.chain == ("mid", "base")
    assert top.disk_size == 5 << 30 and top.mirror == "http://mirror.example/debian"
    assert cat.get("top").to_json()["build"]["from"] == ["mid", "base"]


def test_pulling_a_build_only_image_says_to_build_it(tmp_path):
    cat = load(tmp_path / "cat" if (tmp_path / "cat").mkdir() is None else tmp_path,
               img=DEBIAN)
    store = ImageStore(tmp_path / "store", cat)
    with pytest.raises(ImageError, match="vmctl image build img"):
        asyncio.run(store.pull("img"))
    assert not store.exists("img")


# --- the host's apt mirror ----------------------------------------------------------------

def test_host_mirror_comes_from_the_hosts_apt_sources(tmp_path):
    d = tmp_path / "etc/apt/sources.list.d"
    d.mkdir(parents=True)
    (tmp_path / "etc/apt/sources.list").write_text(
        "# comment\ndeb [arch=amd64] http://one.example/debian/ sid main\n")
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://sec.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\nTypes: deb-src\n"
        "URIs: http://src.example/debian\nSuites: bookworm\n")
    assert recipes.apt_sources(tmp_path)[0] == ("http://one.example/debian", ["sid"])
    r = recipes.resolve("x", {"x": recipes.check_table(None, {
        "distribution": "debian", "suite": "bookworm", "disk_size": "2G",
        "packages": ["sudo"]})})
    got = host_mirror(r, tmp_path)
    assert got.mirror == "http://mirror.example/debian"
    assert got.security_mirror == "http://sec.example/debian-security"
    assert got.suites() == [("http://mirror.example/debian", "bookworm"),
                            ("http://mirror.example/debian", "bookworm-updates"),
                            ("http://sec.example/debian-security", "bookworm-security")]
    # nothing configured for the suite: the distribution's public mirror
    other = host_mirror(r, tmp_path / "nowhere")
    assert other.mirror == "http://deb.debian.org/debian"


# --- resolving against the mirror's package lists -------------------------------------

@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    """The mirror's indexes, downloaded once for this module."""
    if not shutil.which("apt-get"):
        pytest.skip("needs apt-get")
    return tmp_path_factory.mktemp("apt")


def test_devel_recipe_resolves_against_the_mirrors_package_lists(lists):
    recipe = host_mirror(Catalog.load(SHARE).get("devel").recipe)
    installs = aptindex.resolve(recipe, lists)
    assert {"build-essential", "gcc", "git", "python3-venv", "cmake", "cloud-init",
            "linux-image-cloud-amd64", "grub-pc", "openssh-server"} <= set(installs)


def test_test_recipe_resolves_against_the_mirrors_package_lists(lists):
    recipe = host_mirror(Catalog.load(SHARE).get("test").recipe)
    installs = aptindex.resolve(recipe, lists)
    assert {"linux-image-cloud-amd64", "grub-pc", "cloud-init", "openssh-server", "sudo",
            "qemu-guest-agent", "cloud-guest-utils", "isc-dhcp-client"} <= set(installs)
    assert "build-essential" not in installs and "gcc" not in installs


def test_an_unknown_package_fails_to_resolve_with_apts_reason(lists):
    cat = Catalog.load(SHARE)
    recipe = host_mirror(cat.get("debian-12").recipe)
    aptindex.update(recipe, lists)
    from dataclasses import replace
    bad = replace(recipe, packages=(*recipe.packages, "no-such-package-xyz"))
    with pytest.raises(aptindex.ResolveError, match="Unable to locate package "
                       "no-such-package-xyz"):
        aptindex.simulate(bad, lists)


def test_files_are_written_inside_the_image_never_through_a_symlink_out(tmp_path):
    """A recipe file under /var/run (a symlink to /run in Debian) must not resolve to the
    build host's /run: the write is refused before anything is created."""
    from vmagent.images.build.builder import Builder, Log, StepFailed
    recipe = load(tmp_path, r=DEBIAN).get("r").recipe
    work = tmp_path / "work"
    outside = tmp_path / "host-run"
    outside.mkdir()
    builder = Builder(recipe, work, tmp_path / "cache", Log(tmp_path / "build.log"))
    (builder.root / "var").mkdir(parents=True)
    (builder.root / "var" / "run").symlink_to(outside)
    with pytest.raises(StepFailed) as exc:
        builder.write("/var/run/x/y.conf", "z\n")
    assert exc.value.step == "configure" and "symlink out of the image" in str(exc.value)
    assert list(outside.iterdir()) == []
    builder.write("/etc/motd", "hello\n", 0o600)
    assert (builder.root / "etc" / "motd").read_text() == "hello\n"
    assert (builder.root / "etc" / "motd").stat().st_mode & 0o777 == 0o600
