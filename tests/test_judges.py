"""The judges are judged: every comparison and oracle the phases rely on, against answers known beforehand.

One differing byte at the first and the last byte, on both sides of a page edge and of a chunk edge (the
compares skip equal stretches a MiB at a time), and past the first MiB: each judge must report it at its
place (offset, page, GPA, the values on both sides). The instant oracle must also refuse a snapshot that is
consistent but stale, taken at a round before the pause instead of at it, naming both instants.
"""

from __future__ import annotations

import sys

import pytest
from snapproof.guests import storm
from snapproof.guests.storm import StormParams, check_instant, simulate
from snapproof.native import compare
from snapproof.native.compare import describe_difference, differing_pages, exact_oracle

PAGE = 4096
CHUNK = 1 << 20
SIZE = 2 * CHUNK + 3 * PAGE  # two whole chunks and a partial one: the last chunk's edge is not the image's
EDGES = {"first byte": 0, "last byte of page 0": PAGE - 1, "first byte of page 1": PAGE,
         "last byte of the first chunk": CHUNK - 1, "first byte of the second chunk": CHUNK,
         "past the first MiB, mid-page": CHUNK + PAGE + 6, "last byte of a whole chunk": 2 * CHUNK - 1,
         "first byte of the partial chunk": 2 * CHUNK, "last byte": SIZE - 1}
CASES = [pytest.param(off, id=name.replace(" ", "-")) for name, off in EDGES.items()]


