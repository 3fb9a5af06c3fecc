"""Phase 3 — a snapshot file restores into a fresh VM that runs correctly: by copy, by MAP_PRIVATE, by lazy uffd.

Three sequences, each through all three loaders of native/restore.py:

- the original (forkd v0.4 proof 4, PR #160): the source VM runs marker16 to HLT (0x42 at GPA
  0x1000); the marker is reset to 0xBE; the WP engine captures memory straight into a snapshot
  file; a fresh VM loaded from the file holds 0xBE at 0x1000, re-runs marker16 from 0:0x100 and
  halts with 0x42 there, while the file keeps 0xBE.
- mid-execution: counter32 runs to its snapshot point, chosen by the guest's own count (its sync
  after a quarter of the working set), whatever the guest's speed; the live protocol (pause, save
  the vCPU state, arm, resume, copy while the guest runs) captures it into a file; a fresh VM
  restored from the file resumes where the snapshot stopped it, touches its working set, and halts
  with the memory and registers of an uninterrupted run of the same guest and of the counter
  model (guests/counter.py).
- whole vCPU state: cpustate32 on two vCPUs keeps its running result in XMM0, in MM0 (the x87
  registers), in IA32_SYSENTER_EIP and in DR0-DR3; each vCPU stops at its own sync point and the host
  answers with an NMI, left pending; the stopped VM is captured into a file, restored into a fresh VM
  whose vCPUs resume each with its own state (NMI included), and both end as an uninterrupted run and
  the model (guests/cpustate.py), with every part of each vCPU's state read back equal to the file's.

Per loader and size the report gives the time to the first guest instruction (restore until
marker16 halts: its first instruction and two more) and the time until the resumed counter has
touched its whole working set; they differ by orders of magnitude between loaders. The content
hash is checked in a stage of its own and kept out of the restore figures: a verified load hashes
the whole image, which would hide what each loader costs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
from snapproof.guests import counter, cpustate
from snapproof.guests.counter import CounterParams
from snapproof.native.capture import DURABLE_WRITE_HOW, DurableFloor, FileCapture, durable_floor, floor_words
from snapproof.native.compare import describe_difference
from snapproof.native.image import (
    MSR_ENTRY,
    ImageWay,
    SnapshotImage,
    VcpuPart,
    WriteStats,
    describe_part_difference,
    msr_entries,
    part_field,
    split_kvm_x86_state,
)
from snapproof.native.kvm import RESTORE_ORDER, Exit, ExitReason, Vm
from snapproof.native.layout import gpa_of
from snapproof.native.live import VcpuRunner
from snapproof.native.memory import PAGE_SIZE, GuestMemory
from snapproof.native.restore import LOADERS, RestoredVm, restore_vm
from snapproof.native.thp import PMD_SIZE, THP_BACKING_NEEDS
from snapproof.native.wp import ENGINE_NEEDS
from snapproof.results.record import LIMIT_SLACK, fmt_bytes, fmt_ns
from snapproof.results.stats import median

from snapproof import guests

pytestmark = [pytest.mark.phase(3, "round-trip restore"), pytest.mark.platform("linux"),
              pytest.mark.needs("kvm", *ENGINE_NEEDS)]

RUN_TIMEOUT_S = 5.0
GUEST_TIMEOUT_S = 60.0   # this host may emulate every guest instruction (kvm_pvm): a 64 MiB sweep takes a while
BENCH_ROUNDS = 10
# 16 MiB: on a host that emulates the guest (kvm_pvm, about 15 µs an iteration) a larger working set costs
# seconds of guest compute per run and says nothing more about the loaders.
WORKING_SET_MAX_PAGES = 4096
# An on-demand restore of marker16 touches two pages; the kernel's fault-around may map a few neighbours of
# a page-cache page with them. Anything near the whole mapping means the restore itself touched it all.
MOST_RESIDENT = 256 << 10
MARKER = guests.MARKER_GPA
# Performance targets (never assertions: a miss is drawn MISSED in the report). The original sequence at 1 MiB,
# capture to re-run, under 5 ms; Firecracker's restore target, 5 ms to the first instruction at any size.
SEQUENCE_TARGET_NS = 5_000_000
FIRST_INSTRUCTION_TARGET_NS = 5_000_000
BARE_MAP_PRIVATE_TARGET_X = 1.3  # MAP_PRIVATE's restore to the first instruction over its bare floor (issue 15)
SEQUENCE_TARGET_X = 2  # the 1 MiB sequence over a fresh VM over memory already in place (issue 15)
BEFORE, AFTER = guests.MARKER_BEFORE, guests.MARKER_AFTER
WS_TOUCHED = counter.WS_TOUCHED
BLOCK = guests.PARAM_BLOCK_GPA
# cpustate32: two vCPUs, each stopped at its own point, so each holds a state of its own at the capture.
CPUSTATE_SEEDS = [0xC0FFEE, 0x5EED2]
CPUSTATE_ITERATIONS = 1500
CPUSTATE_SYNC_AT = [600, 1100]
# MSRs that count on between the restore and its read-back: the TSC, and the Hyper-V enlightenment counters
# KVM lists on hardware (partition reference time, the vCPU's run time; kvm_pvm does not list them).
MSRS_THAT_COUNT_TIME = {0x10: "the TSC", 0x40000010: "HV_X64_MSR_VP_RUNTIME",
                        0x40000020: "HV_X64_MSR_TIME_REF_COUNT"}
clock = time.perf_counter_ns


def counter_params(mem_size: int) -> CounterParams:
    """counter32 over the data region, at most WORKING_SET_MAX_PAGES of it: the working set.

    Past 16 MiB the rest of guest memory is restored but never touched by the guest (what an
    on-demand loader need not pay for; the prefetch and the final comparison still cover it). An
    eighth more iterations than pages: pages the guest wrote before the snapshot are read and written
    again after the resume, so restored contents are used, not only restored. No periodic sync; two
    single ones: after a quarter of the working set (``sync_at``), the snapshot point, so three
    quarters of it are first touched after the resume; after all of it, which marks the figure.
    """
    npages = min((mem_size - guests.DATA_REGION_GPA) // PAGE_SIZE, WORKING_SET_MAX_PAGES)
    return CounterParams(region_gpa=guests.DATA_REGION_GPA, npages=npages, iterations=npages + npages // 8,
                         sync_every=0, sync_at=max(1, npages // 4))


def capture_timings(st, cap) -> None:
    """The capture's figures, each saying what it includes."""
    st.timing("capture", cap.total_ns, f"file created {fmt_ns(cap.create_ns)} (its page cache allocated) + engine "
              "+ file finalized")
    st.timing("engine", cap.engine_ns, f"arm {fmt_ns(cap.arm_ns)}, bulk copy {fmt_ns(cap.bulk_ns)} (into the "
              f"file's page cache, allocated at create), finalize {fmt_ns(cap.finalize_ns)} (un-protect + handler "
              "stopped through its eventfd, no sleeps)")
    w = cap.write
    st.timing("file finalize", cap.file_ns, f"{w.hash_algo.name.lower()} wait {fmt_ns(w.hash_wait_ns)} (hashed "
              f"{w.where}: {fmt_ns(w.hash_ns)}), fsync x2 {fmt_ns(w.sync_ns)} (image + vCPU section, then the header "
              "with COMPLETE)")


def restore_timings(st, restored) -> None:
    st.timing("restore -> ready", restored.ready_ns,
              f"header {fmt_ns(restored.open_ns)} (unverified), {restored.restored.loader} "
              f"{fmt_ns(restored.load_ns)}, VM + memslot {fmt_ns(restored.vm_ns)}, vCPU {fmt_ns(restored.state_ns)}")


