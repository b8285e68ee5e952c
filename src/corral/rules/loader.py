"""Rule files: read, validate, merge across files, compile, and index by event kind.

The format is docs/rules.md ("Rule files").  Files load in order (built-in rules, then
/etc/corral/rules.d, then the user's), and later entries override earlier ones:

* ``list`` with ``append: true`` adds items to an earlier list; otherwise a list of the
  same name replaces it;
* ``macro`` of the same name replaces the earlier one;
* ``rule`` naming an earlier rule with only ``enabled`` turns it off (or on again); with
  ``append: true`` its ``exceptions`` are added; otherwise it replaces the earlier rule.

Every entry is merged before anything is compiled, so an override of a list or macro
applies to rules in earlier files too (appending to a default list is how a site
tunes the default rules).

A rule file is a contract with its author, so nothing is guessed or skipped: every
problem is collected (file, line, entry, what is wrong) and, if there is any,
RuleLoadError is raised with all of them.  A broken file never leaves rules out
silently.
"""

from __future__ import annotations

import difflib
import functools
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from corral.errors import CorralError
from corral.rules import language as lang
from corral.rules.fields import ALL, FIELDS, ExampleResolver, FieldRegistry
from corral.rules.language import Getter, Macro, Predicate, Resolver, RuleSyntaxError, Screen

SEVERITIES = ("info", "low", "medium", "high", "critical")
CATEGORIES = ("cryptomining", "tunnel", "reverse_shell", "recon", "metadata", "credential_access", "persistence",
              "escape", "privilege_escalation", "defense_evasion", "exfiltration", "resource_abuse", "execution")
ACTIONS = ("alert", "kill", "kill_tree", "freeze", "cut_network", "stop")

BUILTIN_DIR = Path(__file__).parent / "default"
SYSTEM_DIR = Path("/etc/corral/rules.d")

_RULE_KEYS = ("rule", "desc", "event", "condition", "exceptions", "severity", "category", "tags", "action",
              "output", "enabled", "examples", "append")
_REQUIRED = ("desc", "event", "condition", "severity", "category", "examples")
_LIST_KEYS = ("list", "items", "append")
_MACRO_KEYS = ("macro", "condition", "desc")
_EXCEPTION_KEYS = ("name", "condition")
_EXAMPLE_KEYS = ("match", "no_match")
_MACRO_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# %field or %field[N] in output templates; %% is a literal %
_OUTPUT_REF = re.compile(r"%(%|[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)+(?:\[\d+\])?)")
_FIELD_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)(?:\[(\d+)\])?")
_BOOL_TAG = "tag:yaml.org,2002:bool"
_NULL_TAG = "tag:yaml.org,2002:null"
MISSING_TEXT = "<NA>"


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a rule file."""

    file: str
    line: int
    rule: str | None
    message: str
    entry: str = "rule"  # what `rule` names: rule, list, macro

    def __str__(self) -> str:
        who = f"{self.entry} {self.rule!r}: " if self.rule is not None else ""
        return f"{self.file}:{self.line}: {who}{self.message}"


class RuleLoadError(CorralError):
    """Rule files with problems; ``problems`` holds every one of them."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(map(str, self.problems)))


@dataclass(frozen=True)
class Example:
    """Field values a rule must match (``expect`` true) or must not."""

    values: Mapping[str, Any]
    expect: bool
    line: int


@dataclass(frozen=True)
class RuleException:
    """A named condition that vetoes a match of its rule."""

    name: str
    condition: str
    node: lang.Node
    file: str
    line: int


@dataclass(eq=False)
class Rule:
    name: str
    desc: str
    events: tuple[str, ...]
    condition: str
    severity: str
    category: str
    tags: tuple[str, ...]
    action: str
    output: str
    file: str
    line: int
    enabled: bool
    exceptions: tuple[RuleException, ...]
    examples: tuple[Example, ...]
    node: lang.Node
    #: event kind -> the compiled condition, exceptions not applied
    conditions: dict[str, Predicate] = field(default_factory=dict, repr=False)
    #: event kind -> one compiled predicate per exception
    vetoes: dict[str, tuple[Predicate, ...]] = field(default_factory=dict, repr=False)
    #: event kind -> condition and no exception (what RuleSet.match runs)
    tests: dict[str, Predicate] = field(default_factory=dict, repr=False)
    #: event kind -> what must hold for the condition to hold (language.Screen), for RuleSet's index
    screens: dict[str, Screen] = field(default_factory=dict, repr=False)
    _outputs: dict[str, tuple[str | Getter, ...]] = field(default_factory=dict, repr=False)
    #: the output template split into text and (field, index) references
    _template: tuple[str | tuple[str, int | None], ...] = field(default=(), repr=False)

    @property
    def source(self) -> str:
        return f"{self.file}:{self.line}"

    def matches(self, event: Any) -> bool:
        """Whether the rule (condition, then exceptions) matches this event."""
        test = self.tests.get(event.kind)
        return test is not None and bool(test(event))

    def format_output(self, event: Any, resolver: Resolver | None = None) -> str:
        """The output template with every ``%field`` filled in from ``event``.

        By default the getters compiled for the event's kind are used; pass a resolver
        (e.g. ExampleResolver()) to render something else, such as an example dict.
        Missing values print as ``<NA>``, lists as their items joined by spaces.
        """
        if resolver is None:
            parts = self._outputs.get(event.kind, ())
        else:
            parts = tuple(p if isinstance(p, str) else resolver(*p) or _none for p in self._template)
        return "".join(p if isinstance(p, str) else _render(p(event)) for p in parts)


