"""Phase 6 — incremental snapshots: a base and its diffs restore to exactly the full snapshot at the same instant.

A VMM that snapshots often writes one full base, then diffs: only the pages written since the parent,
found by a dirty-page tracker (native/dirty.py), each diff naming its parent by content hash
(native/diff_image.py). Firecracker's first diff snapshots restored guests with inconsistent memory
(issue #1997): KVM's dirty log sees what the guest writes through KVM_RUN and never what the VMM
itself writes into guest memory, as device emulation does. A diff is correct only if the VMM adds the
pages it wrote itself (native/incremental.py, HostWrites).

For each tracker (KVM's dirty log; uffd WP_ASYNC + PAGEMAP_SCAN; soft-dirty where the kernel has it)
one storm32 vCPU sweeps its region, half of it never populated at the start, while the VMM's device
emulation writes a device area at the top of RAM, half of it never populated either:

1. the guest runs to a mark in its first sweep; at that pause the tracker starts and the VMM writes
   the base, a full snapshot;
2. three times: the guest writes on and the devices write pages of their own; the VMM pauses the
   guest and writes a diff (the tracker's pages and its own log), and, as the oracle, a full snapshot
   at the same pause;
3. the table: which writes the tracker saw (the guest's, the host's, into never-populated pages) and
   each diff's size against the pages written since its parent;
4. each chain (the base and 1, 2, 3 diffs) restored through every loader equals the full snapshot
   taken at its newest diff's pause, byte for byte, and the full chain's guest resumes and completes
   its sweep at exactly that sweep's end.

A chain with a wrong or missing parent is refused by every loader, naming both files and hashes.
Diff sizes and restore times per chain length are report figures, never asserted.
"""

from __future__ import annotations

import shutil
import time

import pytest
from snapproof.guests import storm
from snapproof.native.compare import describe_difference, differing_pages
from snapproof.native.diff_image import (
    ChainError,
    bitmap_of,
    count,
    empty_bitmap,
    intersect,
    minus,
    open_chain,
    pages_in,
)
from snapproof.native.dirty import KVM_DIRTY_LOG, TRACKER_NEEDS, TRACKERS, make_tracker, unpopulated
from snapproof.native.incremental import HostWrites, IncrementalSnapshots, write_full_snapshot
from snapproof.native.kvm import KVM_MEM_LOG_DIRTY_PAGES, ExitReason
from snapproof.native.layout import LOW_RAM_END, gpa_of
from snapproof.native.live import VcpuRunner
from snapproof.native.memory import PAGE_SIZE
from snapproof.native.restore import LOADERS
from snapproof.results.record import fmt_bytes, fmt_ns

pytestmark = [pytest.mark.phase(6, "incremental snapshots"), pytest.mark.platform("linux"),
              pytest.mark.needs("kvm")]

GUEST_TIMEOUT_S = 120.0
DIFFS = 3
# The device area: the top DEVICE_PAGES pages of RAM below the 32-bit hole, out of the storm's reach. The VMM
# fills its first half before the base; each interval its devices rewrite DEVICE_WRITES of those pages and write
# DEVICE_WRITES pages of the second half for the first time (never populated until then).
DEVICE_PAGES = 64
DEVICE_WRITES = 8
# Between two pauses the guest writes at least this many pages of its sweep (more at small sizes, where the
# pause lands sweeps later): diffs stay small against memory however large it is.
INTERVAL_PAGES_MAX = 2048
TRACKER_CASES = [pytest.param(t, marks=pytest.mark.needs(*TRACKER_NEEDS[t]), id=t) for t in TRACKERS]
SEEN = ("guest", "guest, never populated", "host", "host, never populated")
COLUMNS = (14, 18, 13, 18)  # the table's widths for SEEN's columns
clock = time.perf_counter_ns


@pytest.fixture
def make_dirty_tracker(make_memory, make_vm):
    """Factory: ``make_dirty_tracker(name, memory, vm)`` -> native.dirty tracker; closed (WP released) at
    teardown, before the VM and the memory it watches."""
    made = []

    def _make(name, memory, vm):
        t = make_tracker(name, memory, vm)
        made.append(t)
        return t

    yield _make
    for t in reversed(made):
        t.close()