def guest_saw_only_restored_pages(st, restored) -> None:
    """No page the guest reached was filled with zeros where the file holds data.

    A lazy loader whose userfaultfd goes away mid-restore lets the kernel fill the faulting page with zeros
    (ORIGINS.md: fcvm PR #739); the loader must fence such pages and stop the guest instead. This is the
    check that sees it when it does not. Checked before the exit is: a guest on zeros runs anywhere.
    """
    filled = restored.restored.zero_filled_pages()
    mapped = restored.memory.rss_bytes() // PAGE_SIZE
    st.check(not filled, f"no page the guest reached holds zeros where the file holds data ({mapped} pages mapped)",
             f"{len(filled)} page(s) the guest reached hold zeros where the file holds data, never restored by "
             f"{restored.restored.loader}: first at GPA {gpa_of(filled[0]) if filled else 0:#x}, all "
             f"{[hex(gpa_of(o)) for o in filled[:8]]}: the guest ran on memory the loader never restored")


def lazy_note(st, restored) -> None:
    if restored.lazy is None:
        return
    s = restored.lazy.stats()
    st.check(s.handler_err == 0, "the lazy handler ran throughout",
             f"the lazy handler stopped with errno {s.handler_err}")
    st.note(f"lazy-uffd: {s.faults} faults served, {s.fault_pages} pages installed by fault, service p50 "
            f"{s.service_percentile_us(0.5):.0f} µs, max {fmt_ns(s.service_ns_max)}")


# -- the original sequence ------------------------------------------------------------------------


@pytest.mark.sizes(1 << 20, 64 << 20)
@pytest.mark.parametrize("loader", LOADERS)
def test_original_sequence_reruns_in_a_fresh_vm_from_the_file(report, make_memory, make_marker16_vm, capture_snapshot,
                                                              make_restored_vm, enter_guest,
                                                              mem_size, loader):
    """The captured file loads into a fresh VM holding 0xBE at 0x1000; marker16 re-runs from 0:0x100 and writes 0x42."""
    with report.stage("source VM runs marker16") as st:
        mem = make_memory("memfd", mem_size)
        _, vcpu = make_marker16_vm(mem)
        ex = vcpu.run(timeout=RUN_TIMEOUT_S)
        st.check(ex.reason is ExitReason.HLT, "source guest halted", f"source guest did not halt: {ex.describe()}")
        st.equal(mem.byte(MARKER), AFTER, "source mem[0x1000] after the run")
        mem.write(MARKER, bytes([BEFORE]))
        st.equal(mem.byte(MARKER), BEFORE, "source mem[0x1000] reset to the BEFORE marker")
        at_capture = mem.snapshot_bytes()

    with report.stage("capture into the file") as st:
        cap = capture_snapshot(mem, "marker16", progress=st.progress(mem_size, "copied"))
        npages = mem_size // PAGE_SIZE
        s = cap.stats
        st.check(s.bulk_pages + s.fault_pages == npages,
                 f"{npages} pages captured: {s.bulk_pages} by bulk copy, {s.fault_pages} by fault",
                 f"{s.bulk_pages} bulk + {s.fault_pages} by fault != {npages} pages")
        st.equal(cap.vcpu_states_written, 0, "vCPU states in the file (the guest re-runs from reset)", str)
        capture_timings(st, cap)

    with report.stage("content check") as st:
        t0 = clock()
        image = SnapshotImage.open(cap.image.path, verify=True, progress=st.progress(mem_size, "hashed"))
        verify_ns = clock() - t0
        st.check(image.verified, f"content hash matches the header ({image.hash_algo.name.lower()} of "
                 f"{fmt_bytes(image.memory_size)})")
        on_file = image.read_memory()
        st.check(on_file == at_capture, "the file's image equals source memory at the capture, byte for byte",
                 f"file vs source at the capture: {describe_difference(at_capture, on_file)}")
        st.timing("verified open", verify_ns, f"header checks + {image.hash_algo.name.lower()} of the image; outside "
                  "the restore figures")

    with report.stage(f"restore ({loader}) into a fresh VM") as st:
        restored = make_restored_vm(image.path, loader, verify=False, reset=partial(enter_guest, "marker16"),
                                    progress=st.progress(mem_size, "read"))
        st.equal(restored.memory.byte(MARKER), BEFORE, "dest mem[0x1000] before the re-run (the BEFORE marker)")
        restore_timings(st, restored)

    with report.stage("re-run marker16 from 0:0x100") as st:
        ex = restored.vcpu.run(timeout=RUN_TIMEOUT_S)
        guest_saw_only_restored_pages(st, restored)
        st.check(ex.reason is ExitReason.HLT, "restored guest halted", f"restored guest did not halt: {ex.describe()}")
        st.equal(restored.memory.byte(MARKER), AFTER, "dest mem[0x1000] after the re-run")
        st.timing("re-run", ex.run_ns, "entry to HLT, three instructions, with the first touch of their pages")
        total = cap.total_ns + restored.ready_ns + ex.run_ns
        st.timing("sequence", total, "capture + restore to ready + re-run (the content check excluded)")
        if mem_size == 1 << 20:
            st.target("capture + restore to ready + re-run at 1 MiB", total, SEQUENCE_TARGET_NS, "ns")
        lazy_note(st, restored)
        report.fact("sequence_ns", total)

    with report.stage("the file and the source are untouched") as st:
        after = SnapshotImage.open(image.path, verify=True, progress=st.progress(mem_size, "hashed"))
        st.check(after.verified, "the file still verifies: the guest's write stayed in the restored VM",
                 "the file's content hash no longer matches: the guest's write reached the file")
        st.equal(after.read_memory(MARKER, 1)[0], BEFORE, "file mem[0x1000]")
        st.equal(mem.byte(MARKER), BEFORE, "source mem[0x1000]")


# -- mid-execution ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MidRunFile:
    """counter32 captured live at its snapshot point: the file, the guest's parameters, the iteration the file
    holds, and the sync values the guest wrote before it."""

    image: SnapshotImage
    params: CounterParams
    iteration: int
    syncs_before: list[int]


