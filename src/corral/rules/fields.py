"""The fields rules read, and a fast getter for each on each kind of event.

docs/rules.md ("Fields") is the contract; this module is its implementation.  A getter
is a closure over one event that returns the field's value, or None when the field does
not apply (so every comparison on it is false).  Getters are made once per (kind, field,
index) and shared by every rule of that kind, which lets the costly ones (decoding a
path, joining argv, walking ancestry) remember their last event: the twenty exec rules
an exec event meets decode its argv once, not twenty times, and no dict is built per
event.  Rules compile per event kind (the loader indexes them by kind), so a getter
never has to ask what kind of event it was given.

Where values come from:

* ``proc.*``: exec events describe the *new* image (``ExecEvent.filename/argv/cwd``).
  Other kernel events take exe/argv/cwd from ``event.proc`` (the process table's view)
  and pid/ppid/uid/comm from the event header, which the kernel filled at the moment of
  the event (a later setuid or reparenting does not rewrite history).  Derived events
  prefer ``event.proc`` and fall back to their header (a detector may not fill it).
  ``proc.pname`` / ``proc.aname[N]`` come from the injected ``ancestors(pid)``.
* ``net.domain``, ``sandbox.name/mode``, ``step.cmdline``, ``episode.id``,
  ``file.canary(_kind)``: from the injected Context (the runner knows them; the kernel
  does not).
* Derived events: ``event.data`` under the field's last part (``scan.hosts`` ->
  ``data["hosts"]``, ``net.l7`` -> ``data["l7"]``), as corral.events.DerivedEvent says.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Protocol

from corral import events as ev
from corral.enrich.proctable import Process
from corral.rules.language import Constant, FieldError, Getter, Resolver


class Context(Protocol):
    """What the runner knows about sandboxes that events do not carry."""

    def domain_of(self, sandbox_id: int, ip: str) -> str | None:
        """The DNS name that resolved to ``ip`` in this sandbox, if any."""

    def sandbox_name(self, sandbox_id: int) -> str | None: ...

    def sandbox_mode(self, sandbox_id: int) -> str | None:
        """``observe`` or ``enforce``."""

    def step_cmdline(self, sandbox_id: int, step_id: int) -> str | None: ...

    def step_started_ns(self, sandbox_id: int, step_id: int) -> int | None:
        """When the step began, ns since the epoch."""

    def episode(self, sandbox_id: int) -> str | None: ...

    def canary_kind(self, dev: int, ino: int) -> str | None:
        """Which canary (``aws``, ``ssh``...) this inode is, or None when it is none."""


class NullContext:
    """A Context that knows nothing: every such field is missing."""

    def domain_of(self, sandbox_id: int, ip: str) -> str | None:
        return None

    def sandbox_name(self, sandbox_id: int) -> str | None:
        return None

    def sandbox_mode(self, sandbox_id: int) -> str | None:
        return None

    def step_cmdline(self, sandbox_id: int, step_id: int) -> str | None:
        return None

    def step_started_ns(self, sandbox_id: int, step_id: int) -> int | None:
        return None

    def episode(self, sandbox_id: int) -> str | None:
        return None

    def canary_kind(self, dev: int, ino: int) -> str | None:
        return None


Ancestors = Callable[[int], Sequence[Process]]

# ------------------------------------------------------------------ event kinds

ALL: frozenset[str] = ev.KINDS
DERIVED: frozenset[str] = frozenset(name for type_id, name in ev.KIND_NAMES.items() if type_id > ev.DROP)
KERNEL: frozenset[str] = ALL - DERIVED
NET: frozenset[str] = frozenset({"connect", "send", "bind", "listen", "accept", "dup_socket"})
#: net kinds whose address and port are the remote end (bind and listen: the local one)
PEER: frozenset[str] = NET - {"bind", "listen"}
FILE: frozenset[str] = frozenset({"open", "unlink", "rename"})
#: derived kinds about one connection, carrying net.* in their data
FLOWISH: frozenset[str] = frozenset({"flow", "long_session", "cred_then_egress"})

#: fields with a handful of values, most events having one of them: rules that require one
#: of those values are better screened on anything else they require (language.Compiler)
COARSE = frozenset({"net.family", "net.proto", "net.direction", "net.l7", "proc.uid", "step.id", "sandbox.mode",
                    "dns.qtype", "mount.op", "ns.op", "setuid.op", "module.op", "denied.match", "limit.resource"})

#: ExecEvent.flags: the bits saying fd 0, 1 or 2 was a socket (ExecEvent.stdio_sockets)
_STDIO_SOCKETS = 0b1110

#: where an executable is one the agent could have written (proc.exe_writable)
WRITABLE_PREFIXES = ("/tmp/", "/var/tmp/", "/dev/shm/", "/workspace/", "/home/", "/root/", "/run/user/",
                     "memfd:", "/memfd:")

#: inode times come from the kernel's coarse clock, up to a tick (4-10 ms) behind the one that
#: timed the step's start: a file written as the step began may look that much older
_CTIME_SLACK_NS = 10_000_000

# ---------------------------------------------------------------- field table

_Factory = Callable[["FieldRegistry", str, "int | None"], "Getter | None"]


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kinds: frozenset[str]
    factory: _Factory
    indexable: bool = False


FIELDS: dict[str, FieldSpec] = {}


def _field(name: str, kinds: frozenset[str], *, indexable: bool = False) -> Callable[[_Factory], _Factory]:
    def register(factory: _Factory) -> _Factory:
        old = FIELDS.get(name)
        if old is None:
            FIELDS[name] = FieldSpec(name, kinds, factory, indexable)
        else:  # the same field on more kinds, computed differently (net.dip: kernel vs flow)
            prev = old.factory

            def either(reg: FieldRegistry, kind: str, index: int | None) -> Getter | None:
                return factory(reg, kind, index) if kind in kinds else prev(reg, kind, index)
            FIELDS[name] = FieldSpec(name, old.kinds | kinds, either, indexable or old.indexable)
        return factory
    return register


def _simple(name: str, kinds: frozenset[str], make: Callable[[FieldRegistry, str], Getter]) -> None:
    """Register a field without an index."""
    _field(name, kinds)(lambda reg, kind, index: make(reg, kind) if index is None else None)


def memo(fn: Getter) -> Getter:
    """``fn`` remembering its last event, so rules sharing a getter compute it once per event.

    The (event, value) pair is replaced in one assignment, so concurrent callers never
    see one event's value under another event; holding the last event alive is what
    makes the ``is`` test safe against a new event reusing a freed one's address.
    """
    last: tuple[Any, Any] = (None, None)

    def get(e: Any) -> Any:
        nonlocal last
        m = last
        if m[0] is e:
            return m[1]
        value = fn(e)
        last = (e, value)
        return value
    return get


_missing = Constant(None)


def _data(key: str) -> Getter:
    return lambda e: e.data.get(key)


# evt.*

_simple("evt.type", ALL, lambda reg, kind: Constant(kind))
_simple("evt.time", ALL, lambda reg, kind: attrgetter("time_ns"))
_simple("evt.res", NET | FILE, lambda reg, kind: attrgetter("result"))
_simple("evt.failed", NET | FILE, lambda reg, kind: lambda e: e.result < 0)


# proc.*: the header (kernel kinds) or the process (derived kinds, header as fallback)

def _from_header(attr: str) -> Callable[[FieldRegistry, str], Getter]:
    def make(reg: FieldRegistry, kind: str) -> Getter:
        if kind in KERNEL:
            return memo(attrgetter(attr)) if attr == "comm" else attrgetter(attr)
        header = attrgetter(attr)
        return lambda e: getattr(e.proc, attr) if e.proc is not None else header(e)
    return make


for _field_name, _attr in (("proc.pid", "pid"), ("proc.ppid", "ppid"), ("proc.uid", "uid"),
                           ("proc.comm", "comm")):
    _simple(_field_name, ALL, _from_header(_attr))


def _exe(reg: FieldRegistry, kind: str) -> Getter:
    if kind == "exec":
        return memo(lambda e: e.filename or None)
    return lambda e: (e.proc.exe or None) if e.proc is not None else None


def _argv(reg: FieldRegistry, kind: str) -> Getter:
    if kind == "exec":
        return memo(lambda e: e.argv or None)
    return lambda e: (e.proc.argv or None) if e.proc is not None else None


def _name(reg: FieldRegistry, kind: str) -> Getter:
    if kind == "exec":  # the base name of proc.exe (decoded once for both), else the task name
        exe, comm = reg.need(kind, "proc.exe"), reg.need(kind, "proc.comm")
        return memo(lambda e: (x[x.rfind("/") + 1:] if (x := exe(e)) is not None else "") or comm(e))
    return memo(lambda e: e.proc.name if e.proc is not None else e.comm)


def _cwd(reg: FieldRegistry, kind: str) -> Getter:
    if kind == "exec":
        return memo(lambda e: e.cwd or None)
    return lambda e: (e.proc.cwd or None) if e.proc is not None else None


_simple("proc.exe", ALL, _exe)
_simple("proc.name", ALL, _name)
_simple("proc.cwd", ALL, _cwd)


def _argv_item(argv: Getter, n: int) -> Getter:
    def get(e: Any) -> Any:
        a = argv(e)
        return a[n] if a is not None and len(a) > n else None
    return get


@_field("proc.argv", ALL, indexable=True)
def _proc_argv(reg: FieldRegistry, kind: str, index: int | None) -> Getter:
    if index is None:
        return _argv(reg, kind)
    return _argv_item(reg.need(kind, "proc.argv"), index)


@_field("proc.args", ALL, indexable=True)
def _proc_args(reg: FieldRegistry, kind: str, index: int | None) -> Getter:
    argv = reg.need(kind, "proc.argv")
    if index is not None:
        return _argv_item(argv, index)  # proc.args[N] is argv[N], as in Falco
    args = memo(lambda e: " ".join(a[1:]) if (a := argv(e)) is not None else None)
    reg.part_of[args] = reg.need(kind, "proc.cmdline")  # argv joined, and args is argv[1:] joined
    return args


def _cmdline(reg: FieldRegistry, kind: str) -> Getter:
    argv = reg.need(kind, "proc.argv")
    if kind == "exec":
        return memo(lambda e: " ".join(a) if (a := argv(e)) else e.filename or None)
    return memo(lambda e: e.proc.cmdline if e.proc is not None else None)


_simple("proc.cmdline", ALL, _cmdline)


def _writable(reg: FieldRegistry, kind: str) -> Getter:
    exe = reg.need(kind, "proc.exe")

    def get(e: Any) -> bool | None:
        path = exe(e)
        return None if path is None else path.startswith(WRITABLE_PREFIXES) or "(deleted)" in path
    return get


_simple("proc.exe_writable", ALL, _writable)


def _written_in_step(reg: FieldRegistry, kind: str) -> Getter:
    started = reg.context.step_started_ns

    def get(e: ev.ExecEvent) -> bool | None:
        began = started(e.sandbox_id, e.step_id)
        if began is None or not e.exe_ctime_ns:
            return None
        return e.exe_ctime_ns + _CTIME_SLACK_NS >= began
    return get


_simple("proc.exe_written_in_step", frozenset({"exec"}), _written_in_step)
_simple("proc.stdio_socket", frozenset({"exec"}), lambda reg, kind: lambda e: e.flags & _STDIO_SOCKETS != 0)


def _pname(reg: FieldRegistry, kind: str) -> Getter:
    chain = reg.ancestry
    return lambda e: a[0].name if (a := chain(e)) else None


_simple("proc.pname", ALL, _pname)


@_field("proc.aname", ALL, indexable=True)
def _proc_aname(reg: FieldRegistry, kind: str, index: int | None) -> Getter:
    """proc.aname[N]: the N-th ancestor's name (0: the process, 1: parent); bare: all of them."""
    chain = reg.ancestry
    if index is None:
        return lambda e: [p.name for p in chain(e)]
    if index == 0:
        return reg.need(kind, "proc.name")
    n = index - 1
    return lambda e: a[n].name if len(a := chain(e)) > n else None


