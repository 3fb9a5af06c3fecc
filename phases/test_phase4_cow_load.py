"""Phase 4 — a snapshot file loads copy-on-write: the guest sees its writes and the file never changes.

The original bug (hyperlight #1373, fixed in #1391): on Windows the snapshot
file was mapped PAGE_READONLY + FILE_MAP_READ, and the guest's first write took
an access violation on the host thread. The fix mapped it PAGE_WRITECOPY +
FILE_MAP_COPY, the twin of Linux's MAP_PRIVATE. That fix costs commit for the
whole view per VM, so hyperlight later mapped the file read-only and copied on
write at the second-level page tables. This phase proves both loads on KVM:

- ``map-private``: the OS copies on write (MAP_PRIVATE of the file);
- ``hypervisor-cow``: KVM_MEM_READONLY slots over a PROT_READ view of the file;
  each first guest write to a page exits, the loader copies the page into
  private memory and maps it writable there (native/hv_cow.py);

puts their private memory and commit per VM side by side for 16 VMs of one
256 MiB file, and shows the read-only mapping failing the way the original bug did.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest
from snapproof.guests import counter
from snapproof.native.compare import describe_cow_difference, describe_difference
from snapproof.native.image import SnapshotImage
from snapproof.native.inject import FaultInjection
from snapproof.results.record import fmt_bytes

from snapproof import guests

pytestmark = [pytest.mark.phase(4, "copy-on-write load")]
linux_only = pytest.mark.platform("linux")      # KVM backend
windows_only = pytest.mark.platform("win32")    # WHP backend

RUN_TIMEOUT_S = 30.0
# The two copy-on-write loads on KVM; the hypervisor-level one needs read-only memslots.
LOADS = [pytest.param("map-private", marks=pytest.mark.needs("kvm")),
         pytest.param("hypervisor-cow", marks=pytest.mark.needs("kvm", "kvm.readonly_mem"))]
LOAD_HOW = {"map-private": "MAP_PRIVATE of the file: the OS copies a page at KVM's first write to it",
            "hypervisor-cow": "KVM_MEM_READONLY slots over a PROT_READ view; each write exit copies the page "
                              "into private memory, mapped writable in its place"}
ORIGINAL_BUG = ("the snapshot file is mapped read-only: the original PAGE_READONLY + FILE_MAP_READ bug "
                "(hyperlight #1373); map it copy-on-write (MAP_PRIVATE, or PAGE_WRITECOPY + FILE_MAP_COPY)")


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_counter_image(path, size: int, params: counter.CounterParams | None = None) -> SnapshotImage:
    """A snapshot file holding counter32's code, and its parameter block when ``params`` is given
    (otherwise each VM writes its own into its private copy)."""
    with SnapshotImage.create(path, size) as w:
        code = guests.load("counter32")
        w.memory[guests.FLAT32_LOAD_GPA:guests.FLAT32_LOAD_GPA + len(code)] = code
        if params is not None:
            block = params.pack()
            w.memory[guests.PARAM_BLOCK_GPA:guests.PARAM_BLOCK_GPA + len(block)] = block
        return w.finalize()


def counter_params(npages: int, region_page: int = 0, iterations: int | None = None) -> counter.CounterParams:
    return counter.CounterParams(region_gpa=guests.DATA_REGION_GPA + region_page * 4096, npages=npages,
                                 iterations=iterations or 4 * npages, sync_every=0)


def write_refused(ex) -> bool:
    """KVM stopped the guest at a write it could not back with host memory, in one of the ways a KVM says so:
    KVM_EXIT_MMIO (a write) on an emulating KVM (kvm_pvm); on hardware KVM, KVM_RUN failing with EFAULT
    (before 6.8) or with KVM_EXIT_MEMORY_FAULT (6.8+, KVM_CAP_MEMORY_FAULT_INFO)."""
    from snapproof.native.kvm import ExitReason

    return (ex.reason is ExitReason.MMIO and ex.mmio_is_write) or ex.reason in (ExitReason.EFAULT,
                                                                                 ExitReason.MEMORY_FAULT)


def expect_halt(st, ex, what: str) -> None:
    """A guest write that KVM could not back with memory is the read-only-mapping bug: say so."""
    from snapproof.native.kvm import ExitReason

    if write_refused(ex):
        st.check(False, "", f"{what}: KVM refused the guest's write ({ex.describe()}): {ORIGINAL_BUG}")
    st.check(ex.reason is ExitReason.HLT, f"{what} halted", f"{what} did not halt: {ex.describe()}")


def with_counter_writes(original: bytes, params: counter.CounterParams) -> bytes:
    """The memory a counter32 run should leave: the file's image with the model's region and parameter block."""
    want = counter.expected_final(params)
    image = bytearray(original)
    image[params.region_gpa:params.region_gpa + params.region_size] = want.region
    image[guests.PARAM_BLOCK_GPA:guests.PARAM_BLOCK_GPA + len(want.block)] = want.block
    return bytes(image)


@pytest.fixture
def cow_vm(make_memory, make_vm, inject):
    """Factory: ``cow_vm(image, params=None, load="map-private")`` -> (memory, vcpu): the file loaded
    copy-on-write at GPA 0 by ``load`` (LOADS), counter32 about to start; ``params``, when given, is
    written into this VM's private copy only."""

    def _make(image: SnapshotImage, params: counter.CounterParams | None = None, load: str = "map-private"):
        if load == "hypervisor-cow":
            mem = make_memory("hypervisor-cow", image.memory_size, path=image.path, offset=image.memory_offset,
                              inject=inject)
        else:
            readonly = bool(inject & FaultInjection.READ_ONLY_MAPPING)
            backing = "file-readonly" if readonly else "file-private"
            mem = make_memory(backing, image.memory_size, path=image.path, offset=image.memory_offset)
        block = guests.PARAM_BLOCK_GPA
        if params is not None:
            mem.write(block, params.pack())
        vm = make_vm(mem)
        vcpu = vm.add_vcpu()
        vcpu.set_flat32(eip=guests.FLAT32_LOAD_GPA, esp=0x7000, esi=block)
        return mem, vcpu

    return _make


