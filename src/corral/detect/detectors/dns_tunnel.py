"""``dns_tunnel``: many long, random-looking names under one domain, or TXT-heavy querying.

DNS tunnels (iodine, dnscat2, exfiltration by lookups) encode data in the labels of names under a
domain the attacker's server answers for: ``<payload>.t.example.net``.  Each name is new, long and
close to random; normal names are short words and repeat.  So, per sandbox and registered domain
(the last two labels, three under suffixes like co.uk), the detector counts *distinct* names that
are long (a label of >= 20 characters or >= 50 in all) and of high entropy (>= 3.5 bits per
character in the part before the domain), and distinct names asked as TXT or NULL (the records
tunnels use to carry replies).  Defaults: 20 of either within 60 s.

Input: ``dns`` events (the sandbox resolver's questions: data ``name``, ``qtype``) and ``flow``
events the wire classified as DNS (data ``l7`` = "dns", ``dns_names``, ``dns_qtype``).
A name seen both ways counts once.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field

from corral import events as ev
from corral.detect.detectors._common import NS, Lru, due

#: public suffixes of two labels under which registrations are three labels deep
SECOND_LEVEL = frozenset(
    f"{sld}.{cc}"
    for cc in ("uk", "au", "nz", "jp", "kr", "br", "in", "cn", "za", "il", "tr", "mx", "ar", "id", "tw", "hk", "sg")
    for sld in ("co", "com", "net", "org", "ac", "gov", "edu", "ne", "or")
)
_TUNNEL_QTYPES = frozenset(("TXT", "NULL"))


def registered_domain(labels: list[str]) -> int:
    """How many trailing labels make the registered domain."""
    n = 3 if len(labels) >= 3 and ".".join(labels[-2:]) in SECOND_LEVEL else 2
    return min(n, len(labels))


def entropy(text: str) -> float:
    """Shannon entropy in bits per character."""
    if not text:
        return 0.0
    total = len(text)
    return -sum(c / total * math.log2(c / total) for c in Counter(text).values())


@dataclass(slots=True)
class _Domain:
    seen: deque[tuple[int, str, float, bool, bool]] = field(default_factory=deque)  # ts, name, H, odd, txt
    odd: dict[str, int] = field(default_factory=dict)  # long high-entropy name -> times in window
    txt: dict[str, int] = field(default_factory=dict)  # TXT/NULL name -> times in window
    entropy_sum: float = 0.0  # over the odd names in the window, once per distinct name
    reported_names: int = 0
    reported_txt: int = 0

    def add(self, item: tuple[int, str, float, bool, bool]) -> None:
        self.seen.append(item)
        _, name, h, odd, txt = item
        if odd:
            n = self.odd.get(name, 0)
            self.odd[name] = n + 1
            if n == 0:
                self.entropy_sum += h
        if txt:
            self.txt[name] = self.txt.get(name, 0) + 1

    def pop_oldest(self) -> None:
        _, name, h, odd, txt = self.seen.popleft()
        if odd:
            if self.odd[name] == 1:
                del self.odd[name]
                self.entropy_sum -= h
            else:
                self.odd[name] -= 1
        if txt:
            if self.txt[name] == 1:
                del self.txt[name]
            else:
                self.txt[name] -= 1


class DnsTunnelDetector:
    """Emits ``dns_tunnel`` (data: domain, names, entropy, txt) about the event that tipped it.

    ``names``: distinct long high-entropy names in the window; ``entropy``: their mean entropy;
    ``txt``: distinct names asked as TXT/NULL.  One event per sandbox and domain, another each
    time a count doubles.
    """

    kinds = frozenset((ev.DNS, ev.FLOW))

    def __init__(self, *, names: int = 20, txt: int = 20, window_s: float = 60.0, label_len: int = 20,
                 name_len: int = 50, min_entropy: float = 3.5, max_domains: int = 256,
                 max_names: int = 2048) -> None:
        """
        names, txt: distinct odd names, distinct TXT/NULL names, within ``window_s``, that conclude.
        label_len, name_len, min_entropy: what makes a name odd (a long label or a long name,
        and that many bits per character in the part before the registered domain).
        max_domains: domains followed per sandbox (least recently asked forgotten first).
        max_names: names kept per domain window.
        """
        self.names, self.txt, self.window_ns = names, txt, int(window_s * NS)
        self.label_len, self.name_len, self.min_entropy = label_len, name_len, min_entropy
        self.max_domains, self.max_names = max_domains, max_names
        self._sandboxes: dict[int, Lru[str, _Domain]] = {}

    def feed(self, event: ev.Event) -> list[ev.DerivedEvent]:
        if event.type not in self.kinds or not isinstance(event, ev.DerivedEvent):
            return []
        data = event.data
        if event.type == ev.DNS:
            names = [str(data.get("name", ""))]
        elif data.get("l7") == "dns":
            names = [str(n) for n in data.get("dns_names", ())]
        else:
            return []
        txt = str(data.get("qtype") or data.get("dns_qtype") or "").upper() in _TUNNEL_QTYPES
        out: list[ev.DerivedEvent] = []
        for name in names:
            found = self._question(event, name.lower().rstrip("."), txt)
            if found is not None:
                out.append(found)
        return out

    def _question(self, event: ev.DerivedEvent, name: str, txt: bool) -> ev.DerivedEvent | None:
        labels = name.split(".")
        if len(labels) < 3 or not all(labels):
            return None  # a bare domain carries no payload
        n = registered_domain(labels)
        sub = labels[:-n]
        if not sub:
            return None
        h = entropy("".join(sub))
        long = len(name) >= self.name_len or max(len(label) for label in sub) >= self.label_len
        odd = long and h >= self.min_entropy
        if not (odd or txt):
            return None  # normal names are never stored
        domain = ".".join(labels[-n:])
        key = event.sandbox_id or -event.cgroup_id
        table = self._sandboxes.get(key)
        if table is None:
            table = self._sandboxes[key] = Lru(self.max_domains)
        window = table.touch(domain, _Domain)
        since = event.ts_ns - self.window_ns
        while window.seen and window.seen[0][0] < since:
            window.pop_oldest()
        window.add((event.ts_ns, name, h, odd, txt))
        if len(window.seen) > self.max_names:
            window.pop_oldest()
        names, txts = len(window.odd), len(window.txt)
        if not (due(names, self.names, window.reported_names) or due(txts, self.txt, window.reported_txt)):
            return None
        window.reported_names = max(names, window.reported_names)
        window.reported_txt = max(txts, window.reported_txt)
        mean = window.entropy_sum / names if names else 0.0
        return ev.DerivedEvent.about("dns_tunnel", event, domain=domain, names=names, entropy=round(mean, 2),
                                     txt=txts)

    def tick(self, now_ns: int) -> list[ev.DerivedEvent]:
        since = now_ns - self.window_ns
        for key, table in list(self._sandboxes.items()):
            for domain in [d for d, w in table.items() if not w.seen or w.seen[-1][0] < since]:
                del table[domain]
            if not table:
                del self._sandboxes[key]
        return []