# net.*: kernel socket events

def _family(reg: FieldRegistry, kind: str) -> Getter:
    return memo(attrgetter("family")) if kind in NET else _data("family")


def _kernel_net(name: str, kinds: frozenset[str], make: Callable[[Getter], Getter]) -> None:
    _simple(name, kinds, lambda reg, kind: make(reg.need(kind, "net.family")))


_simple("net.family", NET | FLOWISH, _family)
_kernel_net("net.dip", PEER, lambda fam: memo(lambda e: e.addr or None))
_kernel_net("net.dport", PEER, lambda fam: lambda e: None if fam(e) == "unix" else e.port)
_kernel_net("net.sport", PEER, lambda fam: lambda e: None if fam(e) == "unix" else e.local_port)
_kernel_net("net.sport", frozenset({"bind", "listen"}), lambda fam: lambda e: None if fam(e) == "unix" else e.port)
_kernel_net("net.unix_path", NET, lambda fam: lambda e: (e.unix_path or None) if fam(e) == "unix" else None)


def _proto(fam: Getter) -> Getter:
    def get(e: Any) -> str:
        if fam(e) == "unix":
            return "unix"
        t = e.sock_type
        return "tcp" if t == "stream" else "udp" if t == "dgram" else str(t)
    return memo(get)