def counter32_captured_mid_run(report, make_memory, make_counter32_vm, capture_snapshot, mem_size) -> MidRunFile:
    """The stages up to the file: counter32 run to its snapshot point, captured live, the file checked."""
    p = counter_params(mem_size)
    with report.stage("counter32 loaded") as st:
        mem = make_memory("memfd", mem_size)
        _, vcpu = make_counter32_vm(mem, p)
        st.note(f"working set: {p.npages} pages ({fmt_bytes(p.region_size)} from GPA {p.region_gpa:#x}) of "
                f"{fmt_bytes(mem_size)}, {p.iterations} iterations")

    with report.stage("counter32 to its snapshot point") as st:
        # The guest's own count picks the point: it syncs right after iteration sync_at and this run stops
        # there, the same iteration on a software KVM, under TCG or at native speed. The runner then holds the
        # vCPU parked, so the live snapshot pins exactly this point however slowly the host sets up the capture.
        ex = vcpu.run(timeout=GUEST_TIMEOUT_S, stop_on_sync=True)
        st.check(ex.reason is ExitReason.SYNC and ex.last_sync == p.sync_at,
                 f"stopped at its sync after iteration {p.sync_at} of the {p.npages} that touch the working set",
                 f"expected the snapshot-point sync {p.sync_at:#x}, saw {ex.describe()} (sync {ex.last_sync:#x})")
        before = [ex.last_sync]

    with VcpuRunner([vcpu], timeout=GUEST_TIMEOUT_S) as runner:
        with report.stage("counter32 running") as st:
            runner.start(paused=True)  # resumed by the live protocol, after the arm
            st.check(not runner.finished, "the guest's vCPU thread is up", f"the guest stopped early: {runner.exits}")

        with report.stage("live snapshot into the file") as st:
            try:
                cap = capture_snapshot(mem, "counter32", runner=runner, progress=st.progress(mem_size, "copied"))
            finally:
                runner.stop()
            s = cap.stats
            st.check(s.bulk_pages + s.fault_pages == mem_size // PAGE_SIZE,
                     f"{mem_size // PAGE_SIZE} pages captured while the guest ran: {s.bulk_pages} by bulk copy, "
                     f"{s.fault_pages} by fault", f"{s.bulk_pages} + {s.fault_pages} pages captured")
            st.timing("pause window", cap.live.pause_ns, "kick -> stopped, vCPU state saved, arm, resume")
            capture_timings(st, cap)
            st.note(f"vCPU states: {cap.vcpu_states_taken} taken, {cap.vcpu_states_written} written to the file")

    with report.stage("the file holds the guest mid-run") as st:
        t0 = clock()
        image = SnapshotImage.open(cap.image.path, verify=True, progress=st.progress(mem_size, "hashed"))
        verify_ns = clock() - t0
        st.check(image.verified, f"content hash matches the header ({image.hash_algo.name.lower()} of "
                 f"{fmt_bytes(image.memory_size)})")
        st.timing("verified open", verify_ns, f"header checks + {image.hash_algo.name.lower()} of the image; outside "
                  "the restore figures")
        k = counter.read_progress(image.read_memory(BLOCK, counter.BLOCK_SIZE)).iteration
        st.equal(k, p.sync_at, "iteration the file was taken at (the guest's trace word)", str)
        mid = counter.expected_after(p, k)
        region = image.read_memory(p.region_gpa, p.region_size)
        st.check(region == mid.region, f"the file's region is the model after iteration {k}, byte for byte",
                 f"file region vs model at iteration {k}: {describe_difference(mid.region, region, p.region_gpa)}")
        st.check(image.read_memory(BLOCK, counter.BLOCK_SIZE) == mid.block,
                 f"the file's parameter block is the model's after iteration {k}",
                 f"file parameter block vs model at iteration {k}: "
                 f"{describe_difference(mid.block, image.read_memory(BLOCK, counter.BLOCK_SIZE), BLOCK)}")
    return MidRunFile(image, p, k, before)


def resumed_to_the_working_set(st, restored, ex, f: MidRunFile) -> None:
    """The first exit after the resume is the working-set sync, the guest having reached only restored pages."""
    p = f.params
    guest_saw_only_restored_pages(st, restored)
    st.note("vCPU restored from the file's saved state" if restored.from_saved_state else
            "no vCPU state in the file: the vCPU starts from counter32's entry (reset state)")
    again = " (the snapshot point's sync again: the guest re-ran iterations it had run before the snapshot)" \
        if ex.reason is ExitReason.SYNC and ex.last_sync == p.sync_at else ""
    st.check(ex.reason is ExitReason.SYNC and ex.last_sync == WS_TOUCHED | p.npages,
             f"first exit after the resume: working set touched (sync {ex.last_sync:#x})",
             f"expected the working-set sync {WS_TOUCHED | p.npages:#x}, saw {ex.describe()} "
             f"(sync {ex.last_sync:#x}){again}")


def resumed_run_ends_as_the_uninterrupted_run(report, restored, ex, f: MidRunFile, counter32_uninterrupted,
                                              mem_size: int) -> None:
    """The stages after the working set: on to HLT, the rest prefetched, memory and registers compared."""
    p = f.params
    with report.stage("resumed run to HLT") as st:
        syncs = [ex.last_sync]
        while (ex := restored.vcpu.run(timeout=GUEST_TIMEOUT_S, stop_on_sync=True)).reason is ExitReason.SYNC:
            syncs.append(ex.last_sync)
        st.check(ex.reason is ExitReason.HLT, "resumed guest halted", f"resumed guest did not halt: {ex.describe()}")
        if restored.lazy is not None:
            t0 = clock()
            rest = restored.lazy.prefetch_all()
            st.timing("prefetch the rest", clock() - t0, f"{rest} pages never touched by the guest, UFFDIO_COPY "
                      "in 2 MiB runs")
        final = restored.memory.snapshot_bytes()
        regs = restored.vcpu.regs()

    with report.stage("ends as the uninterrupted run and the model") as st:
        ref = counter32_uninterrupted(p, mem_size)
        want = counter.expected_final(p)
        st.equal(f.syncs_before + syncs, ref.syncs, "sync values: the snapshot point's, then the resumed run's",
                 lambda v: str([hex(x) for x in v]))
        diff = describe_difference(ref.memory, final)
        st.check(not diff, f"final memory equals the uninterrupted run's, byte for byte ({fmt_bytes(mem_size)})",
                 f"final memory differs from the uninterrupted run's: {diff}")
        seen = {r: regs[r] & 0xFFFFFFFF for r in want.regs}
        st.equal(seen, {r: ref.regs[r] & 0xFFFFFFFF for r in want.regs}, "registers vs the uninterrupted run",
                 lambda v: ", ".join(f"{r}={x:#x}" for r, x in v.items()))
        st.equal(seen, want.regs, "registers vs the model", lambda v: ", ".join(f"{r}={x:#x}" for r, x in v.items()))
        region = final[p.region_gpa:p.region_gpa + p.region_size]
        st.check(region == want.region, f"region equals the model after {p.iterations} iterations",
                 f"region vs model: {describe_difference(want.region, region, p.region_gpa)}")
        st.timing("uninterrupted run", ref.run_ns, "reference VM, entry to HLT, first touch included")


@pytest.mark.sizes(1 << 20, 64 << 20)
@pytest.mark.parametrize("loader", LOADERS)
def test_mid_execution_snapshot_resumes_to_the_uninterrupted_result(report, benchmark, make_memory,
                                                                    make_counter32_vm, capture_snapshot,
                                                                    make_restored_vm, enter_guest,
                                                                    counter32_uninterrupted,
                                                                    mem_size, loader):
    """counter32 captured live mid-run resumes in a fresh VM and ends exactly as an uninterrupted run and the model."""
    f = counter32_captured_mid_run(report, make_memory, make_counter32_vm, capture_snapshot, mem_size)
    p, k = f.params, f.iteration

    with report.stage(f"restore ({loader}) + resume to the working set") as st:
        def resume():
            restored = make_restored_vm(f.image.path, loader, verify=False, reset=partial(enter_guest, "counter32"))
            return restored, restored.vcpu.run(timeout=GUEST_TIMEOUT_S, stop_on_sync=True)

        restored, ex = benchmark.pedantic(resume, rounds=1, iterations=1)
        resumed_to_the_working_set(st, restored, ex, f)
        restore_timings(st, restored)
        to_ws = restored.ready_ns + ex.run_ns
        st.timing("restore -> working set touched", to_ws,
                  f"{p.npages - k} pages first touched after the resume (the guest wrote {k} before the snapshot), "
                  f"{to_ws / (p.npages - k) / 1e3:.1f} µs a page; includes guest compute and every first-touch fault")
        lazy_note(st, restored)
        benchmark.extra_info.update({"loader": loader, "restore_to_ready_ns": restored.ready_ns,
                                     "restore_to_working_set_ns": to_ws})
        report.fact("restore_to_ready_ns", restored.ready_ns)
        report.fact("restore_to_working_set_ns", to_ws)

    resumed_run_ends_as_the_uninterrupted_run(report, restored, ex, f, counter32_uninterrupted, mem_size)


