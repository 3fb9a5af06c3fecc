"""The write-storm guest's host half: parameter block, write order, simulator, instant oracle.

``storm32`` (guests/storm32.S) sweeps a region page by page, generation after
generation, stamping (generation, page index) into the first and last 8 bytes
of each page. This module reproduces that stream so a test can ask of a
snapshot of the region: is it exactly the region at one instant of the
guest's writes, with no page torn except the one in flight and no mix of
instants? (``check_instant``).

The stream. Each page has two slots: slot 0 is the first stamp (gen at +0,
idx at +4), slot 1 the last stamp (gen at +4088, idx at +4092). The k-th page
written in generation g is ``(start_g + k*stride) mod npages`` with
``start_g = (start0 + (g-1)*step) mod npages``; its slot s is write number
``2*((g-1)*npages + k) + s`` of the stream (its *position*). The guest stores
idx before gen in each slot, so the gen store is the slot write's
linearization point. An *instant* t (0 <= t <= total writes) is the state
after writes 0 .. t-1 and before write t.

Pure Python, importable on every platform; no numpy: a 1 GiB region (262144
pages) checks in well under a second on the fast path.
"""

from __future__ import annotations

import array
import bisect
import math
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from snapproof.guests import DATA_REGION_GPA

GUEST = "storm32"
PAGE_SIZE = 4096
WORDS_PER_PAGE = PAGE_SIZE // 4

# Parameter block (u32 little-endian words), shared with guests/storm32.S.
# Changing an offset breaks the committed storm32.bin: change both together.
OFF_REGION = 0x00      # GPA of page 0 (4 KiB aligned)
OFF_NPAGES = 0x04      # pages in the region, >= 1
OFF_STRIDE = 0x08      # 1 <= stride <= npages, odd, gcd(stride, npages) = 1
OFF_START0 = 0x0C      # first page of generation 1
OFF_STEP = 0x10        # start advance per generation
OFF_GENERATIONS = 0x14  # 0 = run forever
OFF_CUR_GEN = 0x18     # guest writes: generation being swept
OFF_DONE_GEN = 0x1C    # guest writes: last generation completed (= its last sync value)
OFF_SEED = 0x20        # host only, for the record: low 32 bits of the seed; the guest ignores it
OFF_MARK_PAGES = 0x24  # pages of generation 1 after which the guest syncs MARK_SYNC | mark_pages; 0 = none
BLOCK_SIZE = 0x40      # the rest is spare, zero

MARK_SYNC = 0x80000000  # | mark_pages: the mark's sync value, never a generation number

# Stamp layout inside a page: (gen word, idx word) per slot, as u32 word indexes.
SLOT_WORDS = ((0, 1), (WORDS_PER_PAGE - 2, WORDS_PER_PAGE - 1))
SLOT_NAMES = ("first", "last")

_U32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1