def _none(e: Any) -> None:
    return None


def _render(value: Any) -> str:
    if value is None:
        return MISSING_TEXT
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


#: (the clause bits a rule's screen needs, rule, test), in load order
_Entry = tuple[int, Rule, Predicate]
_Plan = tuple[tuple[Rule, Predicate], ...]


class RuleSet:
    """Loaded rules, indexed by event kind so an event meets only its kind's rules.

    Within a kind, each rule has a screen (language.Screen): clauses its condition needs,
    such as ``proc.name in (...)`` or "the command line holds one of these words".  Per
    event the index looks up the value of each screened field in one table for every
    rule and searches each screened string once for every rule's words, which tells the
    clauses that hold; only the rules all of whose clauses hold are evaluated (they and
    the unscreened ones make the event's *plan*, remembered per set of clauses).
    Screens are necessary conditions, so this finds exactly the rules that trying each
    would.
    """

    def __init__(self, rules: Sequence[Rule], lists: Mapping[str, tuple[Any, ...]], macros: Mapping[str, Macro],
                 files: Sequence[str]) -> None:
        self.rules = list(rules)
        self.lists = dict(lists)
        self.macros = dict(macros)
        self.files = list(files)
        by_kind: dict[str, list[tuple[Rule, Predicate, Screen]]] = {}
        for rule in self.rules:
            if not rule.enabled:
                continue
            for kind in rule.events:
                test = rule.tests[kind]
                if test is not lang.NEVER:  # e.g. `evt.type = connect and ...` under flow
                    by_kind.setdefault(kind, []).append((rule, test, rule.screens[kind]))
        self._index = {kind: _KindIndex(entries) for kind, entries in by_kind.items()}

    def match(self, event: Any) -> list[Rule]:
        """The enabled rules that match ``event``, in load order."""
        index = self._index.get(event.kind)
        if index is None:
            return []
        return [rule for rule, test in index.plan_for(event) if test(event)]

    def candidates(self, event: Any) -> list[Rule]:
        """The rules that the index leaves to try on ``event`` (those that match among them)."""
        index = self._index.get(event.kind)
        return [rule for rule, _ in index.plan_for(event)] if index is not None else []

    def rules_for(self, kind: str) -> list[Rule]:
        """The enabled rules an event of ``kind`` may be checked against, in load order."""
        index = self._index.get(kind)
        return [rule for _, rule, _ in index.entries] if index is not None else []

    def __len__(self) -> int:
        return len(self.rules)


class _KindIndex:
    """The rules of one event kind, their clauses numbered as bits, and the tables that
    tell which clauses an event satisfies (see RuleSet)."""

    #: plans remembered, at most (then they are forgotten and made again as needed)
    PLANS = 4096

    def __init__(self, entries: Sequence[tuple[Rule, Predicate, Screen]]) -> None:
        bits: dict[lang.Clause, int] = {}
        values: dict[Getter, dict[Any, int]] = {}
        texts: dict[Getter, dict[str, int]] = {}
        every: dict[Getter, int] = {}
        self.entries: list[_Entry] = []
        for rule, test, screen in entries:
            needs = 0
            for clause in screen:
                bit = bits.setdefault(clause, 1 << len(bits))
                needs |= bit
                for atom in clause:
                    every[atom.getter] = every.get(atom.getter, 0) | bit
                    if isinstance(atom, lang.ValueIs):
                        table = values.setdefault(atom.getter, {})
                        table[atom.key] = table.get(atom.key, 0) | bit
                    else:
                        found = texts.setdefault(atom.getter, {})
                        found[atom.text] = found.get(atom.text, 0) | bit
            self.entries.append((needs, rule, test))
        self.values = tuple((get, table, every[get]) for get, table in values.items())
        self.texts = tuple((get, _TextSearch(found), every[get]) for get, found in texts.items())
        self.plans: dict[int, _Plan] = {}

    def plan_for(self, event: Any) -> _Plan:
        """The rules to evaluate on ``event``: those whose clauses all hold on it."""
        held = 0  # bits of the clauses that hold
        for get, table, every in self.values:
            value = get(event)
            cls = value.__class__
            if cls is str or cls is int or cls is bool or cls is float:
                held |= table.get(value, 0)
            elif value is not None:  # a list...: let the rules' own tests decide
                held |= every
        for get, search, every in self.texts:
            value = get(event)
            if value.__class__ is str:
                held |= search(value)
            elif value is not None:
                held |= every
        plan = self.plans.get(held)
        return plan if plan is not None else self.plan(held)

    def plan(self, held: int) -> _Plan:
        """The rules to evaluate when the clauses in ``held`` hold: those that need no other."""
        if len(self.plans) >= self.PLANS:
            self.plans.clear()
        plan = self.plans[held] = tuple((rule, test) for needs, rule, test in self.entries if needs & held == needs)
        return plan