# -- into memory backed by transparent huge pages -----------------------------------------------------------

THP_SIZE = 16 << 20
# Every loader into THP-backed memory: the memfd and anonymous destinations with THP, and for map-private the
# file mapping marked MADV_HUGEPAGE (the kernel maps the page cache's huge folios where it can).
THP_RESTORES = [pytest.param("read-copy", "memfd-thp", id="read-copy-memfd-thp"),
                pytest.param("map-private", "file-thp", id="map-private-file-thp"),
                pytest.param("lazy-uffd", "memfd-thp", id="lazy-uffd-memfd-thp"),
                pytest.param("lazy-uffd", "anonymous-thp", id="lazy-uffd-anonymous-thp")]


@pytest.mark.parametrize(("loader", "backing"), THP_RESTORES)
def test_restore_into_thp_memory_collapsed_mid_restore_resumes_to_the_uninterrupted_result(
        report, require, make_memory, make_counter32_vm, capture_snapshot, make_restored_vm, enter_guest,
        counter32_uninterrupted, loader, backing):
    """Restored into huge-page-backed memory, and collapsed into huge pages by the kernel (as khugepaged would) after
    one 4 KiB fill and before the guest resumes, counter32 never reaches a not-yet-restored page exposed as zeros
    (cloud-hypervisor #8663: a guest triple fault) and ends as an uninterrupted run."""
    require(*THP_BACKING_NEEDS.get(backing, ()))
    f = counter32_captured_mid_run(report, make_memory, make_counter32_vm, capture_snapshot, THP_SIZE)

    with report.stage(f"restore ({loader}) into {backing} memory") as st:
        restored = make_restored_vm(f.image.path, loader, verify=False, reset=partial(enter_guest, "counter32"),
                                    thp=True, lazy_backing=backing.removesuffix("-thp"))
        mem = restored.memory
        st.note(f"{mem.label} at {mem.addr:#x}: {fmt_bytes(mem.huge_bytes())} mapped by huge page entries so far")
        if restored.lazy is not None:
            st.note("huge pages kept off (MADV_NOHUGEPAGE) while pages are missing" if restored.lazy.thp_guard else
                    "huge pages left on while pages are missing: the guard is removed (fault injection)")
        restore_timings(st, restored)

    with report.stage("one 4 KiB fill, then the kernel collapses the memory into huge pages") as st:
        # The guest's parameter block is the page a VMM reads first; a lazy loader installs it alone. Then what
        # khugepaged would do in its own time, now: MADV_COLLAPSE over all of it, restored pages and holes alike.
        block = restored.memory.read(BLOCK, PAGE_SIZE)
        st.check(block == f.image.read_memory(BLOCK, PAGE_SIZE), "the parameter block reads as the file's",
                 f"parameter block: {describe_difference(f.image.read_memory(BLOCK, PAGE_SIZE), block, BLOCK)}")
        answers = mem.collapse_each()
        collapsed = answers.count(0)
        refusals = sorted({os.strerror(e) for e in answers if e})
        outcome = (f"collapsed {collapsed} of {len(answers)} 2 MiB units" if collapsed else
                   f"refused for all {len(answers)} 2 MiB units")
        st.note(f"MADV_COLLAPSE, 2 MiB at a time over {fmt_bytes(mem.size)}: {outcome}"
                f"{' (' + ', '.join(refusals) + ')' if refusals else ''}; {fmt_bytes(mem.huge_bytes())} mapped by "
                "huge page entries now")
        if restored.lazy is not None:
            st.note(f"{restored.lazy.pages_present()} of {restored.lazy.npages} pages restored when it ran")
        report.fact("collapse_mid_restore", outcome)

    with report.stage("resume to the working set") as st:
        ex = restored.vcpu.run(timeout=GUEST_TIMEOUT_S, stop_on_sync=True)
        resumed_to_the_working_set(st, restored, ex, f)
        lazy_note(st, restored)

    resumed_run_ends_as_the_uninterrupted_run(report, restored, ex, f, counter32_uninterrupted, THP_SIZE)

    with report.stage("huge pages in the restored memory") as st:
        err = mem.collapse()  # every page restored now (and a lazy loader lifted its guard): collapse is safe
        huge = mem.huge_bytes()
        folio = mem.folio_at(f.params.region_gpa)
        seen = (f"{fmt_bytes(huge)} of {fmt_bytes(mem.size)} mapped by huge page entries after a last MADV_COLLAPSE "
                f"({'collapsed' if err == 0 else os.strerror(err)}); the working set starts in "
                f"{folio.describe() if folio else 'a folio not readable here'}")
        if loader == "map-private":
            off = f.image.memory_offset
            why = (f"the memory image starts at file offset {off:#x}, so none of it is 2 MiB aligned in the file and "
                   "the kernel cannot map the page cache's huge folios with huge entries" if off % PMD_SIZE else
                   "the page cache's huge folios, where the kernel maps them into a private file mapping")
            st.note(f"{seen} ({why})")
        else:
            st.check(huge > 0, seen, f"no huge page entries in the restored {mem.label} memory: {seen}")
        report.fact("huge_bytes_restored", huge)


# -- whole vCPU state, two vCPUs ------------------------------------------------------------------------


def guest_values_in_state(parts: dict[VcpuPart, bytes]) -> dict[str, int]:
    """cpustate32's running values as a saved vCPU state holds them (the guest's registers, not its memory)."""
    xmm = part_field(VcpuPart.XSAVE, parts[VcpuPart.XSAVE], "XMM0")
    return {"XMM0": xmm, "MM0": part_field(VcpuPart.XSAVE, parts[VcpuPart.XSAVE], "ST0/MM0") & (1 << 64) - 1,
            "SYSENTER_EIP": msr_entries(parts[VcpuPart.MSRS]).get(cpustate.MSR_SYSENTER_EIP, -1),
            **{f"DR{k}": part_field(VcpuPart.DEBUGREGS, parts[VcpuPart.DEBUGREGS], f"DR{k}") for k in range(4)},
            "nmi.pending": part_field(VcpuPart.VCPU_EVENTS, parts[VcpuPart.VCPU_EVENTS], "nmi.pending"),
            "XCR0": part_field(VcpuPart.XCRS, parts[VcpuPart.XCRS], "xcrs[0].value") if VcpuPart.XCRS in parts else 1,
            "ebx": part_field(VcpuPart.REGS, parts[VcpuPart.REGS], "rbx")}


def model_values_at_sync(p: cpustate.CpuStateParams) -> dict[str, int]:
    v = cpustate.expected_after(p, p.sync_at)
    return {"XMM0": sum(w << 32 * k for k, w in enumerate(v.xmm)), "MM0": v.mm, "SYSENTER_EIP": v.msr,
            **{f"DR{k}": w for k, w in enumerate(p.dr_init)}, "nmi.pending": 1, "XCR0": p.xcr0 or 1, "ebx": p.sync_at}