def _pair(off: int, value: int = 0xA5) -> tuple[bytearray, bytearray]:
    """Two images of SIZE bytes, a pattern that differs from page to page, and one byte changed at ``off``."""
    want = bytearray(SIZE)
    for p in range(0, SIZE, PAGE):
        want[p:p + 4] = (p // PAGE).to_bytes(4, "little")
    got = bytearray(want)
    got[off] ^= value
    return want, got


# -- the first-difference searches -------------------------------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the C layer is the Linux backend")
@pytest.mark.parametrize("off", CASES)
def test_c_first_difference_finds_the_one_byte(off):
    """The C first-difference (phase 5's exact oracle under it) returns the offset of the one differing byte."""
    want, got = _pair(off)
    assert compare.c_first_difference(memoryview(want), memoryview(got)) == off
    assert compare.c_first_difference(memoryview(want), memoryview(bytearray(want))) == -1


@pytest.mark.parametrize("off", CASES)
def test_python_first_difference_finds_the_one_byte(off):
    """The Python first-difference (hosts without the C layer) answers as the C one does."""
    want, got = _pair(off)
    assert compare.py_first_difference(memoryview(want), memoryview(got)) == off
    assert compare.first_difference(want, got) == off


# -- native/compare.py -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("off", CASES)
def test_differing_pages_and_description_name_the_byte_at_its_place(off):
    """differing_pages names the one page; describe_difference its GPA and both u32 values around the byte."""
    want, got = _pair(off)
    assert differing_pages(want, got) == [off // PAGE]
    u32 = off & ~3
    w, g = (int.from_bytes(x[u32:u32 + 4], "little") for x in (want, got))
    assert describe_difference(want, got, base=0) == (
        f"1 pages differ, first at GPA {u32:#x}: expected u32 {w:#010x}, saw {g:#010x}")


# -- the exact oracle --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("off", CASES)
def test_exact_oracle_reports_the_one_byte_at_its_gpa(off):
    """The exact oracle (phases 2 and 5) fails on one byte, giving its offset, its GPA and both values."""
    reference, snapshot = _pair(off)
    verdict = exact_oracle(snapshot, reference)
    assert not verdict and (verdict.first, verdict.pages) == (off, 1), verdict
    assert verdict.message == (f"1 pages differ from memory at the pause, first at GPA {off:#x}: expected "
                               f"{reference[off]:#04x}, saw {snapshot[off]:#04x}")
    assert exact_oracle(reference, bytearray(reference)).ok


def test_exact_oracle_counts_every_differing_page():
    """Differences in several pages: the count is all of them, the place the first."""
    reference, snapshot = _pair(CHUNK + 5)
    snapshot[SIZE - 1] ^= 1
    snapshot[7] ^= 1
    verdict = exact_oracle(snapshot, reference)
    assert (verdict.first, verdict.pages) == (7, 3), verdict


# -- the instant oracle ------------------------------------------------------------------------------------------

PARAMS = StormParams.from_seed(0x5EED, npages=300, generations=4)  # 300 pages: past the first MiB of the region
PAUSE = 2 * PARAMS.npages + 2 * 37  # in sweep 2, 37 pages written (no page torn in flight: one wrong stamp is alone)


def test_instant_oracle_pins_the_instant_it_is_given():
    """The region at the pause instant, judged against that instant, is one instant: that one."""
    v = check_instant(PARAMS, simulate(PARAMS, PAUSE), at=PAUSE)
    assert v.ok and v.lo <= PAUSE <= v.hi, v.message


@pytest.mark.parametrize(("page", "slot"), [(0, 0), (0, 1), (PARAMS.npages - 1, 0), (PARAMS.npages - 1, 1),
                                            (256, 0), (257, 1)], ids=["first-page-first-stamp", "first-page-last-stamp",
                                                                      "last-page-first-stamp", "last-page-last-stamp",
                                                                      "page-256-past-1MiB", "page-257-last-stamp"])
def test_instant_oracle_names_the_page_of_one_wrong_stamp(page, slot):
    """One stamp's generation changed: the oracle fails naming that page and its GPA."""
    region = bytearray(simulate(PARAMS, PAUSE))
    word = storm.SLOT_WORDS[slot][0]
    at = page * PAGE + 4 * word
    gen = int.from_bytes(region[at:at + 4], "little")
    region[at:at + 4] = (gen + 2).to_bytes(4, "little")  # two generations on: no instant holds it
    v = check_instant(PARAMS, region, at=PAUSE)
    assert not v.ok and v.page == page and v.gpa == PARAMS.page_gpa(page), v.message
    assert f"page {page} (GPA {PARAMS.page_gpa(page):#x})" in v.message, v.message


def test_instant_oracle_refuses_a_consistent_but_stale_snapshot():
    """A snapshot of one instant, but one a pre-copy round earlier than the pause, is refused: it names both
    instants, how many writes lie between, and the first write the snapshot misses."""
    stale = PARAMS.npages + 11  # sweep 1, a round before the pause
    region = simulate(PARAMS, stale)
    assert check_instant(PARAMS, region).ok, "without the pause instant it is one instant: the oracle alone passes it"
    v = check_instant(PARAMS, region, at=PAUSE)
    missing = storm.stream_point(PARAMS, stale)
    assert not v.ok and v.page == missing.page, v.message
    assert v.message.startswith(f"consistent but stale: one instant, {storm.describe_instant(PARAMS, stale)}"), \
        v.message
    assert f"paused at {storm.describe_instant(PARAMS, PAUSE)}, {PAUSE - stale} writes later" in v.message, v.message
    assert (f"page {missing.page} (GPA {PARAMS.page_gpa(missing.page):#x}) {storm.SLOT_NAMES[missing.slot]} stamp "
            f"gen 0, at the pause gen 1") in v.message, v.message


def test_instant_oracle_refuses_a_snapshot_ahead_of_the_pause():
    """A snapshot holding writes made after the pause is refused the same way, naming the first such write."""
    ahead = PAUSE + 5
    v = check_instant(PARAMS, simulate(PARAMS, ahead), at=PAUSE)
    extra = storm.stream_point(PARAMS, ahead - 1)
    assert not v.ok and v.page == extra.page and "ahead of the pause" in v.message and "by 5 writes" in v.message, \
        v.message


def test_instant_oracle_exact_mode_finds_a_byte_between_the_stamps():
    """A byte between the stamps is invisible to the stamps; exact mode finds it at its GPA."""
    region = bytearray(simulate(PARAMS, PAUSE))
    off = 257 * PAGE + 100
    region[off] = 0x5A
    assert check_instant(PARAMS, region, at=PAUSE).ok
    v = check_instant(PARAMS, region, exact=True, at=PAUSE)
    assert not v.ok and v.page == 257, v.message
    assert f"byte at GPA {PARAMS.region_gpa + off:#x} is 0x5a, expected 0x00" in v.message, v.message


def test_instant_of_registers_knows_every_place_in_the_loop():
    """Where storm32 stands (EIP), its generation (EBP) and pages left (ECX) give the instant; the EIPs are the
    instructions of guests/storm32.bin they name (a reassembled guest that moves them fails here)."""
    from snapproof import guests

    code = guests.load("storm32")

    def at(eip: int) -> bytes:
        return code[eip - guests.FLAT32_LOAD_GPA:]

    assert at(storm.EIP_SLOT0_GEN).startswith(bytes.fromhex("892f")), "mov %ebp,(%edi)"
    assert at(storm.EIP_SLOT1_GEN).startswith(bytes.fromhex("89aff80f0000")), "mov %ebp,0xff8(%edi)"
    assert at(storm.EIP_PAGE_DONE).startswith(bytes.fromhex("4975")), "dec %ecx; jne page"
    assert at(storm.EIP_SWEEP_DONE).startswith(bytes.fromhex("896e1c")), "mov %ebp,P_DONE_GEN(%esi)"
    assert at(storm.EIP_NEXT_SWEEP).startswith(bytes.fromhex("eb")) and at(storm.EIP_HALT)[0] == 0xF4
    n, g, k = PARAMS.npages, 2, 37
    base = 2 * ((g - 1) * n + k)
    ecx = n - k
    assert [storm.instant_of_registers(PARAMS, eip, g, ecx) for eip in
            (storm.EIP_PAGE, storm.EIP_SLOT0_GEN, storm.EIP_SLOT0_GEN + 2, storm.EIP_SLOT1_GEN + 6,
             storm.EIP_PAGE_DONE)] == [base, base, base + 1, base + 2, base + 2]
    assert storm.instant_of_registers(PARAMS, storm.EIP_LOOP, g, ecx - 1) == base + 2, "after the dec: next page"
    assert storm.instant_of_registers(PARAMS, storm.EIP_SWEEP_DONE, g, 0) == 2 * g * n
    assert storm.instant_of_registers(PARAMS, storm.EIP_NEXT_SWEEP, g + 1, 0) == 2 * g * n
    assert storm.instant_of_registers(PARAMS, storm.EIP_HALT, 4, 0) == PARAMS.total_writes
