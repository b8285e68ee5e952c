"""The condition language of rules: tokenize, parse into an AST, compile into closures.

A condition such as ``proc.name in (ssh, autossh) and proc.args glob "*-R*"`` is parsed
once, when rules load, into a tree of frozen dataclasses, and the tree is turned into
nested Python closures: one per comparison, one per ``and``/``or``/``not``.  Nothing is
ever passed to eval/exec, patterns (glob, regex, CIDR) are compiled once, lists and
macros are expanded at compile time, and field access goes through getters a *resolver*
hands out, so the same tree compiles against real events (corral.rules.fields) and
against the plain dicts of rule examples.

Semantics (docs/rules.md, "Conditions"):

* ``not`` binds tighter than ``and``, which binds tighter than ``or``.
* A bare word on the right is a string, or a number when it looks like one; quoted
  values ('single' or "double") are strings that may hold spaces.  Inside quotes a
  backslash escapes only the quote character and itself (so ``"\\d+"`` stays a regex).
* Numbers compare numerically when the field's value is a number; a string value is
  compared as text, except that ``< <= > >=`` with a numeric literal compare a string
  that reads as a number numerically.  ``true``/``false`` compare with boolean fields.
* A missing value (the getter returns None: the field does not apply to the event)
  makes every operator false, ``exists`` included; only ``not`` around it is true.
* For list-valued fields (``proc.argv``, ``ns.types``...) ``contains X`` and ``in (...)``
  test membership, and every other operator is true when any element satisfies it
  (``!=`` is the negation of ``=``: no element equals).
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib
import ipaddress
import operator
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from corral.errors import CorralError

# re's own parser, for the literals of patterns (required_texts): private modules with no
# type stubs, so typed Any; anything unexpected from them leaves a pattern unscreened.
_sre_parser: Any = importlib.import_module("re._parser")
_sre_constants: Any = importlib.import_module("re._constants")

#: field name, index (``proc.args[1]`` -> ("proc.args", 1)) -> a getter, or None when unknown
Getter = Callable[[Any], Any]
Resolver = Callable[[str, int | None], Getter | None]
#: a compiled condition; its result is truthy when the condition holds
Predicate = Callable[[Any], Any]

COMPARISONS = ("=", "!=", "<", "<=", ">", ">=")
WORD_OPERATORS = ("contains", "icontains", "startswith", "endswith", "glob", "regex", "in", "in_cidr", "exists")
OPERATORS = COMPARISONS + WORD_OPERATORS
KEYWORDS = ("and", "or", "not")


class RuleSyntaxError(CorralError):
    """A condition that cannot be parsed or compiled, with the place it went wrong.

    ``column`` is 1-based in ``condition`` (the text the error is about: the rule's
    condition, or a macro's when the mistake is inside a macro the rule uses).
    ``macro`` names the macro whose text that is (None: the condition itself).
    ``str()`` shows the message, then the offending line with a caret under the column.
    """

    def __init__(self, message: str, condition: str, column: int, macro: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.condition = condition
        self.column = max(1, column)
        self.macro = macro

    def __str__(self) -> str:
        # Multi-line conditions (YAML `|` blocks): show the line holding the column.
        start = self.condition.rfind("\n", 0, self.column - 1) + 1
        end = self.condition.find("\n", start)
        line = self.condition[start:] if end < 0 else self.condition[start:end]
        return f"{self.message}\n    {line}\n    {' ' * (self.column - 1 - start)}^"


class Constant:
    """A getter whose value is known when compiling: ``evt.type`` on a rule compiled for
    one kind, or a field that kind lacks (None).  Comparisons on it are decided then
    and there, and ``and``/``or``/``not`` fold around the result, so ``evt.type =
    connect and ...`` costs nothing on connect events and rules that can never match a
    kind are left out of its index."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __call__(self, e: Any) -> Any:
        return self.value

    def __repr__(self) -> str:
        return f"Constant({self.value!r})"


def ALWAYS(e: Any) -> bool:
    """The compiled form of a condition that holds for every event of the kind."""
    return True


def NEVER(e: Any) -> bool:
    """The compiled form of a condition that holds for no event of the kind."""
    return False


class FieldError(Exception):
    """Raised by a resolver to reject a field with a message of its own.

    A resolver that only returns None gets the compiler's generic "unknown field"
    message; raising this lets it say more (e.g. which event kinds have the field).
    """


# ----------------------------------------------------------------------------- AST


@dataclass(frozen=True, slots=True)
class FieldRef:
    name: str
    index: int | None
    column: int

    def __str__(self) -> str:
        return self.name if self.index is None else f"{self.name}[{self.index}]"


@dataclass(frozen=True, slots=True)
class Value:
    """A literal on the right of an operator, as written."""

    text: str
    quoted: bool
    column: int


@dataclass(frozen=True, slots=True)
class Compare:
    """``field op value``, ``field in (v, ...)``, ``field in_cidr (...)`` or ``field exists``."""

    field: FieldRef
    op: str
    values: tuple[Value, ...]
    column: int


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node
    column: int


@dataclass(frozen=True, slots=True)
class And:
    operands: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    operands: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class MacroRef:
    name: str
    column: int


Node = Compare | Not | And | Or | MacroRef


@dataclass(frozen=True, slots=True)
class Macro:
    """A named, parsed condition that other conditions use by name."""

    name: str
    text: str
    node: Node


# ----------------------------------------------------------------------- tokenizer

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_INDEX = re.compile(r"\[\s*(-?\d+)\s*\]")
_SYMBOL_OP = re.compile(r"!=|<=|>=|==|=|<|>")
_BARE_VALUE = re.compile(r"[^\s(),]+")
_SPACE = re.compile(r"\s*")


@dataclass(frozen=True, slots=True)
class Token:
    """kind: 'word' (a name, keyword or word operator), 'op', '(', ')', ',', 'end'."""

    kind: str
    text: str
    column: int


class _Lexer:
    """Hands out tokens on demand; the parser says when it wants a *value*.

    Values are lexed differently from the rest: after an operator a bare value runs to
    the next space, parenthesis or comma, so ``proc.args contains a=b`` and
    ``file.path glob /tmp/*.sh`` need no quotes, while ``proc.name=ssh`` still splits.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str, column: int | None = None) -> RuleSyntaxError:
        return RuleSyntaxError(message, self.text, self.pos + 1 if column is None else column)

    def _skip_space(self) -> None:
        m = _SPACE.match(self.text, self.pos)
        assert m is not None
        self.pos = m.end()

    def peek(self) -> Token:
        saved = self.pos
        try:
            return self.next()
        finally:
            self.pos = saved

    def next(self) -> Token:
        self._skip_space()
        col = self.pos + 1
        if self.pos >= len(self.text):
            return Token("end", "", col)
        ch = self.text[self.pos]
        if ch in "(),":
            self.pos += 1
            return Token(ch, ch, col)
        if m := _IDENT.match(self.text, self.pos):
            self.pos = m.end()
            return Token("word", m.group(), col)
        if m := _SYMBOL_OP.match(self.text, self.pos):
            self.pos = m.end()
            return Token("op", m.group(), col)
        if self.text.startswith(("&&", "||"), self.pos):
            word = "and" if ch == "&" else "or"
            raise self.error(f"unexpected {self.text[self.pos:self.pos + 2]!r}: write '{word}'")
        if ch in "\"'":
            raise self.error("unexpected quoted text: a value must follow an operator (field = \"text\")")
        raise self.error(f"unexpected character {ch!r}")

    def index(self) -> int | None:
        """An optional ``[N]`` right after a field name."""
        if m := _INDEX.match(self.text, self.pos):
            self.pos = m.end()
            n = int(m.group(1))
            if n < 0:
                raise self.error("an index must be 0 or more", m.start() + 2)
            return n
        return None

    def value(self, after: str) -> Value:
        self._skip_space()
        col = self.pos + 1
        if self.pos >= len(self.text) or self.text[self.pos] in "(),":
            found = "the end" if self.pos >= len(self.text) else repr(self.text[self.pos])
            raise self.error(f"expected a value after {after!r}, found {found}")
        quote = self.text[self.pos]
        if quote in "\"'":
            out: list[str] = []
            i = self.pos + 1
            while i < len(self.text):
                ch = self.text[i]
                if ch == "\\" and i + 1 < len(self.text) and self.text[i + 1] in (quote, "\\"):
                    out.append(self.text[i + 1])
                    i += 2
                    continue
                if ch == quote:
                    self.pos = i + 1
                    return Value("".join(out), True, col)
                out.append(ch)
                i += 1
            raise self.error(f"unterminated string: no closing {quote}", col)
        m = _BARE_VALUE.match(self.text, self.pos)
        assert m is not None
        self.pos = m.end()
        return Value(m.group(), False, col)


# -------------------------------------------------------------------------- parser


def parse(text: str) -> Node:
    """Parse a condition into its AST; RuleSyntaxError says where and why it failed."""
    return _Parser(text).parse()


class _Parser:
    def __init__(self, text: str) -> None:
        self.lex = _Lexer(text)

    def parse(self) -> Node:
        if not self.lex.text.strip():
            raise self.lex.error("the condition is empty", 1)
        node = self.or_()
        tok = self.lex.next()
        if tok.kind != "end":
            raise self.unexpected(tok, "'and', 'or' or the end of the condition")
        return node

    def unexpected(self, tok: Token, wanted: str) -> RuleSyntaxError:
        if tok.kind == "end":
            return self.lex.error(f"expected {wanted}, found the end of the condition", tok.column)
        hint = ""
        if tok.kind == "word" and tok.text not in KEYWORDS:
            hint = " (quote values that contain spaces)"
        elif tok.kind in ",(":
            hint = " (quote values that contain commas or parentheses)"
        return self.lex.error(f"expected {wanted}, found {tok.text!r}{hint}", tok.column)

    def keyword(self, word: str) -> bool:
        tok = self.lex.peek()
        if tok.kind == "word" and tok.text == word:
            self.lex.next()
            return True
        return False

    def or_(self) -> Node:
        parts = [self.and_()]
        while self.keyword("or"):
            parts.append(self.and_())
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def and_(self) -> Node:
        parts = [self.not_()]
        while self.keyword("and"):
            parts.append(self.not_())
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def not_(self) -> Node:
        tok = self.lex.peek()
        if tok.kind == "word" and tok.text == "not":
            self.lex.next()
            return Not(self.not_(), tok.column)
        return self.primary()

    def primary(self) -> Node:
        tok = self.lex.next()
        if tok.kind == "(":
            node = self.or_()
            close = self.lex.next()
            if close.kind != ")":
                raise self.unexpected(close, f"')' to close the '(' at column {tok.column}")
            return node
        if tok.kind != "word" or tok.text in KEYWORDS or tok.text in WORD_OPERATORS:
            raise self.unexpected(tok, "a field, a macro name, 'not' or '('")
        index = self.lex.index()
        field = FieldRef(tok.text, index, tok.column)
        op = self.lex.peek()
        if op.kind == "op":
            return self.comparison(field)
        if op.kind == "word" and op.text in WORD_OPERATORS:
            return self.comparison(field)
        if "." in tok.text or index is not None:
            if op.kind == "word" and op.text not in KEYWORDS:
                raise self.lex.error(f"unknown operator {op.text!r} after {field}; operators: "
                                     f"{' '.join(OPERATORS)}", op.column)
            raise self.lex.error(f"field {field} needs an operator (e.g. `{field} = value` or "
                                 f"`{field} exists`)", op.column)
        if op.kind == "word" and op.text not in KEYWORDS:
            raise self.lex.error(f"unknown operator {op.text!r} after {tok.text!r}; operators: "
                                 f"{' '.join(OPERATORS)}", op.column)
        return MacroRef(tok.text, tok.column)

    def comparison(self, field: FieldRef) -> Compare:
        op = self.lex.next()
        if op.text == "==":
            raise self.lex.error("'==' is not an operator: write '='", op.column)
        if op.text == "exists":
            return Compare(field, "exists", (), op.column)
        if op.text in ("in", "in_cidr"):
            opening = self.lex.next()
            if opening.kind != "(":
                raise self.lex.error(f"expected '(' after {op.text!r}: `{field} {op.text} (a, b, list_name)`",
                                     opening.column)
            values = [self.lex.value(f"{op.text} (")]
            while True:
                sep = self.lex.next()
                if sep.kind == ")":
                    break
                if sep.kind != ",":
                    raise self.unexpected(sep, f"',' or ')' in the {op.text} list")
                values.append(self.lex.value(","))
            return Compare(field, op.text, tuple(values), op.column)
        return Compare(field, op.text, (self.lex.value(op.text),), op.column)


# ------------------------------------------------------------------------ compiler


def compile_condition(condition: str | Node, resolver: Resolver, *, lists: Mapping[str, Sequence[Any]] | None = None,
                      macros: Mapping[str, Macro] | None = None, known_fields: Iterable[str] = (),
                      text: str | None = None) -> Predicate:
    """Compile a condition (text, or an AST with its ``text``) into a predicate.

    ``lists`` maps list names to their items (already expanded), ``macros`` macro names
    to parsed macros; ``known_fields`` only feeds "did you mean" suggestions.
    """
    if isinstance(condition, str):
        text, node = condition, parse(condition)
    else:
        node = condition
    return Compiler(resolver, lists=lists, macros=macros, known_fields=known_fields).compile(node, text or "")


class Compiler:
    """Turns ASTs into predicates against one resolver, with lists and macros resolved."""

    def __init__(self, resolver: Resolver, *, lists: Mapping[str, Sequence[Any]] | None = None,
                 macros: Mapping[str, Macro] | None = None, known_fields: Iterable[str] = (),
                 coarse: Collection[Getter] = ()) -> None:
        self.resolver = resolver
        #: getters of fields with few values (``net.family``): screening on them saves little
        self.coarse = coarse
        self.lists = lists or {}
        self.macros = macros or {}
        self.known_fields = sorted(set(known_fields))
        self._stack: list[Macro] = []  # macros being expanded, outermost first
        self._text = ""

    def compile(self, node: Node, text: str) -> Predicate:
        self._text = text
        self._stack = []
        return self._compile(node)

    def error(self, message: str, column: int) -> RuleSyntaxError:
        if self._stack:
            chain = " <- ".join(repr(m.name) for m in reversed(self._stack))
            return RuleSyntaxError(f"in macro {chain}: {message}", self._stack[-1].text, column,
                                   self._stack[-1].name)
        return RuleSyntaxError(message, self._text, column)

    def _compile(self, node: Node) -> Predicate:
        if isinstance(node, Compare):
            return self._compare(node)
        if isinstance(node, And):
            return functools.reduce(_and, [self._compile(n) for n in node.operands])
        if isinstance(node, Or):
            return functools.reduce(_or, [self._compile(n) for n in node.operands])
        if isinstance(node, Not):
            inner = self._compile(node.operand)
            if inner is ALWAYS or inner is NEVER:
                return NEVER if inner is ALWAYS else ALWAYS
            return lambda e: not inner(e)
        return self._macro(node)

    def screen(self, node: Node) -> Screen:
        """A necessary condition of ``node`` that an index can test for many rules at once.

        Clauses that must all hold when ``node`` does, each a set of atoms one of which
        must hold (see Screen); the empty screen when nothing is known, so a rule with it
        is always evaluated.  ``node`` must be one this compiler compiled without error.
        """
        self._stack = []
        found = self._screen(node)
        if not found:
            return ()
        # Each field with a text clause costs a search of every event of the kind, which
        # costs more with each text; a lookup costs little.  So texts screen only rules
        # that no name or number does, and one clause of texts is enough.
        clauses = sorted(set(found), key=self._strength, reverse=True)
        lookups = [c for c in clauses if all(isinstance(a, ValueIs) for a in c)]
        texts = [c for c in clauses if c not in lookups]
        if texts and not (lookups and self._strength(lookups[0]) >= _NAME_STRENGTH):
            lookups.insert(0, texts[0])
        return tuple(lookups[:MAX_CLAUSES])

    def _screen(self, node: Node) -> Screen | None:
        """The screen of ``node``, or None when it never holds on this resolver's events."""
        if isinstance(node, Compare):
            get = self._getter(node.field)
            if isinstance(get, Constant):  # decided now: holds always (nothing to screen) or never
                return () if self._compare(node) is ALWAYS else None
            return self._compare_screen(node, get)
        if isinstance(node, And):  # every term is necessary: so is each of their clauses
            clauses: list[Clause] = []
            for child in node.operands:
                found = self._screen(child)
                if found is None:
                    return None
                clauses += found
            return tuple(clauses)
        if isinstance(node, Or):  # one term holds: so does one clause of each (the strongest)
            terms = [found for child in node.operands if (found := self._screen(child)) is not None]
            if len(terms) <= 1:  # the others never hold here (`evt.type = exec and ...` on open)
                return terms[0] if terms else None
            if not all(terms):
                return ()
            strongest: list[Clause] = [max(found, key=self._strength) for found in terms]
            return (frozenset().union(*strongest),)
        if isinstance(node, Not):  # what must hold is an absence: nothing to look up
            return None if self._compile(node.operand) is ALWAYS else ()
        macro = self.macros[node.name]  # it compiled: the macro exists and is not on a cycle
        self._stack.append(macro)
        try:
            return self._screen(macro.node)
        finally:
            self._stack.pop()

    def _strength(self, clause: Clause) -> int:
        """How good a clause is to screen on, by its weakest atom: a name or number picks few
        events and costs a lookup; a text costs a search and picks fewer the longer it is; a
        boolean, or a field of few values, holds for many events."""
        def atom(a: Atom) -> int:
            if isinstance(a, TextHas):
                return len(a.text)
            return 1 if isinstance(a.key, bool) or a.getter in self.coarse else _NAME_STRENGTH
        return min(map(atom, clause))

    def _compare_screen(self, node: Compare, get: Getter) -> Screen:
        op = node.op
        if op in ("=", "in"):
            # Keys are the literals' texts and, for numeric or boolean ones, their values:
            # every str, number or bool the comparison accepts is among them (a key may
            # admit more, True == 1: the rule's own test still decides).
            lits = self._expand(node.values) if op == "in" else [_Literal.of(node.values[0].text, 0)]
            keys: set[Any] = {lit.text for lit in lits}
            keys |= {lit.number for lit in lits if lit.number is not None}
            keys |= {lit.boolean for lit in lits if lit.boolean is not None}
            return (frozenset(ValueIs(get, key) for key in keys),)
        if op in ("contains", "icontains", "startswith", "endswith"):
            needs = [frozenset({node.values[0].text})]
        elif op == "glob":
            needs = required_texts(fnmatch.translate(node.values[0].text), re.DOTALL)
        elif op == "regex":
            needs = required_texts(node.values[0].text)
        else:  # != and orderings hold for most values; exists and in_cidr have no text to look for
            return ()
        # Texts outside ASCII are left out: fold() is exact only for ASCII ones.  Short
        # ones are found nearly everywhere: screening on them would cost more than it saves.
        return tuple(frozenset(TextHas(get, fold(t)) for t in texts) for texts in needs
                     if all(t.isascii() and len(t) >= MIN_TEXT for t in texts))

    def _macro(self, ref: MacroRef) -> Predicate:
        macro = self.macros.get(ref.name)
        if macro is None:
            if ref.name in self.lists:
                raise self.error(f"{ref.name!r} is a list, not a condition: use it as `field in ({ref.name})`",
                                 ref.column)
            close = difflib.get_close_matches(ref.name, list(self.macros), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise self.error(f"unknown macro {ref.name!r}{hint}", ref.column)
        if any(m.name == macro.name for m in self._stack):
            cycle = " -> ".join([*(m.name for m in self._stack), macro.name])
            raise self.error(f"macro cycle: {cycle}", ref.column)
        self._stack.append(macro)
        try:
            return self._compile(macro.node)
        finally:
            self._stack.pop()

    def _getter(self, field: FieldRef) -> Getter:
        try:
            getter = self.resolver(field.name, field.index)
        except FieldError as e:
            raise self.error(str(e), field.column) from None
        if getter is not None:
            return getter
        if field.index is not None and self.resolver(field.name, None) is not None:
            raise self.error(f"field {field.name} takes no index", field.column)
        close = difflib.get_close_matches(field.name, self.known_fields, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise self.error(f"unknown field {str(field)!r}{hint}", field.column)

    def _expand(self, values: Sequence[Value]) -> list[_Literal]:
        """Literals of an in/in_cidr list, with list names replaced by their items."""
        out: list[_Literal] = []
        for v in values:
            if not v.quoted and v.text in self.lists:
                out += [_Literal.of(item, v.column) for item in self.lists[v.text]]
                continue
            # A near miss of a list name is almost surely a typo, not a value to look for.
            close = difflib.get_close_matches(v.text, list(self.lists), n=1, cutoff=0.85)
            if not v.quoted and "_" in v.text and close:
                raise self.error(f"unknown list {v.text!r}; did you mean {close[0]}? (quote it if you mean "
                                 "the text)", v.column)
            else:
                out.append(_Literal.of(v.text, v.column))
        return out

    def _compare(self, node: Compare) -> Predicate:
        get = self._getter(node.field)
        pred = self._build(node, get)
        if isinstance(get, Constant):
            return ALWAYS if pred(None) else NEVER
        return pred

    def _build(self, node: Compare, get: Getter) -> Predicate:
        op = node.op
        if op == "exists":
            return lambda e: get(e) is not None
        if op in ("in", "in_cidr"):
            lits = self._expand(node.values)
        else:
            lits = [_Literal.of(node.values[0].text, node.values[0].column)]
        try:
            test, on_str, on_int = _TESTS[op](lits)
        except _BadLiteral as e:
            raise self.error(str(e), e.column) from None
        return _predicate(get, test, on_str, on_int)


def _and(a: Predicate, b: Predicate) -> Predicate:
    if a is NEVER or b is NEVER:
        return NEVER
    if a is ALWAYS or b is ALWAYS:
        return b if a is ALWAYS else a
    return lambda e: a(e) and b(e)


def _or(a: Predicate, b: Predicate) -> Predicate:
    if a is ALWAYS or b is ALWAYS:
        return ALWAYS
    if a is NEVER or b is NEVER:
        return b if a is NEVER else a
    return lambda e: a(e) or b(e)


def _predicate(get: Getter, test: Test, on_str: Test | None, on_int: Test | None) -> Predicate:
    """One comparison: fetch, then dispatch on the value's type.

    Strings (and ints) are by far the most common values, so they get a test of
    their own, usually a C-level callable (a bound ``str.__eq__``, a compiled regex's
    ``match``): that keeps one comparison at two Python calls.
    """
    s = on_str or test
    i = on_int or test

    def pred(e: Any) -> Any:
        v = get(e)
        cls = v.__class__
        if cls is str:
            return s(v)
        if cls is int:
            return i(v)
        return v is not None and test(v)

    return pred


# --------------------------------------------------------------------- literals


_INT = re.compile(r"[-+]?\d+")
_HEX = re.compile(r"[-+]?0[xX][0-9a-fA-F]+|[-+]?0[oO][0-7]+|[-+]?0[bB][01]+")
_FLOAT = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def as_number(text: str) -> int | float | None:
    """The number a text reads as (decimal, 0x/0o/0b, or float), or None."""
    if _INT.fullmatch(text):
        return int(text)
    if _HEX.fullmatch(text):
        return int(text, 0)
    if _FLOAT.fullmatch(text):
        return float(text)
    return None


@dataclass(frozen=True, slots=True)
class _Literal:
    text: str
    number: int | float | None
    boolean: bool | None
    column: int

    @classmethod
    def of(cls, raw: Any, column: int) -> _Literal:
        if isinstance(raw, bool):  # list items come from YAML already typed
            raw = "true" if raw else "false"
        text = str(raw)
        low = text.lower()
        return cls(text, as_number(text), True if low == "true" else False if low == "false" else None, column)


# A test takes a value that is not None; Tests returns (generic, for str, for int).
Test = Callable[[Any], Any]
Tests = tuple[Test, Test | None, Test | None]


def _any(test: Test) -> Test:
    """A test lifted over list values: true when some element passes."""
    def lifted(v: Any) -> Any:
        if isinstance(v, (list, tuple, set, frozenset)):
            return any(x is not None and test(x) for x in v)
        return test(v)
    return lifted


def _scalar_eq(lit: _Literal) -> Test:
    def eq(v: Any) -> bool:
        if isinstance(v, bool):
            return v is lit.boolean
        if isinstance(v, (int, float)):
            return lit.number is not None and v == lit.number
        return str(v) == lit.text
    return eq


def _eq(lits: Sequence[_Literal]) -> Tests:
    lit = lits[0]
    num = lit.number
    on_int = (lambda v: v == num) if isinstance(num, (int, float)) else (lambda v: False)
    return _any(_scalar_eq(lit)), lit.text.__eq__, on_int


def _ne(lits: Sequence[_Literal]) -> Tests:
    test, on_str, on_int = _eq(lits)
    assert on_str is not None and on_int is not None
    return (lambda v: not test(v)), lits[0].text.__ne__, (lambda v: not on_int(v))


def _ordering(cmp: Callable[[Any, Any], bool]) -> Callable[[Sequence[_Literal]], Tests]:
    def make(lits: Sequence[_Literal]) -> Tests:
        lit = lits[0]
        num = lit.number

        def scalar(v: Any) -> bool:
            if isinstance(v, bool):
                return False
            if isinstance(v, (int, float)):
                return num is not None and cmp(v, num)
            if isinstance(v, str):
                if num is None:
                    return cmp(v, lit.text)
                n = as_number(v.strip())
                return n is not None and cmp(n, num)
            return False
        return _any(scalar), None, None
    return make


def _in(lits: Sequence[_Literal]) -> Tests:
    texts = frozenset(lit.text for lit in lits)
    numbers = frozenset(lit.number for lit in lits if lit.number is not None)
    booleans = frozenset(lit.boolean for lit in lits if lit.boolean is not None)

    def scalar(v: Any) -> bool:
        if isinstance(v, bool):
            return v in booleans
        if isinstance(v, (int, float)):
            return v in numbers
        return str(v) in texts
    return _any(scalar), texts.__contains__, numbers.__contains__


def _contains(lits: Sequence[_Literal]) -> Tests:
    lit = lits[0]
    eq = _scalar_eq(lit)

    def test(v: Any) -> bool:
        if isinstance(v, str):
            return lit.text in v
        if isinstance(v, (list, tuple, set, frozenset)):
            return any(x is not None and eq(x) for x in v)
        return False
    return test, re.compile(re.escape(lit.text)).search, lambda v: False


def _icontains(lits: Sequence[_Literal]) -> Tests:
    low = lits[0].text.lower()

    def test(v: Any) -> bool:
        if isinstance(v, str):
            return low in v.lower()
        if isinstance(v, (list, tuple, set, frozenset)):
            return any(isinstance(x, str) and x.lower() == low for x in v)
        return False
    return test, re.compile(re.escape(lits[0].text), re.IGNORECASE).search, lambda v: False


def _string_op(make: Callable[[str], Callable[[str], Any]]) -> Callable[[Sequence[_Literal]], Tests]:
    """startswith, endswith, glob, regex: string operators, any element of a list."""
    def build(lits: Sequence[_Literal]) -> Tests:
        fast = make(lits[0].text)
        return _any(lambda v: isinstance(v, str) and fast(v)), fast, lambda v: False
    return build


class _BadLiteral(ValueError):
    """A value an operator cannot use (a bad regex or network), and where it is."""

    def __init__(self, message: str, column: int) -> None:
        super().__init__(message)
        self.column = column


def _regex(lits: Sequence[_Literal]) -> Tests:
    try:
        search = re.compile(lits[0].text).search
    except re.error as e:
        raise _BadLiteral(f"bad regex {lits[0].text!r}: {e}", lits[0].column) from None
    return _string_op(lambda t: search)(lits)


def _glob(pattern: str) -> Callable[[str], Any]:
    # fnmatch.fnmatchcase, with the translation done once
    return re.compile(fnmatch.translate(pattern), re.DOTALL).match


@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> tuple[int, int] | None:
    """(version, address as int) of an IP literal, or None; cached: addresses repeat."""
    try:
        addr = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return 4, int(addr.ipv4_mapped)  # ::ffff:10.0.0.1 is 10.0.0.1 for CIDR purposes
    return addr.version, int(addr)


def _in_cidr(lits: Sequence[_Literal]) -> Tests:
    nets: list[tuple[int, int, int]] = []
    for lit in lits:
        try:
            net = ipaddress.ip_network(lit.text, strict=False)
        except ValueError:
            raise _BadLiteral(f"bad network {lit.text!r} in in_cidr: write an address or CIDR "
                              "such as 10.0.0.0/8 or fd00::/8", lit.column) from None
        nets.append((net.version, int(net.network_address), int(net.netmask)))
    table = tuple(nets)

    def scalar(v: Any) -> bool:
        if not isinstance(v, str):
            return False
        ip = _ip(v)
        if ip is None:
            return False
        version, addr = ip
        return any(ver == version and addr & mask == base for ver, base, mask in table)
    # Addresses repeat (a sandbox talks to few hosts): remember answers per text,
    # so the common case is one C-level dict lookup.
    return _any(scalar), _Memo(scalar).__getitem__, lambda v: False


class _Memo(dict[str, bool]):
    """answers of a string test, computed on first sight; bounded by starting over."""

    LIMIT = 4096

    def __init__(self, test: Callable[[str], bool]) -> None:
        super().__init__()
        self.test = test

    def __missing__(self, key: str) -> bool:
        if len(self) >= self.LIMIT:
            self.clear()
        value = self[key] = self.test(key)
        return value


_TESTS: dict[str, Callable[[Sequence[_Literal]], Tests]] = {
    "=": _eq, "!=": _ne,
    "<": _ordering(operator.lt), "<=": _ordering(operator.le),
    ">": _ordering(operator.gt), ">=": _ordering(operator.ge),
    "in": _in, "in_cidr": _in_cidr,
    "contains": _contains, "icontains": _icontains,
    "startswith": _string_op(lambda t: re.compile(re.escape(t)).match),
    "endswith": _string_op(lambda t: lambda v: v.endswith(t)),
    "glob": _string_op(_glob),
    "regex": _regex,
}


# ----------------------------------------------------------------------- screens
#
# Most rules can only match an event whose name is one of a few, or whose command line
# holds one of a few words: an index that looks those up once per event, for every rule
# of its kind together, evaluates only the rules that can match (RuleSet).  A Screen is
# what Compiler.screen() derives from a condition for that.


@dataclass(frozen=True, slots=True)
class ValueIs:
    """The field's value is ``key``: a str, number or bool, as ``=`` and ``in`` compare."""

    getter: Getter
    key: Any


@dataclass(frozen=True, slots=True)
class TextHas:
    """The field's value, a string, contains ``text`` once both are case-folded by fold()."""

    getter: Getter
    text: str


Atom = ValueIs | TextHas
#: one of its atoms holds
Clause = frozenset[Atom]
#: a necessary condition: every clause holds; () when nothing is known.  An atom says
#: nothing about a value that is not a scalar (a list: ``proc.argv``), which an index must
#: treat as satisfying every atom on its field, nor about a missing one (None), which
#: satisfies none (every comparison on it is false).
Screen = tuple[Clause, ...]

#: clauses kept per screen, the strongest (more cost an index more than they save)
MAX_CLAUSES = 4
#: the shortest text worth screening on
MIN_TEXT = 2
#: the strength (_strength) of a name or number: more than any text's, as a lookup costs less than a search
_NAME_STRENGTH = 1000
#: the most texts a piece of a regex may stand for before it is not expanded further
_MAX_TEXTS = 64

#: The characters ``re`` matches against an ASCII letter when case-blind (IGNORECASE:
#: simple case folding, plus the equivalences re adds), as that letter's lower case.
#: tests/test_rules_index.py checks it against re over every code point.
_FOLD = {**{c: c + 32 for c in range(ord("A"), ord("Z") + 1)},
         0x130: ord("i"), 0x131: ord("i"), 0x17F: ord("s"), 0x212A: ord("k")}


def fold(text: str) -> str:
    """``text`` with the characters that case-blind ``re`` takes for an ASCII letter made
    that lower-case letter, nothing else changed (not even the length).

    If a pattern, case-blind or not, matches a text, the pattern's ASCII literals,
    folded, are in the folded text.
    """
    return text.lower() if text.isascii() else text.translate(_FOLD)


def required_texts(pattern: str, flags: int = 0) -> list[frozenset[str]]:
    """Sets of texts such that every string ``pattern`` matches holds one text of each set
    (as written, whatever the case flags say); none when nothing is known."""
    try:
        needs = _sequence(_sre_parser.parse(pattern, flags)).needs
    except Exception:  # an internal module's surprise: then this pattern is not screened
        return []
    # A text that holds another of its set is redundant: finding the other is enough.
    return [frozenset(t for t in texts if not any(o != t and o in t for o in texts)) for texts in dict.fromkeys(needs)]


_Texts = frozenset[str]
_NOTHING: _Texts = frozenset({""})
#: sets of required texts kept per piece of a regex, the best
_MAX_NEEDS = 4


@dataclass(frozen=True, slots=True)
class _Pieces:
    """What is known of the strings a piece of a regex matches: all of them, when they are
    few; texts each starts with, and ends with (``{""}``: none known); and sets of texts
    each holds one text of every set."""

    exact: _Texts | None
    prefixes: _Texts
    suffixes: _Texts
    needs: tuple[_Texts, ...]


_UNKNOWN = _Pieces(None, _NOTHING, _NOTHING, ())


def _known(strings: _Texts) -> _Pieces:
    return _Pieces(strings, strings, strings, tuple(_needs(strings)))


def _needs(strings: _Texts) -> list[_Texts]:
    """The requirement that one of ``strings`` is there: none if one is empty."""
    return [strings] if strings and "" not in strings else []


def _join(a: _Texts, b: _Texts) -> _Texts | None:
    """Every string of ``a`` followed by one of ``b``; None when that makes too many."""
    return frozenset(x + y for x in a for y in b) if len(a) * len(b) <= _MAX_TEXTS else None


def _rank(texts: _Texts) -> tuple[int, int]:
    """Better sets to screen on first: the longer their shortest text, then the fewer."""
    return min(map(len, texts)), -len(texts)


def _best(needs: Iterable[_Texts]) -> tuple[_Texts, ...]:
    return tuple(sorted(set(needs), key=_rank, reverse=True)[:_MAX_NEEDS])


def _sequence(items: Iterable[tuple[Any, Any]]) -> _Pieces:
    """The pieces of a sequence of regex items.

    A match of the sequence is the items' matches one after the other: so the strings
    known before an item, joined to the texts it starts with, are contiguous in it; after
    the item it goes on from the texts the item ends with.
    """
    head, head_open = _NOTHING, True  # the sequence starts with one of head
    run = _NOTHING  # ...and what it matched so far ends with one of run
    needs: list[_Texts] = []
    for op, av in items:
        item = _item(op, av)
        if head_open:
            joined = _join(head, item.exact if item.exact is not None else item.prefixes)
            head_open = joined is not None and item.exact is not None
            head = joined if joined is not None else head
        if item.exact is not None:
            joined = _join(run, item.exact)
            if joined is None:  # too many: what the run had is required, a new one starts
                needs += _needs(run)
            run = joined if joined is not None else item.exact
            continue
        joined = _join(run, item.prefixes)
        needs += _needs(joined) if joined is not None else [*_needs(run), *_needs(item.prefixes)]
        needs += item.needs
        run = item.suffixes
    if head_open:
        return _known(head)
    return _Pieces(None, head, run, _best([*needs, *_needs(run)]))


def _item(op: Any, av: Any) -> _Pieces:
    """The pieces of one regex item."""
    c = _sre_constants
    if op == c.LITERAL:
        return _known(frozenset({chr(av)}))
    if op in (c.AT, c.ASSERT, c.ASSERT_NOT):  # zero width: joins what is around it
        return _known(_NOTHING)
    if op == c.IN:
        if len(av) <= 8 and all(o == c.LITERAL for o, _ in av):
            return _known(frozenset(chr(v) for _, v in av))
        return _UNKNOWN
    if op in (c.SUBPATTERN, c.ATOMIC_GROUP):
        return _sequence(av[-1] if op == c.SUBPATTERN else av)
    if op == c.BRANCH:
        return _branch([_sequence(alternative) for alternative in av[1]])
    if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
        low, high, sub = av
        item = _sequence(sub)
        if item.exact is not None and low == high and len(item.exact) ** low <= _MAX_TEXTS:
            out = _NOTHING
            for _ in range(low):
                out = frozenset(a + b for a in out for b in item.exact)
            return _known(out)
        if item.exact is not None and low == 0 and high == 1:
            return _known(item.exact | _NOTHING)
        # At least once: the first time starts it, the last ends it.
        return _Pieces(None, item.prefixes, item.suffixes, item.needs) if low >= 1 else _UNKNOWN
    return _UNKNOWN  # any character, classes, back references...


def _branch(alternatives: Sequence[_Pieces]) -> _Pieces:
    """The pieces of ``a|b|...``: one alternative matches."""
    def union(sets: Iterable[_Texts]) -> _Texts | None:
        out = frozenset().union(*sets)
        return out if len(out) <= _MAX_TEXTS else None

    exact = union(a.exact for a in alternatives if a.exact is not None)
    if exact is not None and all(a.exact is not None for a in alternatives):
        return _known(exact)
    prefixes = union(a.prefixes for a in alternatives) or _NOTHING
    suffixes = union(a.suffixes for a in alternatives) or _NOTHING
    if not all(a.needs for a in alternatives):
        return _Pieces(None, prefixes, suffixes, ())
    # Each set of the alternative that matched holds: so each set of each alternative,
    # with the best set of every other, is a set one of whose texts is there.
    best = [a.needs[0] for a in alternatives]
    needs = [texts.union(*best[:i], *best[i + 1:]) for i, a in enumerate(alternatives) for texts in a.needs]
    return _Pieces(None, prefixes, suffixes, _best(needs))


def fields_of(node: Node, macros: Mapping[str, Macro] | None = None) -> list[FieldRef]:
    """Every field a condition reads, macros expanded (each macro once)."""
    out: list[FieldRef] = []
    seen: set[str] = set()

    def walk(n: Node) -> None:
        if isinstance(n, Compare):
            out.append(n.field)
        elif isinstance(n, (And, Or)):
            for child in n.operands:
                walk(child)
        elif isinstance(n, Not):
            walk(n.operand)
        elif macros is not None and n.name in macros and n.name not in seen:
            seen.add(n.name)
            walk(macros[n.name].node)

    walk(node)
    return out


def macro_refs(node: Node) -> list[str]:
    """Names of the macros a condition uses directly (not through other macros)."""
    if isinstance(node, MacroRef):
        return [node.name]
    if isinstance(node, (And, Or)):
        return [name for child in node.operands for name in macro_refs(child)]
    if isinstance(node, Not):
        return macro_refs(node.operand)
    return []