def check_hypervisor_cow_exits(st, report, mem, ex, guest_pages: int, slots: int) -> None:
    """The hypervisor-level load served one write exit per page the guest wrote, each mapping the page
    writable (no exit on a page already private), in merged slots; the figures go to the report."""
    s = mem.stats
    st.equal(s.guest_pages, guest_pages, "pages the guest made private, each at a KVM_EXIT_MMIO write", str)
    st.equal(ex.mmio_served, s.write_exits, "write exits the run served", str)
    st.equal(s.exits_on_private_pages, 0, "write exits on a page already private (its writable slot took the "
             "guest's later writes)", str)
    mem.layout.check()
    st.equal(mem.layout.slots, slots, "memslots at the end (read-only gaps and merged private runs)", str)
    st.note(s.describe())
    report.fact("exits_per_written_page", round(s.exits_per_written_page, 3))
    report.fact("slot_ioctls_per_written_page", round(s.slot_ioctls_per_page, 3))
    report.fact("memslots_at_end", mem.layout.slots)


@linux_only
@pytest.mark.parametrize("load", LOADS)
def test_guest_sees_its_writes_and_the_file_never_changes(report, tmp_path, cow_vm, load):
    """counter32 runs from the file loaded copy-on-write (by the OS, or by the hypervisor a page a write exit):
    its read-modify-writes add up, the file is untouched."""
    params = counter_params(npages=16)
    with report.stage("snapshot file") as st:
        image = write_counter_image(tmp_path / "counter.snap", 1 << 20, params)
        before = file_sha256(image.path)
        original = image.read_memory()
        st.note(f"{fmt_bytes(image.memory_size)} image with counter32 and its parameters, sha256 {before[:16]}…")

    with report.stage(f"load copy-on-write ({load}) + run counter32") as st:
        st.note(LOAD_HOW[load])
        mem, vcpu = cow_vm(image, load=load)
        ex = vcpu.run(timeout=RUN_TIMEOUT_S)
        expect_halt(st, ex, "counter32")
        st.timing("guest run", ex.run_ns, "includes the copy-on-write of its first writes"
                  + (", each a write exit served" if load == "hypervisor-cow" else ""))

    with report.stage("the guest saw its writes") as st:
        want = with_counter_writes(original, params)
        seen = mem.snapshot_bytes()
        st.check(seen == want, f"all of memory is the file plus the guest's writes ({params.npages} pages of "
                 "read-modify-writes and its parameter block, as the counter model has them)",
                 f"memory differs from the file plus the counter model's writes: "
                 f"{describe_cow_difference(original, want, seen)}")
        st.equal(vcpu.regs()["eax"], counter.expected_final(params).checksum, "final checksum in EAX")

    if load == "hypervisor-cow":
        with report.stage("one write exit per page the guest wrote, each page then mapped writable") as st:
            # 16 region pages (one merged run) and the parameter block page: 5 slots around two runs.
            check_hypervisor_cow_exits(st, report, mem, ex, guest_pages=params.npages + 1, slots=5)

    with report.stage("the file never changed") as st:
        st.equal(file_sha256(image.path), before, "file sha256", lambda v: str(v)[:16] + "…")
        on_disk = SnapshotImage.open(image.path, verify=True).read_memory(params.region_gpa, params.region_size)
        st.check(on_disk == bytes(params.region_size), "the region on disk is still all zero",
                 "guest writes reached the file")


@linux_only
@pytest.mark.parametrize("load", LOADS)
def test_two_vms_from_one_file_are_isolated(report, tmp_path, cow_vm, load):
    """Two VMs loaded copy-on-write from one file each see only their own writes."""
    a_params = counter_params(npages=8, region_page=0)
    b_params = counter_params(npages=8, region_page=64)
    with report.stage(f"one file, two copy-on-write VMs ({load})") as st:
        image = write_counter_image(tmp_path / "shared.snap", 1 << 20)
        before = file_sha256(image.path)
        a_mem, a_vcpu = cow_vm(image, a_params, load=load)
        b_mem, b_vcpu = cow_vm(image, b_params, load=load)
        expect_halt(st, a_vcpu.run(timeout=RUN_TIMEOUT_S), "VM A")
        expect_halt(st, b_vcpu.run(timeout=RUN_TIMEOUT_S), "VM B")

    with report.stage("each VM sees only its own writes") as st:
        zero = bytes(a_params.region_size)
        st.check(a_mem.read(a_params.region_gpa, a_params.region_size) == counter.expected_final(a_params).region,
                 "VM A's region holds A's writes")
        st.check(b_mem.read(b_params.region_gpa, b_params.region_size) == counter.expected_final(b_params).region,
                 "VM B's region holds B's writes")
        st.check(a_mem.read(b_params.region_gpa, b_params.region_size) == zero, "VM A does not see B's writes",
                 f"B's writes at GPA {b_params.region_gpa:#x} are visible in VM A")
        st.check(b_mem.read(a_params.region_gpa, a_params.region_size) == zero, "VM B does not see A's writes",
                 f"A's writes at GPA {a_params.region_gpa:#x} are visible in VM B")
        st.equal(file_sha256(image.path), before, "file sha256", lambda v: str(v)[:16] + "…")