_kernel_net("net.proto", NET, _proto)
_simple("dup.fd", frozenset({"dup_socket"}), lambda reg, kind: attrgetter("target_fd"))

# net.*: derived events about one connection
def _data_field(name: str, kinds: frozenset[str], key: str) -> None:
    _simple(name, kinds, lambda reg, kind: _data(key))


def _property_field(name: str, kind: str, attr: str) -> None:
    _simple(name, frozenset({kind}), lambda reg, k: attrgetter(attr))


for _key in ("dip", "dport", "sport", "proto", "unix_path", "l7", "sni", "http_host", "http_request",
             "http_response", "direction", "payload", "ssh_banner", "stratum_method", "stratum_agent",
             "dns_names", "dns_qtype", "dns_answers"):
    _data_field(f"net.{_key}", FLOWISH, _key)


@_field("net.domain", PEER | FLOWISH)
def _domain(reg: FieldRegistry, kind: str, index: int | None) -> Getter | None:
    if index is not None:
        return None
    dip = reg.need(kind, "net.dip")
    domain_of = reg.context.domain_of

    def get(e: Any) -> str | None:
        if kind in FLOWISH and (known := e.data.get("domain")) is not None:
            return str(known)
        ip = dip(e)
        return domain_of(e.sandbox_id, ip) if ip else None
    return get