@pytest.mark.parametrize("loader", LOADERS)
def test_two_vcpus_resume_each_with_its_own_whole_state(report, make_memory, make_cpustate32_vm, capture_snapshot,
                                                        make_restored_vm, cpustate32_uninterrupted, loader):
    """cpustate32's two vCPUs, stopped at their own sync points with an NMI pending and captured, resume in a fresh
    VM each with its own x87/SSE, MSR, XCR, debug-register, event and MP state, and end as an uninterrupted run
    and the model."""
    mem_size = 1 << 20
    with report.stage("cpustate32 on two vCPUs") as st:
        mem = make_memory("memfd", mem_size)
        vm, params = make_cpustate32_vm(mem, CPUSTATE_SEEDS, CPUSTATE_ITERATIONS, CPUSTATE_SYNC_AT)
        for i, p in enumerate(params):
            st.note(f"vCPU {i}: seed {CPUSTATE_SEEDS[i]:#x}, {p.iterations} iterations, sync after {p.sync_at}, "
                    f"XCR0 {p.xcr0 or 1:#x} ({'XSAVE on: the CPUID offers it' if p.xcr0 else 'XSAVE off'})")

    with report.stage("each vCPU runs to its own sync point; the host answers with an NMI") as st:
        for i, (vcpu, p) in enumerate(zip(vm.vcpus, params, strict=True)):
            ex = vcpu.run(timeout=GUEST_TIMEOUT_S, stop_on_sync=True)
            st.check(ex.reason is ExitReason.SYNC and ex.last_sync == p.sync_at,
                     f"vCPU {i} stopped at its sync after iteration {p.sync_at}",
                     f"vCPU {i}: expected SYNC {p.sync_at:#x}, saw {ex.describe()} (sync {ex.last_sync:#x})")
            vcpu.inject_nmi()  # queued: delivered at the next entry, so the capture holds it pending
        st.note("the vCPUs are stopped (not in KVM_RUN): the capture needs no pause and no head start")

    with report.stage("capture both vCPUs into the file") as st:
        cap = capture_snapshot(mem, "cpustate32", vcpus=vm.vcpus)
        s = cap.stats
        st.check(s.bulk_pages + s.fault_pages == mem_size // PAGE_SIZE, f"{mem_size // PAGE_SIZE} pages captured",
                 f"{s.bulk_pages} + {s.fault_pages} pages captured of {mem_size // PAGE_SIZE}")
        st.equal(cap.vcpu_states_written, 2, "vCPU states in the file", str)
        capture_timings(st, cap)

    with report.stage("the file holds each vCPU's own state at its sync point") as st:
        image = SnapshotImage.open(cap.image.path, verify=True)
        st.check(image.verified, f"content hash and vCPU section hash match ({len(image.vcpu_states)} vCPUs, "
                 f"{image.vcpu_size} bytes of vCPU state, layout version {image.vcpu_state_version})")
        for i, p in enumerate(params):
            parts = image.vcpu_parts(i)
            st.note(f"vCPU {i}: " + ", ".join(f"{part.label} {len(data)}" for part, data in parts.items())
                    + f" bytes; {len(parts[VcpuPart.MSRS]) // MSR_ENTRY.size} MSRs")
            seen, want = guest_values_in_state(parts), model_values_at_sync(p)
            st.equal(seen, want, f"vCPU {i}'s registers in the file vs the model after iteration {p.sync_at}",
                     lambda v: ", ".join(f"{k}={x:#x}" for k, x in v.items()))

    with report.stage(f"restore ({loader}) into a fresh VM") as st:
        restored = make_restored_vm(image.path, loader, verify=False)
        st.equal(len(restored.vcpus), 2, "vCPUs created, one per saved state", str)
        # Read back now, before the guest runs: what KVM holds is what the restore wrote.
        read_back = [v.save_state() for v in restored.vcpus]
        restore_timings(st, restored)
        for i, v in enumerate(restored.vcpus):
            if v.msrs_refused_at_value:
                st.note(f"vCPU {i}: KVM refused to set MSR(s) {', '.join(hex(m) for m in v.msrs_refused_at_value)}; "
                        "the vCPU already held the file's value")

    with report.stage("both vCPUs resume to HLT") as st:
        for i, vcpu in enumerate(restored.vcpus):
            ex = vcpu.run(timeout=GUEST_TIMEOUT_S, stop_on_sync=True)
            guest_saw_only_restored_pages(st, restored)
            st.check(ex.reason is ExitReason.HLT, f"vCPU {i} halted", f"vCPU {i} did not halt: {ex.describe()}")
            st.equal(ex.sync_count, 0, f"vCPU {i} sync writes after the resume (its sync came before the capture)", str)
        if restored.lazy is not None:
            restored.lazy.prefetch_all()
        final = restored.memory.snapshot_bytes()
        regs = [v.regs() for v in restored.vcpus]

    with report.stage("each vCPU ends as the model and the uninterrupted run") as st:
        ref = cpustate32_uninterrupted(params, mem_size)
        results = [cpustate.read_result(final[cpustate.block_gpa(i):cpustate.block_gpa(i) + cpustate.BLOCK_SIZE])
                   for i in range(len(params))]
        # Every vCPU's differences in one message: a state given to the wrong vCPU shows on both.
        diffs = [f"vCPU {i} {d}" for i, (seen, p) in enumerate(zip(results, params, strict=True))
                 for d in seen.differences(cpustate.expected_result(p))]
        st.check(not diffs, "each vCPU reports the model's result: " + "; ".join(
            f"vCPU {i}: {r.describe()}" for i, r in enumerate(results)),
            f"results vs the model: {'; '.join(diffs)}")
        diff = describe_difference(ref.memory, final)
        st.check(not diff, f"final memory equals the uninterrupted run's, byte for byte ({fmt_bytes(mem_size)})",
                 f"final memory differs from the uninterrupted run's: {diff}")
        for i in range(len(params)):
            want = {r: ref.regs[i][r] & 0xFFFFFFFF for r in ("ebx", "esi", "esp", "eip")}
            st.equal({r: regs[i][r] & 0xFFFFFFFF for r in want}, want, f"vCPU {i} registers vs the uninterrupted run",
                     lambda v: ", ".join(f"{r}={x:#x}" for r, x in v.items()))
            st.equal(regs[i]["eip"], cpustate.halt_eip(), f"vCPU {i} EIP vs the model (just past the hlt)")

    with report.stage("each restored vCPU held the file's state, part by part") as st:
        # What the guest's result cannot show (XCR0, the MP state) is proven here: KVM gave every part back as
        # the file has it (counters of time excepted), and the restore wrote every part the file holds.
        for i, blob in enumerate(read_back):
            saved, held = image.vcpu_parts(i), split_kvm_x86_state(blob)
            diffs = {part.label: d for part in saved
                     if (d := describe_part_difference(part, saved[part], held.get(part, b""),
                                                       ignore_msrs=MSRS_THAT_COUNT_TIME))}
            uncompared = ", ".join(f"{m:#x} ({name})" for m, name in MSRS_THAT_COUNT_TIME.items())
            st.check(not diffs, f"vCPU {i}: every part read back equals the file's ({len(saved)} parts; "
                     f"MSRs that count time not compared: {uncompared})",
                     f"vCPU {i} state read back after the restore vs the file: "
                     + "; ".join(f"{k}: {d}" for k, d in diffs.items()))
        for i, applied in enumerate(restored.applied_parts):
            # The MP state of a VM without an in-kernel LAPIC is always RUNNABLE (KVM refuses any other), so a
            # restore that skipped it would read back equal: this is what shows it.
            want = tuple(part for part in RESTORE_ORDER if part in image.vcpu_parts(i))
            missing = [p.label for p in want if p not in applied]
            st.equal([p.label for p in applied], [p.label for p in want],
                     f"vCPU {i}: parts the restore wrote, in order{f' (not written: {missing})' if missing else ''}",
                     lambda v: ", ".join(v))


# -- benchmarks: figures as ratios to this host's own limits, measured in the same run ---------------