@pytest.fixture
def chain_folder(tmp_path):
    """Where a case's bases, diffs and full snapshots go; deleted at teardown, so 1 GiB and 4 GiB chains do not pile
    up in the temporary directories pytest keeps."""
    folder = tmp_path / "chain"
    folder.mkdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def device_page(mem_size: int, i: int) -> int:
    """Memory offset of page i of the device area (the top of RAM below the 32-bit hole)."""
    return min(mem_size, LOW_RAM_END) - (DEVICE_PAGES - i) * PAGE_SIZE


def device_data(interval: int, page: int) -> bytes:
    """What the devices write into a page in an interval: unlike anything there before (so the page changes)."""
    return (0xDE71CE00 | interval).to_bytes(4, "little") * 2 + page.to_bytes(8, "little") * (PAGE_SIZE // 8 - 1)


def devices_write(host: HostWrites, mem_size: int, interval: int) -> None:
    """Device emulation in an interval: the VMM rewrites DEVICE_WRITES pages of the device area's populated half
    and fills DEVICE_WRITES pages of its never-populated half, a plain copy through its own mapping each."""
    for i in range(DEVICE_WRITES):
        again = (interval * DEVICE_WRITES + i) % (DEVICE_PAGES // 2)
        first = DEVICE_PAGES // 2 + (interval - 1) * DEVICE_WRITES + i
        for page in (again, first):
            host.write(device_page(mem_size, page), device_data(interval, page))


def step_past(p, at: int, pages: int):
    """The stream point ``pages`` pages of writes past instant ``at``, moved on to the first page of the populated
    half of the region: a page the host may poll through its mapping without populating it."""
    pos = at + 2 * pages
    pos += pos % 2  # a page's first stamp
    while True:
        point = storm.stream_point(p, pos)
        assert point is not None, "storm32 runs forever here (generations = 0): every position is a write"
        if point.page < p.npages // 2:
            return point
        pos += 2


def stamped(mem, p, point) -> bool:
    """Whether the guest has written the first stamp of ``point`` (its gen word has reached point's generation)."""
    return int.from_bytes(mem.read(p.page_gpa(point.page), 4), "little") >= point.generation


def unchanged_text(p, unchanged, next_write) -> str:
    """Why a diff holds pages that did not change: the page of the guest's next store at the pause, marked by its
    write fault before the pause cut the store, which lands after the resume (in the next diff)."""
    pages = list(pages_in(unchanged))
    gpas = ", ".join(f"{gpa_of(q * PAGE_SIZE):#x}" for q in pages[:4])
    if next_write is not None and pages == [(p.region_gpa + next_write.page * PAGE_SIZE) // PAGE_SIZE]:
        return (f"GPA {gpas}, where the guest's next store at the pause goes ({next_write}): its write fault marked "
                "the page, the pause came before the store ran, and it lands after the resume")
    return f"GPA {gpas}: marked by the tracker, or written with the bytes they held"


def seen_text(seen: int, total: int) -> str:
    return f"{seen}/{total}" if total else "-"


def why_missing(taken, written, holes, upto: int) -> str:
    """For a chain that differs from its oracle: what its diffs lack of the pages written, by whom."""
    parts = []
    for k in range(1, upto + 1):
        missing = minus(written[k], taken[k].image.bitmap)
        if count(missing):
            host = count(intersect(missing, taken[k].host))
            first = next(pages_in(missing))
            parts.append(f"diff {k} lacks {count(missing)} pages written since its parent ({host} by the host's "
                         f"device emulation, {count(missing) - host} by the guest; "
                         f"{count(intersect(missing, holes[k - 1]))} never populated before), first at GPA "
                         f"{gpa_of(first * PAGE_SIZE):#x}")
    return "; " + "; ".join(parts) if parts else ""


@pytest.mark.sizes(1 << 20, 64 << 20, 256 << 20)
@pytest.mark.parametrize("tracker", TRACKER_CASES)
def test_chain_restores_to_the_full_snapshot_at_the_same_instant(report, make_storm_vm, make_memory, make_dirty_tracker,
                                                                 make_restored_chain, inject, chain_folder, mem_size,
                                                                 tracker):
    """A base and 1..3 diffs, written while the guest and the VMM's devices write, restore through every loader to
    exactly the full snapshot taken at the newest diff's pause."""
    npages = mem_size // PAGE_SIZE
    with report.stage("storm guest and device area") as st:
        storm_vm = make_storm_vm("memfd", mem_size, 1, slot_flags=KVM_MEM_LOG_DIRTY_PAGES,
                                 mark=lambda n: n // 8, reserve=DEVICE_PAGES * PAGE_SIZE)
        mem, p = storm_vm.memory, storm_vm.params[0]
        # Half the storm region populated (zero pages, as the guest left them), half never populated.
        mem.populate(p.region_gpa, p.npages // 2 * PAGE_SIZE)
        host = HostWrites(mem)
        for i in range(DEVICE_PAGES // 2):
            host.write(device_page(mem_size, i), device_data(0, i))
        dirty = make_dirty_tracker(tracker, mem, storm_vm.vm)
        snaps = IncrementalSnapshots(mem, dirty, host, chain_folder, inject)
        ex = storm_vm.run_to_marks(GUEST_TIMEOUT_S)[0]
        st.check(ex.reason is ExitReason.SYNC and ex.last_sync == p.mark_sync,
                 f"storm32 at its mark, {p.mark_pages} of {p.npages} pages into its first sweep",
                 f"expected the mark sync {p.mark_sync:#x}, saw {ex.describe()} (sync {ex.last_sync:#x})")
        st.note(f"{fmt_bytes(mem_size)} memfd; storm region {p.npages} pages from GPA {p.region_gpa:#x}, the first "
                f"{p.npages // 2} populated; device area {DEVICE_PAGES} pages from GPA "
                f"{gpa_of(device_page(mem_size, 0)):#x}, the first {DEVICE_PAGES // 2} populated; tracker {tracker}")

    step = max(1, min(INTERVAL_PAGES_MAX, (p.npages - p.mark_pages) // (DIFFS + 1)))
    at = p.mark_position  # the storm's instant at the last pause: the base is taken at the mark
    # Per pause: the full snapshot (mapped), the diff, the never-populated pages, the storm's next write.
    images, taken, holes, next_writes = [], [None], [], [storm.stream_point(p, at)]
    with VcpuRunner(storm_vm.vm.vcpus, timeout=GUEST_TIMEOUT_S) as runner:  # stopped on every way out
        runner.start(paused=True)  # each vCPU parked where it is, at its mark
        with report.stage("base: a full snapshot, tracking started at the same pause") as st:
            stop_ns = runner.pause()  # parked at the mark: the base is exactly that instant
            base = snaps.base([v.save_state() for v in runner.vcpus])
            holes.append(unpopulated(mem))
            runner.resume()
            images.append(make_memory("file-readonly", mem_size, path=base.image.path,
                                      offset=base.image.memory_offset))
            st.timing("base", base.ns, f"{fmt_bytes(mem_size)} image: {base.data_bytes / mem_size:.0%} of it data "
                      f"extents read through the memfd, the rest holes; sha256, fsync; kick->stopped {fmt_ns(stop_ns)}")
            st.note(f"{count(holes[0])} of {npages} pages never populated at the base")

        for k in range(1, DIFFS + 1):
            with report.stage(f"diff {k}: the guest and the devices write, the VMM pauses") as st:
                target = step_past(p, at, step)
                storm_vm.wait(lambda t=target: stamped(mem, p, t), f"{step} pages written since the last pause "
                              f"(page {target.page} of sweep {target.generation})", timeout=GUEST_TIMEOUT_S)
                devices_write(host, mem_size, k)
                kick = clock()
                stop_ns = runner.pause()
                states = [v.save_state() for v in runner.vcpus]
                d = snaps.diff(states)
                pause_ns = clock() - kick
                # The oracle, at the same pause: the test's, not the VMM's work (outside the pause window).
                full = write_full_snapshot(chain_folder / f"full-{k}.snap", mem, states)
                holes.append(unpopulated(mem))
                runner.resume()
                taken.append(d)
                images.append(make_memory("file-readonly", mem_size, path=full.image.path,
                                          offset=full.image.memory_offset))
                with storm_vm.region_view(images[k].mm, 0) as region:
                    instant = storm.check_instant(p, region)
                st.check(instant.ok, f"the full snapshot at this pause is one instant of the storm: {instant.message}",
                         f"the oracle itself is not one instant of the storm: {instant.message}")
                at = instant.lo
                next_writes.append(storm.stream_point(p, at))
                st.note(f"diff {k}: {d.pages} pages ({count(d.tracked)} named by the tracker, {count(d.host)} by the "
                        f"VMM's own log), {d.image.file_length / 1024:.0f} KiB on disk; parent "
                        f"{d.image.parent_hash.hex()[:16]}, content {d.image.content_hash.hex()[:16]}")
                st.timing("pause window", pause_ns, f"kick->stopped {fmt_ns(stop_ns)}, vCPU state saved, the tracker's "
                          f"get-and-clear {fmt_ns(d.collect_ns)}, the diff file {fmt_ns(d.write_ns)} (pages gathered "
                          "through the memfd, sha256, fsync)")
                st.timing("oracle", full.ns, "the full snapshot at the same pause: test mode, outside the window")
        exits = runner.stop()

    with report.stage(f"which writes {tracker} saw") as st:
        for i, ex in sorted(exits.items()):
            st.check(ex.reason is ExitReason.KICKED, f"vCPU {i} wrote throughout (still running when stopped)",
                     f"vCPU {i} ended with {ex.describe()} before it was stopped")
        written = [empty_bitmap(npages)] + [bitmap_of(differing_pages(images[k - 1].mm, images[k].mm), npages)
                                            for k in range(1, DIFFS + 1)]
        totals = dict.fromkeys(SEEN, (0, 0))
        rows = []
        st.note(f"{'':8}{'guest writes':>14}{'  never populated':>18}{'host writes':>13}{'  never populated':>18}"
                f"{'diff pages / written':>23}")
        for k in range(1, DIFFS + 1):
            d = taken[k]
            guest = minus(written[k], d.host)
            cats = {"guest": minus(guest, holes[k - 1]), "guest, never populated": intersect(guest, holes[k - 1]),
                    "host": minus(d.host, holes[k - 1]), "host, never populated": intersect(d.host, holes[k - 1])}
            seen = {c: (count(intersect(pages, d.tracked)), count(pages)) for c, pages in cats.items()}
            for c, (a, b) in seen.items():
                totals[c] = (totals[c][0] + a, totals[c][1] + b)
            missing = count(minus(written[k], d.image.bitmap))
            unchanged = minus(d.image.bitmap, written[k])
            if count(unchanged):
                st.note(f"diff {k} holds {count(unchanged)} page(s) that did not change since its parent: "
                        + unchanged_text(p, unchanged, next_writes[k]))
            ratio = f"{d.pages}/{count(written[k])} = {d.pages / max(count(written[k]), 1):.2f}"
            st.note(f"diff {k}: " + "".join(f"{seen_text(*seen[c]):>{w}}" for c, w in zip(SEEN, COLUMNS, strict=True))
                    + f"{ratio:>23}" + (f"  {missing} written pages NOT in the diff" if missing else ""))
            rows.append({"diff": k, "pages": d.pages, "pages_written": count(written[k]), "missing": missing,
                         "unchanged": count(unchanged),
                         "tracked": count(d.tracked), "host_log": count(d.host), "file_bytes": d.image.file_length,
                         **{c.replace(", ", "_").replace(" ", "_"): list(seen[c]) for c in SEEN}})
        diff_pages, all_written = sum(r["pages"] for r in rows), sum(r["pages_written"] for r in rows)
        total = f"{diff_pages}/{all_written} = {diff_pages / max(all_written, 1):.2f}"
        st.note("total:  " + "".join(f"{seen_text(*totals[c]):>{w}}" for c, w in zip(SEEN, COLUMNS, strict=True))
                + f"{total:>23}")
        verdict = {c: ("sees" if a == b else "misses some" if a else "misses") if b else "not exercised"
                   for c, (a, b) in totals.items()}
        st.note(f"{tracker}: " + "; ".join(f"{c} writes: {v} ({seen_text(*totals[c])})" for c, v in verdict.items()))
        if any(totals[c][0] < totals[c][1] for c in ("host", "host, never populated")):
            st.note("the host's writes reach the diffs through the VMM's own log of them (HostWrites)")
        report.fact("tracker", tracker)
        report.fact("tracker_sees", {c.replace(", ", "_").replace(" ", "_"): list(totals[c]) for c in SEEN})
        report.fact("diffs", rows)
        st.check(all(totals[c][1] for c in SEEN),
                 "every kind of write happened: guest and host, into populated and never-populated pages",
                 "a kind of write never happened, nothing was proved about it: "
                 + ", ".join(c for c in SEEN if not totals[c][1]))

    with report.stage("the chain's hashes") as st:
        t0 = clock()
        chain = open_chain(snaps.paths[0], snaps.paths[1:], verify=True)
        st.check(all(f.verified for f in (chain.base, *chain.diffs)),
                 f"the base's and each diff's content hash match their files; each diff names the file before it "
                 f"({chain.head.content_hash.hex()[:16]} heads it)")
        st.timing("verified open", clock() - t0, f"sha256 of the {fmt_bytes(mem_size)} base and the {DIFFS} diffs; "
                  "outside the restore figures, which open the chain unverified")

    resume_at = storm_vm.progress(0, image=images[DIFFS].mm).done_gen + 1
    restore_ns: dict[str, list[int]] = {}
    for loader in LOADERS:
        with report.stage(f"restore ({loader}): the base and 1..{DIFFS} diffs") as st:
            for k in range(1, DIFFS + 1):
                restored = make_restored_chain(snaps.paths[:k + 1], loader, verify=False)
                prefetch = ""
                if restored.vm.lazy is not None:
                    rest = restored.vm.lazy.prefetch_all()  # outside the figure: the compare reads every page
                    prefetch = f"; then {rest} pages the guest never touched prefetched"
                diff = describe_difference(images[k].mm, restored.memory.mm)
                st.check(not diff, f"base + {k} diff(s) = the full snapshot at pause {k}, byte for byte "
                         f"({fmt_bytes(mem_size)}, {restored.applied.pages} pages from the diffs)",
                         f"base + {k} diff(s) restored by {loader} vs the full snapshot at pause {k}: {diff}"
                         + why_missing(taken, written, holes, k))
                st.timing(f"restore, chain of {k}", restored.ready_ns,
                          f"chain opened {fmt_ns(restored.open_ns)}, {loader} {fmt_ns(restored.vm.load_ns)}, VM + "
                          f"vCPU {fmt_ns(restored.vm.vm_ns + restored.vm.state_ns)}, diffs applied "
                          f"{fmt_ns(restored.applied.ns)} ({restored.applied.pages} pages, "
                          f"{restored.applied.installed} by UFFDIO_COPY){prefetch}")
                restore_ns.setdefault(loader, []).append(restored.ready_ns)
                if k < DIFFS:
                    restored.close()

            ex = restored.vm.vcpu.run(timeout=GUEST_TIMEOUT_S, stop_on_sync=True)
            st.check(ex.reason is ExitReason.SYNC and ex.last_sync == resume_at,
                     f"the full chain's guest resumed from the head's vCPU state and completed sweep {resume_at}",
                     f"expected the end of sweep {resume_at} (sync {resume_at:#x}), saw {ex.describe()} "
                     f"(sync {ex.last_sync:#x})")
            with storm_vm.region_view(restored.memory.mm, 0) as region:
                at_end = storm.check_instant(p, region)
            st.check(at_end.ok and at_end.lo == at_end.hi == p.sync_position(resume_at),
                     f"its region is the storm at the end of sweep {resume_at}: {at_end.message}",
                     f"its region at the end of sweep {resume_at}: expected "
                     f"{storm.describe_instant(p, p.sync_position(resume_at))}, saw {at_end.message}")
            restored.close()

    with report.stage("figures") as st:
        st.note(f"{'loader':<14}" + "".join(f"{f'chain of {k}':>14}" for k in range(1, DIFFS + 1)))
        for loader, times in restore_ns.items():
            st.note(f"{loader:<14}" + "".join(f"{fmt_ns(t):>14}" for t in times))
        report.fact("restore_ns", restore_ns)
        report.fact("diff_pages_per_page_written", [round(r["pages"] / max(r["pages_written"], 1), 3) for r in rows])


# -- a chain that does not fit together -------------------------------------------------------------


@pytest.fixture
def three_chains(make_memory, make_vm, make_dirty_tracker, chain_folder):
    """Two chains over one 1 MiB memfd, written by the VMM alone: base A with diffs A1, A2, base B with diff B1.
    Returns their paths by name."""
    mem = make_memory("memfd", 1 << 20)
    vm = make_vm(mem, flags=KVM_MEM_LOG_DIRTY_PAGES)
    host = HostWrites(mem)
    paths = {}
    for name, diffs in (("A", 2), ("B", 1)):
        folder = chain_folder / name
        folder.mkdir()
        snaps = IncrementalSnapshots(mem, make_dirty_tracker(KVM_DIRTY_LOG, mem, vm), host, folder)
        host.write(0x20000, name.encode() * 64)
        paths[name] = snaps.base([]).image.path
        for k in range(1, diffs + 1):
            host.write(0x20000 + k * PAGE_SIZE, f"{name}{k}".encode() * 64)
            paths[f"{name}{k}"] = snaps.diff([]).image.path
    return paths


@pytest.mark.parametrize("loader", LOADERS)
def test_a_chain_with_a_wrong_or_missing_parent_is_refused_naming_both(report, three_chains, make_restored_chain,
                                                                     loader):
    """A diff from another chain, a chain with a diff left out, and diffs out of order are refused before anything
    is loaded, the error naming the diff, the parent hash it names, and the file it got instead."""
    c = three_chains
    with report.stage("the chain as written restores") as st:
        restored = make_restored_chain([c["A"], c["A1"], c["A2"]], loader)
        st.equal(restored.memory.read(0x22000, 4), b"A2A2", "memory at GPA 0x22000 (diff 2's write)", repr)
        restored.close()
    cases = [
        ("a diff of another chain", [c["A"], c["B1"]], "diff[1].parent_hash", "B",
         "no file of this chain has it: the diff's parent is missing (or from another chain)"),
        ("its parent left out", [c["A"], c["A2"]], "diff[1].parent_hash", "A1",
         "no file of this chain has it: the diff's parent is missing (or from another chain)"),
        ("diffs out of order", [c["A"], c["A2"], c["A1"]], "diff[1].parent_hash", "A1",
         "later in the chain: the diffs are out of order"),
    ]
    from snapproof.native.diff_image import DiffImage
    from snapproof.native.image import SnapshotImage

    def content_hash(name: str) -> str:
        opened = SnapshotImage.open(c[name]) if len(name) == 1 else DiffImage.open(c[name])
        return opened.content_hash.hex()

    for what, paths, field, named, why in cases:
        with report.stage(f"{what}: refused by {loader}") as st:
            with pytest.raises(ChainError) as info:
                make_restored_chain(paths, loader)
            err = str(info.value)
            st.check(info.value.field == field and paths[1] in err and content_hash(named) in err
                     and content_hash("A") in err and why in err,
                     f"refused: {err}",
                     f"expected a ChainError on {field} naming {paths[1]}, the parent hash it names "
                     f"({content_hash(named)[:16]}...) and the one it got ({content_hash('A')[:16]}...), {why!r}; "
                     f"saw {info.value.field}: {err}")