def _splitmix64(state: int) -> tuple[int, int]:
    """One step of splitmix64: (new state, output). Spelled out so any tool can reproduce from_seed."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


@dataclass(frozen=True)
class StormParams:
    """One vCPU's storm: what the guest reads from its parameter block."""

    region_gpa: int
    npages: int
    stride: int
    start0: int
    step: int
    generations: int
    seed: int = 0
    mark_pages: int = 0

    def __post_init__(self) -> None:
        if self.region_gpa % PAGE_SIZE or not 0 <= self.region_gpa <= _U32:
            raise ValueError(f"region_gpa {self.region_gpa:#x}: must be a 4 KiB aligned 32-bit GPA")
        if self.npages < 1:
            raise ValueError(f"npages {self.npages}: must be >= 1")
        if self.region_gpa + self.npages * PAGE_SIZE > 1 << 32:
            raise ValueError(f"region {self.region_gpa:#x} + {self.npages} pages: beyond 4 GiB")
        # The guest advances idx with one conditional subtract: idx + stride < 2*npages.
        if not (1 <= self.stride <= self.npages and self.stride % 2 == 1
                and math.gcd(self.stride, self.npages) == 1):
            raise ValueError(f"stride {self.stride}: must be odd, in [1, {self.npages}] "
                             f"and coprime with npages {self.npages}")
        for name in ("start0", "step"):
            value = getattr(self, name)
            if not 0 <= value < self.npages:
                raise ValueError(f"{name} {value}: must be in [0, {self.npages})")
        if not 0 <= self.generations <= _U32:
            raise ValueError(f"generations {self.generations}: must fit a u32 (0 = forever)")
        if not 0 <= self.mark_pages <= self.npages:
            raise ValueError(f"mark_pages {self.mark_pages}: must be in [0, npages {self.npages}] (0 = no mark)")

    @classmethod
    def from_seed(cls, seed: int, region_gpa: int = DATA_REGION_GPA, npages: int = 64,
                  generations: int = 3, mark_pages: int = 0) -> StormParams:
        """Stride, start0 and step drawn from ``seed`` by splitmix64 (stable across Python versions)."""
        state = seed & _MASK64
        state, x = _splitmix64(state)
        state, y = _splitmix64(state)
        state, z = _splitmix64(state)
        stride = 1
        if npages > 2:
            # A random odd stride coprime with npages; 1 always qualifies, so the walk ends.
            stride = 1 + x % (npages - 1)
            while stride % 2 == 0 or math.gcd(stride, npages) != 1:
                stride = stride + 1 if stride + 1 < npages else 1
        return cls(region_gpa=region_gpa, npages=npages, stride=stride, start0=y % npages,
                   step=z % npages, generations=generations, seed=seed, mark_pages=mark_pages)

    def pack(self) -> bytes:
        """The parameter block the host writes at the vCPU's block GPA (progress words zero)."""
        block = bytearray(BLOCK_SIZE)
        struct.pack_into("<6I", block, OFF_REGION, self.region_gpa, self.npages, self.stride,
                         self.start0, self.step, self.generations)
        struct.pack_into("<I", block, OFF_SEED, self.seed & _U32)
        struct.pack_into("<I", block, OFF_MARK_PAGES, self.mark_pages)
        return bytes(block)

    @classmethod
    def unpack(cls, block: bytes) -> StormParams:
        region, npages, stride, start0, step, gens = struct.unpack_from("<6I", block, OFF_REGION)
        (seed,) = struct.unpack_from("<I", block, OFF_SEED)
        (mark_pages,) = struct.unpack_from("<I", block, OFF_MARK_PAGES)
        return cls(region, npages, stride, start0, step, gens, seed, mark_pages)

    @property
    def region_size(self) -> int:
        return self.npages * PAGE_SIZE

    @property
    def total_writes(self) -> int | None:
        """Slot writes in the whole run (the final instant), None when it runs forever."""
        return 2 * self.npages * self.generations if self.generations else None

    def page_gpa(self, page: int) -> int:
        return self.region_gpa + page * PAGE_SIZE

    def start(self, g: int) -> int:
        """First page of generation g (g >= 1)."""
        return (self.start0 + (g - 1) * self.step) % self.npages

    def sync_position(self, g: int) -> int:
        """The instant at which the guest signals the end of sweep g (sync value g)."""
        return 2 * g * self.npages

    @property
    def mark_sync(self) -> int:
        """The mark's sync value (only written when mark_pages is set)."""
        return MARK_SYNC | self.mark_pages

    @property
    def mark_position(self) -> int:
        """The instant at which the guest signals the mark: both stamps of mark_pages pages of sweep 1 written."""
        return 2 * self.mark_pages


@dataclass(frozen=True)
class StormProgress:
    """What the guest wrote into its parameter block."""

    cur_gen: int
    done_gen: int


def read_progress(block: bytes) -> StormProgress:
    cur, done = struct.unpack_from("<2I", block, OFF_CUR_GEN)
    return StormProgress(cur, done)