class _TextSearch:
    """Which of many texts a string holds, case-folded (language.fold), as the OR of their bits.

    One regex, a trie, finds where the texts may start.  It costs little where a string
    has a character no text starts with, much more where one does (and more the deeper a
    place leads into the trie): so each text is looked for from its least common
    character on (_anchor), and where that part is found the whole text is checked.  At a
    place the trie matches the longest part there; the parts that are its prefixes are
    there too.  Searching again from the next character finds every other place,
    overlapping ones included.  A string that holds none, as most do, costs one search.
    """

    def __init__(self, texts: Mapping[str, int]) -> None:
        starts: dict[str, list[tuple[int, str, int]]] = {}
        for text, bits in texts.items():
            at = _anchor(text)
            starts.setdefault(text[at:], []).append((at, text, bits))
        #: the longest part found at a place -> (its offset in a text, the text, its bits) to check
        self._checks = {part: tuple(c for n in range(1, len(part) + 1) for c in starts.get(part[:n], ()))
                        for part in starts}
        self._all = functools.reduce(operator.or_, texts.values(), 0)
        self._search = re.compile(_trie(starts)).search

    def __call__(self, value: str) -> int:
        text = lang.fold(value)
        search, checks, every = self._search, self._checks, self._all
        bits = 0
        found = search(text)
        while found is not None:
            place = found.start()
            for offset, whole, more in checks[found.group()]:
                if offset <= place and text.startswith(whole, place - offset):
                    bits |= more
            if bits == every:
                break
            found = search(text, place + 1)
        return bits


#: characters by how often they are in command lines and paths, most often first (a
#: guess; the rest, punctuation mostly, rarer still)
_COMMON = " -/.etaoinsrlcudmpgxh0123456789b_=fywkvzjq"
#: the shortest part of a text looked for in its place
_ANCHOR_LENGTH = 3


def _anchor(text: str) -> int:
    """Where in ``text`` its least common character is (the first such place), leaving
    _ANCHOR_LENGTH characters after it at least."""
    last = max(0, len(text) - _ANCHOR_LENGTH)

    def commonness(i: int) -> tuple[int, int]:
        rank = _COMMON.find(text[i])
        return (len(_COMMON) if rank < 0 else rank), -i

    return max(range(last + 1), key=commonness)


