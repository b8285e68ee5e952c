"""The reader's sleep: after a quiet spell it asks the kernel to wake it, and the next record does."""

from __future__ import annotations

import os
import subprocess

from corral.sensor.cgroups import ScratchCgroup
from corral.sensor.sensor import Sensor


def test_a_sleeping_reader_is_woken_by_the_next_record_and_only_then() -> None:
    with Sensor() as sensor:
        cg = ScratchCgroup(f"test-wake-{os.getpid()}")
        try:
            sensor.watch_cgroup(cg.id)

            def records_from_true() -> None:
                sensor.read()
                sensor.ring.wait(0)  # forget any readiness left from before
                subprocess.run(["/bin/true"], preexec_fn=lambda: cg.add(os.getpid()), check=True)
                assert sensor.ring.pending() > 0

            # Polling (the flag down): records wait in the ring, nobody is woken for them.
            records_from_true()
            assert not sensor.ring.wait(0)
            # Asleep (the flag up): the first record wakes the reader and takes the flag down.
            sensor._asleep[0:4] = b"\1\0\0\0"
            records_from_true()
            assert sensor._asleep[0:4] == b"\0\0\0\0"
            assert sensor.ring.wait(0)
            assert {e.kind for e in sensor.read()} >= {"exec", "exit"}
        finally:
            cg.remove()