# file.*

_simple("file.path", FILE, lambda reg, kind: memo(lambda e: e.path or None))
_simple("file.path2", FILE, lambda reg, kind: memo(lambda e: e.path2 or None))
_simple("file.flags", frozenset({"open"}), lambda reg, kind: attrgetter("flags"))
_simple("file.writable", frozenset({"open"}), lambda reg, kind: attrgetter("writable"))
_simple("file.truncated", frozenset({"open"}), lambda reg, kind: attrgetter("truncates"))


def _canary_kind(reg: FieldRegistry, kind: str) -> Getter:
    lookup = reg.context.canary_kind
    return lambda e: lookup(e.dev, e.ino) if e.ino else None


_simple("file.canary_kind", FILE, _canary_kind)
_simple("file.canary", FILE, lambda reg, kind: (lambda k: lambda e: k(e) is not None)(
    reg.need(kind, "file.canary_kind")))

# sandbox.*, step.*, episode.*


def _ctx(method: str, *attrs: str) -> Callable[[FieldRegistry, str], Getter]:
    def make(reg: FieldRegistry, kind: str) -> Getter:
        call = getattr(reg.context, method)
        args = attrgetter(*attrs)
        if len(attrs) == 1:
            return lambda e: call(args(e))
        return lambda e: call(*args(e))
    return make


_simple("sandbox.id", ALL, lambda reg, kind: attrgetter("sandbox_id"))
_simple("sandbox.name", ALL, _ctx("sandbox_name", "sandbox_id"))
_simple("sandbox.mode", ALL, _ctx("sandbox_mode", "sandbox_id"))
_simple("step.id", ALL, lambda reg, kind: attrgetter("step_id"))
_simple("step.cmdline", ALL, _ctx("step_cmdline", "sandbox_id", "step_id"))
_simple("episode.id", ALL, _ctx("episode", "sandbox_id"))

# one kind each: the typed properties of corral.events
_PROPERTIES: dict[str, tuple[str, str]] = {
    "signal.target_pid": ("signal", "target_pid"), "signal.sig": ("signal", "signal"),
    "ptrace.request": ("ptrace", "request"), "ptrace.target_pid": ("ptrace", "target_pid"),
    "mount.op": ("mount", "op"), "mount.target": ("mount", "target"),
    "mount.source": ("mount", "source"), "mount.fstype": ("mount", "fstype"),
    "ns.op": ("ns", "op"), "ns.types": ("ns", "namespaces"),
    "bpf.cmd": ("bpf", "cmd"), "module.op": ("module_load", "op"),
    "setuid.op": ("setuid", "op"), "setuid.ids": ("setuid", "ids"),
    "memfd.name": ("memfd_exec", "memfd_name"), "drop.count": ("drop", "count"),
}
for _field_name, (_kind, _attr) in _PROPERTIES.items():
    _property_field(_field_name, _kind, _attr)

