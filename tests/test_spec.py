"""vmagent.spec: VM names, sizes, user-data, unknown fields, allocation rules, SSH keys,
admins and the defaults phase (pure; no I/O)."""

from __future__ import annotations

import time

import pytest

from vmagent.errors import BadRequest
from vmagent.spec import (
    USER_DATA_MAX,
    Defaults,
    VMSpec,
    apply_defaults,
    check_name,
    format_size,
    parse_size,
    parse_user_data,
)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdM09Ct5ZbpGEQm6BvLA/Ji8N4McDg7RPn/6+OGhCmD t@x"
RSA = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 user@host"
G = 1 << 30
M = 1 << 20


def spec(**fields) -> VMSpec:
    return VMSpec.from_dict({"name": "vm", **fields})


def refused(match: str, **fields) -> str:
    with pytest.raises(BadRequest, match=match) as info:
        spec(**fields)
    assert info.value.status == 400 and info.value.code == "bad_request"
    return info.value.message


# --- names -----------------------------------------------------------------------------

RULE = "1-63 characters, lowercase letters, digits and '-', starting with a letter"


@pytest.mark.parametrize("name", ["../x", "a\x00b", "a" * 300, "Abc", "-x", "",
                                  "1abc", "a\n", "a/b", "a_b", "a b", "a.b", "a" * 64,
                                  "vm\u00e9"])
def test_bad_names_are_refused_with_the_rule(name):
    with pytest.raises(BadRequest) as info:
        VMSpec.from_dict({"name": name})
    msg = info.value.message
    assert "is invalid" in msg and RULE in msg
    assert "\n" not in msg and "\x00" not in msg          # one printable line
    assert len(msg) < 200                                  # a 300-char name is cut short
    with pytest.raises(BadRequest):
        check_name(name)                                   # path parameters too


def test_long_name_is_shown_shortened_with_its_length():
    msg = refused("name", name="a" * 300)
    assert "300 characters" in msg and "a" * 41 not in msg


@pytest.mark.parametrize("name", [None, 5, ["vm"], {"a": 1}])
def test_non_string_names_are_refused(name):
    with pytest.raises(BadRequest, match="name: expected a string"):
        VMSpec.from_dict({"name": name})


@pytest.mark.parametrize("name", ["a", "dev1", "a-b-c", "x" + "0" * 62, "web-2"])
def test_good_names(name):
    assert VMSpec.from_dict({"name": name}).name == name
    assert check_name(name) == name


def test_name_is_required_and_body_must_be_a_mapping():
    with pytest.raises(BadRequest, match="name is required"):
        VMSpec.from_dict({"cpus": 2})
    for body in (["vm"], "vm", None, 3):
        with pytest.raises(BadRequest, match="JSON object"):
            VMSpec.from_dict(body)


# --- sizes -----------------------------------------------------------------------------

