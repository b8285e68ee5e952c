"""Rule files: loading, every kind of mistake with file and line, overrides, matching, and the CLI."""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import pytest
from test_rules_fields import PROC, exec_event, file_event, net_event, sys_event

from corral import events as ev
from corral.enrich.proctable import Process
from corral.rules import cli
from corral.rules.fields import ExampleResolver, FieldRegistry
from corral.rules.language import NEVER
from corral.rules.loader import (
    Problem,
    RuleLoadError,
    RuleSet,
    default_rule_paths,
    load_rules,
    load_rules_text,
)

DOC_EXAMPLE = """\
- list: tunnel_tools
  items: [ssh, autossh, ngrok, cloudflared, chisel, frpc, bore, socat]

- macro: outbound
  condition: evt.type = connect and not net.dip in_cidr (127.0.0.0/8, ::1/128)

- rule: Reverse SSH tunnel
  desc: ssh asked to forward a remote port back into the sandbox
  event: exec                       # one kind, or a list: [connect, send]
  condition: proc.name in (ssh, autossh) and proc.args glob "*-R*"
  exceptions:                       # optional: conditions that veto a match
    - name: our bastion
      condition: proc.args contains "bastion.internal"
  severity: critical                # info, low, medium, high, critical
  category: tunnel                  # see the fixed list below
  tags: [T1572]                     # MITRE ATT&CK technique ids
  action: kill_tree                 # alert (default), kill, kill_tree, freeze, cut_network, stop
  output: "reverse tunnel by %proc.cmdline (step %step.id)"
  enabled: true
  examples:                         # run by `corral rules test`; each is a map of field values
    match:
      - {proc.name: ssh, proc.args: "-N -R 8080:localhost:22 user@203.0.113.5"}
    no_match:
      - {proc.name: ssh, proc.args: "user@203.0.113.5 uptime"}

- rule: Tunnel tool outbound
  desc: a tunnelling tool connects out
  event: [connect, flow]
  condition: outbound and proc.name in (tunnel_tools)
  severity: high
  category: tunnel
  output: "%proc.name to %net.dip:%net.dport"
  examples:
    match: [{proc.name: chisel, net.dip: 203.0.113.5}]
    no_match: [{proc.name: chisel, net.dip: 127.0.0.1}, {proc.name: curl, net.dip: 203.0.113.5}]
"""

