"""The sensor's machinery: layouts vs BTF, drops, scope, host checks, the CLI."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import python, run_in_cgroup

from corral import events as ev
from corral.errors import HostError
from corral.monitor import Monitor
from corral.sensor import records
from corral.sensor.cgroups import ScratchCgroup
from corral.sensor.libbpf import BpfObject, LibbpfError
from corral.sensor.sensor import Sensor, layout_mismatches, object_path

CORRAL = str(Path(sys.executable).parent / "corral")


def test_python_layouts_match_the_compiled_object_btf() -> None:
    obj = BpfObject(str(object_path()))
    try:
        assert layout_mismatches(obj) == []
    finally:
        obj.close()


def test_layout_check_catches_a_drifted_member(monkeypatch: pytest.MonkeyPatch) -> None:
    fmt, members = records.LAYOUTS["net_event"]
    # as if someone widened `fd` in Python only
    monkeypatch.setitem(records.LAYOUTS, "net_event", (fmt.replace("iIHH", "iQHH", 1), members))
    monkeypatch.setitem(records.STRUCTS, "net_event", records.struct.Struct(
        "<" + records.HEADER_FORMAT + fmt.replace("iIHH", "iQHH", 1)))
    obj = BpfObject(str(object_path()))
    try:
        problems = layout_mismatches(obj)
    finally:
        obj.close()
    assert any(p.startswith("net_event.family: offset 72 in BTF, 80 in Python") for p in problems), problems


def test_full_ring_buffer_reports_drops_not_silence() -> None:
    with Sensor(ring_size=1 << 14) as sensor:  # 16 KiB: about 70 connect records
        cg = ScratchCgroup(f"test-drops-{os.getpid()}")
        try:
            sensor.watch_cgroup(cg.id)
            storm = python("import socket\nfor _ in range(3000):\n"
                           "    s = socket.socket(); s.connect_ex(('127.0.0.1', 1)); s.close()")
            subprocess.run(storm, preexec_fn=lambda: cg.add(os.getpid()), check=True)
            batch: list[ev.Event] = []
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any(isinstance(e, ev.DropEvent) for e in batch):
                time.sleep(0.11)  # drop counters are read at most every 0.1 s
                batch += sensor.read()
        finally:
            cg.remove()
    drops = [e for e in batch if isinstance(e, ev.DropEvent)]
    assert drops, "a full ring must be reported"
    connects = sum(1 for e in batch if e.kind == "connect")
    assert drops[0].count > 1000 and connects < 3000
    assert drops[0].count + connects >= 3000 - 5  # what was not delivered was counted
    assert sensor.drops_total == drops[-1].total


def test_host_wide_mode_sees_unwatched_processes_but_not_itself() -> None:
    with Sensor(host_wide=True) as sensor:
        marker = subprocess.run(["/bin/echo", "corral-host-wide-marker"], capture_output=True)
        assert marker.returncode == 0
        seen: list[ev.Event] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            seen += sensor.read(timeout=0.1)
            if any(isinstance(e, ev.ExecEvent) and "corral-host-wide-marker" in e.argv for e in seen):
                break
    assert any(isinstance(e, ev.ExecEvent) and "corral-host-wide-marker" in e.argv for e in seen)
    assert all(e.pid != os.getpid() for e in seen)


def test_unknown_or_short_records_are_counted_not_fatal(monitor: Monitor) -> None:
    sensor = monitor.sensor
    unknown = bytearray(records.STRUCTS["sys_event"].size)
    unknown[records.TYPE_OFFSET] = 99
    assert 99 not in sensor._table  # so the ring reader hands it to _unknown
    short = bytearray(records.HEADER.size)  # a connect record cut after its header
    short[records.TYPE_OFFSET] = ev.CONNECT
    with pytest.raises(ValueError):  # which the ring reader also hands to _unknown
        sensor._table[ev.CONNECT](memoryview(short), 0, len(short))
    before = sensor.bad_records
    assert sensor._unknown(memoryview(unknown), 0, len(unknown)) is None
    assert sensor.bad_records == before + 1


def test_not_root_gives_one_clear_line() -> None:
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", CORRAL, "doctor"],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1
    assert res.stderr.startswith("corral: error: the sensor needs root")


def test_missing_object_names_the_fix() -> None:
    env = dict(os.environ, CORRAL_BPF_OBJECT="/nonexistent/sensor.bpf.o")
    res = subprocess.run([CORRAL, "trace", "--", "true"], capture_output=True, text=True, env=env)
    assert res.returncode == 2
    assert "run `make setup`" in res.stderr and res.stderr.count("\n") == 1


def test_doctor_reports_ok() -> None:
    res = subprocess.run([CORRAL, "doctor"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "sensor loaded and attached" in res.stdout


def test_trace_prints_events_and_returns_the_exit_status(tmp_path: Path) -> None:
    res = subprocess.run([CORRAL, "trace", "--", "/bin/sh", "-c", "/bin/echo traced >/dev/null; exit 5"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 5, res.stderr
    lines = res.stdout.splitlines()
    assert any(" exec " in line and '"/bin/echo", "traced"' in line for line in lines)
    assert any(" exit " in line and "exit 5" in line for line in lines)


def test_trace_json_has_process_and_ancestry() -> None:
    res = subprocess.run([CORRAL, "trace", "--json", "--", "/bin/sh", "-c", "/bin/echo hi >/dev/null"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    records_ = [json.loads(line) for line in res.stdout.splitlines()]
    echo = next(r for r in records_ if r["kind"] == "exec" and r["filename"] == "/bin/echo")
    assert echo["argv"] == ["/bin/echo", "hi"]
    assert echo["proc"]["name"] == "echo"
    assert echo["ancestors"][0] == "sh"
    assert echo["time"].endswith("Z") and "T" in echo["time"]


def test_trace_signal_exit_status() -> None:
    res = subprocess.run([CORRAL, "trace", "--", "/bin/sh", "-c", "kill -TERM $$"], capture_output=True, text=True)
    assert res.returncode == 128 + 15


def test_trace_pid_attaches_to_a_running_process(monitor: Monitor) -> None:
    cg = ScratchCgroup(f"test-attach-{os.getpid()}")
    try:
        target = subprocess.Popen(["/bin/sh", "-c", "sleep 1; /bin/echo late-work >/dev/null"],
                                  preexec_fn=lambda: cg.add(os.getpid()))
        res = subprocess.run([CORRAL, "trace", "--pid", str(target.pid)], capture_output=True, text=True,
                             timeout=20)
        target.wait()
    finally:
        cg.remove()
    assert res.returncode == 0, res.stderr
    assert '"/bin/echo", "late-work"' in res.stdout


def test_trace_rejects_ambiguous_arguments() -> None:
    res = subprocess.run([CORRAL, "trace", "--pid", "1", "--", "true"], capture_output=True, text=True)
    assert res.returncode == 2 and "exactly one of" in res.stderr


def test_run_helper_sees_only_its_own_cgroup(monitor: Monitor) -> None:
    run = run_in_cgroup(monitor, ["/bin/true"])
    assert run.events and all(e.cgroup_id == run.cgroup_id for e in run.events)


def test_a_refused_load_says_what_to_do_and_why() -> None:
    lines = [f"libbpf: line {n}" for n in range(40)]
    error = LibbpfError("bpf_object__load", errno.EPERM, lines).refused("sensor")
    first, *rest = str(error).splitlines()
    assert isinstance(error, HostError)
    assert first == ("the kernel refused the sensor (bpf_object__load: Operation not permitted); run `make setup` "
                     "to rebuild it for this kernel. libbpf said:")
    assert rest == lines[-25:]  # the end of the log, where libbpf says why