# derived events: data[...] by the field's last part
_DATA: dict[str, tuple[str, ...]] = {
    "dns": ("dns.name", "dns.qtype", "dns.allowed", "dns.answers", "dns.rcode"),
    "scan": ("scan.hosts", "scan.ports", "scan.attempts", "scan.failed", "scan.window_s", "scan.targets",
             "scan.scope"),
    "cpu_saturation": ("cpu.percent", "cpu.seconds", "cpu.peers", "cpu.policy"),
    "long_session": ("session.seconds",),
    "cred_then_egress": ("cred.path", "cred.kind", "cred.seconds"),
    "dns_tunnel": ("tunnel.domain", "tunnel.names", "tunnel.entropy", "tunnel.txt"),
    "outlives_step": ("outlives.seconds",),
    "exec_denied": ("denied.filename", "denied.path", "denied.match", "denied.rule", "denied.enforced"),
    "limit_hit": ("limit.resource", "limit.count", "limit.total"),
}
for _kind, _names in _DATA.items():
    for _field_name in _names:
        _data_field(_field_name, frozenset({_kind}), _field_name.split(".", 1)[1])

# ------------------------------------------------------------------- registry


class FieldRegistry:
    """Getters for real events, made once per (kind, field, index) and shared."""

    def __init__(self, context: Context | None = None, ancestors: Ancestors | None = None) -> None:
        self.context: Context = context if context is not None else NullContext()
        self._ancestors: Ancestors = ancestors or (lambda pid: ())
        self._getters: dict[tuple[str, str, int | None], Getter | None] = {}
        #: getter -> the getter of a field whose value holds this one's whenever it is a
        #: string (so a search for a text in one can be a search in the other)
        self.part_of: dict[Getter, Getter] = {}
        #: getters of the COARSE fields
        self.coarse: set[Getter] = set()
        lookup = self._ancestors

        def chain(e: Any) -> Sequence[Process]:
            pid = e.pid or (e.proc.pid if e.proc is not None else 0)
            return lookup(pid) if pid else ()
        #: the event's process's ancestors, nearest first (one walk per event)
        self.ancestry: Getter = memo(chain)

    def getter(self, kind: str, name: str, index: int | None = None) -> Getter | None:
        """The getter for ``name`` (``[index]``) on events of ``kind``; None if it has none."""
        key = (kind, name, index)
        if key in self._getters:
            return self._getters[key]
        getter: Getter | None = None
        if (spec := FIELDS.get(name)) is not None and kind in spec.kinds:
            getter = spec.factory(self, kind, index)
            if name in COARSE and getter is not None:
                self.coarse.add(getter)
        self._getters[key] = getter
        return getter

    def need(self, kind: str, name: str) -> Getter:
        """The getter of a field that one field's getter is built on (so they share its memo)."""
        getter = self.getter(kind, name)
        assert getter is not None, (kind, name)
        return getter

    def resolver(self, kind: str, also: Sequence[str] = ()) -> Resolver:
        """A resolver for conditions evaluated on ``kind`` events.

        ``also``: the other kinds the same condition is compiled for (a rule with
        ``event: [connect, flow]``); a field of one of them that ``kind`` lacks is a
        missing value here, not an error.  A field on none of them raises FieldError.
        """
        if kind not in ALL:
            raise ValueError(f"unknown event kind {kind!r}")
        kinds = [kind, *(k for k in also if k != kind)]

        def resolve(name: str, index: int | None) -> Getter | None:
            getter = self.getter(kind, name, index)
            if getter is not None:
                return getter
            spec = FIELDS.get(name)
            if spec is None or (index is not None and not spec.indexable):
                return None
            if spec.kinds & set(kinds):
                return _missing
            raise FieldError(f"field {name} does not exist on {', '.join(kinds)} events; "
                             f"it exists on: {', '.join(sorted(spec.kinds))}")
        return resolve

    def known_fields(self, kind: str) -> list[str]:
        """Names of the fields of ``kind`` events, sorted."""
        return sorted(name for name, spec in FIELDS.items() if kind in spec.kinds)

    @staticmethod
    def kinds_of(name: str) -> frozenset[str]:
        spec = FIELDS.get(name)
        return spec.kinds if spec is not None else frozenset()

    @staticmethod
    def takes_index(name: str) -> bool:
        spec = FIELDS.get(name)
        return spec is not None and spec.indexable