RULE = """\
- rule: {name}
  desc: d
  event: {event}
  condition: {condition}
  severity: high
  category: execution
  examples:
    match: [{{proc.name: x}}]
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str, *before: str) -> list[str]:
    """Every problem of loading `text` (after files `before`), with paths shortened."""
    paths = [write(tmp_path, f"{i}.yaml", t) for i, t in enumerate(before)]
    paths.append(write(tmp_path, "bad.yaml", text))
    with pytest.raises(RuleLoadError) as info:
        load_rules(paths)
    return [str(p).replace(str(tmp_path) + "/", "") for p in info.value.problems]


def ssh_exec(args: str, name: str = "ssh") -> ev.Event:
    return exec_event(f"/usr/bin/{name}", [name, *args.split()])


# ----------------------------------------------------------------------- loading


def test_the_documented_example_loads(tmp_path: Path) -> None:
    rules = load_rules([write(tmp_path, "r.yaml", DOC_EXAMPLE)])
    assert [r.name for r in rules.rules] == ["Reverse SSH tunnel", "Tunnel tool outbound"]
    assert rules.lists["tunnel_tools"][:2] == ("ssh", "autossh") and set(rules.macros) == {"outbound"}
    r = rules.rules[0]
    assert (r.events, r.severity, r.category, r.tags, r.action, r.enabled) == (
        ("exec",), "critical", "tunnel", ("T1572",), "kill_tree", True)
    assert r.source == f"{tmp_path}/r.yaml:7"
    assert [x.name for x in r.exceptions] == ["our bastion"]
    assert [(x.expect, x.line) for x in r.examples] == [(True, 22), (False, 24)]
    assert r.examples[0].values == {"proc.name": "ssh", "proc.args": "-N -R 8080:localhost:22 user@203.0.113.5"}
    assert rules.rules_for("exec") == [r]
    assert rules.rules[1].action == "alert"  # the default


def test_matching_uses_the_index_and_exceptions_veto(tmp_path: Path) -> None:
    rules = load_rules([write(tmp_path, "r.yaml", DOC_EXAMPLE)])
    tunnel = rules.rules[0]
    assert rules.match(ssh_exec("-N -R 8080:localhost:22 user@203.0.113.5")) == [tunnel]
    assert rules.match(ssh_exec("user@203.0.113.5 uptime")) == []
    assert rules.match(ssh_exec("-R 8080:localhost:22 me@bastion.internal")) == []  # the exception
    assert tunnel.conditions["exec"](ssh_exec("-R 1:x:2 me@bastion.internal"))  # condition alone holds
    assert rules.match(ssh_exec("-R 8080:localhost:22 x", name="curl")) == []
    out = net_event(ev.CONNECT, "203.0.113.5", 443)
    out.proc = Process(1, 0, "chisel", "/tmp/chisel", ("chisel", "client"), "/", 0)
    assert rules.match(out) == [rules.rules[1]]
    local = net_event(ev.CONNECT, "127.0.0.1", 443)
    local.proc = out.proc
    assert rules.match(local) == []
    # `evt.type = connect` can never hold on a flow: the rule is not even tried there
    assert rules.rules[1].tests["flow"] is NEVER and rules.rules_for("flow") == []
    assert rules.match(file_event(ev.OPEN, "/etc/shadow")) == []


def test_output_templates(tmp_path: Path) -> None:
    rules = load_rules_text(DOC_EXAMPLE + RULE.format(name="Pct", event="[exec, open]", condition="proc.pid > 0")
                            + '  output: "100%% of %proc.name, %proc.argv, %file.path. %proc.args[1] 5%"\n')
    e = ssh_exec("-R 8080:localhost:22 x")
    assert rules.rules[0].format_output(e) == "reverse tunnel by ssh -R 8080:localhost:22 x (step 3)"
    pct = rules.rules[2]
    assert pct.format_output(e) == "100% of ssh, ssh -R 8080:localhost:22 x, <NA>. -R 5%"
    assert pct.format_output({"proc.name": "nc"}, ExampleResolver()) == "100% of nc, <NA>, <NA>. <NA> 5%"
    flow = ev.DerivedEvent.make("flow", comm="chisel", dip="1.2.3.4", dport=80)
    assert rules.rules[1].format_output(flow) == "chisel to 1.2.3.4:80"


def test_a_rule_without_output_says_its_description() -> None:
    rules = load_rules_text(RULE.format(name="Quiet", event="exec", condition="proc.pid > 0"))
    assert rules.rules[0].format_output(ssh_exec("x")) == "d"


def test_empty_files_and_directories(tmp_path: Path) -> None:
    assert default_rule_paths(tmp_path / "missing", tmp_path / "also-missing") == []
    (tmp_path / "empty").mkdir()
    assert default_rule_paths(tmp_path / "empty", tmp_path / "missing") == []
    d = tmp_path / "rules.d"
    d.mkdir()
    write(d, "20-b.yaml", RULE.format(name="B", event="exec", condition="proc.pid = 2"))
    write(d, "10-a.yml", "# nothing but a comment\n")
    write(d, "notes.txt", "not rules")
    write(d, "15-c.yaml", RULE.format(name="C", event="exec", condition="proc.pid = 3"))
    assert [p.name for p in default_rule_paths(d, tmp_path / "missing")] == ["10-a.yml", "15-c.yaml", "20-b.yaml"]
    rules = load_rules([d])
    assert [r.name for r in rules.rules] == ["C", "B"]
    assert len(load_rules([])) == 0


# ---------------------------------------------------------------------- mistakes


@pytest.mark.parametrize(("text", "expected"), [
    ("- rule: X\n  desc: d\n  event: exec\n  condition: proc.name = x\n  sevrity: high\n  severity: high\n"
     "  category: execution\n  examples: {match: [{proc.name: x}]}\n",
     "bad.yaml:5: rule 'X': unknown key 'sevrity'; did you mean 'severity'?"),
    (RULE.format(name="X", event="exec", condition="proc.name = x").replace("high", "urgent"),
     "bad.yaml:5: rule 'X': severity must be one of info, low, medium, high, critical, not 'urgent'"),
    (RULE.format(name="X", event="exec", condition="proc.name = x").replace("execution", "mining"),
     "bad.yaml:6: rule 'X': category must be one of cryptomining, tunnel,"),
    (RULE.format(name="X", event="exec", condition="proc.name = x") + "  action: nuke\n",
     "bad.yaml:9: rule 'X': action must be one of alert, kill, kill_tree, freeze, cut_network, stop, not 'nuke'"),
    (RULE.format(name="X", event="exec", condition="proc.nmae = x"),
     "bad.yaml:4: rule 'X': condition: unknown field 'proc.nmae'; did you mean proc.name"),
    (RULE.format(name="X", event="exec", condition="proc.name is x"),
     "bad.yaml:4: rule 'X': condition: unknown operator 'is' after proc.name"),
    (RULE.format(name="X", event="exec", condition="proc.name = x and outbund"),
     "bad.yaml:4: rule 'X': condition: unknown macro 'outbund'"),
    ("- list: tunnel_tools\n  items: [ssh]\n" + RULE.format(name="X", event="exec",
                                                             condition="proc.name in (tunnel_tool)"),
     "bad.yaml:6: rule 'X': condition: unknown list 'tunnel_tool'; did you mean tunnel_tools?"),
    (RULE.format(name="X", event="exec", condition="scan.hosts > 10"),
     "bad.yaml:4: rule 'X': condition: field scan.hosts does not exist on exec events; it exists on: scan"),
    (RULE.format(name="X", event="exce", condition="proc.name = x"),
     "bad.yaml:3: rule 'X': unknown event kind 'exce' (did you mean exec?)"),
    ("- macro: a\n  condition: b\n- macro: b\n  condition: a or proc.pid = 1\n",
     "bad.yaml:2: macro 'a': macro cycle: a -> b -> a"),
    ("- macro: a\n  condition: proc.nmae = 1\n",
     "bad.yaml:2: macro 'a': condition: unknown field 'proc.nmae'"),
    ("- list: a\n  items: [b]\n- list: b\n  items: [a, x]\n", "bad.yaml:1: list 'a': list cycle: a -> b -> a"),
    ("- rule: X\n  desc: d\n  event: exec\n  condition: proc.name = x\n  severity: high\n  category: execution\n",
     "bad.yaml:1: rule 'X': missing examples"),
    (RULE.format(name="X", event="exec", condition="proc.name = x").replace("match:", "no_match:"),
     "bad.yaml:7: rule 'X': no examples: give at least one under examples.match"),
    (RULE.format(name="X", event="exec", condition="proc.name = x").replace("proc.name: x", "proc.nme: x"),
     "bad.yaml:8: rule 'X': example key 'proc.nme' is not a field (did you mean proc.name?)"),
    (RULE.format(name="X", event="exec", condition="proc.name = x").replace("proc.name: x", "net.sni: x"),
     "bad.yaml:8: rule 'X': example key 'net.sni' is not a field of exec events"),
    (RULE.format(name="X", event="exec", condition="proc.name = x") + '  output: "%proc.nam did it"\n',
     "bad.yaml:9: rule 'X': output: unknown field %proc.nam (did you mean proc.name?)"),
    (RULE.format(name="X", event="exec", condition="proc.name = x") + '  output: "%net.dport"\n',
     "bad.yaml:9: rule 'X': output: %net.dport: field net.dport does not exist on exec events"),
    (RULE.format(name="X", event="exec", condition="proc.name = x") + "  enabled: maybe\n",
     "bad.yaml:9: rule 'X': 'enabled' must be true or false"),
    (RULE.format(name="X", event="exec", condition="proc.name = x")
     + "  exceptions:\n    - name: e\n      condition: proc.args contans x\n",
     "bad.yaml:11: rule 'X': exception 'e': condition: unknown operator 'contans'"),
    (RULE.format(name="X", event="exec", condition="proc.name = x") + "  exceptions:\n    - {name: e}\n",
     "bad.yaml:10: rule 'X': an exception needs a name and a condition"),
    (RULE.format(name="X", event="exec", condition="proc.name = x") * 2,
     "bad.yaml:9: rule 'X': rule 'X' is already defined in this file (line 1)"),
    ("- rule: X\n  enabled: false\n", "bad.yaml:1: rule 'X': no earlier rule named 'X' to disable"),
    ("- rule: X\n  append: true\n  exceptions: [{name: e, condition: proc.pid = 1}]\n",
     "bad.yaml:1: rule 'X': append: true, but no earlier rule is named 'X'"),
    ("- list: x\n  append: true\n  items: [a]\n", "bad.yaml:1: list 'x': append: true, but no earlier list"),
    ("- rule: X\n  desc: [unclosed\n", "bad.yaml:3: YAML syntax error"),
    ("rule: X\n", "bad.yaml:1: a rule file is a YAML list"),
    ("- just a string\n", "bad.yaml:1: each entry must be a mapping"),
    ("- rule: X\n  list: Y\n", "bad.yaml:1: an entry needs exactly one of rule:, list:, macro: (it has rule and list)"),
    ("- macro: not\n  condition: proc.pid = 1\n", "bad.yaml:1: macro 'not': macro names are letters"),
    (RULE.format(name="X", event="exec", condition="proc.args regex '(('"),
     "bad.yaml:4: rule 'X': condition: bad regex '(('"),
    (RULE.format(name="X", event="exec", condition="proc.name = x").replace("desc: d", "desc:"),
     "bad.yaml:2: rule 'X': 'desc' must be a text value"),
])
def test_each_mistake_names_file_line_entry_and_what(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert any(p.startswith(expected) for p in found), "\n".join(found)


def test_condition_problems_show_a_caret(tmp_path: Path) -> None:
    (p,) = problems(tmp_path, RULE.format(name="X", event="exec", condition="proc.name = ssh and (proc.pid = 1"))
    assert p.splitlines() == [
        "bad.yaml:4: rule 'X': condition: expected ')' to close the '(' at column 21, found the end of the condition",
        "    proc.name = ssh and (proc.pid = 1",
        "                                     ^"]


def test_every_problem_of_every_file_is_reported(tmp_path: Path) -> None:
    one = write(tmp_path, "one.yaml", RULE.format(name="A", event="exec", condition="proc.nme = 1")
                + RULE.format(name="B", event="exec", condition="proc.name = ok"))
    two = write(tmp_path, "two.yaml", RULE.format(name="C", event="exec", condition="proc.name = x")
                .replace("high", "hi") + "- rule: B\n  enabled: nope\n")
    with pytest.raises(RuleLoadError) as info:
        load_rules([one, two])
    found = info.value.problems
    assert [(Path(p.file).name, p.line, p.rule) for p in found] == [
        ("one.yaml", 4, "A"), ("two.yaml", 5, "C"), ("two.yaml", 10, "B")]
    assert all(isinstance(p, Problem) for p in found)
    assert str(info.value).count(".yaml:") == 3


def test_a_problem_in_a_macro_is_reported_once_not_per_rule(tmp_path: Path) -> None:
    found = problems(tmp_path, "- macro: m\n  condition: proc.nmae = 1\n"
                     + RULE.format(name="A", event="exec", condition="m")
                     + RULE.format(name="B", event="exec", condition="m or proc.pid = 1"))
    assert len(found) == 1 and found[0].startswith("bad.yaml:2: macro 'm'")


def test_a_macro_field_missing_on_the_rules_kind_is_blamed_on_the_rule(tmp_path: Path) -> None:
    (p,) = problems(tmp_path, "- macro: ssh_port\n  condition: net.dport = 22\n"
                    + RULE.format(name="A", event="exec", condition="ssh_port"))
    assert p.startswith("bad.yaml:6: rule 'A': condition: in macro 'ssh_port': field net.dport does not exist "
                        "on exec events")


# --------------------------------------------------------------------- overrides


BASE = """\
- list: miners
  items: [xmrig, minerd]