def _trie(texts: Iterable[str]) -> str:
    """A regex of ``texts`` as a trie: at each place it matches the longest of them there."""
    root: dict[str, Any] = {}
    for text in texts:
        node = root
        for ch in text:
            node = node.setdefault(ch, {})
        node[""] = {}  # a text ends here

    def pattern(node: dict[str, Any]) -> str:
        branches = [re.escape(ch) + pattern(sub) for ch, sub in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
        return f"(?:{body})?" if "" in node else body  # greedy: the longer text first

    return pattern(root)


# ----------------------------------------------------------------- loading


def default_rule_paths(builtin_dir: Path = BUILTIN_DIR, system_dir: Path = SYSTEM_DIR) -> list[Path]:
    """Built-in rules, then the site's (/etc/corral/rules.d); a missing directory adds nothing."""
    return [*_yaml_files(builtin_dir), *_yaml_files(system_dir)]


def load_default_rules(registry: FieldRegistry | None = None, extra: Sequence[Path] = ()) -> RuleSet:
    """The default search path, then ``extra`` (the user's files or directories)."""
    return load_rules([*default_rule_paths(), *extra], registry)


def load_rules(paths: Sequence[Path], registry: FieldRegistry | None = None) -> RuleSet:
    """Load rule files (a directory stands for its *.yaml files, sorted), in order.

    Raises RuleLoadError with every problem found in any of them.
    """
    loader = _Loader(registry or FieldRegistry())
    files: list[str] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            for f in _yaml_files(path):
                files.append(str(f))
                loader.read_file(f)
        else:
            files.append(str(path))
            loader.read_file(path)
    return loader.finish(files)


def load_rules_text(text: str, source: str = "<rules>", registry: FieldRegistry | None = None) -> RuleSet:
    """Rules from a string (tests, embedding); ``source`` names it in problems."""
    loader = _Loader(registry or FieldRegistry())
    loader.read_text(text, source)
    return loader.finish([source])


def _yaml_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


@dataclass
class _ListDef:
    name: str
    items: list[tuple[str, bool]]  # (text, plain: may name another list)
    file: str
    line: int


@dataclass
class _MacroDef:
    macro: Macro
    file: str
    line: int


@dataclass
class _RuleDef:
    """A rule entry as read, before merging and compiling."""

    name: str
    file: str
    line: int
    keys: dict[str, Node]
    desc: str = ""
    events: tuple[str, ...] = ()
    condition: str = ""
    condition_line: int = 0
    node: lang.Node | None = None
    exceptions: list[RuleException] = field(default_factory=list)
    severity: str = ""
    category: str = ""
    tags: tuple[str, ...] = ()
    action: str = "alert"
    output: str = ""
    output_line: int = 0
    enabled: bool = True
    append: bool = False
    examples: list[Example] = field(default_factory=list)
    examples_line: int = 0


class _Loader:
    def __init__(self, registry: FieldRegistry) -> None:
        self.registry = registry
        self.problems: list[Problem] = []
        self.lists: dict[str, _ListDef] = {}
        self.macros: dict[str, _MacroDef] = {}
        self.rules: dict[str, _RuleDef] = {}
        # where the entry being read came from, for problems
        self._file = ""
        self._entry: tuple[str, str | None] = ("rule", None)
        self._seen_here: dict[tuple[str, str], int] = {}

    # ------------------------------------------------------------ problems

    def problem(self, node: Node | int, message: str, entry: tuple[str, str | None] | None = None,
                file: str | None = None) -> None:
        line = node if isinstance(node, int) else node.start_mark.line + 1
        kind, name = entry or self._entry
        self.problems.append(Problem(file or self._file, line, name, message, kind))

    # ------------------------------------------------------------ reading

    def read_file(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            self.problems.append(Problem(str(path), 1, None, f"cannot read rule file: {e}"))
            return
        self.read_text(text, str(path))

    def read_text(self, text: str, source: str) -> None:
        self._file = source
        self._entry = ("rule", None)
        self._seen_here = {}
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            self.problem(mark.line + 1 if mark else 1, f"YAML syntax error: {e.problem or e.context}")
            return
        except yaml.YAMLError as e:
            self.problem(1, f"YAML syntax error: {e}")
            return
        if root is None:
            return  # an empty file (or only comments) holds no rules; that is fine
        if not isinstance(root, SequenceNode):
            self.problem(root, "a rule file is a YAML list of `- rule:`, `- list:` and `- macro:` entries")
            return
        for item in root.value:
            self._entry = ("rule", None)
            if not isinstance(item, MappingNode):
                self.problem(item, "each entry must be a mapping starting with rule:, list: or macro:")
                continue
            keys = self.keys_of(item)
            if keys is None:
                continue
            kinds = [k for k in ("rule", "list", "macro") if k in keys]
            if len(kinds) != 1:
                what = "none" if not kinds else " and ".join(kinds)
                self.problem(item, f"an entry needs exactly one of rule:, list:, macro: (it has {what})")
                continue
            kind = kinds[0]
            name = self.text(keys[kind], kind)
            if name is None:
                continue
            self._entry = (kind, name)
            allowed = {"rule": _RULE_KEYS, "list": _LIST_KEYS, "macro": _MACRO_KEYS}[kind]
            self.check_keys(item, keys, allowed, kind)
            if kind == "list":
                self.read_list(name, item, keys)
            elif kind == "macro":
                self.read_macro(name, item, keys)
            else:
                self.read_rule(name, item, keys)

    def keys_of(self, node: MappingNode) -> dict[str, Node] | None:
        out: dict[str, Node] = {}
        for key, value in node.value:
            if not isinstance(key, ScalarNode):
                self.problem(key, "keys must be plain names")
                return None
            if key.value in out:
                self.problem(key, f"key {key.value!r} is given twice")
            out[key.value] = value
        return out

    def check_keys(self, node: MappingNode, keys: Mapping[str, Node], allowed: Sequence[str], what: str) -> None:
        for key_node, _ in node.value:
            key = key_node.value
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                self.problem(key_node, f"unknown key {key!r}; {hint}({what} keys: {', '.join(allowed)})")

    def text(self, node: Node, key: str) -> str | None:
        """A scalar as written (so `rule: yes` is the text 'yes', not True)."""
        if not isinstance(node, ScalarNode) or node.tag == _NULL_TAG:
            self.problem(node, f"{key!r} must be a text value")
            return None
        return str(node.value)

    def boolean(self, node: Node, key: str) -> bool | None:
        if not isinstance(node, ScalarNode) or node.tag != _BOOL_TAG:
            self.problem(node, f"{key!r} must be true or false")
            return None
        return node.value.lower() in ("true", "yes", "on", "y")

    def texts(self, node: Node, key: str) -> list[tuple[str, bool, int]] | None:
        """A scalar or a list of scalars: (text, plain, line) each."""
        items = [node] if isinstance(node, ScalarNode) and node.tag != _NULL_TAG else node.value \
            if isinstance(node, SequenceNode) else None
        if items is None:
            self.problem(node, f"{key!r} must be a value or a list of values")
            return None
        out: list[tuple[str, bool, int]] = []
        for item in items:
            if not isinstance(item, ScalarNode) or item.tag == _NULL_TAG:
                self.problem(item, f"items of {key!r} must be plain values, not lists or mappings")
                continue
            out.append((str(item.value), item.style is None, item.start_mark.line + 1))
        return out

    def choice(self, node: Node, key: str, choices: Sequence[str]) -> str | None:
        value = self.text(node, key)
        if value is not None and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            self.problem(node, f"{key} must be one of {', '.join(choices)}, not {value!r}{hint}")
            return None
        return value

    def condition(self, node: Node, key: str = "condition") -> tuple[str, lang.Node] | None:
        text = self.text(node, key)
        if text is None:
            return None
        try:
            return text, lang.parse(text)
        except RuleSyntaxError as e:
            self.problem(node, f"{key}: {e}")
            return None

    def once_per_file(self, node: Node, kind: str, name: str) -> None:
        """A second full definition in the same file is a mistake, not an override."""
        first = self._seen_here.get((kind, name))
        if first is not None:
            self.problem(node, f"{kind} {name!r} is already defined in this file (line {first})")
        else:
            self._seen_here[(kind, name)] = node.start_mark.line + 1

    def read_list(self, name: str, node: MappingNode, keys: Mapping[str, Node]) -> None:
        line = node.start_mark.line + 1
        append = self.boolean(keys["append"], "append") if "append" in keys else False
        if "items" not in keys:
            self.problem(node, "a list needs items: [a, b, ...]")
            return
        items = self.texts(keys["items"], "items") if _kind(keys["items"]) != "null" else []
        if items is None:
            return
        entries = [(text, plain) for text, plain, _ in items]
        if append:
            old = self.lists.get(name)
            if old is None:
                self.problem(node, f"append: true, but no earlier list is named {name!r}{_hint(name, self.lists)}")
                return
            old.items += entries
        else:
            self.once_per_file(node, "list", name)
            self.lists[name] = _ListDef(name, entries, self._file, line)

    def read_macro(self, name: str, node: MappingNode, keys: Mapping[str, Node]) -> None:
        if not _MACRO_NAME.fullmatch(name) or name in lang.KEYWORDS or name in lang.WORD_OPERATORS:
            self.problem(node, f"macro names are letters, digits and _ (and not a keyword), not {name!r}")
            return
        if "condition" not in keys:
            self.problem(node, "a macro needs a condition")
            return
        parsed = self.condition(keys["condition"])
        if parsed is None:
            return
        self.once_per_file(node, "macro", name)
        self.macros[name] = _MacroDef(Macro(name, *parsed), self._file, keys["condition"].start_mark.line + 1)

    def read_rule(self, name: str, node: MappingNode, keys: dict[str, Node]) -> None:
        r = _RuleDef(name, self._file, node.start_mark.line + 1, keys)
        if "append" in keys:
            r.append = bool(self.boolean(keys["append"], "append"))
        if "enabled" in keys:
            enabled = self.boolean(keys["enabled"], "enabled")
            r.enabled = True if enabled is None else enabled
        if "desc" in keys:
            r.desc = self.text(keys["desc"], "desc") or ""
        if "event" in keys:
            r.events = self.events(keys["event"])
        if "condition" in keys:
            r.condition_line = keys["condition"].start_mark.line + 1
            parsed = self.condition(keys["condition"])
            if parsed is not None:
                r.condition, r.node = parsed
        if "exceptions" in keys:
            r.exceptions = self.exceptions(keys["exceptions"])
        if "severity" in keys:
            r.severity = self.choice(keys["severity"], "severity", SEVERITIES) or ""
        if "category" in keys:
            r.category = self.choice(keys["category"], "category", CATEGORIES) or ""
        if "tags" in keys:
            r.tags = tuple(text for text, _, _ in self.texts(keys["tags"], "tags") or ())
        if "action" in keys:
            r.action = self.choice(keys["action"], "action", ACTIONS) or "alert"
        if "output" in keys:
            r.output = self.text(keys["output"], "output") or ""
            r.output_line = keys["output"].start_mark.line + 1
        if "examples" in keys:
            r.examples_line = _key_line(node, "examples")
            r.examples = self.examples(keys["examples"])
        self.merge_rule(r, node)

    def events(self, node: Node) -> tuple[str, ...]:
        out: list[str] = []
        for text, _, line in self.texts(node, "event") or ():
            if text not in ALL:
                self.problem(line, f"unknown event kind {text!r}{_hint(text, ALL)} (kinds: {', '.join(sorted(ALL))})")
            elif text not in out:
                out.append(text)
        return tuple(out)

    def exceptions(self, node: Node) -> list[RuleException]:
        if not isinstance(node, SequenceNode):
            self.problem(node, "exceptions must be a list of {name: ..., condition: ...}")
            return []
        out: list[RuleException] = []
        for item in node.value:
            if not isinstance(item, MappingNode):
                self.problem(item, "each exception is a mapping {name: ..., condition: ...}")
                continue
            keys = self.keys_of(item)
            if keys is None:
                continue
            self.check_keys(item, keys, _EXCEPTION_KEYS, "exception")
            if "name" not in keys or "condition" not in keys:
                self.problem(item, "an exception needs a name and a condition")
                continue
            name = self.text(keys["name"], "name")
            parsed = self.condition(keys["condition"], f"exception {name!r}: condition")
            if name is not None and parsed is not None:
                out.append(RuleException(name, parsed[0], parsed[1], self._file,
                                         keys["condition"].start_mark.line + 1))
        return out

    def examples(self, node: Node) -> list[Example]:
        if not isinstance(node, MappingNode):
            self.problem(node, "examples must be a mapping {match: [...], no_match: [...]}")
            return []
        keys = self.keys_of(node) or {}
        self.check_keys(node, keys, _EXAMPLE_KEYS, "examples")
        out: list[Example] = []
        for key in _EXAMPLE_KEYS:
            if key not in keys:
                continue
            seq = keys[key]
            if not isinstance(seq, SequenceNode):
                self.problem(seq, f"examples.{key} must be a list of field maps ({{proc.name: ssh, ...}})")
                continue
            for item in seq.value:
                if not isinstance(item, MappingNode):
                    self.problem(item, f"each example in examples.{key} is a map of field values")
                    continue
                values = _to_python(item)
                if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
                    self.problem(item, "example keys must be field names")
                    continue
                out.append(Example(values, key == "match", item.start_mark.line + 1))
        return out

    # ------------------------------------------------------------ merging

    def merge_rule(self, r: _RuleDef, node: MappingNode) -> None:
        given = set(r.keys) - {"rule"}
        old = self.rules.get(r.name)
        if r.append:
            if old is None:
                self.problem(node, f"append: true, but no earlier rule is named {r.name!r}{_hint(r.name, self.rules)}")
                return
            extra = sorted(given - {"append", "exceptions"})
            if extra:
                self.problem(node, f"with append: true only exceptions can be added, not {', '.join(extra)} "
                                   "(to change those, redefine the whole rule)")
            names = {x.name for x in old.exceptions}
            for x in r.exceptions:
                if x.name in names:
                    self.problem(x.line, f"exception {x.name!r} already exists in rule {r.name!r}")
            old.exceptions += r.exceptions
            return
        if given == {"enabled"}:
            if old is None:
                self.problem(node, f"no earlier rule named {r.name!r} to {'enable' if r.enabled else 'disable'}"
                                   f"{_hint(r.name, self.rules)}")
                return
            old.enabled = r.enabled
            return
        missing = [k for k in _REQUIRED if k not in r.keys]
        if missing:
            self.problem(node, f"missing {', '.join(missing)} (a rule needs {', '.join(_REQUIRED)}; to only "
                               "disable an earlier rule write `enabled: false` alone)")
        if "examples" in r.keys and not any(x.expect for x in r.examples):
            self.problem(r.examples_line, "no examples: give at least one under examples.match "
                                          "(and no_match ones that must not match)")
        seen: set[str] = set()
        for x in r.exceptions:
            if x.name in seen:
                self.problem(x.line, f"exception {x.name!r} is given twice")
            seen.add(x.name)
        self.once_per_file(node, "rule", r.name)
        if r.name in self.rules:
            del self.rules[r.name]  # the new definition takes the later position
        self.rules[r.name] = r

    # ------------------------------------------------------------ compiling

    def finish(self, files: Sequence[str]) -> RuleSet:
        lists = self.resolve_lists()
        macros = {name: m.macro for name, m in self.macros.items()}
        bad_macros = self.check_macros(lists, macros)
        rules = [rule for r in self.rules.values()
                 if (rule := self.compile_rule(r, lists, macros, bad_macros)) is not None]
        if self.problems:
            raise RuleLoadError(sorted(self.problems, key=lambda p: (files.index(p.file) if p.file in files
                                                                     else len(files), p.line)))
        return RuleSet(rules, lists, macros, files)

    def resolve_lists(self) -> dict[str, tuple[str, ...]]:
        """Items of every list, with plain items naming another list expanded."""
        done: dict[str, tuple[str, ...]] = {}

        def expand(name: str, stack: list[str]) -> tuple[str, ...]:
            if name in done:
                return done[name]
            d = self.lists[name]
            if name in stack:
                self.problem(d.line, f"list cycle: {' -> '.join([*stack, name])}", ("list", name), d.file)
                return ()
            items: list[str] = []
            for text, plain in d.items:
                items += expand(text, [*stack, name]) if plain and text in self.lists else [text]
            done[name] = tuple(items)
            return done[name]

        for name in self.lists:
            expand(name, [])
        return done

    def check_macros(self, lists: Mapping[str, Sequence[str]], macros: Mapping[str, Macro]) -> set[str]:
        """Compile each macro on its own (fields of any kind) so its mistakes point at it."""
        def any_kind(name: str, index: int | None) -> Getter | None:
            spec = FIELDS.get(name)
            return _none if spec is not None and (index is None or spec.indexable) else None

        bad = self.macro_cycles(macros)
        for name, m in self.macros.items():
            if name in bad:
                continue
            compiler = lang.Compiler(any_kind, lists=lists, macros=macros, known_fields=FIELDS)
            try:
                compiler.compile(m.macro.node, m.macro.text)
            except RuleSyntaxError as e:
                bad.add(name)
                if e.macro is None:  # a mistake inside another macro is reported there, once
                    self.problem(m.line, f"condition: {e}", ("macro", name), m.file)
        return bad

    def macro_cycles(self, macros: Mapping[str, Macro]) -> set[str]:
        """Macros on a cycle of references, each cycle reported once."""
        state: dict[str, int] = {}  # 1: being visited, 2: done
        on_cycle: set[str] = set()

        def visit(name: str, path: list[str]) -> None:
            state[name] = 1
            for ref in lang.macro_refs(macros[name].node):
                if ref not in macros:
                    continue
                if state.get(ref) == 1:
                    cycle = [*path[path.index(ref):], ref]
                    first = self.macros[ref]
                    self.problem(first.line, f"macro cycle: {' -> '.join(cycle)}", ("macro", ref), first.file)
                    on_cycle.update(cycle)
                elif ref not in state:
                    visit(ref, [*path, ref])
            state[name] = 2

        for name in macros:
            if name not in state:
                visit(name, [name])
        return on_cycle

    def compile_rule(self, r: _RuleDef, lists: Mapping[str, Sequence[str]], macros: Mapping[str, Macro],
                     bad_macros: set[str]) -> Rule | None:
        entry: tuple[str, str | None] = ("rule", r.name)
        if r.node is None or not r.events:
            return None  # its problems are already reported
        rule = Rule(r.name, r.desc, r.events, r.condition, r.severity, r.category, r.tags, r.action,
                    r.output or r.desc, r.file, r.line, r.enabled, tuple(r.exceptions), tuple(r.examples), r.node)
        known = sorted({f for kind in r.events for f in self.registry.known_fields(kind)})
        self.check_examples(rule, r, entry)
        ok = self.compile_output(rule, r, entry)
        for kind in r.events:
            compiler = lang.Compiler(self.registry.resolver(kind, also=r.events), lists=lists, macros=macros,
                                     known_fields=known, coarse=self.registry.coarse)
            try:
                cond = compiler.compile(r.node, r.condition)
            except RuleSyntaxError as e:
                if e.macro not in bad_macros:
                    self.problem(r.condition_line, f"condition: {e}", entry, r.file)
                ok = False
                break
            vetoes: list[Predicate] = []
            for x in r.exceptions:
                try:
                    vetoes.append(compiler.compile(x.node, x.condition))
                except RuleSyntaxError as e:
                    self.problem(x.line, f"exception {x.name!r}: {e}", entry, x.file)
                    ok = False
            rule.conditions[kind] = cond
            rule.vetoes[kind] = tuple(vetoes)
            rule.tests[kind] = _with_vetoes(cond, vetoes)
            screen = compiler.screen(r.node) if cond is not lang.NEVER else ()
            rule.screens[kind] = tuple(frozenset(self.text_in_whole(atom) for atom in clause) for clause in screen)
        return rule if ok else None

    def text_in_whole(self, atom: lang.Atom) -> lang.Atom:
        """A text looked for in the field that holds the atom's one, if there is one: one
        search of the larger string then serves the rules of both."""
        if isinstance(atom, lang.TextHas) and (whole := self.registry.part_of.get(atom.getter)) is not None:
            return lang.TextHas(whole, atom.text)
        return atom

    def compile_output(self, rule: Rule, r: _RuleDef, entry: tuple[str, str | None]) -> bool:
        pieces: list[str | tuple[str, int | None]] = []
        pos = 0
        for m in _OUTPUT_REF.finditer(rule.output):
            pieces.append(rule.output[pos:m.start()])
            pos = m.end()
            if m.group(1) == "%":
                pieces.append("%")
                continue
            fm = _FIELD_KEY.fullmatch(m.group(1))
            assert fm is not None
            ref = (fm.group(1), int(fm.group(2)) if fm.group(2) is not None else None)
            pieces.append(ref)
        pieces.append(rule.output[pos:])
        line = r.output_line or r.line
        for kind in rule.events:
            resolve = self.registry.resolver(kind, also=rule.events)
            parts: list[str | Getter] = []
            for piece in pieces:
                if isinstance(piece, str):
                    if piece:
                        parts.append(piece)
                    continue
                name, index = piece
                shown = name if index is None else f"{name}[{index}]"
                try:
                    getter = resolve(name, index)
                except lang.FieldError as e:
                    self.problem(line, f"output: %{shown}: {e}", entry, r.file)
                    return False
                if getter is None:
                    self.problem(line, f"output: unknown field %{shown}{_hint(name, FIELDS)}", entry, r.file)
                    return False
                parts.append(getter)
            rule._outputs[kind] = tuple(parts)
        rule._template = tuple(p for p in pieces if p != "")
        return True

    def check_examples(self, rule: Rule, r: _RuleDef, entry: tuple[str, str | None]) -> None:
        kinds = set(rule.events)
        for example in rule.examples:
            for key in example.values:
                m = _FIELD_KEY.fullmatch(key)
                name = m.group(1) if m else key
                if key in ExampleResolver.EXTRA_KEYS or key == "evt.type":
                    continue
                spec = FIELDS.get(name)
                if m is None or spec is None:
                    self.problem(example.line, f"example key {key!r} is not a field{_hint(name, FIELDS)}",
                                 entry, r.file)
                elif not spec.kinds & kinds:
                    self.problem(example.line, f"example key {key!r} is not a field of "
                                               f"{', '.join(rule.events)} events", entry, r.file)
                elif m.group(2) is not None and not spec.indexable:
                    self.problem(example.line, f"example key {key!r}: {name} takes no index", entry, r.file)


def _with_vetoes(cond: Predicate, vetoes: Sequence[Predicate]) -> Predicate:
    if lang.ALWAYS in vetoes:
        return lang.NEVER
    vetoes = [v for v in vetoes if v is not lang.NEVER]
    if not vetoes or cond is lang.NEVER:
        return cond
    if len(vetoes) == 1:
        veto = vetoes[0]
        return lambda e: cond(e) and not veto(e)
    return lambda e: cond(e) and not any(v(e) for v in vetoes)


def _key_line(node: MappingNode, key: str) -> int:
    """The line of a key (a block value starts on the line after it)."""
    return next(int(k.start_mark.line) + 1 for k, _ in node.value if k.value == key)


def _hint(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _kind(node: Node) -> str:
    if isinstance(node, ScalarNode):
        return "null" if node.tag == _NULL_TAG else "scalar"
    return "seq" if isinstance(node, SequenceNode) else "map"


def _to_python(node: Node) -> Any:
    """A composed node as the plain Python value yaml.safe_load would give."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


def compile_for_examples(ruleset: RuleSet) -> dict[str, Predicate]:
    """Each rule's condition and exceptions compiled against ExampleResolver.

    Examples name fields in a plain dict; ``evt.type`` defaults to the rule's first
    event kind so macros such as ``evt.type = connect`` work without it.
    """
    resolver = ExampleResolver()
    known = list(FIELDS)
    out: dict[str, Predicate] = {}
    for rule in ruleset.rules:
        compiler = lang.Compiler(resolver, lists=ruleset.lists, macros=ruleset.macros, known_fields=known)
        cond = compiler.compile(rule.node, rule.condition)
        vetoes = [compiler.compile(x.node, x.condition) for x in rule.exceptions]
        out[rule.name] = _with_vetoes(cond, vetoes)
    return out


def example_values(rule: Rule, example: Example) -> dict[str, Any]:
    """The example's values as the example resolver reads them (evt.type filled in)."""
    return {"evt.type": rule.events[0], **example.values}