@dataclass(frozen=True)
class DensityRow:
    """One VM of the density test: pages it wrote, what smaps says it holds privately, what it is charged."""

    vm: int
    wrote: int             # pages: its working set and the parameter block page the host wrote
    private: int           # pages, smaps (see the test's docstring)
    commit: int            # bytes charged to Committed_AS by its mappings (GuestMemory.commit_bytes)
    exits: int = 0         # hypervisor-cow: write exits served
    slot_ioctls: int = 0   # hypervisor-cow: KVM_SET_USER_MEMORY_REGION calls
    slots: int = 0         # hypervisor-cow: memslots at the end


def density_table(rows: dict[str, list[DensityRow]]) -> list[str]:
    """The two loads side by side, a line a VM: the report's table."""
    mp, hv = rows["map-private"], rows["hypervisor-cow"]
    lines = ["VM    wrote | MAP_PRIVATE: private     commit | hypervisor-cow: private     commit  exits  "
             "slot ioctls  slots"]
    for a, b in zip(mp, hv, strict=True):
        lines.append(f"{a.vm:<5} {a.wrote:5} | {a.private:20} {fmt_bytes(a.commit):>10} | {b.private:23} "
                     f"{fmt_bytes(b.commit):>10} {b.exits:6} {b.slot_ioctls:12} {b.slots:6}")
    n = len(mp)
    lines.append(f"mean  {sum(r.wrote for r in mp) / n:5.1f} | {sum(r.private for r in mp) / n:20.1f} "
                 f"{sum(r.commit for r in mp) / n / 2**20:6.1f} MiB | {sum(r.private for r in hv) / n:23.1f} "
                 f"{sum(r.commit for r in hv) / n / 2**10:6.1f} KiB {sum(r.exits for r in hv) / n:6.1f} "
                 f"{sum(r.slot_ioctls for r in hv) / n:12.1f} {sum(r.slots for r in hv) / n:6.1f}")
    lines.append("(wrote, private: 4 KiB pages; private: smaps; commit: charged to Committed_AS by the VM's mappings)")
    return lines


@linux_only
@pytest.mark.needs("kvm", "kvm.readonly_mem")
def test_density_of_16_vms_from_one_256MiB_file(report, tmp_path, cow_vm):
    """Sixteen VMs per load share one 256 MiB file; each holds privately only the pages it wrote, and is charged
    commit for its whole mapping by the OS-level load but only for those pages by the hypervisor-level one.

    Private memory is smaps, per VM: ``Anonymous`` of the MAP_PRIVATE mapping (the pages copied on write);
    ``Private_Dirty`` of the hypervisor-level load's overlay (a memfd no other process maps) plus ``Anonymous``
    of its read-only view. File pages a VM only read stay shared page cache. Commit is what each VM's
    mappings charge to Committed_AS, read from their own state (GuestMemory.commit_bytes): the whole
    mapping when smaps VmFlags has ``ac`` (accounted at mmap: a private writable mapping), plus the pages
    allocated in a memfd (st_blocks; memfd shmem is charged a page at a time). The system-wide
    Committed_AS delta over each load's 16 VMs is reported beside it, a figure other processes move too.
    """
    from snapproof.native.host import meminfo

    vms = 16
    with report.stage("256 MiB snapshot file") as st:
        image = write_counter_image(tmp_path / "density.snap", 256 << 20)
        before = file_sha256(image.path)
        st.check(image.memory_size == 256 << 20, f"{fmt_bytes(image.memory_size)} image")

    rows: dict[str, list[DensityRow]] = {}
    committed_delta: dict[str, int] = {}
    for load in ("map-private", "hypervisor-cow"):
        with report.stage(f"{vms} VMs by {load}, each writing its own number of pages") as st:
            st.note(LOAD_HOW[load])
            committed_before = meminfo()["Committed_AS"]
            rows[load] = []
            for i in range(vms):
                params = counter_params(npages=4 * (i + 1), region_page=0, iterations=4 * (i + 1))
                mem, vcpu = cow_vm(image, params, load=load)
                ex = vcpu.run(timeout=RUN_TIMEOUT_S)
                expect_halt(st, ex, f"VM {i}")
                hv = mem.stats if load == "hypervisor-cow" else None
                rows[load].append(DensityRow(i, params.npages + 1, mem.cow_bytes() // 4096, mem.commit_bytes(),
                                             *((hv.write_exits, hv.slot_ioctls, hv.slots) if hv else ())))
            committed_delta[load] = meminfo()["Committed_AS"] - committed_before
            if load == "hypervisor-cow":
                # The host wrote each VM's parameter block page before it ran: the guest made its region private.
                off = [(r.vm, r.exits) for r in rows[load] if r.exits != r.wrote - 1]
                st.check(not off, "each VM took one write exit per region page it wrote",
                         f"(VM, write exits) {off}: expected one write exit per region page (4, 8, ... 64)")
            for r in rows[load]:
                st.check(r.private == r.wrote, f"VM {r.vm:2}: wrote {r.wrote:3} pages, holds {r.private:3} privately",
                         f"VM {r.vm}: wrote {r.wrote} pages but holds {r.private} privately (smaps)")
            if load == "map-private":
                whole = [r.vm for r in rows[load] if r.commit != image.memory_size]
                st.check(not whole, f"each VM is charged commit for its whole {fmt_bytes(image.memory_size)} mapping "
                         "(private and writable: smaps VmFlags ac), written or not",
                         f"VMs {whole}: expected {image.memory_size:#x} bytes of commit each (the whole MAP_PRIVATE "
                         f"mapping), saw {[hex(rows[load][v].commit) for v in whole]}")
            else:
                off = [r.vm for r in rows[load] if r.commit != r.wrote * 4096]
                st.check(not off, "each VM is charged commit for its private pages only (the overlay memfd's "
                         "pages; the PROT_READ view of the file charges nothing)",
                         f"VMs {off}: expected commit = pages written x 4 KiB, saw "
                         f"{[(hex(rows[load][v].commit), rows[load][v].wrote) for v in off]}")
            st.note(f"Committed_AS (system-wide) moved {committed_delta[load] / 2**20:+.1f} MiB over these {vms} VMs "
                    f"({committed_delta[load] / vms / 2**20:+.2f} MiB per VM; other processes move it too)")

    with report.stage("private memory and commit per VM: OS-level against hypervisor-level copy-on-write") as st:
        for line in density_table(rows):
            st.note(line)
        mp_commit, hv_commit = (sum(r.commit for r in rows[k]) for k in ("map-private", "hypervisor-cow"))
        mp_private, hv_private = (sum(r.private for r in rows[k]) * 4096 for k in ("map-private", "hypervisor-cow"))
        st.check(mp_private == hv_private, f"private memory in all: {fmt_bytes(mp_private)} by either load "
                 f"({mp_private / (vms * image.memory_size):.3%} of {vms} full copies)",
                 f"private memory in all: MAP_PRIVATE {mp_private:#x}, hypervisor-cow {hv_private:#x} bytes: expected "
                 "the same pages copied by both")
        st.note(f"commit in all: MAP_PRIVATE {fmt_bytes(mp_commit)}, hypervisor-cow {fmt_bytes(hv_commit)} "
                f"({mp_commit / hv_commit:.0f}x less)")
        report.fact("density_private_bytes_total", mp_private)
        report.fact("density_private_bytes_total_hypervisor_cow", hv_private)
        report.fact("density_commit_bytes_per_vm", {k: [r.commit for r in v] for k, v in rows.items()})
        report.fact("density_committed_as_delta_bytes", committed_delta)
        hv_rows = rows["hypervisor-cow"]
        report.fact("density_hypervisor_cow_exits_per_written_page",
                    round(sum(r.exits for r in hv_rows) / sum(r.wrote - 1 for r in hv_rows), 3))
        st.equal(file_sha256(image.path), before, "file sha256", lambda v: str(v)[:16] + "…")


