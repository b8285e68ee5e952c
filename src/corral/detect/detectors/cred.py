"""``cred_then_egress``: a credential was read, then the same step sent something out.

Reading a canary is already an alert (rules match the ``open`` itself); reading one and then
sending is the shape of theft.  The two need not be the same process (``cat ~/.aws/credentials``
then ``curl``), so they are joined per step (sandbox + step) within N seconds (default 120).

What is a credential read: a successful open of one of the sandbox's canaries (the sensor matched
its inode: kind "canary"), or of a path that holds secrets by convention (kind "credential"):
private keys under ~/.ssh, cloud and registry credentials, .env files, another process's
/proc/<pid>/environ.  Files every tool reads in passing (~/.ssh/known_hosts, ssh config, public
keys) are left out.  What is egress: an IP connect or send to a non-loopback address (attempts
included: a connect the egress policy denied was still meant to carry the secret), or a ``flow``
going out.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

from corral import events as ev
from corral.detect.detectors._common import NS, Lru, StepKey, is_local, outbound, step_key

#: paths that hold secrets by convention (searched anywhere in the path, so any home counts)
CREDENTIAL_PATH = re.compile(
    r"/\.ssh/(?!known_hosts|config$|authorized_keys|[^/]*\.pub$)[^/]+$"  # private keys, not what ssh reads anyway
    r"|/\.aws/credentials$|/\.config/gcloud/.*(credential|\.json$|\.db$)|/\.azure/"
    r"|/\.kube/config$|/\.docker/config\.json$|/\.git-credentials$|/\.netrc$|/\.pypirc$"
    r"|/\.env(\.[^/]*)?$|/\.local/share/keyrings/|/\.bitcoin/.*wallet|/\.ethereum/keystore/|/\.electrum/wallets/"
    r"|^/var/run/secrets/|^/run/secrets/|^/etc/shadow$|^/etc/gshadow$"
)
_ENVIRON = re.compile(r"^/proc/(\d+)/(?:task/\d+/)?environ$")


@dataclass(slots=True)
class _Step:
    reads: dict[str, tuple[int, str]] = field(default_factory=dict)  # path -> (ts_ns, kind), oldest first
    reported: dict[str, None] = field(default_factory=dict)  # paths already concluded, oldest first


def credential_kind(event: ev.FileEvent) -> str | None:
    """"canary", "credential" or None for an open event."""
    if "inode" in event.match:
        return "canary"
    path = event.path
    if CREDENTIAL_PATH.search(path):
        return "credential"
    m = _ENVIRON.match(path)
    if m and int(m[1]) != event.pid:  # /proc/self/environ and one's own are harmless
        return "credential"
    return None


class CredThenEgressDetector:
    """Emits ``cred_then_egress`` (data: path, kind, seconds, dip, dport) about the sending process.

    One event per step and credential path.
    """

    kinds = frozenset((ev.OPEN, ev.CONNECT, ev.SEND, ev.FLOW))

    def __init__(self, *, seconds: float = 120.0, before_s: float = 10.0, max_steps: int = 1024,
                 max_paths: int = 64, max_senders: int = 4096) -> None:
        """
        seconds: how long after the read an egress still counts.
        before_s: how long before the read an egress by the same process still counts: an
            uploader connects first and reads what it sends after (curl -F file=@...).
        max_steps: steps remembered at once (least recently active forgotten first).
        max_paths: credential paths remembered per step, read and reported (oldest forgotten first).
        max_senders: processes whose last egress is remembered.
        """
        self.window_ns = int(seconds * NS)
        self.before_ns = int(before_s * NS)
        self.max_paths = max_paths
        self._steps: Lru[StepKey, _Step] = Lru(max_steps)
        self._last_egress: Lru[tuple[int, int], tuple[int, tuple[str, int]]] = Lru(max_senders)
        # every read, oldest first, for tick() to expire: it looks at what is due, not at every step
        # (with hundreds of sandboxes, each step that read a canary was looked at twice a second)
        self._expiry: deque[tuple[int, StepKey, str]] = deque()
        self._max_expiry = max_steps * max_paths

    def feed(self, event: ev.Event) -> list[ev.DerivedEvent]:
        t = event.type
        if t == ev.OPEN:
            if isinstance(event, ev.FileEvent) and event.result >= 0:
                kind = credential_kind(event)
                if kind is not None:
                    key = step_key(event)
                    step = self._steps.touch(key, _Step)
                    reads = step.reads
                    reads.pop(event.path, None)
                    reads[event.path] = (event.ts_ns, kind)
                    self._expiry.append((event.ts_ns, key, event.path))
                    if len(self._expiry) > self._max_expiry:  # re-reads left stale entries: keep the live
                        self._expiry = deque(sorted((ts, k, path) for k, st in self._steps.items()
                                                    for path, (ts, _kind) in st.reads.items()))
                    if len(reads) > self.max_paths:
                        del reads[next(iter(reads))]
                    return self._sent_before(event, step, kind)
            return []
        dest = self._egress(event)
        if dest is None:
            return []
        self._last_egress.put((event.sandbox_id, event.pid), (event.ts_ns, dest))
        if not self._steps:
            return []  # nothing read: the common case for every connect and send
        current = self._steps.get(step_key(event))
        if current is None:
            return []
        step = current
        out: list[ev.DerivedEvent] = []
        for path, (ts, kind) in list(step.reads.items()):
            age = event.ts_ns - ts
            if age > self.window_ns:
                del step.reads[path]
            elif path not in step.reported and age >= 0:
                step.reported[path] = None
                if len(step.reported) > self.max_paths:
                    del step.reported[next(iter(step.reported))]
                out.append(ev.DerivedEvent.about("cred_then_egress", event, path=path, kind=kind,
                                                 seconds=round(age / NS, 3), dip=dest[0], dport=dest[1]))
        return out

    def _sent_before(self, event: ev.FileEvent, step: _Step, kind: str) -> list[ev.DerivedEvent]:
        """The reading process already sent out (seconds before): conclude now."""
        last = self._last_egress.get((event.sandbox_id, event.pid))
        if last is None or event.path in step.reported:
            return []
        ts, dest = last
        age = event.ts_ns - ts
        if not 0 <= age <= self.before_ns:
            return []
        step.reported[event.path] = None
        if len(step.reported) > self.max_paths:
            del step.reported[next(iter(step.reported))]
        return [ev.DerivedEvent.about("cred_then_egress", event, path=event.path, kind=kind,
                                      seconds=-round(age / NS, 3), dip=dest[0], dport=dest[1])]

    @staticmethod
    def _egress(event: ev.Event) -> tuple[str, int] | None:
        if event.type == ev.FLOW:
            data = event.data if isinstance(event, ev.DerivedEvent) else {}
            dip = str(data.get("dip", ""))
            if data.get("direction") != "out" or is_local(dip):
                return None
            return dip, int(data.get("dport", 0))
        net = outbound(event)
        return None if net is None else (net.addr, net.port)

    def tick(self, now_ns: int) -> list[ev.DerivedEvent]:
        since = now_ns - self.window_ns
        expiry = self._expiry
        while expiry and expiry[0][0] < since:
            ts, key, path = expiry.popleft()
            step = self._steps.get(key)
            if step is None:
                continue  # forgotten already (the least recent, past max_steps)
            read = step.reads.get(path)
            if read is not None and read[0] == ts:  # (not read again since)
                del step.reads[path]
            if not step.reads and not step.reported:
                del self._steps[key]  # (what was reported stays, until the step is the least recent)
        return []