- macro: pool_port
  condition: net.dport in (3333, 4444)
- rule: Miner
  desc: a miner runs
  event: exec
  condition: proc.name in (miners)
  severity: high
  category: cryptomining
  examples: {match: [{proc.name: xmrig}]}
- rule: Pool
  desc: connects to a pool port
  event: connect
  condition: pool_port
  severity: medium
  category: cryptomining
  examples: {match: [{net.dport: 3333}]}
- rule: Nc
  desc: nc runs
  event: exec
  condition: proc.name = nc
  exceptions: [{name: not in ci, condition: proc.args contains ci}]
  severity: low
  category: execution
  examples: {match: [{proc.name: nc}]}
"""

SITE = """\
- list: miners
  append: true
  items: [t-rex]
- macro: pool_port
  condition: net.dport = 5555
- rule: Nc
  append: true
  exceptions: [{name: our probe, condition: proc.args contains probe}]
- rule: Pool
  enabled: false
- rule: Miner
  desc: a miner runs, by name or by flag
  event: exec
  condition: proc.name in (miners) or proc.args contains stratum
  severity: critical
  category: cryptomining
  action: kill_tree
  examples: {match: [{proc.name: t-rex}, {proc.args: "-o stratum+tcp://x"}]}
"""


def test_later_files_override_earlier_ones(tmp_path: Path) -> None:
    base = load_rules([write(tmp_path, "base.yaml", BASE)])
    rules = load_rules([write(tmp_path, "base.yaml", BASE), write(tmp_path, "site.yaml", SITE)])
    assert rules.lists["miners"] == ("xmrig", "minerd", "t-rex")
    miner = next(r for r in rules.rules if r.name == "Miner")
    assert (miner.severity, miner.action, Path(miner.file).name, miner.line) == ("critical", "kill_tree",
                                                                                 "site.yaml", 11)
    assert [r.name for r in rules.rules] == ["Pool", "Nc", "Miner"]  # a replacement moves to where it was made
    assert rules.match(exec_event("/tmp/t-rex", ["t-rex"])) == [miner]
    assert rules.match(exec_event("/tmp/x", ["x", "-o", "stratum+tcp://p"])) == [miner]
    assert base.match(exec_event("/tmp/t-rex", ["t-rex"])) == []
    pool = next(r for r in rules.rules if r.name == "Pool")
    assert not pool.enabled and rules.rules_for("connect") == []
    assert rules.match(net_event(ev.CONNECT, "198.51.100.1", 5555)) == []
    # the replaced macro applies to the earlier file's rule
    assert pool.matches(net_event(ev.CONNECT, "198.51.100.1", 5555))
    assert not pool.matches(net_event(ev.CONNECT, "198.51.100.1", 3333))
    nc = next(r for r in rules.rules if r.name == "Nc")
    assert [x.name for x in nc.exceptions] == ["not in ci", "our probe"]
    assert rules.match(exec_event("/bin/nc", ["nc", "probe"])) == []
    assert rules.match(exec_event("/bin/nc", ["nc", "ci"])) == []
    assert rules.match(exec_event("/bin/nc", ["nc", "-l"])) == [nc]


def test_a_disabled_rule_can_be_enabled_again(tmp_path: Path) -> None:
    rules = load_rules([write(tmp_path, "a.yaml", BASE), write(tmp_path, "b.yaml", "- rule: Pool\n  enabled: false\n"),
                        write(tmp_path, "c.yaml", "- rule: Pool\n  enabled: true\n")])
    assert [r.name for r in rules.rules_for("connect")] == ["Pool"]


def test_append_adds_only_exceptions(tmp_path: Path) -> None:
    found = problems(tmp_path, "- rule: Nc\n  append: true\n  severity: high\n"
                     "  exceptions: [{name: not in ci, condition: proc.pid = 1}]\n", BASE)
    assert found == [
        "bad.yaml:1: rule 'Nc': with append: true only exceptions can be added, not severity (to change those, "
        "redefine the whole rule)",
        "bad.yaml:4: rule 'Nc': exception 'not in ci' already exists in rule 'Nc'"]


# ---------------------------------------------------------------------- the index


def test_the_index_finds_exactly_what_trying_every_rule_finds() -> None:
    names = ["ssh", "nc", "xmrig", "curl", "python3", "bash"]
    conditions = [
        "proc.name in (ssh, nc) and proc.args contains -e", "proc.name = xmrig", "proc.name = curl or proc.pid = 9",
        "proc.args contains -e", "proc.name in (bash) and proc.aname[1] = sshd", "proc.argv in (-e, -R)",
        "not proc.name = bash", "proc.pid in (1, 9, 4242) and proc.name != nc", "proc.uid = 0 and proc.name = nc",
        "proc.stdio_socket = true", "evt.type = exec and proc.name in (python3, ssh)", "proc.argv = -R",
    ]
    text = "".join(RULE.format(name=f"R{i}", event="exec", condition=c) for i, c in enumerate(conditions))
    text += "- rule: R3\n  enabled: false\n"
    registry = FieldRegistry(ancestors=lambda pid: [Process(1, 0, "sshd", "/usr/sbin/sshd", (), "/", 0)]
                             if pid == 9 else [])
    rules = load_rules_text(text, registry=registry)
    assert any(r.screens["exec"] for r in rules.rules) and any(not r.screens["exec"] for r in rules.rules)
    count = 0
    for i, name in enumerate(names * 4):
        for args in ([], ["-e"], ["-R", "x"], ["-e", "-R"]):
            e = exec_event(f"/usr/bin/{name}", [name, *args], pid=9 if i % 3 == 0 else 4242, uid=i % 2,
                           flags=0b10 if i % 5 == 0 else 0)
            expected = [r for r in rules.rules if r.enabled and r.matches(e)]
            assert rules.match(e) == expected, (name, args)
            count += len(expected)
    assert count > 50


def test_screens_on_numbers_and_booleans() -> None:
    text = (RULE.format(name="Port", event="connect", condition="net.dport in (22, 2222) and proc.pid > 0")
            + RULE.format(name="Write", event="open", condition="file.writable = true and file.path startswith /etc"))
    rules = load_rules_text(text)
    assert all(r.screens[r.events[0]] for r in rules.rules)
    assert [r.name for r in rules.match(net_event(ev.CONNECT, "10.0.0.1", 2222))] == ["Port"]
    assert rules.match(net_event(ev.CONNECT, "10.0.0.1", 80)) == []
    assert [r.name for r in rules.match(file_event(ev.OPEN, "/etc/passwd", flags=1))] == ["Write"]
    assert rules.match(file_event(ev.OPEN, "/etc/passwd", flags=0)) == []


# ------------------------------------------------------------------------- the CLI


def run_cli(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="corral")
    cli.add_rules_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["rules", *argv])
    out = io.StringIO()
    code = args.func(args, out)
    return code, out.getvalue()


def test_cli_check(tmp_path: Path) -> None:
    good = write(tmp_path, "good.yaml", DOC_EXAMPLE)
    assert run_cli("check", "--no-defaults", str(good)) == (0, "ok: 2 rules, 1 lists, 1 macros (1 file)\n")
    bad = write(tmp_path, "bad.yaml", RULE.format(name="X", event="exec", condition="proc.nme = x")
                .replace("high", "hgih"))
    code, out = run_cli("check", "--no-defaults", str(good), str(bad))
    assert code == 2
    lines = out.splitlines()
    assert lines[0] == f"{bad}:4: rule 'X': condition: unknown field 'proc.nme'; did you mean proc.name, " \
                       "proc.pname, proc.aname?"
    assert lines[3] == f"{bad}:5: rule 'X': severity must be one of info, low, medium, high, critical, " \
                       "not 'hgih' (did you mean high?)"
    assert lines[-1] == "2 problems"
    assert run_cli("check", "--no-defaults", str(tmp_path / "nope.yaml")) == (
        2, f"{tmp_path}/nope.yaml: no such file or directory\n")


def test_cli_list(tmp_path: Path) -> None:
    long_name = "A rule with a very long name that will not fit in its column"
    path = write(tmp_path, "a-file-with-a-long-name.yaml",
                 DOC_EXAMPLE + RULE.format(name=long_name, event="[exec, connect, open, flow]",
                                           condition="proc.pid = 1") + "- rule: Reverse SSH tunnel\n  enabled: false\n")
    code, out = run_cli("list", "--no-defaults", str(path))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "EVENTS", "SEVERITY", "CATEGORY", "ACTION", "ON", "LINE"]
    assert all(len(line) <= 100 for line in lines), out
    assert lines[1] == f"{path}:"
    assert lines[2].split()[-6:] == ["exec", "critical", "tunnel", "kill_tree", "no", "7"]
    assert lines[4].startswith("A rule with a very long name that… exec,connect… high     execution")
    assert lines[-1] == "3 rules from 1 files"
    code, out = run_cli("list", "--no-defaults", "--json", str(path))
    first = json.loads(out.splitlines()[0])
    assert first == {"name": "Reverse SSH tunnel", "events": ["exec"], "severity": "critical", "category": "tunnel",
                     "action": "kill_tree", "enabled": False, "tags": ["T1572"], "source": f"{path}:7",
                     "desc": "ssh asked to forward a remote port back into the sandbox"}


def test_cli_test(tmp_path: Path) -> None:
    good = write(tmp_path, "good.yaml", DOC_EXAMPLE)
    assert run_cli("test", "--no-defaults", str(good)) == (0, "5 passed, 0 failed\n")
    wrong = write(tmp_path, "wrong.yaml", """\
