"""Sandbox policies: what a sandbox may reach and use, written in YAML.

```yaml
name: dev                    # optional; defaults to the file name without .yaml
mode: enforce                # enforce (block) or observe (detect only); default enforce
egress:                      # default: nothing at all
  allow: ["198.51.100.10:22", "10.0.0.0/8", "[2001:db8::1]:443"]   # ADDR, CIDR, either with :PORT
  allow_domains: ["pypi.org", "*.github.com"]   # names the sandbox's resolver answers
  deny: ["169.254.169.254"]                      # wins over allow
limits: {cpus: 2, memory: 2G, pids: 512}         # each optional; memory in bytes or K/M/G/T
filesystem: {extra_ro: ["/opt/tools"]}          # host paths shown read-only at the same place
detect:                      # this sandbox's own alert thresholds
  cpu_saturation: {percent: 90, seconds: 60}     # one process this busy this long is an alert
```

The file is a contract with its author, so nothing is guessed or skipped: an unknown field,
a wrong type or a bad entry is an error naming the file, the line and the field. Addresses
are IP literals only (names go under allow_domains); entries are kept in canonical text, as
corral.sandbox.egress.Rule prints them, and Rule.parse reads them back.

load_policy("dev") loads a built-in (src/corral/sandbox/policies/NAME.yaml, parsed the same
way); anything that contains a "/" or ends in .yaml/.yml is a file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from corral.errors import CorralError
from corral.sandbox.cgroups import parse_size
from corral.sandbox.egress import Rule
from corral.sandbox.fs import check_extra_ro

MODES = ("enforce", "observe")
_FIELDS: dict[str, tuple[str, ...]] = {
    "": ("name", "mode", "egress", "limits", "filesystem", "detect"),
    "egress": ("allow", "allow_domains", "deny"),
    "limits": ("cpus", "memory", "pids"),
    "filesystem": ("extra_ro",),
    "detect": ("cpu_saturation",),
    "detect.cpu_saturation": ("percent", "seconds"),
}
# One DNS label, as the resolver compares them (underscores appear in real names: _dmarc).
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?", re.IGNORECASE)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TAG = "tag:yaml.org,2002:"
_T = TypeVar("_T")
# Validates one list entry (text, where it came from) and returns its canonical text.
_Check = Callable[[str, str], str]
_TYPE_NAMES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
               "null": "empty", "seq": "a list", "map": "a mapping"}


@dataclass(frozen=True)
class Policy:
    """One sandbox policy; entries are validated and in canonical form."""

    name: str
    mode: str = "enforce"
    allow: tuple[str, ...] = ()
    allow_domains: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    cpus: float | None = None
    memory_bytes: int | None = None
    pids: int | None = None
    extra_ro: tuple[Path, ...] = ()
    #: (percent of one CPU, seconds): a process of this sandbox that busy that long is an alert
    cpu_saturation: tuple[float, float] | None = None

    def merged(self, *, allow: Sequence[str] = (), allow_domains: Sequence[str] = (), deny: Sequence[str] = (),
               mode: str | None = None, cpus: float | None = None, memory_bytes: int | None = None,
               pids: int | None = None, extra_ro: Sequence[str | Path] = ()) -> Policy:
        """This policy with command-line overrides: list entries are added, the others replace."""
        where = "command line"
        if mode is not None and mode not in MODES:
            raise CorralError(f"{where}: mode must be one of {', '.join(MODES)}, not {mode!r}")
        for flag, value in (("cpus", cpus), ("memory", memory_bytes), ("pids", pids)):
            if value is not None and not value > 0:
                raise CorralError(f"{where}: --{flag} must be more than 0, not {value}")
        return dataclasses.replace(
            self,
            mode=mode or self.mode,
            allow=_union(self.allow, (_rule(e, f"{where}: --allow") for e in allow)),
            allow_domains=_union(self.allow_domains, (_domain(d, f"{where}: --allow-domain") for d in allow_domains)),
            deny=_union(self.deny, (_rule(e, f"{where}: --deny") for e in deny)),
            cpus=float(cpus) if cpus is not None else self.cpus,
            memory_bytes=memory_bytes if memory_bytes is not None else self.memory_bytes,
            pids=pids if pids is not None else self.pids,
            extra_ro=_union(self.extra_ro, (Path(_extra_ro(str(p), f"{where}: extra_ro")) for p in extra_ro)),
        )


def builtin_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in _builtin_dir().iterdir() if p.name.endswith(".yaml"))


def load_policy(path_or_name: str) -> Policy:
    """A built-in policy by name (default, dev, ...) or a policy file by path."""
    looks_like_path = "/" in path_or_name or path_or_name.endswith((".yaml", ".yml"))
    if not looks_like_path and path_or_name in builtin_names():
        resource = _builtin_dir() / f"{path_or_name}.yaml"
        return parse_policy(resource.read_text(encoding="utf-8"), str(resource), default_name=path_or_name)
    path = Path(path_or_name)
    if not looks_like_path and not path.exists():
        raise CorralError(f"no policy file or built-in policy named {path_or_name!r}; "
                          f"built-ins: {', '.join(builtin_names())}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CorralError(f"{path}: cannot read policy file ({e})") from e
    return parse_policy(text, str(path), default_name=path.name.rsplit(".", 1)[0])


def parse_policy(text: str, source: str, default_name: str = "policy") -> Policy:
    """Parse policy YAML; source names the file in error messages."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise CorralError(f"{source}:{line}: YAML syntax error: {e.problem or e.context}") from e
    except yaml.YAMLError as e:
        raise CorralError(f"{source}: YAML syntax error: {e}") from e
    if root is None:
        raise CorralError(f"{source}:1: the policy is empty; write a mapping such as "
                          "`egress: {allow_domains: [pypi.org]}` (`{}` is a policy that allows no egress)")
    return _Parser(source).policy(root, default_name)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, node: Node, message: str) -> CorralError:
        return CorralError(f"{self.source}:{node.start_mark.line + 1}: {message}")

    def policy(self, root: Node, default_name: str) -> Policy:
        top = self.mapping(root, "")
        egress = self.mapping(top["egress"], "egress") if "egress" in top else {}
        limits = self.mapping(top["limits"], "limits") if "limits" in top else {}
        fs = self.mapping(top["filesystem"], "filesystem") if "filesystem" in top else {}
        detect = self.mapping(top["detect"], "detect") if "detect" in top else {}

        name = default_name
        if "name" in top:
            name = self.string(top["name"], "name")
            if not _NAME.fullmatch(name):
                raise self.error(top["name"], f"'name' must be letters, digits, '.', '_' or '-' "
                                              f"(at most 64), not {name!r}")
        mode = "enforce"
        if "mode" in top:
            node = top["mode"]
            mode = self.string(node, "mode", what=f"one of {', '.join(MODES)}")
            if mode not in MODES:
                raise self.error(node, f"'mode' must be one of {', '.join(MODES)}, not {mode!r}")

        def entries(node: Node | None, field: str, check: _Check) -> tuple[str, ...]:
            if node is None:
                return ()
            return _union((), (self.entry(item, f"{field}[{i}]", check)
                               for i, item in enumerate(self.sequence(node, field))))

        return Policy(
            name=name,
            mode=mode,
            allow=entries(egress.get("allow"), "egress.allow", _rule),
            allow_domains=entries(egress.get("allow_domains"), "egress.allow_domains", _domain),
            deny=entries(egress.get("deny"), "egress.deny", _rule),
            cpus=self.cpus(limits.get("cpus")),
            memory_bytes=self.memory(limits.get("memory")),
            pids=self.pids(limits.get("pids")),
            extra_ro=tuple(Path(p) for p in entries(fs.get("extra_ro"), "filesystem.extra_ro", _extra_ro)),
            cpu_saturation=self.cpu_saturation(detect.get("cpu_saturation")),
        )

    # ---------------------------------------------------------------- structure

    def mapping(self, node: Node, path: str) -> dict[str, Node]:
        """The fields of a mapping, refusing unknown and repeated ones."""
        where = f"'{path}'" if path else "the top level"
        if not isinstance(node, MappingNode):
            if path and _kind(node) == "null":  # `limits:` with nothing under it
                return {}
            raise self.error(node, f"{where} must be a mapping of fields, not {_TYPE_NAMES[_kind(node)]}")
        known = _FIELDS[path]
        fields: dict[str, Node] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, ScalarNode) else None
            if name not in known or not isinstance(name, str):
                shown = repr(name) if name is not None else "(not a name)"
                raise self.error(key, f"unknown field {shown} under {where}; known: {', '.join(known)}")
            if name in fields:
                raise self.error(key, f"field '{_join(path, name)}' is given twice")
            fields[name] = value
        return fields

    def sequence(self, node: Node, field: str) -> list[Node]:
        if _kind(node) == "null":
            return []
        if not isinstance(node, SequenceNode):
            raise self.error(node, f"'{field}' must be a list, not {_TYPE_NAMES[_kind(node)]}")
        return list(node.value)

    def string(self, node: Node, field: str, what: str = "a string") -> str:
        if _kind(node) != "str":
            raise self.error(node, f"'{field}' must be {what}, not {_describe(node)}")
        return str(node.value)

    def entry(self, node: Node, field: str, check: _Check) -> str:
        text = self.string(node, field, what="a string (quote it)")
        try:
            return check(text, f"'{field}'")
        except CorralError as e:
            raise self.error(node, str(e)) from None

    def number(self, node: Node, field: str, kinds: tuple[str, ...], what: str) -> float | int:
        if _kind(node) not in kinds:
            raise self.error(node, f"'{field}' must be {what}, not {_describe(node)}")
        value: float | int = yaml.constructor.SafeConstructor().construct_object(node)
        if not 0 < value < float("inf"):
            raise self.error(node, f"'{field}' must be more than 0, not {node.value}")
        return value

    # ---------------------------------------------------------------- limits

    def cpus(self, node: Node | None) -> float | None:
        if node is None or _kind(node) == "null":
            return None
        return float(self.number(node, "limits.cpus", ("int", "float"), "a number of CPUs such as 2 or 0.5"))

    def pids(self, node: Node | None) -> int | None:
        if node is None or _kind(node) == "null":
            return None
        return int(self.number(node, "limits.pids", ("int",), "a whole number of processes"))

    def cpu_saturation(self, node: Node | None) -> tuple[float, float] | None:
        if node is None or _kind(node) == "null":
            return None
        given = self.mapping(node, "detect.cpu_saturation")
        missing = [f for f in ("percent", "seconds") if f not in given]
        if missing:
            raise self.error(node, f"'detect.cpu_saturation' needs {' and '.join(missing)}: "
                                   "e.g. {percent: 90, seconds: 60}")
        return (float(self.number(given["percent"], "detect.cpu_saturation.percent", ("int", "float"),
                                  "a percentage of one CPU such as 90 (above 100 for several threads)")),
                float(self.number(given["seconds"], "detect.cpu_saturation.seconds", ("int", "float"),
                                  "a number of seconds")))

    def memory(self, node: Node | None) -> int | None:
        if node is None or _kind(node) == "null":
            return None
        if _kind(node) == "int":  # a plain number is bytes, as cgroups take it
            return int(self.number(node, "limits.memory", ("int",), "a size"))
        text = self.string(node, "limits.memory", what="a size such as 512M or 2G")
        try:
            size = parse_size(text)
        except ValueError as e:
            raise self.error(node, f"'limits.memory': {e}") from None
        if size <= 0:
            raise self.error(node, f"'limits.memory' must be more than 0, not {text!r}")
        return size


