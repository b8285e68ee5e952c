"""The condition language: parsing, every operator's semantics, lists and macros, errors with a caret."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from corral.rules.language import (
    ALWAYS,
    NEVER,
    And,
    Compare,
    Compiler,
    Constant,
    FieldError,
    FieldRef,
    Getter,
    Macro,
    MacroRef,
    Not,
    Or,
    RuleSyntaxError,
    Value,
    ValueIs,
    as_number,
    compile_condition,
    parse,
)

KNOWN = ("proc.name", "proc.args", "proc.argv", "proc.pid", "proc.uid", "proc.aname", "proc.cmdline",
         "net.dip", "net.dport", "net.sni", "file.path", "file.writable", "ns.types", "setuid.ids",
         "dns.answers", "cpu.percent", "evt.type")
INDEXED = ("proc.args", "proc.argv", "proc.aname")


def resolver(name: str, index: int | None) -> Getter | None:
    """Fields read from a dict; indexed ones from a list under the bare name."""
    if name not in KNOWN or (index is not None and name not in INDEXED):
        return None
    if index is None:
        return lambda d: d.get(name)
    return lambda d: d[name][index] if isinstance(d.get(name), list) and len(d[name]) > index else None


def macro_map(**conditions: str) -> dict[str, Macro]:
    return {name: Macro(name, text, parse(text)) for name, text in conditions.items()}


def check(condition: str, values: Mapping[str, Any], **kw: Any) -> bool:
    return bool(compile_condition(condition, resolver, known_fields=KNOWN, **kw)(dict(values)))


def error(condition: str, **kw: Any) -> RuleSyntaxError:
    with pytest.raises(RuleSyntaxError) as info:
        compile_condition(condition, resolver, known_fields=KNOWN, **kw)
    return info.value


# ------------------------------------------------------------------ parsing


def test_parse_builds_the_tree_with_columns() -> None:
    node = parse('proc.name in (ssh, "auto ssh") and not proc.args glob "*-R*"')
    assert node == And((
        Compare(FieldRef("proc.name", None, 1), "in", (Value("ssh", False, 15), Value("auto ssh", True, 20)), 11),
        Not(Compare(FieldRef("proc.args", None, 40), "glob", (Value("*-R*", True, 55),), 50), 36),
    ))


def test_precedence_not_then_and_then_or() -> None:
    # not a or b and c  ==  (not a) or (b and c)
    node = parse("not a.x exists or b.x exists and c.x exists")
    assert isinstance(node, Or)
    assert isinstance(node.operands[0], Not) and isinstance(node.operands[1], And)
    assert check("proc.name = a or proc.name = b and proc.pid = 1", {"proc.name": "a", "proc.pid": 2})
    assert not check("(proc.name = a or proc.name = b) and proc.pid = 1", {"proc.name": "a", "proc.pid": 2})
    assert check("not proc.name = a and proc.pid = 2", {"proc.name": "b", "proc.pid": 2})
    assert not check("not (proc.name = b and proc.pid = 2)", {"proc.name": "b", "proc.pid": 2})
    assert check("not not proc.name = b", {"proc.name": "b"})


def test_and_or_chains_flatten() -> None:
    node = parse("a.x exists and b.x exists and c.x exists or d.x exists or e.x exists")
    assert isinstance(node, Or) and len(node.operands) == 3
    assert isinstance(node.operands[0], And) and len(node.operands[0].operands) == 3


def test_operators_without_spaces_and_bare_values_with_symbols() -> None:
    assert check("proc.name=ssh", {"proc.name": "ssh"})
    assert check("net.dport>=1024 and net.dport<2000", {"net.dport": 1024})
    assert check("proc.args contains --opt=a", {"proc.args": "x --opt=a"})
    assert "(quote values that contain commas" in error("proc.args contains --opt=a,b").message
    assert check("file.path glob /tmp/*.sh", {"file.path": "/tmp/x.sh"})
    assert check("proc.args contains user@203.0.113.5:22", {"proc.args": "-p user@203.0.113.5:22"})


def test_quoting() -> None:
    assert check('proc.args = "a b  c"', {"proc.args": "a b  c"})
    assert "unexpected quoted text" in error("proc.args = 'it''s'").message  # no implicit concatenation
    assert check(r'proc.args = "say \"hi\""', {"proc.args": 'say "hi"'})
    assert check(r"proc.args = 'it\'s'", {"proc.args": "it's"})
    assert check(r'proc.args regex "^\d+$"', {"proc.args": "123"})  # other backslashes stay for regexes
    assert check('proc.name in ("a b", c)', {"proc.name": "a b"})
    assert check('proc.args = ""', {"proc.args": ""})
    assert not check('proc.args = "and"', {"proc.args": "x"})
    assert check('proc.name = "or"', {"proc.name": "or"})  # keywords are plain text once quoted


def test_indexing() -> None:
    assert parse("proc.aname[2] = sh") == Compare(FieldRef("proc.aname", 2, 1), "=", (Value("sh", False, 17),), 15)
    values = {"proc.argv": ["ssh", "-R", "8080"], "proc.aname": ["bash", "sshd"]}
    assert check("proc.argv[1] = -R and proc.aname[1] = sshd", values)
    assert check("proc.argv[ 2 ] = 8080", values)
    assert not check("proc.argv[5] exists", values)  # past the end: missing
    assert check("not proc.argv[5] exists", values)


# ------------------------------------------------------------ operators


@pytest.mark.parametrize(("condition", "values", "expected"), [
    ("proc.name = ssh", {"proc.name": "ssh"}, True),
    ("proc.name = ssh", {"proc.name": "sshd"}, False),
    ("proc.name != ssh", {"proc.name": "sshd"}, True),
    ("proc.name != ssh", {"proc.name": "ssh"}, False),
    ("net.dport = 22", {"net.dport": 22}, True),
    ("net.dport = 22.0", {"net.dport": 22}, True),
    ("net.dport = 0x16", {"net.dport": 22}, True),
    ("net.dport = '22'", {"net.dport": 22}, True),  # numbers compare numerically, quoted or not
    ("net.dport = ssh", {"net.dport": 22}, False),
    ("net.dport != 22", {"net.dport": 23}, True),
    ("net.dport < 1024", {"net.dport": 22}, True),
    ("net.dport < 1024", {"net.dport": 1024}, False),
    ("net.dport <= 1024", {"net.dport": 1024}, True),
    ("net.dport > 1024", {"net.dport": 8080}, True),
    ("net.dport >= 8080", {"net.dport": 8080}, True),
    ("cpu.percent > 90", {"cpu.percent": 97.5}, True),
    ("cpu.percent > 90", {"cpu.percent": 12.0}, False),
    ("proc.args > 9", {"proc.args": "10"}, True),  # a string that reads as a number, against a number
    ("proc.args > 9", {"proc.args": "abc"}, False),
    ("proc.name < m", {"proc.name": "bash"}, True),  # text against text: lexical
    ("proc.pid in (1, 2, 3)", {"proc.pid": 2}, True),
    ("proc.pid in (1, 2, 3)", {"proc.pid": 4}, False),
    ("proc.name in (ssh, autossh)", {"proc.name": "autossh"}, True),
    ("proc.name in (ssh, autossh)", {"proc.name": "ssh2"}, False),
    ("proc.args contains -R", {"proc.args": "-N -R 80:x:22"}, True),
    ("proc.args contains -r", {"proc.args": "-N -R 80:x:22"}, False),
    ("proc.args icontains -r", {"proc.args": "-N -R 80:x:22"}, True),
    ("proc.args icontains STRATUM", {"proc.args": "-o stratum+tcp://x"}, True),
    ("file.path startswith /tmp/", {"file.path": "/tmp/x"}, True),
    ("file.path startswith /tmp/", {"file.path": "/var/tmp/x"}, False),
    ("file.path endswith .sh", {"file.path": "/tmp/x.sh"}, True),
    ("file.path endswith .sh", {"file.path": "/tmp/x.shx"}, False),
    ("file.path glob '/home/*/.ssh/*'", {"file.path": "/home/a/.ssh/id_rsa"}, True),
    ("file.path glob '/home/*/.ssh/*'", {"file.path": "/root/.ssh/id_rsa"}, False),
    ("file.path glob '*.PEM'", {"file.path": "/x.pem"}, False),  # case-sensitive, like fnmatchcase
    ("file.path glob 'id_[re]*'", {"file.path": "id_rsa"}, True),
    ("proc.args regex 'stratum\\+tcp://'", {"proc.args": "-o stratum+tcp://pool:3333"}, True),
    ("proc.args regex '^-o'", {"proc.args": "x -o"}, False),  # search, anchored by the pattern only
    ("net.dip in_cidr (10.0.0.0/8, 192.168.0.0/16)", {"net.dip": "10.1.2.3"}, True),
    ("net.dip in_cidr (10.0.0.0/8, 192.168.0.0/16)", {"net.dip": "11.1.2.3"}, False),
    ("net.dip in_cidr (::1/128, fd00::/8)", {"net.dip": "fd12::1"}, True),
    ("net.dip in_cidr (10.0.0.0/8)", {"net.dip": "::ffff:10.0.0.1"}, True),  # v4-mapped
    ("net.dip in_cidr (10.0.0.0/8)", {"net.dip": "fd00::1"}, False),
    ("net.dip in_cidr (169.254.169.254)", {"net.dip": "169.254.169.254"}, True),  # a bare address is a /32
    ("net.dip in_cidr (10.0.0.0/8)", {"net.dip": "example.com"}, False),  # not an address: never matches
    ("net.dip in_cidr (10.0.0.0/8)", {"net.dip": 167772161}, False),
    ("net.sni exists", {"net.sni": "x.example"}, True),
    ("net.sni exists", {}, False),
    ("not net.sni exists", {}, True),
    ("file.writable = true", {"file.writable": True}, True),
    ("file.writable = true", {"file.writable": False}, False),
    ("file.writable = false", {"file.writable": False}, True),
    ("file.writable != true", {"file.writable": False}, True),
    ("file.writable in (true)", {"file.writable": True}, True),
    ("file.writable = 1", {"file.writable": True}, False),  # a boolean is not a number
])
def test_operator(condition: str, values: dict[str, Any], expected: bool) -> None:
    assert check(condition, values) is expected


@pytest.mark.parametrize("condition", [
    "proc.name = x", "proc.name != x", "proc.name < x", "proc.name <= x", "proc.name > x", "proc.name >= x",
    "proc.name in (x, y)", "proc.name contains x", "proc.name icontains x", "proc.name startswith x",
    "proc.name endswith x", "proc.name glob '*'", "proc.name regex '.*'", "proc.name in_cidr (0.0.0.0/0)",
    "proc.name exists",
])
def test_a_missing_value_makes_every_operator_false_and_not_true(condition: str) -> None:
    assert check(condition, {}) is False
    assert check(f"not {condition}", {}) is True
    assert check(f"not ({condition})", {"proc.name": None}) is True


def test_list_valued_fields() -> None:
    ns = {"ns.types": ["net", "user"]}
    assert check("ns.types contains user", ns)
    assert not check("ns.types contains pid", ns)
    assert check("ns.types in (pid, net)", ns)  # membership: any element in the set
    assert not check("ns.types in (pid, mnt)", ns)
    assert check("ns.types = net", ns)  # any element
    assert check("ns.types != pid", ns)  # no element equals
    assert not check("ns.types != net", ns)
    assert check("ns.types startswith us", ns)
    assert check("ns.types icontains USER", ns)
    ids = {"setuid.ids": [0, -1, -1]}
    assert check("setuid.ids contains 0", ids)
    assert not check("setuid.ids contains 1000", ids)
    assert check("setuid.ids < 0", ids)
    answers = {"dns.answers": ["203.0.113.9", "10.0.0.5"]}
    assert check("dns.answers in_cidr (10.0.0.0/8)", answers)
    assert not check("dns.answers in_cidr (172.16.0.0/12)", answers)
    assert check("proc.argv glob '-R*'", {"proc.argv": ["ssh", "-R8080:x:22"]})
    assert not check("proc.argv exists", {"proc.argv": None})


# ------------------------------------------------------------- lists and macros


def test_lists_expand_inside_in_and_in_cidr() -> None:
    lists = {"tunnel_tools": ("ssh", "autossh", "chisel"), "private": ("10.0.0.0/8", "192.168.0.0/16"),
             "ports": ("22", "2222")}
    assert check("proc.name in (tunnel_tools)", {"proc.name": "chisel"}, lists=lists)
    assert check("proc.name in (ngrok, tunnel_tools)", {"proc.name": "ngrok"}, lists=lists)
    assert not check("proc.name in ('tunnel_tools')", {"proc.name": "ssh"}, lists=lists)  # quoted: the text
    assert check("proc.name in ('tunnel_tools')", {"proc.name": "tunnel_tools"}, lists=lists)
    assert check("net.dip in_cidr (private)", {"net.dip": "192.168.1.1"}, lists=lists)
    assert check("net.dport in (ports)", {"net.dport": 2222}, lists=lists)
    assert not check("proc.name = tunnel_tools", {"proc.name": "ssh"}, lists=lists)  # only in (...) expands


def test_a_near_miss_of_a_list_name_is_an_error() -> None:
    e = error("proc.name in (tunel_tools)", lists={"tunnel_tools": ("ssh",)})
    assert "unknown list 'tunel_tools'; did you mean tunnel_tools?" in e.message
    assert e.column == 15


def test_macros_expand_nest_and_negate() -> None:
    macros = macro_map(outbound="evt.type = connect and not net.dip in_cidr (127.0.0.0/8)",
                       ssh_out="outbound and net.dport = 22")
    out = {"evt.type": "connect", "net.dip": "203.0.113.5", "net.dport": 22}
    assert check("ssh_out", out, macros=macros)
    assert check("ssh_out and proc.name = ssh", {**out, "proc.name": "ssh"}, macros=macros)
    assert not check("ssh_out", {**out, "net.dip": "127.0.0.1"}, macros=macros)
    assert check("not ssh_out", {**out, "net.dip": "127.0.0.1"}, macros=macros)
    assert check("(ssh_out)", out, macros=macros)


def test_macro_cycles_and_unknown_macros_are_errors() -> None:
    macros = macro_map(a="b and proc.pid = 1", b="proc.name = x or a")
    e = error("proc.pid = 2 or a", macros=macros)
    assert "macro cycle: a -> b -> a" in e.message
    assert e.macro == "b" and e.condition == "proc.name = x or a" and e.column == 18
    e = error("outbund and proc.pid = 1", macros=macro_map(outbound="proc.pid = 1"))
    assert e.message == "unknown macro 'outbund'; did you mean outbound?"
    e = error("tools", lists={"tools": ("a",)})
    assert "'tools' is a list, not a condition" in e.message


def test_errors_inside_a_macro_point_into_the_macro() -> None:
    macros = macro_map(m="proc.nme = x")
    e = error("proc.pid = 1 and m", macros=macros)
    assert e.message.startswith("in macro 'm': unknown field 'proc.nme'")
    assert str(e).splitlines()[1:] == ["    proc.nme = x", "    ^"]


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize(("condition", "message", "column"), [
    ("", "the condition is empty", 1),
    ("proc.name", "field proc.name needs an operator", 10),
    ("proc.name ssh", "unknown operator 'ssh' after proc.name", 11),
    ("proc.name is ssh", "unknown operator 'is' after proc.name", 11),
    ("proc.name == ssh", "'==' is not an operator: write '='", 11),
    ("proc.name = ssh && proc.pid = 1", "unexpected '&&': write 'and'", 17),
    ("proc.name = ssh || proc.pid = 1", "unexpected '||': write 'or'", 17),
    ("proc.name =", "expected a value after '=', found the end", 12),
    ("proc.name = )", "expected a value after '=', found ')'", 13),
    ("proc.name in ssh", "expected '(' after 'in'", 14),
    ("proc.name in (ssh", "expected ',' or ')' in the in list, found the end of the condition", 18),
    ("proc.name in ()", "expected a value after 'in (', found ')'", 15),
    ("proc.name in (a,)", "expected a value after ',', found ')'", 17),
    ("proc.name = 'ssh", "unterminated string: no closing '", 13),
    ("(proc.name = ssh", "expected ')' to close the '(' at column 1", 17),
    ("proc.name = ssh)", "expected 'and', 'or' or the end of the condition, found ')'", 16),
    ("proc.name = two words", "found 'words' (quote values that contain spaces)", 17),
    ("proc.name = a and", "expected a field, a macro name, 'not' or '(', found the end", 18),
    ("and proc.name = a", "expected a field, a macro name, 'not' or '(', found 'and'", 1),
    ("not", "expected a field, a macro name, 'not' or '(', found the end", 4),
    ("proc.name = a or or", "found 'or'", 18),
    ("= a", "expected a field, a macro name, 'not' or '(', found '='", 1),
    ("proc.args[-1] = a", "an index must be 0 or more", 11),
    ('"ssh" = proc.name', "unexpected quoted text", 1),
    ("proc.name = a $ b", "unexpected character '$'", 15),
    ("proc.name = a and $", "unexpected character '$'", 19),
    ("proc.name = a and proc.nme = b", "unknown field 'proc.nme'; did you mean proc.name", 19),
    ("proc.nmae exists", "unknown field 'proc.nmae'; did you mean proc.name", 1),
    ("totally.unknown = 1", "unknown field 'totally.unknown'", 1),
    ("proc.name[1] = x", "field proc.name takes no index", 1),
    ("proc.args regex 'a(b'", "bad regex 'a(b'", 17),
    ("net.dip in_cidr (10.0.0.0/8, 10.0.0.0/33)", "bad network '10.0.0.0/33' in in_cidr", 30),
    ("net.dip in_cidr (nothere)", "bad network 'nothere'", 18),
])
def test_errors_say_where(condition: str, message: str, column: int) -> None:
    e = error(condition)
    assert message in e.message
    assert e.column == column, str(e)
    lines = str(e).splitlines()
    assert lines[1] == f"    {condition}"
    assert lines[2] == "    " + " " * (column - 1) + "^"


def test_multiline_conditions_show_the_line_with_the_mistake() -> None:
    e = error("proc.name = ssh and\n  proc.args contans -R")
    assert str(e).splitlines()[1:] == ["      proc.args contans -R", "                ^"]


def test_a_resolver_can_explain_why_a_field_is_unknown() -> None:
    def picky(name: str, index: int | None) -> Getter | None:
        raise FieldError(f"{name} is not on exec events")
    with pytest.raises(RuleSyntaxError, match=r"proc\.name is not on exec events"):
        compile_condition("proc.name = x", picky)


# ----------------------------------------------------------- compile-time facts


def test_constant_fields_fold_away() -> None:
    def typed(name: str, index: int | None) -> Getter | None:
        if name == "evt.type":
            return Constant("connect")
        if name == "net.sni":
            return Constant(None)  # a field this kind lacks
        return resolver(name, index)

    def compiled(text: str) -> Any:
        return compile_condition(text, typed, known_fields=KNOWN)

    assert compiled("evt.type = connect") is ALWAYS
    assert compiled("evt.type = flow") is NEVER
    assert compiled("net.sni exists") is NEVER
    assert compiled("not net.sni exists") is ALWAYS
    assert compiled("evt.type = flow and proc.name = x") is NEVER
    assert compiled("evt.type = connect or proc.name = x") is ALWAYS
    pred = compiled("evt.type = connect and proc.name = x")
    assert pred not in (ALWAYS, NEVER) and pred({"proc.name": "x"}) and not pred({"proc.name": "y"})


def test_screen_says_what_a_condition_needs() -> None:
    macros = macro_map(outbound="evt.type = connect and net.dport = 22")
    c = Compiler(resolver, lists={"tools": ("ssh", "scp")}, macros=macros)

    def screen(text: str) -> set[frozenset[Any]]:
        """Clauses, each as the keys (names, numbers) and folded texts of its atoms."""
        node = parse(text)
        c.compile(node, text)
        return {frozenset(a.key if isinstance(a, ValueIs) else ("text", a.text) for a in clause)
                for clause in c.screen(node)}

    # names and numbers are looked up; a text is searched only for a rule no name screens
    assert screen("proc.name in (tools, nc) and proc.args contains -R") == {frozenset({"ssh", "scp", "nc"})}
    assert screen("outbound and proc.pid = 1") == {frozenset({"connect"}), frozenset({"22", 22}),
                                                   frozenset({"1", 1})}
    assert screen("proc.name = a or proc.name = b") == {frozenset({"a", "b"})}
    assert screen("proc.args contains -R or proc.name = b") == {frozenset({("text", "-r"), "b"})}
    assert screen('proc.args regex "(?i)--(donate|pool)-level=[0-9]+"') == {
        frozenset({("text", "--donate-level="), ("text", "--pool-level=")})}
    assert screen("file.writable = true") == {frozenset({"true", True})}
    # nothing to screen on: always evaluated
    assert screen("not proc.name = a") == set()
    assert screen("proc.pid != 3") == set()
    assert screen("proc.name = a or not proc.args contains x") == set()
    assert screen('proc.args contains "é"') == set()  # fold() is exact for ASCII only
    assert screen("proc.args contains x") == set()  # one character: found nearly everywhere


def test_numbers() -> None:
    assert as_number("42") == 42 and as_number("-7") == -7 and as_number("0x1f") == 31
    assert as_number("1.5") == 1.5 and as_number("1e3") == 1000.0
    assert as_number("abc") is None and as_number("1.2.3") is None and as_number("") is None


def test_macro_ref_node() -> None:
    assert parse("outbound") == MacroRef("outbound", 1)
