"""Child programs of the reliability self-tests: ``python -m tests.reliability_child COMMAND [ARGS]``.

interrupted-capture PATH
    A live snapshot of a running storm guest into the snapshot file PATH, copied slowly (a copier
    writing to a slow disk), to be interrupted with SIGINT by the parent once it prints ``ARMED``.
    Its last words, in a ``finally``, are ``LAST {json}``: where it was, the pages still carrying
    PM_UFFD_WP, and the process gauges next to those of the start (``START {json}``).

As a pytest plugin (``-p tests.reliability_child``) it prints ``START {json}`` (the process gauges)
when the session starts, ``CALL nodeid`` as each test's call begins, and ``LAST {json}`` at
pytest_unconfigure, after every fixture was torn down: what an interrupted pytest leaves behind.

probe
    ``PROBE {json}``: what an unprivileged process is told: the host probe's skip reasons for
    ``kvm`` and ``uffd``, and the errors Vm.create() and the uffd open raise.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

STORM_SIZE = 64 << 20
SLOW_COPY_PAGES = 256     # pages per bulk_copy call ...
SLOW_COPY_PAUSE_S = 0.005  # ... and the pause after each: 16,384 pages take about 0.35 s


def _say(tag: str, payload: dict[str, Any]) -> None:
    print(f"{tag} {json.dumps(payload)}", flush=True)


def interrupted_capture(path: str) -> int:
    import guests
    from guests import storm
    from native.image import SnapshotImage
    from native.kvm import Vm
    from native.live import VcpuRunner
    from native.memory import GuestMemory
    from native.wp import WpSnapshot, read_pagemap
    from tests.reliability_support import Gauges, threads_settled

    start = Gauges.now()
    _say("START", start.as_dict())
    stage = "setup"
    interrupted = False
    mem = GuestMemory.memfd(STORM_SIZE)
    try:
        mem.write(guests.FLAT32_LOAD_GPA, guests.load("storm32"))
        npages = (STORM_SIZE - guests.DATA_REGION_GPA) // 4096 // 2
        with Vm.create() as vm:
            vm.map_memory(mem)
            for i in range(2):
                p = storm.StormParams.from_seed(0x5EED + i, region_gpa=guests.DATA_REGION_GPA + i * npages * 4096,
                                                npages=npages, generations=0)
                block = guests.PARAM_BLOCK_GPA + guests.PARAM_BLOCK_STRIDE * i
                mem.write(block, p.pack())
                vm.add_vcpu().set_flat32(eip=guests.FLAT32_LOAD_GPA, esp=0x7000 - 0x400 * i, esi=block)
            # Nesting is the cleanup order: the vCPUs stop, then the engine un-protects, joins its
            # handler and drops its pointer into the file, then the writer (unfinished) marks the file
            # incomplete and closes it, then the VM goes.
            with SnapshotImage.create(path, STORM_SIZE) as writer, \
                    WpSnapshot(mem, writer.memory) as snap, \
                    VcpuRunner(vm.vcpus, timeout=60.0) as runner:
                stage = "guest running"
                runner.start()
                time.sleep(0.05)
                stage = "pause + arm"
                runner.pause()
                states = [v.save_state() for v in vm.vcpus]
                snap.arm()
                runner.resume()
                stage = "bulk copy, guest running"
                print("ARMED", flush=True)
                for first in range(0, snap.npages, SLOW_COPY_PAGES):
                    snap.bulk_copy(first, min(SLOW_COPY_PAGES, snap.npages - first))
                    time.sleep(SLOW_COPY_PAUSE_S)
                stage = "finalize"
                snap.finalize()
                runner.stop()
                writer.finalize(states)
                stage = "done"
    except KeyboardInterrupt:
        interrupted = True
    finally:
        wp_left = sum(read_pagemap(mem.addr, mem.size // 4096)[1])
        mem.close()
        threads = threads_settled(start.threads)
        end = Gauges.now()
        _say("LAST", {"stage": stage, "interrupted": interrupted, "wp_pages_left": wp_left,
                      **end.as_dict(), "threads": threads})
    return 130 if interrupted else 0


def probe() -> int:
    from native.errors import CapabilityMissing
    from native.host import probe as host_probe
    from native.kvm import Vm
    from native.wp import supported_features

    rep = host_probe()
    out: dict[str, Any] = {"missing_kvm": rep.missing("kvm"), "missing_uffd": rep.missing("uffd")}
    try:
        Vm.create().close()
        out["vm_create"] = "ok"
    except CapabilityMissing as e:
        out["vm_create"] = str(e)
    try:
        supported_features()
        out["uffd_open"] = "ok"
    except CapabilityMissing as e:
        out["uffd_open"] = str(e)
    _say("PROBE", out)
    return 0


# -- as a pytest plugin ---------------------------------------------------------------------------

_session_start: dict[str, int] = {}


def pytest_sessionstart(session: Any) -> None:
    from tests.reliability_support import Gauges

    _session_start.update(Gauges.now().as_dict())
    _say("START", _session_start)


def pytest_runtest_call(item: Any) -> None:
    print(f"CALL {item.nodeid}", flush=True)


def pytest_unconfigure(config: Any) -> None:
    from tests.reliability_support import Gauges, threads_settled

    threads = threads_settled(_session_start.get("threads", 1))
    _say("LAST", {**Gauges.now().as_dict(), "threads": threads})


def main(argv: list[str]) -> int:
    if argv[:1] == ["interrupted-capture"] and len(argv) == 2:
        return interrupted_capture(argv[1])
    if argv == ["probe"]:
        return probe()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
