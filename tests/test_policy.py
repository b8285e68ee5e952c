"""Policy files: built-ins, overrides, and an error naming file, line and field for every mistake."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from corral.errors import CorralError
from corral.sandbox.policy import Policy, builtin_names, load_policy

FULL = """\
name: lab
mode: observe
egress:
  allow: ["198.51.100.10:22", "10.0.0.0/8", "[2001:db8::1]:443", "2001:db8:1::/48"]
  allow_domains: ["PyPI.org.", "files.pythonhosted.org", "*.github.com"]
  deny: ["169.254.169.254"]
limits: {cpus: 2, memory: 2G, pids: 512}
filesystem: {extra_ro: ["/opt/tools"]}
detect: {cpu_saturation: {percent: 90, seconds: 60}}
"""


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(CorralError) as info:
        load_policy(path)
    return str(info.value).replace(path, "policy.yaml")


def test_builtins_load() -> None:
    assert {"default", "dev"} <= set(builtin_names())
    default = load_policy("default")
    assert (default.name, default.mode, default.allow, default.allow_domains) == ("default", "enforce", (), ())
    dev = load_policy("dev")
    assert dev.allow == ()
    assert set(dev.allow_domains) == {"pypi.org", "files.pythonhosted.org", "registry.npmjs.org", "deb.debian.org",
                                      "github.com", "codeload.github.com", "objects.githubusercontent.com"}


def test_a_full_file(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, FULL))
    assert policy == Policy(
        name="lab", mode="observe",
        allow=("198.51.100.10/32:22", "10.0.0.0/8", "[2001:db8::1/128]:443", "2001:db8:1::/48"),
        allow_domains=("pypi.org", "files.pythonhosted.org", "*.github.com"),
        deny=("169.254.169.254/32",),
        cpus=2.0, memory_bytes=2 * 1024**3, pids=512, extra_ro=(Path("/opt/tools"),),
        cpu_saturation=(90.0, 60.0))


def test_defaults_fill_what_is_left_out(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, "egress:\n  allow_domains: [example.com]\nlimits:\n", "mine.yaml"))
    assert policy == Policy(name="mine", allow_domains=("example.com",))
    assert policy.mode == "enforce"  # never observe by accident


def test_overrides_merge() -> None:
    dev = load_policy("dev")
    merged = dev.merged(allow=["203.0.113.5:443", "10.0.0.0/8"], allow_domains=["example.com", "pypi.org"],
                        deny=["10.1.0.0/16"], mode="observe", cpus=0.5, memory_bytes=512 * 1024**2, pids=64,
                        extra_ro=["/opt/tools"])
    assert merged.allow == ("203.0.113.5/32:443", "10.0.0.0/8")
    assert merged.allow_domains == (*dev.allow_domains, "example.com")  # added, without repeats
    assert merged.deny == ("10.1.0.0/16",)
    assert (merged.mode, merged.cpus, merged.memory_bytes, merged.pids) == ("observe", 0.5, 512 * 1024**2, 64)
    assert merged.extra_ro == (Path("/opt/tools"),)
    assert dev.merged() == dev


@pytest.mark.parametrize(("overrides", "message"), [
    ({"allow": ["10.0.0.0/33"]}, "--allow"),
    ({"allow_domains": ["not a name"]}, "--allow-domain"),
    ({"mode": "block"}, "mode"),
    ({"cpus": 0}, "--cpus"),
    ({"pids": -1}, "--pids"),
    ({"extra_ro": ["/root"]}, "extra_ro"),
])
def test_bad_overrides_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(CorralError, match=f"command line: .*{re.escape(message)}"):
        load_policy("dev").merged(**overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "expected"), [
    # unknown fields, at every level
    ("name: x\negres:\n  allow: []\n",
     "policy.yaml:2: unknown field 'egres' under the top level; known: name, mode, egress, limits, filesystem, "
     "detect"),
    ("egress:\n  allow: []\n  alow: []\n", "policy.yaml:3: unknown field 'alow' under 'egress'"),
    ("limits:\n  cpu: 2\n", "policy.yaml:2: unknown field 'cpu' under 'limits'; known: cpus, memory, pids"),
    ("filesystem:\n  extra_rw: [/opt]\n", "policy.yaml:2: unknown field 'extra_rw' under 'filesystem'"),
    ("name: a\nname: b\n", "policy.yaml:2: field 'name' is given twice"),
    ("detect:\n  cpu: {percent: 90}\n", "policy.yaml:2: unknown field 'cpu' under 'detect'; known: cpu_saturation"),
    ("detect:\n  cpu_saturation: {percent: 90, secs: 60}\n",
     "policy.yaml:2: unknown field 'secs' under 'detect.cpu_saturation'; known: percent, seconds"),
    ("detect:\n  cpu_saturation:\n    percent: 90\n", "policy.yaml:3: 'detect.cpu_saturation' needs seconds"),
    ("detect:\n  cpu_saturation: {percent: 0, seconds: 60}\n",
     "policy.yaml:2: 'detect.cpu_saturation.percent' must be more than 0"),
    ("detect:\n  cpu_saturation: {percent: 90, seconds: 1m}\n",
     "policy.yaml:2: 'detect.cpu_saturation.seconds' must be a number of seconds, not a string"),
    ("detect:\n  cpu_saturation: 90\n", "policy.yaml:2: 'detect.cpu_saturation' must be a mapping of fields"),
    # bad addresses and ports
    ("egress:\n  allow:\n    - 10.0.0.0/8\n    - 10.0.0.0/33\n", "policy.yaml:4: 'egress.allow[1]'"),
    ("egress:\n  allow: ['10.0.0.1/8']\n", "policy.yaml:2: 'egress.allow[0]': .*host bits set"),
    ("egress:\n  deny: ['300.1.2.3']\n", "policy.yaml:2: 'egress.deny[0]'"),
    ("egress:\n  allow: ['198.51.100.1:70000']\n", "policy.yaml:2: 'egress.allow[0]': port 70000"),
    ("egress:\n  allow: ['198.51.100.1:ssh']\n", "policy.yaml:2: 'egress.allow[0]': bad port"),
    ("egress:\n  allow: ['[2001:db8::1]:-1']\n", "policy.yaml:2: 'egress.allow[0]': bad port"),
    ("egress:\n  allow: ['pypi.org:443']\n", "policy.yaml:2: .*is a name, not an address; put names under "
                                              "egress.allow_domains"),
    ("egress:\n  allow_domains: ['10.0.0.1']\n", "policy.yaml:2: .*is an address; put addresses under egress.allow"),
    ("egress:\n  allow_domains: ['pypi.org:443']\n", "policy.yaml:2: .*names take no port"),
    ("egress:\n  allow_domains: ['a..b', 'bad name']\n", "policy.yaml:2: 'egress.allow_domains[0]'"),
    # bad mode
    ("mode: block\n", "policy.yaml:1: 'mode' must be one of enforce, observe, not 'block'"),
    ("mode: on\n", "policy.yaml:1: 'mode' must be one of enforce, observe, not a boolean"),
    # bad sizes and numbers
    ("limits:\n  memory: 2X\n", "policy.yaml:2: 'limits.memory': '2X' is not a size"),
    ("limits:\n  memory: -1\n", "policy.yaml:2: 'limits.memory' must be more than 0"),
    ("limits:\n  cpus: 0\n", "policy.yaml:2: 'limits.cpus' must be more than 0"),
    ("limits:\n  pids: 1.5\n", "policy.yaml:2: 'limits.pids' must be a whole number"),
    # wrong types
    ("egress:\n  allow: 10.0.0.0/8\n", "policy.yaml:2: 'egress.allow' must be a list, not a string"),
    ("egress: [a]\n", "policy.yaml:1: 'egress' must be a mapping of fields, not a list"),
    ("limits:\n  cpus: two\n", "policy.yaml:2: 'limits.cpus' must be a number of CPUs"),
    ("limits:\n  pids: true\n", "policy.yaml:2: 'limits.pids' must be a whole number of processes, not a boolean"),
    ("egress:\n  allow: [{a: 1}]\n", "policy.yaml:2: 'egress.allow[0]' must be a string"),
    ("name: [a]\n", "policy.yaml:1: 'name' must be a string"),
    ("name: 'two words'\n", "policy.yaml:1: 'name' must be letters"),
    ("- egress\n", "policy.yaml:1: the top level must be a mapping"),
    ("limits:\n  pids: !!python/object:os.system x\n", "policy.yaml:2: 'limits.pids' must be a whole number"),
    ("filesystem:\n  extra_ro: [opt/tools]\n", "policy.yaml:2: 'filesystem.extra_ro[0]': .*absolute"),
    ("filesystem:\n  extra_ro: [/home/alice]\n", "policy.yaml:2: 'filesystem.extra_ro[0]': .*cannot be shown"),
    # empty files and broken YAML
    ("", "policy.yaml:1: the policy is empty"),
    ("# only a comment\n", "policy.yaml:1: the policy is empty"),
    ("name: x\negress:\n  allow: [10.0.0.0/8\n", "policy.yaml:4: YAML syntax error"),
    ("name: x\n  mode: enforce\n", "policy.yaml:2: YAML syntax error: mapping values are not allowed here"),
    ("name: x\n\tmode: enforce\n", "policy.yaml:2: YAML syntax error"),
])
def test_every_mistake_names_file_line_and_field(tmp_path: Path, text: str, expected: str) -> None:
    message = error_of(tmp_path, text)
    # expected is literal text, with ".*" where the message may say more
    assert re.match(".*".join(map(re.escape, expected.split(".*"))), message), message


def test_unknown_names_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CorralError, match=r"no policy file or built-in policy named 'nope'; built-ins: .*dev"):
        load_policy("nope")
    with pytest.raises(CorralError, match=r"missing\.yaml: cannot read policy file"):
        load_policy(str(tmp_path / "missing.yaml"))
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CorralError, match=r"bin\.yaml: cannot read policy file"):
        load_policy(str(tmp_path / "bin.yaml"))


def test_a_file_may_shadow_nothing_but_is_found_by_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dev").write_text("name: mine\n")
    (tmp_path / "lab").write_text("name: lab\n")
    assert load_policy("dev").name == "dev"  # a bare built-in name always means the built-in
    assert load_policy("./dev").name == "mine"
    assert load_policy("lab").name == "lab"  # not a built-in: the file of that name