@linux_only
@pytest.mark.needs("kvm")
def test_read_only_mapping_stops_the_guest_write_as_the_original_bug_did(report, tmp_path, make_memory, make_vm):
    """The negative control: mapped PROT_READ, the guest's first write stops KVM at the store and never lands."""
    from snapproof.native.kvm import KVM_MEMORY_EXIT_FLAG_PRIVATE, ExitReason

    params = counter_params(npages=4)
    first_write = params.word_gpa(1)
    store_eip = counter.region_store_eip()
    with report.stage("read-only mapping of the file") as st:
        # The parameter block is in the file: a read-only mapping takes no host writes either.
        image = write_counter_image(tmp_path / "ro.snap", 1 << 20, params)
        before = file_sha256(image.path)
        mem = make_memory("file-readonly", image.memory_size, path=image.path, offset=image.memory_offset)
        vm = make_vm(mem)  # a plain slot, as a COW load registers it: no KVM_MEM_READONLY
        vcpu = vm.add_vcpu()
        vcpu.set_flat32(eip=guests.FLAT32_LOAD_GPA, esp=0x7000, esi=guests.PARAM_BLOCK_GPA)
        st.check(not mem.writable, "mapped PROT_READ (MAP_SHARED): what PAGE_READONLY + FILE_MAP_READ is on Windows")
        at_load = mem.snapshot_bytes()

    with report.stage("the guest's first write") as st:
        ex = vcpu.run(timeout=RUN_TIMEOUT_S)
        st.check(write_refused(ex), f"KVM refused the write: {ex.describe()}",
                 f"expected KVM to refuse the guest's first write (KVM_EXIT_MMIO write, EFAULT or "
                 f"KVM_EXIT_MEMORY_FAULT), saw {ex.describe()}")
        if ex.reason is ExitReason.MMIO:
            # An emulating KVM (kvm_pvm) decoded the store: it names the exact GPA.
            st.equal(ex.mmio_gpa, first_write, "KVM_EXIT_MMIO write GPA (the counter's first word)")
        else:
            # Hardware KVM failed KVM_RUN before the store retired: the guest is still on it.
            st.equal(ex.rip, store_eip, "guest RIP after the failed KVM_RUN (counter32's region store)")
        if ex.reason is ExitReason.MEMORY_FAULT:
            st.check(ex.fault_gpa <= first_write < ex.fault_gpa + ex.fault_size,
                     f"KVM_EXIT_MEMORY_FAULT range [{ex.fault_gpa:#x}, {ex.fault_gpa + ex.fault_size:#x}) holds "
                     f"the first write at GPA {first_write:#x}",
                     f"KVM_EXIT_MEMORY_FAULT range [{ex.fault_gpa:#x}, {ex.fault_gpa + ex.fault_size:#x}): "
                     f"expected it to hold the first write at GPA {first_write:#x}")
            st.equal(ex.fault_flags & KVM_MEMORY_EXIT_FLAG_PRIVATE, 0,
                     "KVM_MEMORY_EXIT_FLAG_PRIVATE (no guest_memfd here)")
        report.fact("read_only_write_signature", ex.reason.name)
        st.note(f"this is the original bug's failure on KVM: {ORIGINAL_BUG}")

    with report.stage("nothing landed") as st:
        st.equal(mem.read(first_write, 4), bytes(4), "word at the faulting GPA, in the mapping", lambda v: v.hex())
        after = mem.snapshot_bytes()
        st.check(after == at_load, "the whole mapping is as it was loaded", describe_difference(at_load, after))
        st.equal(file_sha256(image.path), before, "file sha256", lambda v: str(v)[:16] + "…")