def _rule(text: str, where: str) -> str:
    try:
        return str(Rule.parse(text))
    except ValueError as e:  # egress.RuleError is a ValueError and says which forms it takes
        host = text.strip().rsplit(":", 1)[0] if text.count(":") == 1 else text.strip()
        if any(c.isalpha() for c in host) and _is_domain(host):
            raise CorralError(f"{where}: {text!r} is a name, not an address; put names under "
                              "egress.allow_domains") from None
        raise CorralError(f"{where}: {e}") from None


def _domain(text: str, where: str) -> str:
    name = text.strip().rstrip(".").lower()
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        pass
    else:
        raise CorralError(f"{where}: {text!r} is an address; put addresses under egress.allow")
    if not _is_domain(name):
        port = " (names take no port)" if ":" in name else ""
        raise CorralError(f"{where}: {text!r} is not a domain name{port}; use a name like pypi.org, "
                          "or *.example.com for its subdomains")
    return name


def _is_domain(name: str) -> bool:
    try:
        labels = name.removeprefix("*.").encode("idna").decode().split(".")  # bücher.de -> xn--bcher-kva.de
    except UnicodeError:
        return False
    return len(name) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def _extra_ro(text: str, where: str) -> str:
    try:
        check_extra_ro(Path(text))
    except CorralError as e:
        raise CorralError(f"{where}: {e}") from None
    return text


def _union(first: Iterable[_T], more: Iterable[_T]) -> tuple[_T, ...]:
    return tuple(dict.fromkeys([*first, *more]))  # in order, without repeats


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "map"
    if isinstance(node, SequenceNode):
        return "seq"
    return str(node.tag).removeprefix(_TAG)  # str, int, float, bool, null, timestamp, or a custom !tag


def _describe(node: Node) -> str:
    kind = _kind(node)
    name = _TYPE_NAMES.get(kind, f"a {kind}")
    return f"{name} ({node.value!r})" if isinstance(node, ScalarNode) and kind != "null" else name


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _builtin_dir() -> resources.abc.Traversable:
    return resources.files("corral.sandbox") / "policies"