- rule: Wrong
  desc: examples that disagree with the condition
  event: exec
  condition: proc.name = ssh and proc.args[1] = -R
  exceptions: [{name: bastion, condition: proc.args contains bastion}]
  severity: low
  category: tunnel
  examples:
    match:
      - {proc.name: ssh, proc.args: "-R 1:x:2 host"}
      - {proc.name: ssh, proc.args: "-L 1:x:2 host"}
      - {proc.name: ssh, proc.args: "-R 1:x:2 bastion"}
    no_match:
      - {proc.name: ssh, proc.argv: [ssh, -R, "1:x:2"]}
""")
    code, out = run_cli("test", "--no-defaults", str(good), str(wrong))
    assert code == 1
    assert out.splitlines() == [
        f"FAIL {wrong}:11: rule 'Wrong': should match but does not: "
        '{"proc.name": "ssh", "proc.args": "-L 1:x:2 host"}',
        f"FAIL {wrong}:12: rule 'Wrong': should match but does not: "
        '{"proc.name": "ssh", "proc.args": "-R 1:x:2 bastion"}',
        f"FAIL {wrong}:14: rule 'Wrong': should not match but does: "
        '{"proc.name": "ssh", "proc.argv": ["ssh", "-R", "1:x:2"]}',
        "6 passed, 3 failed"]
    code, out = run_cli("test", "-v", "--no-defaults", str(good))
    assert code == 0 and out.count("\nok   ") + out.startswith("ok   ") == 5


def test_the_default_search_path_loads_what_is_there() -> None:
    """Built-in rules (if any are installed yet) must load and pass their own examples."""
    if not default_rule_paths():
        pytest.skip("no built-in or site rules installed")
    code, out = run_cli("test")
    assert code == 0, out


# --------------------------------------------------------------------- throughput


def test_throughput_sanity_print(capsys: pytest.CaptureFixture[str]) -> None:
    """Not a timed assertion: prints events/s for ~100 rules on a mix of decoded records."""
    rules_text = "- list: tools\n  items: [xmrig, minerd, nc, ncat, socat, ssh, chisel, ngrok, nmap, masscan]\n"
    rules_text += "- macro: outbound\n  condition: evt.type = connect and not net.dip in_cidr (127.0.0.0/8)\n"
    for n in range(40):
        cond = (f"proc.name in (tool{n}, x{n}) and proc.args contains -x{n}" if n % 2 else
                f"proc.name = bin{n} or proc.args glob '*--flag{n}*'" if n % 3 else
                f"proc.exe startswith /tmp/{n} and proc.aname[1] in (tools)")
        rules_text += RULE.format(name=f"e{n}", event="exec", condition=cond)
    for n in range(25):
        cond = (f"file.path startswith /etc/s{n} and not proc.name in (tools)" if n % 2 else
                f"file.path glob '/home/*/.ssh/id_{n}*' and file.writable = true")
        rules_text += RULE.format(name=f"o{n}", event="open", condition=cond)
    for n in range(25):
        cond = (f"outbound and net.dport = {3333 + n} and proc.name in (tools)" if n % 2 else
                f"net.dip in_cidr (169.254.169.254/32, 100.100.100.{n}/32)")
        rules_text += RULE.format(name=f"c{n}", event="connect", condition=cond)
    for n in range(10):
        rules_text += RULE.format(name=f"f{n}", event="[fork, exit]", condition=f"proc.name = forker{n}")
    rules: RuleSet = load_rules_text(rules_text)
    assert len(rules) == 100
    events: list[ev.Event] = []
    for k in range(2000):
        slot = k % 10
        e = (exec_event("/usr/bin/git", ["git", "commit", "-m", f"m{k}"]) if slot == 0 else
             file_event(ev.OPEN, f"/home/agent/.cache/f{k}") if slot in (1, 2, 3) else
             net_event(ev.CONNECT, f"198.51.100.{k % 250}", 443) if slot in (4, 5) else
             sys_event(ev.FORK, [k]))
        e.proc = PROC
        events.append(e)
    match = rules.match
    start = time.perf_counter()
    for e in events:
        match(e)
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[rules] {len(events) / elapsed:,.0f} events/s, 100 rules, mixed kinds (sanity print)")