# -- benchmark: the copy-on-write load against this host's floor, measured in the same run ---------------------


@linux_only
@pytest.mark.needs("kvm", "kvm.readonly_mem")
def test_benchmark_cow_load_run(report, benchmark, tmp_path, cow_vm, make_memory, make_vm):
    """counter32 run from a fresh MAP_PRIVATE mapping (first writes copy pages), and from a fresh hypervisor-level
    load (first writes exit), against the same run on warm memfd."""
    from snapproof.native.kvm import ExitReason

    params = counter_params(npages=64)
    rounds = 10
    with report.stage("the floor: counter32 on populated memfd") as st:
        image = write_counter_image(tmp_path / "bench.snap", 1 << 20, params)
        plain = []
        for _ in range(rounds):
            mem = make_memory("memfd", image.memory_size)
            mem.populate()
            mem.write(0, SnapshotImage.open(image.path).read_memory(0, image.memory_size))
            vm = make_vm(mem)
            vcpu = vm.add_vcpu()
            vcpu.set_flat32(eip=guests.FLAT32_LOAD_GPA, esp=0x7000, esi=guests.PARAM_BLOCK_GPA)
            ex = vcpu.run(timeout=RUN_TIMEOUT_S)
            if ex.reason is not ExitReason.HLT:
                expect_halt(st, ex, "counter32 on memfd")
            plain.append(ex.run_ns)
        st.check(len(plain) == rounds, f"{rounds} runs halted")
        floor = sorted(plain)[rounds // 2]
        st.timing("plain run median", floor, f"{params.npages} pages written, memory populated: no fault of the load")

    with report.stage("counter32 from a fresh copy-on-write mapping, each round") as st:
        runs = []

        def load():
            return (cow_vm(image)[1],), {}

        def run(vcpu):
            ex = vcpu.run(timeout=RUN_TIMEOUT_S)
            if ex.reason is not ExitReason.HLT:
                expect_halt(st, ex, "counter32 from the copy-on-write mapping")
            runs.append(ex.run_ns)

        benchmark.pedantic(run, setup=load, rounds=rounds)
        st.check(bool(runs), f"{len(runs)} runs halted")
        median = sorted(runs)[len(runs) // 2]
        ratio = median / floor
        st.timing("copy-on-write run median", median, f"{ratio:.2f}x the plain run (the floor); includes "
                  f"{params.npages + 1} copy-on-write faults")
        benchmark.extra_info.update({"cow_run_median_ns": median, "plain_run_median_ns": floor,
                                     "ratio_to_plain_memfd_run": ratio})
        report.fact("ratio_to_plain_memfd_run", round(ratio, 3))

    with report.stage("counter32 from a fresh hypervisor-level copy-on-write load, each round") as st:
        hv_runs, service, slot_changes = [], [], []
        for _ in range(rounds):
            mem, vcpu = cow_vm(image, load="hypervisor-cow")
            ex = vcpu.run(timeout=RUN_TIMEOUT_S)
            if ex.reason is not ExitReason.HLT:
                expect_halt(st, ex, "counter32 from the hypervisor-level load")
            hv_runs.append(ex.run_ns)
            service += mem.stats.service_ns
            slot_changes += mem.stats.slot_change_ns
        st.check(len(hv_runs) == rounds, f"{rounds} runs halted")
        hv_median = sorted(hv_runs)[rounds // 2]
        st.timing("hypervisor-level run median", hv_median, f"{hv_median / floor:.2f}x the plain run (the floor), "
                  f"{hv_median / median:.2f}x the MAP_PRIVATE run; includes {params.npages + 1} write exits served")
        st.timing("write exit service median", sorted(service)[len(service) // 2],
                  "exit read -> page copied into the overlay, slots changed, stored bytes applied")
        st.timing("slot change median", sorted(slot_changes)[len(slot_changes) // 2],
                  "the KVM_SET_USER_MEMORY_REGION calls of one page made private (4 when it extends a run)")
        benchmark.extra_info.update({"hypervisor_cow_run_median_ns": hv_median,
                                     "hypervisor_cow_ratio_to_plain_memfd_run": hv_median / floor})
        report.fact("hypervisor_cow_ratio_to_plain_memfd_run", round(hv_median / floor, 3))
        report.fact("hypervisor_cow_ratio_to_map_private_run", round(hv_median / median, 3))


# -- Windows: WHP, copy-on-write two ways (runs on a Windows host; deselected elsewhere) ------------------------
# OS level: PAGE_WRITECOPY + FILE_MAP_COPY, the seed's fix; Windows charges commit for the whole view per VM.
# Hypervisor level: the snapshot a PAGE_READONLY view mapped Read|Execute, each first write to a page served by a
# private copy mapped writable at that GPA (native.whp.CowMemory): what hyperlight moved to for that commit.
# One partition with mapped memory per process (ERROR_VID_PARTITION_ALREADY_EXISTS): each test closes one WhpVm
# before the next maps; the VMs' memory stays open, so "two VMs" are two memories, their partitions in turn.


def write_marker16_image(path, size: int = 1 << 20) -> SnapshotImage:
    """The original proof's memory: marker16 at 0:0x100, the BEFORE marker 0xBE at GPA 0x1000."""
    return write_real_mode_image(path, "marker16", size)


def write_cow16_image(path, size: int = 1 << 20) -> SnapshotImage:
    """cow16 at 0:0x100 (stores to GPAs 0x1000, 0x1001 and 0x2000, reads the first two back), 0xBE at 0x1000."""
    return write_real_mode_image(path, "cow16", size)


def write_real_mode_image(path, guest: str, size: int) -> SnapshotImage:
    with SnapshotImage.create(path, size, hypervisor="whp") as w:
        code = guests.load(guest)
        w.memory[guests.REAL_MODE_LOAD_GPA:guests.REAL_MODE_LOAD_GPA + len(code)] = code
        w.memory[guests.MARKER_GPA] = guests.MARKER_BEFORE
        return w.finalize()


# cow16's writes and what it reads back out of the debug port (guests/cow16.S).
COW16_WRITES = {0x1000: 0x42, 0x1001: 0x43, 0x2000: 0x44}
COW16_DEBUG = bytes([0x42, 0x43])
COW16_PAGES_WRITTEN = 2


def expect_whp_halt(st, ex, what: str) -> None:
    from snapproof.native import whp

    if ex.reason is whp.ExitReason.MEMORY_ACCESS and ex.access is whp.MemoryAccessType.WRITE:
        st.check(False, "", f"{what}: guest write at GPA {ex.gpa:#x} stopped on a memory-access exit: {ORIGINAL_BUG}")
    st.check(ex.reason is whp.ExitReason.HLT, f"{what} halted", f"{what} did not halt: {ex.describe()}")


def view_commit(st, delta: int, view_size: int, what: str) -> float:
    """Report a view's commit charge beside the view's size; return it as a ratio to that size.

    The view starts at the 64 KiB allocation granularity below the image, so it covers the header page too: the
    size is the view's (``FileView.view_size``), not the guest memory's.
    """
    ratio = delta / view_size
    st.note(f"commit charge (PrivateUsage) around the {what} alone: {'+' if delta >= 0 else '-'}"
            f"{fmt_bytes(abs(delta))} for a {fmt_bytes(view_size)} view = {ratio:.3f} x the view's size")
    return ratio


@windows_only
@pytest.mark.needs("whp")
def test_whp_guest_sees_its_write_and_the_file_never_changes(report, tmp_path, inject):
    """Under WHP, marker16 runs from a FILE_MAP_COPY view: it writes 0x42 and the file keeps 0xBE."""
    from snapproof.native import whp

    with report.stage("snapshot file") as st:
        image = write_marker16_image(tmp_path / "marker16.snap")
        before = file_sha256(image.path)
        st.note(f"{fmt_bytes(image.memory_size)} image, sha256 {before[:16]}…")

    if inject & FaultInjection.READ_ONLY_MAPPING:
        with report.stage("load read-only (fault injection), in a child process") as st:
            outcome = whp.readonly_load_in_child(image.path, image.memory_offset, image.memory_size)
            st.check(not outcome.failed_like_original_bug, "", f"{outcome.describe()}: {ORIGINAL_BUG}")

    with report.stage("PAGE_WRITECOPY + FILE_MAP_COPY view, WHvMapGpaRange RWX") as st:
        commit_before = whp.private_usage()
        with whp.FileView.copy(image.path, image.memory_offset, image.memory_size) as view:
            commit_delta = whp.private_usage() - commit_before  # the view alone, before any partition exists
            with whp.WhpVm(view) as vm:
                ex = vm.run(timeout=RUN_TIMEOUT_S)
                expect_whp_halt(st, ex, "marker16")
                st.timing("guest run", ex.run_ns, "includes the copy-on-write fault of its write")
                st.equal(vm.read(guests.MARKER_GPA, 1)[0], guests.MARKER_AFTER, "the guest's mem[0x1000]")
        ratio = view_commit(st, commit_delta, view.view_size, "FILE_MAP_COPY view")
        st.note("PAGE_WRITECOPY charges commit for the whole view at map time, per VM, touched or not")
        report.fact("commit_per_writecopy_view_bytes", commit_delta)
        report.fact("commit_per_writecopy_view_ratio", round(ratio, 4))

    with report.stage("the file never changed") as st:
        st.equal(file_sha256(image.path), before, "file sha256", lambda v: str(v)[:16] + "…")
        on_disk = SnapshotImage.open(image.path, verify=True).read_memory(guests.MARKER_GPA, 1)[0]
        st.equal(on_disk, guests.MARKER_BEFORE, "mem[0x1000] on disk")


@windows_only
@pytest.mark.needs("whp")
def test_whp_two_partitions_from_one_file_are_isolated(report, tmp_path):
    """Two copy views of one file, each run in its own partition (one after the other), see only their own writes."""
    from snapproof.native import whp

    with report.stage("two copy views of one file; partition A, then partition B") as st:
        image = write_marker16_image(tmp_path / "shared.snap")
        before = file_sha256(image.path)
        with whp.FileView.copy(image.path, image.memory_offset, image.memory_size) as a_view, \
                whp.FileView.copy(image.path, image.memory_offset, image.memory_size) as b_view:
            with whp.WhpVm(a_view) as a:
                expect_whp_halt(st, a.run(timeout=RUN_TIMEOUT_S), "partition A")
            # A's partition is deleted before B's maps memory (one per process); A's view, its memory, stays.
            st.equal(b_view.read(guests.MARKER_GPA, 1)[0], guests.MARKER_BEFORE,
                     "B's mem[0x1000] before B runs (A's write unseen)")
            b_view.write(0x2000, b"\x77")  # only B's copy changes at 0x2000
            with whp.WhpVm(b_view) as b:
                expect_whp_halt(st, b.run(timeout=RUN_TIMEOUT_S), "partition B")
            st.equal(a_view.read(guests.MARKER_GPA, 1)[0], guests.MARKER_AFTER, "A's mem[0x1000] (A's write)")
            st.equal(a_view.read(0x2000, 1)[0], 0, "A's mem[0x2000] (B's write unseen)")
            st.equal(b_view.read(0x2000, 1)[0], 0x77, "B's mem[0x2000]")
            st.equal(b_view.read(guests.MARKER_GPA, 1)[0], guests.MARKER_AFTER, "B's mem[0x1000] (B's own write)")
        st.equal(file_sha256(image.path), before, "file sha256", lambda v: str(v)[:16] + "…")


@windows_only
@pytest.mark.needs("whp")
def test_whp_read_only_view_fails_the_way_the_original_bug_did(report, tmp_path):
    """The negative control: PAGE_READONLY + FILE_MAP_READ mapped RWX, in a child: the guest's store fails, by an
    access violation, a write memory-access exit or a failed run call; the report names which."""
    from snapproof.native import whp

    with report.stage("read-only view, run in a child process") as st:
        image = write_marker16_image(tmp_path / "ro.snap")
        before = file_sha256(image.path)
        outcome = whp.readonly_load_in_child(image.path, image.memory_offset, image.memory_size)
        st.check(outcome.failed_like_original_bug,
                 f"{outcome.outcome.name}: {outcome.outcome.meaning}: the guest's store failed, the original bug",
                 f"the read-only load did not fail like the original bug: {outcome.describe()}")
        if outcome.memory_access_write:
            st.equal(outcome.exit["gpa"] if outcome.exit else None, guests.MARKER_GPA, "GPA of the refused store")
        report.fact("readonly_load_outcome", outcome.outcome.name)
        st.equal(file_sha256(image.path), before, "file sha256", lambda v: str(v)[:16] + "…")


@windows_only
@pytest.mark.needs("whp", "whp.partial_unmap")
def test_whp_hypervisor_copy_on_write_guest_sees_its_writes_and_the_file_never_changes(report, tmp_path):
    """cow16 runs from the snapshot mapped read-only (Read|Execute); each first write to a page exits and is served
    by a private copy mapped writable at that GPA: the guest reads back its writes, two VMs from one file see only
    their own, and the file never changes."""
    from snapproof.native import whp

    with report.stage("snapshot file") as st:
        image = write_cow16_image(tmp_path / "cow16.snap")
        before = file_sha256(image.path)
        st.note(f"{fmt_bytes(image.memory_size)} image with cow16 at 0:0x100, sha256 {before[:16]}…")

    with whp.CowMemory.open(image.path, image.memory_offset, image.memory_size) as a_mem, \
            whp.CowMemory.open(image.path, image.memory_offset, image.memory_size) as b_mem:
        with report.stage("VM A: PAGE_READONLY view mapped Read|Execute, write exits served") as st:
            with whp.WhpVm(a_mem) as a:
                ex = a.run(timeout=RUN_TIMEOUT_S)
            expect_whp_halt(st, ex, "cow16 in VM A")
            st.equal(ex.debug, COW16_DEBUG, "what the guest read back of its writes (debug port)", lambda v: v.hex())
            st.equal(ex.cow_faults, COW16_PAGES_WRITTEN,
                     "write exits served (GPA 0x1000 and 0x2000; the second store to page 0x1000 did not exit)")
            for gpa, value in COW16_WRITES.items():
                st.equal(a_mem.read(gpa, 1)[0], value, f"A's mem[{gpa:#x}]")
            stats = a_mem.stats()
            st.equal(stats.private_pages, COW16_PAGES_WRITTEN, "A's private pages")
            st.check(not a_mem.is_private(guests.REAL_MODE_LOAD_GPA), "the code page is still the snapshot's",
                     "the page cow16 only executed from became private")
            st.timing("guest run", ex.run_ns, f"includes {ex.cow_faults} copy-on-write faults")
            st.timing("copy-on-write faults, in all", ex.cow_ns, "commit a page, copy it, unmap, map RWX, per fault")

        with report.stage("VM B from the same file, once A's partition is deleted") as st:
            st.equal(b_mem.read(guests.MARKER_GPA, 1)[0], guests.MARKER_BEFORE,
                     "B's mem[0x1000] before B runs (A's write unseen)")
            with whp.WhpVm(b_mem) as b:
                expect_whp_halt(st, b.run(timeout=RUN_TIMEOUT_S), "cow16 in VM B")
            for gpa, value in COW16_WRITES.items():
                st.equal(b_mem.read(gpa, 1)[0], value, f"B's mem[{gpa:#x}]")
            st.equal(a_mem.read(0x2000, 1)[0], COW16_WRITES[0x2000], "A's mem[0x2000], still A's own")
            st.equal(a_mem.snapshot.read(guests.MARKER_GPA, 1)[0], guests.MARKER_BEFORE,
                     "the read-only snapshot view's mem[0x1000]")

    with report.stage("the file never changed") as st:
        st.equal(file_sha256(image.path), before, "file sha256", lambda v: str(v)[:16] + "…")
        on_disk = SnapshotImage.open(image.path, verify=True).read_memory(guests.MARKER_GPA, 1)[0]
        st.equal(on_disk, guests.MARKER_BEFORE, "mem[0x1000] on disk")


DENSITY_VMS = 8
DENSITY_IMAGE = 64 << 20
# A read-only view is backed by the file, not the pagefile: a VM loaded this way is charged only its private pages
# (COW16_PAGES_WRITTEN of them) and whatever the run allocates. Allow 1% of the view: still 30x below WRITECOPY's
# whole view, and far above the few pages expected, so heap noise cannot fail it.
COW_COMMIT_CEILING_RATIO = 0.01


@windows_only
@pytest.mark.needs("whp", "whp.partial_unmap")
def test_whp_density_hypervisor_copy_on_write_against_writecopy(report, tmp_path):
    """Eight VMs from one 64 MiB snapshot, all their memory held at once: the hypervisor-level copy-on-write load
    charges each VM about the pages it wrote; PAGE_WRITECOPY charges each the whole view."""
    import contextlib

    from snapproof.native import whp

    with report.stage(f"{fmt_bytes(DENSITY_IMAGE)} snapshot file") as st:
        image = write_cow16_image(tmp_path / "density.snap", DENSITY_IMAGE)
        before = file_sha256(image.path)
        st.check(image.memory_size == DENSITY_IMAGE, f"{fmt_bytes(image.memory_size)} image with cow16")

    rows: dict[str, list[tuple[int, int, int]]] = {"hypervisor copy-on-write": [], "PAGE_WRITECOPY": []}
    with contextlib.ExitStack() as held:  # every VM's memory stays mapped to the end: N VMs' worth at once
        with report.stage(f"{DENSITY_VMS} VMs, hypervisor-level copy-on-write (read-only view)") as st:
            for i in range(DENSITY_VMS):
                c0 = whp.private_usage()
                mem = held.enter_context(whp.CowMemory.open(image.path, image.memory_offset, image.memory_size))
                c_view = whp.private_usage() - c0
                with whp.WhpVm(mem) as vm:  # one partition at a time; the memory outlives it
                    c1 = whp.private_usage()
                    ex = vm.run(timeout=RUN_TIMEOUT_S)
                    c_run = whp.private_usage() - c1
                expect_whp_halt(st, ex, f"VM {i}")
                st.equal(mem.stats().private_pages, COW16_PAGES_WRITTEN, f"VM {i}: private pages")
                rows["hypervisor copy-on-write"].append((c_view + c_run, mem.snapshot.view_size,
                                                         mem.stats().private_bytes))
        with report.stage(f"{DENSITY_VMS} VMs, PAGE_WRITECOPY + FILE_MAP_COPY views") as st:
            for i in range(DENSITY_VMS):
                c0 = whp.private_usage()
                view = held.enter_context(whp.FileView.copy(image.path, image.memory_offset, image.memory_size))
                c_view = whp.private_usage() - c0
                with whp.WhpVm(view) as vm:
                    c1 = whp.private_usage()
                    ex = vm.run(timeout=RUN_TIMEOUT_S)
                    c_run = whp.private_usage() - c1
                expect_whp_halt(st, ex, f"VM {i}")
                rows["PAGE_WRITECOPY"].append((c_view + c_run, view.view_size, COW16_PAGES_WRITTEN * 4096))

        with report.stage("commit charge per VM, as a ratio to the view's size") as st:
            ratios = {}
            for load, per_vm in rows.items():
                commit = sorted(c for c, _, _ in per_vm)[len(per_vm) // 2]
                view_size = per_vm[0][1]
                ratios[load] = commit / view_size
                st.note(f"{load}: median commit per VM {fmt_bytes(max(commit, 0))} for a {fmt_bytes(view_size)} "
                        f"view = {ratios[load]:.4f} x the view; guest wrote {fmt_bytes(per_vm[0][2])}")
            cow = ratios["hypervisor copy-on-write"]
            st.check(cow <= COW_COMMIT_CEILING_RATIO,
                     f"hypervisor copy-on-write: {cow:.4f} x the view per VM (at most {COW_COMMIT_CEILING_RATIO})",
                     f"hypervisor copy-on-write charged {cow:.4f} x the view per VM, above "
                     f"{COW_COMMIT_CEILING_RATIO}: the read-only view is being charged")
            st.note(f"{DENSITY_VMS} VMs held at once; PAGE_WRITECOPY / hypervisor copy-on-write commit per VM: "
                    f"{ratios['PAGE_WRITECOPY'] / max(cow, 1e-9):.0f}x")
            report.fact("density_cow_commit_per_vm_ratio", round(cow, 5))
            report.fact("density_writecopy_commit_per_vm_ratio", round(ratios["PAGE_WRITECOPY"], 5))
            report.fact("density_cow_private_bytes_per_vm", rows["hypervisor copy-on-write"][0][2])

    with report.stage("the file never changed") as st:
        st.equal(file_sha256(image.path), before, "file sha256", lambda v: str(v)[:16] + "…")