@pytest.fixture(scope="module")
def marker16_file(tmp_path_factory):
    """``marker16_file(size)`` -> path: a sparse snapshot file holding marker16 at 0x100 and 0xBE at 0x1000,
    nothing else (no vCPU state: the guest runs from reset). One per size, deleted with the module."""
    made: dict[int, str] = {}
    folder = tmp_path_factory.mktemp("phase3-bench")

    def _file(size: int) -> str:
        if size not in made:
            code = guests.load("marker16")
            with SnapshotImage.create(folder / f"marker16-{fmt_bytes(size).replace(' ', '')}.snap", size) as w:
                w.memory[guests.REAL_MODE_LOAD_GPA:guests.REAL_MODE_LOAD_GPA + len(code)] = code
                w.memory[MARKER] = BEFORE
                made[size] = w.finalize().path
        return made[size]

    yield _file
    for path in made.values():
        os.unlink(path)


def fresh_vm_run(memory: GuestMemory) -> tuple[int, Exit]:
    """A fresh VM over ``memory`` already in place, run from marker16's entry: (ns from KVM_CREATE_VM to the
    exit, the exit). The floor of every restore, and with a bare mapping before it, MAP_PRIVATE's own."""
    t0 = clock()
    with Vm.create() as vm:
        vm.map_memory(memory)
        vcpu = vm.add_vcpu()
        vcpu.set_real_mode(ip=guests.REAL_MODE_LOAD_GPA)
        ex = vcpu.run(timeout=RUN_TIMEOUT_S)
        return clock() - t0, ex


@pytest.fixture(scope="module")
def fresh_vm_floor() -> dict[str, Any]:
    """This host's floor for any restore: a fresh VM over memory already in place (a populated 1 MiB
    memfd with marker16), from KVM_CREATE_VM to HLT. Median of 30 rounds, in ns."""
    samples = []
    with GuestMemory.memfd(1 << 20) as mem:
        mem.write(guests.REAL_MODE_LOAD_GPA, guests.load("marker16"))
        mem.populate()
        for _ in range(30):
            mem.write(MARKER, bytes([BEFORE]))
            ns, ex = fresh_vm_run(mem)
            samples.append(ns)
            if ex.reason is not ExitReason.HLT:
                raise AssertionError(f"fresh-VM floor: marker16 did not halt: {ex.describe()}")
    return {"median_ns": median(samples), "samples_ns": samples}


def _case(loader: str, size: int, *marks: pytest.MarkDecorator):
    return pytest.param(loader, size, marks=marks, id=f"{loader}-{fmt_bytes(size).replace(' ', '')}")


FIRST_INSTRUCTION_CASES = [
    *[_case(loader, size) for size in (1 << 20, 64 << 20) for loader in LOADERS],
    _case("map-private", 1 << 30),
    _case("lazy-uffd", 1 << 30),
    _case("read-copy", 1 << 30, pytest.mark.slow),  # copies (and first-touches) all 1 GiB, every round
]


@pytest.mark.parametrize(("loader", "mem_size"), FIRST_INSTRUCTION_CASES)
def test_benchmark_time_to_first_instruction(report, benchmark, require, marker16_file, fresh_vm_floor, host_limits,
                                             enter_guest, loader, mem_size):
    """From the start of a restore until the guest's first instructions ran (marker16 halted), per loader and size."""
    if loader == "lazy-uffd":
        require("uffd.MISSING_SHMEM")
    with report.stage("snapshot file") as st:
        path = marker16_file(mem_size)
        st.note(f"{fmt_bytes(mem_size)} sparse file with marker16 and the BEFORE marker; in the page cache")

    rounds: list[dict[str, int]] = []
    live: list[tuple[RestoredVm, int, Exit]] = []
    bare: list[int] = []
    memory_offset = SnapshotImage.open(path, verify=False).memory_offset

    def bare_map_private() -> None:
        """MAP_PRIVATE's own floor, untimed by the benchmark, beside each round: the file's memory image mapped
        by hand and a fresh VM run over it, without the restore's header, loader or vCPU state."""
        t0 = clock()
        with GuestMemory.file_private(path, offset=memory_offset, size=mem_size) as memory:
            mapped = clock() - t0
            ns, ex = fresh_vm_run(memory)  # up to the exit: the VM's close is left out, as the restore's is
            bare.append(mapped + ns)
            if ex.reason is not ExitReason.HLT or memory.byte(MARKER) != AFTER:
                raise AssertionError(f"bare MAP_PRIVATE + fresh VM: marker16 did not halt with {AFTER:#04x} at "
                                     f"0x1000: {ex.describe()}")

    def restore_and_run() -> None:
        t0 = clock()
        restored = restore_vm(path, loader, verify=False, reset=partial(enter_guest, "marker16"))
        ex = restored.vcpu.run(timeout=RUN_TIMEOUT_S)
        live.append((restored, clock() - t0, ex))

    def check_and_close(*_args: object) -> None:
        """After each round, outside the timing: what the round did, then close it."""
        while live:
            restored, total, ex = live.pop()
            try:
                rounds.append({
                    "total": total, "ready": restored.ready_ns, "load": restored.load_ns, "vm": restored.vm_ns,
                    "run": ex.run_ns, "halted": ex.reason is ExitReason.HLT, "marker": restored.memory.byte(MARKER),
                    "faults": restored.lazy.stats().faults if restored.lazy is not None else -1,
                    "rss": restored.memory.rss_bytes(), "cow": restored.memory.cow_bytes()})
            finally:
                restored.close()

    with report.stage(f"restore ({loader}) -> marker16 halted, {BENCH_ROUNDS} rounds") as st:
        try:
            benchmark.pedantic(restore_and_run, setup=bare_map_private if loader == "map-private" else None,
                               teardown=check_and_close, rounds=BENCH_ROUNDS, iterations=1)
        finally:
            check_and_close()
        bad = [i for i, r in enumerate(rounds) if not r["halted"] or r["marker"] != AFTER]
        st.check(not bad, f"every round halted with mem[0x1000] = {AFTER:#04x} ({len(rounds)} rounds)",
                 f"rounds {bad} did not halt with {AFTER:#04x} at 0x1000")
        if loader == "lazy-uffd":
            st.equal(sorted({r["faults"] for r in rounds}), [2], "pages loaded on demand per round "
                     "(0x0: the code, 0x1000: the marker)", str)
        rss, cow = max(r["rss"] for r in rounds), max(r["cow"] for r in rounds)
        if loader != "read-copy":
            st.check(rss <= MOST_RESIDENT, f"resident after the run: at most {fmt_bytes(rss)} of "
                     f"{fmt_bytes(mem_size)}, {fmt_bytes(cow)} of it private copies",
                     f"{fmt_bytes(rss)} of {fmt_bytes(mem_size)} resident after a three-instruction guest: "
                     "the restore touched more than the guest did")

    with report.stage("figures") as st:
        first = median([r["total"] for r in rounds])
        floor = fresh_vm_floor["median_ns"]
        report.figure("fresh_vm_ns", fresh_vm_floor["samples_ns"], "ns",
                      what="a fresh VM over memory already in place, KVM_CREATE_VM to HLT (floor)")
        report.figure("first_instruction_ns", [r["total"] for r in rounds], "ns",
                      what="restore start -> marker16 halted, its first touch of pages 0x0 and 0x1000 included")
        report.figure("first_instruction_ratio_to_fresh_vm", [r["total"] / floor for r in rounds], "x",
                      what="each restore's time to the first instruction over the fresh VM's median, same run")
        st.timing("time to first instruction", first,
                  f"median; restore start -> marker16 halted, its first touch of pages 0x0 and 0x1000 included; "
                  f"{first / floor:.2f}x a fresh VM over memory already in place ({fmt_ns(floor)})")
        st.timing("restore -> ready", median([r["ready"] for r in rounds]),
                  f"loader {fmt_ns(median([r['load'] for r in rounds]))}, "
                  f"VM + memslot {fmt_ns(median([r['vm'] for r in rounds]))}")
        st.timing("first run", median([r["run"] for r in rounds]), "KVM_RUN entry to HLT")
        if loader == "read-copy":
            rate = mem_size / (median([r["load"] for r in rounds]) / 1e9)
            memcpy = host_limits["memcpy_bytes_per_s"]
            st.note(f"read-copy at {rate / 1e9:.2f} GB/s = {rate / memcpy:.2f}x warm memcpy ({memcpy / 1e9:.1f} "
                    "GB/s); includes the first touch of every memfd page")
        if loader == "map-private":
            report.figure("bare_map_private_ns", bare, "ns",
                          what="the memory image mapped MAP_PRIVATE by hand + a fresh VM, to HLT (floor)")
            to_bare = median(report.figure(
                "first_instruction_ratio_to_bare_map_private", [r["total"] / median(bare) for r in rounds], "x",
                what="each restore's time to the first instruction over the bare mapping + fresh VM's median").samples)
            st.timing("bare MAP_PRIVATE + fresh VM", median(bare), f"the restore takes {to_bare:.2f}x it: the rest "
                      "is the header read and checked, and the vCPU reset through the restore's own path")
        if loader == "map-private" and mem_size >= 1 << 30:
            st.target(f"time to the first instruction at {fmt_bytes(mem_size)} (median)", first,
                      FIRST_INSTRUCTION_TARGET_NS, "ns", source="Firecracker's restore target, flat as size grows")
            st.target(f"time to the first instruction at {fmt_bytes(mem_size)} over the bare MAP_PRIVATE + fresh VM",
                      to_bare, BARE_MAP_PRIVATE_TARGET_X, "x", source="issue 15: within 1.3x of the bare mapping")