@pytest.mark.parametrize("text,expect", [
    ("2G", 2 * G), ("512M", 512 * M), ("1T", 1 << 40), ("64K", 64 << 10), ("2g", 2 * G),
    ("1.5G", 3 * G // 2), ("10GiB", 10 * G), ("10GB", 10 * G), (" 2G ", 2 * G),
    ("1048576", M), (1048576, M), (0, 0),
])
def test_sizes_parse(text, expect):
    assert parse_size(text) == expect


@pytest.mark.parametrize("value", ["2X", "12Q", "G", "", "abc", "1e9G", "2 GG", "0x10",
                                   "-1G", "-5", -1, -(1 << 40), 2.5, None, True, [2]])
def test_bad_sizes_are_refused(value):
    with pytest.raises(BadRequest, match="size") as info:
        parse_size(value)
    if isinstance(value, str) and value:
        assert repr(value) in info.value.message             # says what it got


def test_negative_int_says_negative():
    with pytest.raises(BadRequest, match="negative"):
        parse_size(-1, "disk")


def test_size_errors_name_the_field():
    refused("memory", memory="2X")
    refused("disk", disk="lots")
    refused("ram_limit", ram_limit="1Q")
    refused("ram_guarantee", ram_guarantee=-3)


def test_memory_and_disk_ranges():
    msg = refused("memory", memory=2048)                       # bytes, not MiB
    assert "give a unit" in msg
    refused("memory", memory="2T")
    refused("disk", disk="512M")
    refused("disk", disk="128T")
    s = spec(memory="512M", disk="20G")
    assert (s.memory, s.disk) == (512 * M, 20 * G)
    assert spec(memory=2 * G).memory == 2 * G                  # an int is bytes


def test_format_size_round_trips():
    for n in (2 * G, 512 * M, 1 << 40, 3 * (1 << 10), 1000):
        assert parse_size(format_size(n)) == n
    assert format_size(2 * G) == "2G" and format_size(1000) == "1000"


@pytest.mark.parametrize("cpus,ok", [(1, True), (64, True), ("4", True), (0, False),
                                     (65, False), (-1, False), (2.5, False),
                                     ("two", False), (True, False)])
def test_cpus(cpus, ok):
    if ok:
        assert spec(cpus=cpus).cpus == int(cpus)
    else:
        refused("cpus", cpus=cpus)


# --- user-data -------------------------------------------------------------------------

def test_valid_user_data_is_kept_verbatim():
    text = "packages: [htop]\nruncmd:\n  - echo hi\n"
    s = spec(user_data=text)
    assert s.user_data == text
    assert s.extra_cloud_config() == {"packages": ["htop"], "runcmd": ["echo hi"]}
    assert spec(user_data="").extra_cloud_config() == {}
    assert parse_user_data("# only a comment\n") == {}


def test_invalid_yaml_says_where():
    msg = refused("user_data", user_data="a: [unclosed\nb: 1\n")
    assert "invalid YAML" in msg and "line" in msg


@pytest.mark.parametrize("text,kind", [("- a\n- b\n", "list"), ("just text", "str"),
                                       ("42", "int")])
def test_user_data_must_be_a_mapping(text, kind):
    msg = refused("mapping", user_data=text)
    assert kind in msg


def test_user_data_over_64_kib_is_refused():
    text = "a: '" + "x" * USER_DATA_MAX + "'\n"
    msg = refused("64 KiB", user_data=text)
    assert str(len(text)) in msg
    # just under the limit is fine
    ok = "a: '" + "x" * (USER_DATA_MAX - 10) + "'\n"
    assert len(ok.encode()) <= USER_DATA_MAX and spec(user_data=ok).user_data == ok


def test_user_data_limit_counts_bytes_not_characters():
    text = "a: '" + "\u00e9" * (USER_DATA_MAX // 2) + "'\n"   # 2 bytes each
    assert len(text) < USER_DATA_MAX < len(text.encode())
    refused("64 KiB", user_data=text)


@pytest.mark.parametrize("value", [42, ["a: 1"], {"a": 1}])
def test_user_data_must_be_text(value):
    refused("user_data", user_data=value)


def test_user_data_with_nul_or_python_tags_is_refused():
    refused("NUL", user_data="a: 1\x00\n")
    refused("user_data", user_data="a: !!python/object/apply:os.system ['true']\n")


def test_user_data_alias_bomb_is_refused_quickly():
    """A few hundred bytes of YAML aliases expand to millions of values when the seed
    is rendered (that stalled the agent for minutes); refuse them up front."""
    lines = ["a0: &a0 [" + ",".join(["xxxxxxxxxx"] * 9) + "]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    start = time.monotonic()
    refused("expands", user_data="\n".join(lines) + "\n")
    assert time.monotonic() - start < 2


def test_user_data_nested_too_deep_is_a_bad_request_not_a_crash():
    refused("nested", user_data="a: " + "[" * 700 + "]" * 700)  # was a RecursionError
    refused("nested", user_data="a: " + "[" * 150 + "]" * 150)
    refused("nested|recursive", user_data="a: &a [*a]\n")


def test_plain_user_data_is_not_mistaken_for_a_bomb():
    text = "a: [" + ",".join(["1"] * 8000) + "]\nb: &x [1, 2]\nc: *x\n"
    cfg = spec(user_data=text).extra_cloud_config()
    assert len(cfg["a"]) == 8000 and cfg["c"] == [1, 2]


# --- unknown fields ----------------------------------------------------------------------

def test_unknown_fields_are_refused_and_named():
    msg = refused("unknown field", colour="red", flavour="big")
    assert "colour" in msg and "flavour" in msg


def test_all_known_fields_round_trip():
    s = spec(image="debian-12", cpus=4, memory="4G", disk="20G", ssh_keys=[KEY],
             admins=["alice", "bob"], user_data="a: 1\n", cpu_guarantee=1.5, cpu_limit=4,
             ram_guarantee="1G", ram_limit="4G", segment="dev")
    d = s.to_dict()
    assert set(d) == set(VMSpec.FIELDS)
    assert VMSpec.from_dict(d) == s


@pytest.mark.parametrize("image", ["../../etc", "Debian", "a/b", "", ".x"])
def test_bad_image_names(image):
    refused("image", image=image)


# --- allocation ----------------------------------------------------------------------

def test_guarantee_above_limit_is_refused():
    msg = refused("cpu_guarantee", cpu_guarantee=3, cpu_limit=2, segment="default")
    assert "above cpu_limit" in msg
    msg = refused("ram_guarantee", ram_guarantee="4G", ram_limit="2G")
    assert "4G" in msg and "2G" in msg
    s = spec(cpu_guarantee=2, cpu_limit=2, ram_guarantee="2G", ram_limit="2G")
    assert (s.cpu_guarantee, s.ram_limit) == (2, 2 * G)


@pytest.mark.parametrize("segment", ["dev", "gpu-dev"])
def test_developer_segments_guarantee_at_most_two_cpus(segment):
    msg = refused("segment", cpu_guarantee=2.5, segment=segment)
    assert "at most 2" in msg and "default" in msg
    assert spec(cpu_guarantee=2, segment=segment).cpu_guarantee == 2


def test_default_segment_may_guarantee_more():
    assert spec(cpu_guarantee=8, segment="default").cpu_guarantee == 8


def test_dev_guarantee_rule_applies_once_the_default_segment_is_filled_in():
    s = spec(cpu_guarantee=3)                        # no segment yet: checked later
    with pytest.raises(BadRequest, match="segment 'dev'"):
        apply_defaults(s, Defaults())


@pytest.mark.parametrize("segment", ["prod", "DEV", "", 3])
def test_bad_segment(segment):
    msg = refused("segment", segment=segment)
    assert "dev, default, gpu-dev" in msg


@pytest.mark.parametrize("field,value", [("cpu_guarantee", 0), ("cpu_guarantee", -1),
                                         ("cpu_limit", 65), ("cpu_limit", "lots"),
                                         ("cpu_guarantee", float("nan")),
                                         ("cpu_limit", float("inf"))])
def test_bad_cpu_allocation_numbers(field, value):
    refused(field, **{field: value})


# --- ssh keys and admins ---------------------------------------------------------------

def test_ssh_keys_are_validated_and_stripped():
    s = spec(ssh_keys=[KEY + "\n", "  " + RSA])
    assert s.ssh_keys == [KEY, RSA]
    assert spec(ssh_keys=KEY).ssh_keys == [KEY]                # one key as a string


@pytest.mark.parametrize("key", ["not a key", "ssh-ed25519", "ssh-foo AAAA x",
                                 KEY + "\nssh-rsa AAAA injected", "ssh-ed25519 AA$A",
                                 "ssh-ed25519 AAAA c\x00d"])
def test_bad_ssh_keys(key):
    refused("ssh_keys", ssh_keys=[key])


def test_ssh_keys_must_be_a_short_list_of_strings():
    refused("list of strings", ssh_keys=[1])
    refused("list of strings", ssh_keys={"k": KEY})
    refused("at most 64", ssh_keys=[KEY] * 65)


@pytest.mark.parametrize("user", ["alice", "_svc", "dev-1", "a" * 32])
def test_good_admins(user):
    assert spec(admins=[user]).admins == [user]


@pytest.mark.parametrize("user,match", [
    ("root", "system account"), ("sshd", "system account"), ("nobody", "system account"),
    ("Bad User", "not a valid user name"), ("Alice", "not a valid user name"),
    ("1abc", "not a valid user name"), ("a" * 33, "not a valid user name"),
    ("../x", "not a valid user name"), ("", "not a valid user name"),
])
def test_bad_admins(user, match):
    refused(match, admins=[user])


def test_duplicate_admins_are_refused():
    refused("duplicate", admins=["dev", "dev"])
    refused("list of strings", admins=[None])


# --- defaults --------------------------------------------------------------------------

def test_defaults_fill_every_missing_field():
    full = apply_defaults(spec(ssh_keys=[KEY]), Defaults(), base_size=2 * G)
    assert full.image == "debian-12" and full.cpus == 2
    assert full.memory == 2 * G and full.disk == 10 * G
    # admins are people besides the owner: none unless given
    assert full.admins == [] and full.segment == "dev" and full.ssh_keys == [KEY]
    assert full.user_data is None and full.cpu_guarantee is None


def test_defaults_come_from_the_given_defaults_and_keep_given_fields():
    d = Defaults(image="img", cpus=3, memory=M * 768, disk=5 * G, admins=("ops",),
                 segment="default")
    full = apply_defaults(VMSpec(name="vm"), d)
    assert (full.image, full.cpus, full.memory, full.disk, full.admins, full.segment) == \
        ("img", 3, 768 * M, 5 * G, ["ops"], "default")
    given = apply_defaults(spec(image="other", cpus=8, memory="4G", disk="40G",
                                admins=["alice"], segment="gpu-dev"), d)
    assert (given.image, given.cpus, given.memory, given.disk, given.admins,
            given.segment) == ("other", 8, 4 * G, 40 * G, ["alice"], "gpu-dev")


def test_apply_defaults_returns_a_new_spec():
    original = spec()
    full = apply_defaults(original, Defaults())
    assert full is not original and original.cpus is None and original.admins == []
    full.admins.append("x")
    assert original.admins == []


def test_default_disk_is_never_below_the_base_image():
    assert apply_defaults(spec(), Defaults(), base_size=20 * G).disk == 20 * G
    assert apply_defaults(spec(), Defaults(), base_size=1 * G).disk == 10 * G
    assert apply_defaults(spec(), Defaults(), base_size=None).disk == 10 * G


def test_explicit_disk_smaller_than_the_base_is_refused():
    with pytest.raises(BadRequest, match="smaller than the image") as info:
        apply_defaults(spec(disk="2G", image="big"), Defaults(), base_size=4 * G)
    assert "'big'" in info.value.message and "4G" in info.value.message
    assert apply_defaults(spec(disk="4G"), Defaults(), base_size=4 * G).disk == 4 * G