def live_position(params: StormParams, block_gpa: int, read_u32: Callable[[int], int], tries: int = 3) -> int:
    """The instant (slot writes done) a guest running right now has reached, read from its memory with
    ``read_u32(gpa)`` while it runs; its parameter block is at ``block_gpa``.

    Sweep g stamps g into slot 0 of its pages in sweep order, so the pages of the sweep already holding g are
    a prefix of it, found by binary search (19 reads at 1 GiB). A guest that moves on to the next sweep
    meanwhile is read again; after ``tries`` the answer is the start of its newest sweep: never past what it
    wrote."""
    n = params.npages
    g = read_u32(block_gpa + OFF_CUR_GEN)
    for _ in range(tries):
        if g == 0:  # not started
            return 0
        start = params.start(g)
        lo, hi = 0, n  # the first page of the sweep not yet holding g lies in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if read_u32(params.page_gpa((start + mid * params.stride) % n)) == g:
                lo = mid + 1
            else:
                hi = mid
        now = read_u32(block_gpa + OFF_CUR_GEN)
        if now == g:  # slot 0 of the lo-th page is written; its slot 1 may not be yet
            return 2 * ((g - 1) * n + lo) - (lo > 0)
        g = now
    return 2 * (g - 1) * n


def write_order(params: StormParams, g: int) -> list[int]:
    """Pages in the order generation g writes them."""
    n, stride = params.npages, params.stride
    idx = params.start(g)
    order = []
    for _ in range(n):
        order.append(idx)
        idx += stride
        if idx >= n:
            idx -= n
    return order


def rank(params: StormParams, g: int, page: int) -> int:
    """k such that ``page`` is the k-th page written in generation g, in O(1)."""
    inv = pow(params.stride, -1, params.npages)
    return (page - params.start(g)) * inv % params.npages


def position(params: StormParams, g: int, page: int, slot: int) -> int:
    """Stream position of the write of generation g into ``slot`` of ``page``."""
    return 2 * ((g - 1) * params.npages + rank(params, g, page)) + slot


@dataclass(frozen=True)
class StreamPoint:
    """Write number ``position`` of the stream, in the guest's terms."""

    position: int
    generation: int
    k: int          # the k-th page of the generation's sweep
    page: int
    slot: int       # 0 = first stamp, 1 = last stamp

    def __str__(self) -> str:
        return (f"write {self.position} = gen {self.generation} page {self.page} "
                f"(#{self.k} of its sweep) {SLOT_NAMES[self.slot]} stamp")


def stream_point(params: StormParams, pos: int) -> StreamPoint | None:
    """The write at ``pos``, or None past the last write of a finite run."""
    total = params.total_writes
    if pos < 0 or (total is not None and pos >= total):
        return None
    n = params.npages
    gen0, rem = divmod(pos, 2 * n)
    k, slot = divmod(rem, 2)
    g = gen0 + 1
    page = (params.start(g) + k * params.stride) % n
    return StreamPoint(pos, g, k, page, slot)


def describe_instant(params: StormParams, t: int) -> str:
    """Instant t in words: which write comes next."""
    nxt = stream_point(params, t)
    if nxt is None:
        return f"instant {t} (after the last write)"
    return f"instant {t} (before {nxt})"


