"""Stateful detectors: conclusions drawn from many events, emitted as derived events for rules.

Each detector has ``feed(event)``, called for every event in kernel order (cheap: it looks only at
the event kinds in its ``kinds`` and keeps O(1) amortised work per event), and ``tick(now_ns)``,
called about every 0.5 s with CLOCK_BOOTTIME ns for conclusions that take time (a CPU still
pinned, a connection still open).  Both return derived events; none raises an alert itself.
Every threshold is a constructor parameter; every table is bounded.  A conclusion is emitted once
per process or step and target, and again only when it has grown (doubled).

``Detectors`` runs them all.
"""

from __future__ import annotations

from corral import events as ev
from corral.detect.detectors._common import Detector
from corral.detect.detectors.cpu import CpuSaturationDetector
from corral.detect.detectors.cred import CredThenEgressDetector
from corral.detect.detectors.dns_tunnel import DnsTunnelDetector
from corral.detect.detectors.outlives import OutlivesStepDetector
from corral.detect.detectors.scan import ScanDetector
from corral.detect.detectors.session import LongSessionDetector

__all__ = [
    "CpuSaturationDetector", "CredThenEgressDetector", "Detector", "Detectors", "DnsTunnelDetector",
    "LongSessionDetector", "OutlivesStepDetector", "ScanDetector",
]


class Detectors:
    """All the detectors, each fed only the event kinds it looks at.

    Pass an instance to tune one (``Detectors(scan=ScanDetector(hosts=20))``), or ``extra``
    detectors of your own.  Derived events the detectors emit are not fed back: none of them
    consumes another's output (``dns`` and ``flow`` come from the resolver and the wire).
    """

    def __init__(self, *, scan: ScanDetector | None = None, cpu: CpuSaturationDetector | None = None,
                 session: LongSessionDetector | None = None, cred: CredThenEgressDetector | None = None,
                 dns_tunnel: DnsTunnelDetector | None = None, outlives: OutlivesStepDetector | None = None,
                 extra: tuple[Detector, ...] = ()) -> None:
        self.scan = scan or ScanDetector()
        self.cpu = cpu or CpuSaturationDetector()
        self.session = session or LongSessionDetector()
        self.cred = cred or CredThenEgressDetector()
        self.dns_tunnel = dns_tunnel or DnsTunnelDetector()
        self.outlives = outlives or OutlivesStepDetector()
        self.all: tuple[Detector, ...] = (self.scan, self.cpu, self.session, self.cred, self.dns_tunnel,
                                          self.outlives, *extra)
        self._by_type: dict[int, list[Detector]] = {}
        for detector in self.all:
            for type_id in detector.kinds:
                self._by_type.setdefault(type_id, []).append(detector)
        self.kinds = frozenset(self._by_type)  # itself a Detector

    def feed(self, event: ev.Event) -> list[ev.DerivedEvent]:
        detectors = self._by_type.get(event.type)
        if not detectors:
            return []
        out: list[ev.DerivedEvent] = []
        for detector in detectors:
            out += detector.feed(event)
        return out

    def tick(self, now_ns: int) -> list[ev.DerivedEvent]:
        out: list[ev.DerivedEvent] = []
        for detector in self.all:
            out += detector.tick(now_ns)
        return out

    def step_ended(self, sandbox_id: int, step_id: int, now_ns: int) -> None:
        self.outlives.step_ended(sandbox_id, step_id, now_ns)