# The sequence's capture: from staging memory kept between rounds into the page cache, where the restore reads it.
# Captures of 1 MiB in one run of test_benchmark_capture_to_file here: 4.5 ms through the file's mapping (its page
# cache populated at create, 0.8 ms of it), 3.4 ms this way, 3.3 ms by O_DIRECT; but an O_DIRECT file is read back
# from the device (a read-copy restore took 3.0 ms against 1.5-1.7 ms from the page cache).
SEQUENCE_WAY = ImageWay.PWRITE


def copier_also(write: WriteStats) -> str:
    """What else a capture's bulk copy did, in words: at most 2 MiB, the image's hash and write (``on_caller``)."""
    return " with the hash and the write it did as it marked the image final" if write.on_caller else ""


def plain_write_words(writes: list[DurableFloor]) -> str:
    """This host's plain durable writes of one benchmark, in words: the median of the faster way, then each way's."""
    faster = fmt_ns(median([w.total_ns for w in writes]))
    return f"{faster}, the faster way of each round: {floor_words(writes, fmt_ns)}"


@pytest.mark.parametrize("loader", LOADERS)
def test_benchmark_original_sequence_1MiB(report, benchmark, make_memory, make_marker16_vm, capture_snapshot,
                                          make_staging_memory, require, enter_guest, fresh_vm_floor, tmp_path, loader):
    """The whole original sequence at 1 MiB: capture into the file, restore into a fresh VM, re-run to HLT;
    against a fresh VM, and against this host's limit for it: a fresh VM plus the plain durable write of the same
    1 MiB (``durable_floor``) measured before each round. The capture copies into staging memory kept between
    rounds, as a snapshotter that captures again and again keeps it, and pwrites it into the page cache, where
    the restore reads it (``SEQUENCE_WAY``)."""
    if loader == "lazy-uffd":
        require("uffd.MISSING_SHMEM")
    with report.stage("source VM halted") as st:
        mem = make_memory("memfd", 1 << 20)
        _, vcpu = make_marker16_vm(mem)
        ex = vcpu.run(timeout=RUN_TIMEOUT_S)
        st.check(ex.reason is ExitReason.HLT, "source guest halted", f"source guest did not halt: {ex.describe()}")
        staging = make_staging_memory(mem.size)
        st.timing("staging memory allocated", staging.alloc_ns, "once, before the rounds, in none of them")

    rounds: list[dict[str, int]] = []
    live: list[tuple[FileCapture, RestoredVm, int, Exit]] = []
    plain_writes: list[DurableFloor] = []
    writes: list[WriteStats] = []

    def before_round() -> None:
        """Untimed: the marker put back, and the host's plain durable write of the same memory, interleaved with
        the rounds so a busy host slows both alike."""
        plain_writes.append(durable_floor(tmp_path / "plain.raw", mem))
        mem.write(MARKER, bytes([BEFORE]))

    def sequence() -> None:
        t0 = clock()
        cap = capture_snapshot(mem, f"sequence-{len(rounds)}", way=SEQUENCE_WAY, staging=staging)
        restored = restore_vm(cap.image.path, loader, verify=False, reset=partial(enter_guest, "marker16"))
        ex = restored.vcpu.run(timeout=RUN_TIMEOUT_S)
        live.append((cap, restored, clock() - t0, ex))

    def check_and_close(*_args: object) -> None:
        """After each round, outside the timing: what the round did, then close it and drop its file."""
        while live:
            cap, restored, total, ex = live.pop()
            try:
                writes.append(cap.write)
                rounds.append({"total": total, "capture": cap.total_ns, "file": cap.file_ns, "engine": cap.engine_ns,
                               "ready": restored.ready_ns, "run": ex.run_ns,
                               "ok": ex.reason is ExitReason.HLT and restored.memory.byte(MARKER) == AFTER})
            finally:
                restored.close()
                os.unlink(cap.image.path)

    with report.stage(f"capture + restore ({loader}) + re-run, {BENCH_ROUNDS * 2} rounds") as st:
        try:
            benchmark.pedantic(sequence, setup=before_round, teardown=check_and_close, rounds=BENCH_ROUNDS * 2,
                               iterations=1)
        finally:
            check_and_close()
        bad = [i for i, r in enumerate(rounds) if not r["ok"]]
        st.check(not bad, f"every round re-ran to HLT with {AFTER:#04x} at 0x1000 ({len(rounds)} rounds)",
                 f"rounds {bad} did not re-run to {AFTER:#04x} at 0x1000")

    with report.stage("figures") as st:
        total = median([r["total"] for r in rounds])
        floor = fresh_vm_floor["median_ns"]
        st.timing("sequence", total, "median; capture + restore + re-run, the content check excluded; "
                  f"{total / floor:.2f}x a fresh VM over memory already in place ({fmt_ns(floor)}); forkd's PR #160 "
                  "took 162.6 ms")
        st.target("capture + restore + re-run at 1 MiB (median)", total, SEQUENCE_TARGET_NS, "ns")
        st.target("capture + restore + re-run at 1 MiB over a fresh VM (median)", total / floor, SEQUENCE_TARGET_X,
                  "x", source="issue 15: within 2x of the fresh-VM floor")
        plain = median([w.total_ns for w in plain_writes])
        limit = floor + plain
        st.timing("host limit", limit, f"a fresh VM ({fmt_ns(floor)}) + the plain durable write of the same 1 MiB "
                  f"({plain_write_words(plain_writes)}); the sequence takes {total / limit:.2f}x it")
        if (needed := SEQUENCE_TARGET_X * floor) < limit:
            st.note(f"the {SEQUENCE_TARGET_X}x target is past this host's own limit: it is a sequence in "
                    f"{fmt_ns(needed)}, and a fresh VM plus the plain durable write alone take {fmt_ns(limit)}")
        st.timing("capture", median([r["capture"] for r in rounds]),
                  f"engine {fmt_ns(median([r['engine'] for r in rounds]))} (its bulk copy into the kept staging "
                  f"memory{copier_also(writes[0])}), file finalize {fmt_ns(median([r['file'] for r in rounds]))} "
                  f"(the writes' and the hash's tails, fsync x2); the image reached the file by {SEQUENCE_WAY.words}, "
                  f"hashed and written {writes[0].where}")
        st.timing("restore -> ready", median([r["ready"] for r in rounds]))
        st.timing("re-run", median([r["run"] for r in rounds]), "entry to HLT with the first touch of its pages")
        report.figure("sequence_ns", [r["total"] for r in rounds], "ns",
                      what="capture + restore + re-run, the content check excluded")
        report.figure("sequence_ratio_to_fresh_vm", [r["total"] / floor for r in rounds], "x",
                      what="each sequence over the fresh VM's median, same run")
        report.figure("sequence_ratio_to_durable_limit",
                      [r["total"] / (floor + w.total_ns) for r, w in zip(rounds, plain_writes, strict=True)], "x",
                      what="each sequence over the fresh VM's median plus the plain durable write of the same 1 MiB "
                           "measured right before it")