def simulate(params: StormParams, instant: int, idx_in_flight: bool = False) -> bytes:
    """The region after the first ``instant`` slot writes, from a zeroed region.

    ``idx_in_flight`` also applies the idx store of write ``instant`` (the
    guest stores idx one store before gen; only visible in generation 1).
    """
    n = params.npages
    total = params.total_writes
    if instant < 0 or (total is not None and instant > total):
        raise ValueError(f"instant {instant}: outside [0, {total}]")
    done_gens, rem = divmod(instant, 2 * n)
    gens = ([done_gens] * n, [done_gens] * n)
    idxs = (list(range(n)), list(range(n))) if done_gens else ([0] * n, [0] * n)
    nxt = stream_point(params, instant)
    if nxt is not None and (rem or idx_in_flight):
        order = write_order(params, nxt.generation)
        for k in range(rem // 2):
            page = order[k]
            gens[0][page] = gens[1][page] = nxt.generation
            idxs[0][page] = idxs[1][page] = page
        if nxt.slot:
            gens[0][nxt.page] = nxt.generation
            idxs[0][nxt.page] = nxt.page
        if idx_in_flight:
            idxs[nxt.slot][nxt.page] = nxt.page
    region = bytearray(params.region_size)
    if sys.byteorder == "little":
        words = memoryview(region).cast("I")
        for slot, (gen_word, idx_word) in enumerate(SLOT_WORDS):
            words[gen_word::WORDS_PER_PAGE] = array.array("I", gens[slot])
            words[idx_word::WORDS_PER_PAGE] = array.array("I", idxs[slot])
        words.release()
    else:  # pragma: no cover - big-endian hosts
        for page in range(n):
            for slot, (gen_word, idx_word) in enumerate(SLOT_WORDS):
                struct.pack_into("<I", region, 4 * gen_word + page * PAGE_SIZE, gens[slot][page])
                struct.pack_into("<I", region, 4 * idx_word + page * PAGE_SIZE, idxs[slot][page])
    return bytes(region)


@dataclass(frozen=True)
class InstantVerdict:
    """Whether a region snapshot equals the region at one instant of the storm.

    ``lo``..``hi`` is the range of instants it is consistent with (both
    inclusive; see ``describe_instant``); on failure ``page`` is the first
    offending page, ``message`` says what was expected there and what was seen.
    """

    ok: bool
    message: str
    lo: int | None = None
    hi: int | None = None
    lo_term: StreamPoint | None = None   # the write that comes next at instant lo
    hi_term: StreamPoint | None = None   # the write that comes next at instant hi
    torn: tuple[int, ...] = ()           # pages whose first and last stamps differ
    page: int | None = None
    gpa: int | None = None
    generations_seen: tuple[int, ...] = field(default=())

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return self.message


def _fail(params: StormParams, page: int, message: str, **kw) -> InstantVerdict:
    return InstantVerdict(ok=False, message=message, page=page, gpa=params.page_gpa(page), **kw)


def _stamp_words(params: StormParams, region) -> tuple[list[int], ...]:
    """(gen0, idx0, gen1, idx1) per page, read with four strided slices."""
    size = params.region_size
    mv = memoryview(region).cast("B")
    if mv.nbytes != size:
        raise ValueError(f"region snapshot is {mv.nbytes:#x} bytes, params say {size:#x} "
                         f"({params.npages} pages)")
    if sys.byteorder == "little":
        words = mv.cast("I")
        return tuple(words[w::WORDS_PER_PAGE].tolist() for w in (0, 1, WORDS_PER_PAGE - 2, WORDS_PER_PAGE - 1))
    cols: tuple[list[int], ...] = ([], [], [], [])  # pragma: no cover - big-endian hosts
    for page in range(params.npages):  # pragma: no cover
        base = page * PAGE_SIZE
        g0, i0 = struct.unpack_from("<II", mv, base)
        g1, i1 = struct.unpack_from("<II", mv, base + PAGE_SIZE - 8)
        for col, v in zip(cols, (g0, i0, g1, i1), strict=True):
            col.append(v)
    return cols  # pragma: no cover


def check_instant(params: StormParams, snapshot_region, exact: bool = False, at: int | None = None) -> InstantVerdict:
    """Decide whether ``snapshot_region`` (bytes-like, the whole region) is the region at one instant.

    The stamps decide; ``exact`` also compares every byte with ``simulate`` at
    that instant (the bytes between the stamps must still be zero), at the
    cost of building the simulated region. ``at``, the instant the snapshot
    must be (where the vCPU stood when it was paused: ``instant_of_registers``),
    also refuses a snapshot that is one instant but another one: consistent
    and stale (taken at a pre-copy round before the pause), or ahead of it.

    Each slot holding generation g was written at position pos (-1 if g = 0)
    and will next be written at position nxt (g+1's write; never after the
    last generation). An instant t fits the slot iff pos < t <= nxt, so one
    fits them all iff max(pos) + 1 <= min(nxt). Checked first, page by page:
    idx words equal the page index (0 while never written, except the one
    slot whose first write is in flight), no gen beyond ``generations``, at
    most one torn page.
    """
    n = params.npages
    gens_limit = params.generations
    total = params.total_writes
    inf = math.inf if total is None else total
    g0s, i0s, g1s, i1s = _stamp_words(params, snapshot_region)

    # Stamps page by page: idx words, gen bounds, torn pages.
    torn: list[int] = []
    in_flight: list[tuple[int, int]] = []   # (page, slot) with idx stored but gen still 0
    for page in range(n):
        g0, i0, g1, i1 = g0s[page], i0s[page], g1s[page], i1s[page]
        for slot, g, i in ((0, g0, i0), (1, g1, i1)):
            if gens_limit and g > gens_limit:
                return _fail(params, page, f"page {page} (GPA {params.page_gpa(page):#x}): "
                             f"{SLOT_NAMES[slot]} stamp gen {g}, but the run has only {gens_limit} "
                             f"generations")
            if g == 0 and i == page and i != 0:
                in_flight.append((page, slot))
            elif i != (page if g else 0):
                want = f"{page:#x}" if g else "0 (never written)"
                return _fail(params, page, f"page {page} (GPA {params.page_gpa(page):#x}): "
                             f"{SLOT_NAMES[slot]} stamp gen {g}: expected idx {want}, saw {i:#x}")
        if g0 != g1:
            torn.append(page)
    if len(in_flight) > 1:
        (p1, s1), (p2, s2) = in_flight[:2]
        return _fail(params, p2, f"page {p2} (GPA {params.page_gpa(p2):#x}): {SLOT_NAMES[s2]} stamp "
                     f"gen 0 with idx {p2:#x} already stored, but so has page {p1} {SLOT_NAMES[s1]} "
                     f"stamp: only one write can be in flight ({len(in_flight)} are)")
    if len(torn) > 1:
        a, b = torn[0], torn[1]
        return _fail(params, b, f"{len(torn)} torn pages, at most the one in flight may be: "
                     f"page {a} (GPA {params.page_gpa(a):#x}): first stamp gen {g0s[a]}, last stamp "
                     f"gen {g1s[a]}; page {b} (GPA {params.page_gpa(b):#x}): first stamp gen {g0s[b]}, "
                     f"last stamp gen {g1s[b]}", torn=tuple(torn))
    if torn and g0s[torn[0]] != g1s[torn[0]] + 1:
        p = torn[0]
        return _fail(params, p, f"page {p} (GPA {params.page_gpa(p):#x}): first stamp gen {g0s[p]}, "
                     f"last stamp gen {g1s[p]}: a sweep writes the first stamp before the last, so "
                     f"only first = last + 1 can be in flight", torn=tuple(torn))

    pos, nxt = _slot_positions(params, g0s, g1s)
    for page, slot in in_flight:
        # Its idx store landed, its gen store did not: the instant is exactly its first write.
        j = 2 * page + slot
        pos[j] = nxt[j] - 1
    lo = max(pos) + 1
    hi = min(min(nxt), inf)
    seen = tuple(sorted(set(g0s) | set(g1s)))
    if lo <= hi and at is not None and not lo <= at <= hi:
        return _off_the_pause(params, g0s, g1s, int(lo), hi, at, torn, seen)
    if lo <= hi:
        if exact:
            wrong = _first_difference_from_simulation(params, snapshot_region, int(lo), bool(in_flight))
            if wrong is not None:
                return _fail(params, wrong[0], wrong[1], torn=tuple(torn), generations_seen=seen)
        return InstantVerdict(
            ok=True, lo=lo, hi=hi, lo_term=stream_point(params, lo), hi_term=stream_point(params, hi),
            torn=tuple(torn), generations_seen=seen,
            message=f"one instant: {describe_instant(params, lo)}"
                    + ("" if hi == lo else f" .. {describe_instant(params, hi)}")
                    + (f"; page {torn[0]} torn in flight" if torn else ""))
    return _explain_mixed(params, pos, nxt, g0s, g1s, torn, in_flight, lo, hi, seen)


def _off_the_pause(params: StormParams, g0s: Sequence[int], g1s: Sequence[int], lo: int, hi: float, at: int,
                   torn: list[int], seen: tuple[int, ...]) -> InstantVerdict:
    """One instant, but not the pause's: say which, by how many writes, and the first write that tells them apart."""
    stale = hi < at
    # Stale: the write at position hi came before the pause and is missing. Ahead: the write at lo - 1 came after
    # the pause and is there.
    pt = stream_point(params, int(hi) if stale else lo - 1)
    assert pt is not None, "a write between two instants of the run exists"
    seen_gen = (g0s, g1s)[pt.slot][pt.page]
    at_pause = pt.generation if stale else pt.generation - 1
    span = describe_instant(params, lo) + ("" if hi == lo else f" .. {describe_instant(params, int(hi))}")
    if stale:
        what = (f"consistent but stale: one instant, {span}, but the vCPU was paused at "
                f"{describe_instant(params, at)}, {at - int(hi)} writes later (a snapshot of a round before the pause)")
    else:
        what = (f"one instant, {span}, but ahead of the pause at {describe_instant(params, at)} by {lo - at} writes "
                "(writes after the pause reached the snapshot)")
    return _fail(params, pt.page, f"{what}; page {pt.page} (GPA {params.page_gpa(pt.page):#x}) "
                 f"{SLOT_NAMES[pt.slot]} stamp gen {seen_gen}, at the pause gen {at_pause}",
                 lo=lo, hi=hi, torn=tuple(torn), generations_seen=seen)


# Where storm32 stands, by its EIP (guests/storm32.S loaded at FLAT32_LOAD_GPA; tests/test_guests.py pins the
# instruction bytes at each): the stores that make each slot's stamp, the end of a page, the end of a sweep.
EIP_SWEEP = 0x1008         # a sweep begins (ebp = its generation)
EIP_PAGE = 0x1010          # a page begins (ecx = pages left in the sweep, this one included)
EIP_SLOT0_GEN = 0x101A     # mov %ebp,(%edi): slot 0's generation store, the linearization point
EIP_SLOT1_GEN = 0x1022     # mov %ebp,0xff8(%edi): slot 1's
EIP_PAGE_DONE = 0x1053     # dec %ecx: both stamps of the page written
EIP_LOOP = 0x1054          # jne page: ecx already counts the next page
EIP_SWEEP_DONE = 0x1056    # mov %ebp,P_DONE_GEN(%esi): the sweep's writes all done
EIP_NEXT_SWEEP = 0x107B    # jmp sweep: ebp already the next generation
EIP_HALT = 0x107D          # hlt: every generation written


def instant_of_registers(params: StormParams, eip: int, ebp: int, ecx: int) -> int:
    """The instant a stopped storm32 vCPU stands at: the number of slot writes it has made, from where it is
    (EIP), its generation (EBP) and the pages left in its sweep (ECX)."""
    n = params.npages
    if eip < EIP_SWEEP:
        return 0
    if eip < EIP_PAGE:
        return 2 * (ebp - 1) * n
    if eip <= EIP_LOOP:
        k = n - ecx  # the page being written, counted in its sweep (ecx counts it until the dec)
        base = 2 * ((ebp - 1) * n + k)
        if eip <= EIP_SLOT0_GEN or eip == EIP_LOOP:
            return base
        return base + 1 if eip <= EIP_SLOT1_GEN else base + 2
    if eip < EIP_NEXT_SWEEP:
        return 2 * ebp * n
    if eip < EIP_HALT:
        return 2 * (ebp - 1) * n
    total = params.total_writes
    if total is None:
        raise ValueError(f"EIP {eip:#x}: storm32 halted, but these params run forever")
    return total


def instant_of_vcpu_state(params: StormParams, state: bytes) -> int:
    """``instant_of_registers`` from a saved vCPU state (``Vcpu.save_state``, a snapshot file's vCPU record)."""
    from snapproof.native.image import VcpuPart, part_field, split_kvm_x86_state

    regs = split_kvm_x86_state(state)[VcpuPart.REGS]
    eip, ebp, ecx = (part_field(VcpuPart.REGS, regs, r) & _U32 for r in ("rip", "rbp", "rcx"))
    return instant_of_registers(params, eip, ebp, ecx)


def _first_difference_from_simulation(params: StormParams, region, t: int,
                                      idx_in_flight: bool) -> tuple[int, str] | None:
    """(page, message) for the first page that differs from simulate(params, t), or None."""
    want = simulate(params, t, idx_in_flight=idx_in_flight)
    got = memoryview(region).cast("B")
    if got == want:
        return None
    for page in range(params.npages):
        a, b = page * PAGE_SIZE, (page + 1) * PAGE_SIZE
        if got[a:b] != want[a:b]:
            off = next(i for i in range(a, b) if got[i] != want[i])
            gpa = params.region_gpa + off
            return page, (f"page {page} (GPA {params.page_gpa(page):#x}): stamps fit "
                          f"{describe_instant(params, t)}, but byte at GPA {gpa:#x} is {got[off]:#04x}, "
                          f"expected {want[off]:#04x}")
    return None  # pragma: no cover - the whole-region compare said they differ


def _slot_positions(params: StormParams, g0s: Sequence[int], g1s: Sequence[int]) -> tuple[list, list]:
    """Per slot (index 2*page + slot): position of the write it holds, position of the next one.

    rank(g, page) = (page - start_g) * inv mod n = (r_page - c_g) mod n with
    r_page = page*inv mod n and c_g = start_g*inv mod n, so a page costs a
    subtraction and a mod per slot.
    """
    n = params.npages
    gens_limit = params.generations
    inv = pow(params.stride, -1, n)
    c_cache: dict[int, int] = {}

    def c(g: int) -> int:
        v = c_cache.get(g)
        if v is None:
            v = c_cache[g] = params.start(g) * inv % n
        return v

    pos: list[float] = [0] * (2 * n)
    nxt: list[float] = [0] * (2 * n)
    two_n = 2 * n
    for page in range(n):
        r = page * inv % n
        for slot, g in ((0, g0s[page]), (1, g1s[page])):
            j = 2 * page + slot
            pos[j] = two_n * (g - 1) + 2 * ((r - c(g)) % n) + slot if g else -1
            nxt[j] = (math.inf if gens_limit and g >= gens_limit
                      else two_n * g + 2 * ((r - c(g + 1)) % n) + slot)
    return pos, nxt


def _expected_gen(params: StormParams, page: int, slot: int, t: int) -> int:
    """Generation slot (page, slot) holds at instant t."""
    n = params.npages
    g = t // (2 * n)          # sweeps 1..g are complete at t
    if params.generations and g >= params.generations:
        return params.generations
    return g + 1 if position(params, g + 1, page, slot) < t else g


def _explain_mixed(params, pos, nxt, g0s, g1s, torn, in_flight, lo, hi, seen) -> InstantVerdict:
    """No instant fits: find the instant most slots fit and blame the first page off it."""
    total = params.total_writes
    nslots = len(pos)
    # Slots off instant t: #(pos >= t) + #(nxt < t) = nslots - #(pos+1 <= t) + #(nxt+1 <= t).
    # That only drops at t = pos+1, so the best t is 0 or one of those.
    ups = sorted(p + 1 for p in pos)
    downs = sorted(x + 1 for x in nxt if x != math.inf)
    best_t, best_off = 0, nslots - bisect.bisect_right(ups, 0) + bisect.bisect_right(downs, 0)
    for j, t in enumerate(ups):
        if j + 1 < nslots and ups[j + 1] == t:
            continue
        off = nslots - (j + 1) + bisect.bisect_right(downs, t)
        if off < best_off:
            best_t, best_off = t, off
    if total is not None:
        best_t = min(best_t, total)
    first_off = next((j for j in range(nslots) if not pos[j] < best_t <= nxt[j]), None)
    assert first_off is not None, "an empty instant range has a slot off every instant"
    bad_page, bad_slot = divmod(first_off, 2)
    seen_gen = (g0s, g1s)[bad_slot][bad_page]
    want_gen = _expected_gen(params, bad_page, bad_slot, best_t)
    pages_off = len({j // 2 for j in range(nslots) if not pos[j] < best_t <= nxt[j]})
    tear = ""
    if (bad_page, bad_slot) in in_flight:
        tear = (f" but idx {bad_page:#x} already stored: only the write at "
                f"{describe_instant(params, int(nxt[2 * bad_page + bad_slot]))} can be in flight")
    elif bad_page in torn:
        tear = (f"; torn (first stamp gen {g0s[bad_page]}, last stamp gen {g1s[bad_page]}) "
                f"but not the page in flight")
    message = (f"no single instant: page {bad_page} (GPA {params.page_gpa(bad_page):#x}): "
               f"{SLOT_NAMES[bad_slot]} stamp gen {seen_gen}, expected gen {want_gen} at the "
               f"best-fit {describe_instant(params, best_t)}{tear}; {pages_off} of {params.npages} "
               f"pages off it (latest write seen needs instant >= {lo}, stalest stamp needs <= {hi})")
    return _fail(params, bad_page, message, torn=tuple(torn), generations_seen=seen)