# ------------------------------------------------------------- examples


class ExampleResolver:
    """Resolves fields from a plain dict of example values (a rule's ``examples``).

    Keys are field names (``proc.name``, ``net.dport``); a missing key is a missing
    value.  So that examples stay short, some fields are derived when not given:

    * ``proc.args[N]`` / ``proc.argv[N]``: the key itself (``"proc.args[1]": "-R"``),
      else ``proc.argv[N]``, else word N of ``proc.cmdline``, else word N-1 of
      ``proc.args`` (words split on spaces);
    * ``proc.argv``: the list, else ``proc.cmdline`` split on spaces;
    * ``proc.args``: argv[1:] joined; ``proc.cmdline``: argv joined;
    * ``proc.name``: the base name of ``proc.exe``, else of argv[0];
    * ``proc.aname[N]``: the key itself, else item N-1 of ``proc.anames`` (a list of
      ancestor names, parent first; ``proc.aname`` works as the same list), else
      ``proc.pname`` for N = 1; ``proc.aname[0]`` is ``proc.name``;
      ``proc.pname``: item 0 of ``proc.anames``;
    * ``evt.failed``: ``evt.res < 0``; ``file.canary``: ``file.canary_kind`` is given.
    """

    #: keys allowed in examples beyond real field names
    EXTRA_KEYS = ("proc.anames",)

    def __call__(self, name: str, index: int | None) -> Getter:
        key = name if index is None else f"{name}[{index}]"
        derive = self._derivation(name, index)
        return lambda ex: ex[key] if key in ex else derive(ex)

    def _derivation(self, name: str, index: int | None) -> Callable[[Mapping[str, Any]], Any]:
        if name in ("proc.args", "proc.argv") and index is not None:
            return lambda ex: _item(_argv_of(ex), index)
        if name == "proc.aname" and index is not None:
            if index == 0:
                return self("proc.name", None)
            return lambda ex: _item(_anames(ex), index - 1)
        derived: dict[str, Callable[[Mapping[str, Any]], Any]] = {
            "proc.argv": _argv_of,
            "proc.args": lambda ex: " ".join(map(str, a[1:])) if (a := _argv_of(ex)) is not None else None,
            "proc.cmdline": lambda ex: " ".join(map(str, a)) if (a := _argv_of(ex, False)) is not None else None,
            "proc.name": _example_name,
            "proc.pname": lambda ex: _item(_anames(ex), 0),
            "proc.aname": _anames,
            "evt.failed": lambda ex: ex["evt.res"] < 0 if isinstance(ex.get("evt.res"), int) else None,
            "file.canary": lambda ex: ex["file.canary_kind"] is not None if "file.canary_kind" in ex else None,
        }
        return derived.get(name, lambda ex: None)


def _item(seq: Sequence[Any] | None, n: int) -> Any:
    return seq[n] if seq is not None and len(seq) > n else None


def _words(value: Any) -> list[str] | None:
    return str(value).split() if value is not None else None


def _argv_of(ex: Mapping[str, Any], from_args: bool = True) -> list[Any] | None:
    if isinstance(ex.get("proc.argv"), (list, tuple)):
        return list(ex["proc.argv"])
    if "proc.cmdline" in ex:
        return _words(ex["proc.cmdline"])
    if from_args and "proc.args" in ex:
        # argv[0] unknown: the name stands in for it, so argv[N] is args word N-1
        return [ex.get("proc.name") or ex.get("proc.exe") or "", *(_words(ex["proc.args"]) or [])]
    return None


def _anames(ex: Mapping[str, Any]) -> list[Any] | None:
    for key in ("proc.anames", "proc.aname"):
        if isinstance(ex.get(key), (list, tuple)):
            return list(ex[key])
    return [ex["proc.pname"]] if "proc.pname" in ex else None


def _example_name(ex: Mapping[str, Any]) -> Any:
    if ex.get("proc.exe"):
        return os.path.basename(str(ex["proc.exe"]))
    argv = _argv_of(ex, False)
    return os.path.basename(str(argv[0])) if argv else None