@pytest.mark.sizes(1 << 20, 64 << 20)
@pytest.mark.parametrize("way", list(ImageWay), ids=[w.value for w in ImageWay])
def test_benchmark_capture_to_file(report, benchmark, make_memory, make_marker16_vm, capture_snapshot, host_limits,
                                   make_staging_memory, tmp_path, mem_size, way):
    """Capturing a stopped VM's memory into a durable snapshot file, each way its image can reach the file, against
    this host's plain durable write of the same bytes (``durable_floor``) measured right before each round."""
    with report.stage("source VM halted, memory populated") as st:
        mem = make_memory("memfd", mem_size)
        mem.populate()  # the guest's memory is warm; the file's page cache is not (a new file each round)
        _, vcpu = make_marker16_vm(mem)
        ex = vcpu.run(timeout=RUN_TIMEOUT_S)
        st.check(ex.reason is ExitReason.HLT, "source guest halted", f"source guest did not halt: {ex.describe()}")
        # Writing from anonymous memory, the capturer keeps that memory from one capture to the next: allocated here.
        staging = None if way is ImageWay.MAPPING else make_staging_memory(mem_size)
        if staging is not None:
            st.timing("staging memory allocated", staging.alloc_ns, "once, before the rounds, in none of them")

    rounds: list[FileCapture] = []
    plain_writes: list[DurableFloor] = []

    def write_plainly() -> None:
        """Untimed by the benchmark, interleaved with its rounds: a busy host slows both alike."""
        plain_writes.append(durable_floor(tmp_path / "plain.raw", mem))

    def capture() -> None:
        rounds.append(capture_snapshot(mem, f"bench-{len(rounds)}", vcpus=[vcpu], way=way, staging=staging))

    def drop_file(*_args: object) -> None:
        os.unlink(rounds[-1].image.path)  # untimed: freeing a big file's page cache is no part of a capture

    with report.stage(f"capture into a new file, {BENCH_ROUNDS} rounds") as st:
        benchmark.pedantic(capture, setup=write_plainly, teardown=drop_file, rounds=BENCH_ROUNDS, iterations=1)
        total = median([c.total_ns for c in rounds])
        plain = median([p.total_ns for p in plain_writes])
        memcpy_ns = mem_size / host_limits["memcpy_bytes_per_s"] * 1e9
        st.timing("capture", total, f"median; file create + engine + file finalize; {total / plain:.2f}x this host's "
                  f"plain durable write of {fmt_bytes(mem_size)} ({plain_write_words(plain_writes)}); "
                  f"{total / memcpy_ns:.1f}x a warm memcpy ({fmt_ns(memcpy_ns)})")
        writes = [c.write for c in rounds]
        st.timing("file created", median([c.create_ns for c in rounds]),
                  f"sized, its header written, the image's memory allocated for the copy; the image reaches the file "
                  f"by {writes[0].how}")
        st.timing("engine", median([c.engine_ns for c in rounds]),
                  f"arm {fmt_ns(median([c.arm_ns for c in rounds]))}, bulk copy "
                  f"{fmt_ns(median([c.bulk_ns for c in rounds]))}{copier_also(writes[0])}, finalize "
                  f"{fmt_ns(median([c.finalize_ns for c in rounds]))} (un-protect + join, no fixed sleep)")
        st.timing("hash", median([w.hash_ns for w in writes]),
                  f"{writes[0].hash_algo.name.lower()} {writes[0].where}; finalize waited "
                  f"{fmt_ns(median([w.hash_wait_ns for w in writes]))} for it (and the writes)")
        if way is not ImageWay.MAPPING:
            st.timing("writes", median([w.write_ns for w in writes]), "each final piece from the staging memory")
        st.timing("writeback", median([w.writeback_ns for w in writes]),
                  "sync_file_range of each piece written to the page cache (none by O_DIRECT)")
        st.timing("fsync", median([w.sync_ns for w in writes]),
                  "finalize's two: the image (what writeback left, or the blocks O_DIRECT allocated) and the vCPU "
                  "section, then the header with COMPLETE")
        st.timing("file finalize", median([c.file_ns for c in rounds]), "the hash's tail, vCPU section, fsync x2")
        rest_from = "read back from the file" if way is ImageWay.MAPPING else "from memory as it was written"
        st.note(f"hashed as the copy went: {fmt_bytes(min(w.hashed_as_final for w in writes))} of "
                f"{fmt_bytes(mem_size)} (the least of any round); hashed at finalize, {rest_from}: "
                f"{fmt_bytes(max(w.hashed_at_finalize for w in writes))} (the most)")
        if stopped := {w.writeback_error for w in writes} - {""}:
            st.note(f"early writeback stopped (the fsyncs wrote everything): {'; '.join(sorted(stopped))}")
        st.check(all(c.stats.bulk_pages == mem_size // PAGE_SIZE for c in rounds),
                 f"every round's bulk copy captured all {mem_size // PAGE_SIZE} pages",
                 f"bulk pages per round: {[c.stats.bulk_pages for c in rounds]}")
        bulk = min(c.bulk_ns for c in rounds)
        if bulk * LIMIT_SLACK < memcpy_ns:
            why = (f"a bulk copy of {fmt_bytes(mem_size)} into the file in {fmt_ns(bulk)}, {memcpy_ns / bulk:.2f}x as "
                   f"fast as this host's warm memcpy of it ({fmt_ns(memcpy_ns)}, same run; limit {LIMIT_SLACK}x)")
            st.note(f"MEASUREMENT ERROR: {why}")
            report.measurement_error("capture_bulk_copy_ns", bulk, why)
        report.figure("capture_ns", [c.total_ns for c in rounds], "ns",
                      what="file create + engine + file finalize")
        report.figure("capture_ratio_to_memcpy", [c.total_ns / memcpy_ns for c in rounds], "x",
                      what="each capture over a warm memcpy of the memory at this run's memcpy rate")
        report.figure("capture_hash_ns", [w.hash_ns for w in writes], "ns",
                      what="time in the content hash, on the writer's thread (overlapping the copy)")
        report.figure("capture_fsync_ns", [w.sync_ns for w in writes], "ns", what="finalize's two fsyncs")
        report.figure("durable_write_ns", [p.total_ns for p in plain_writes], "ns",
                      what=f"{DURABLE_WRITE_HOW}; no WP, no hash: the reference")
        report.figure("capture_ratio_to_durable_write",
                      [c.total_ns / f.total_ns for c, f in zip(rounds, plain_writes, strict=True)], "x",
                      what="each capture over the plain durable write measured right before it")
