"""Self-tests of the guests: committed binaries match their source, and the host-side models are right.

No KVM here: the storm oracle is checked against its own simulator, the
counter model against hand-computed values. tests/test_guests_on_kvm.py runs
the binaries.
"""

from __future__ import annotations

import re
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from snapproof.guests import counter, cpustate, storm
from snapproof.guests.counter import CounterParams
from snapproof.guests.cpustate import CpuStateParams
from snapproof.guests.storm import PAGE_SIZE, StormParams, check_instant, simulate, write_order

from snapproof import guests

# -- binaries -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", guests.names())
def test_guest_source_reassembles_to_its_committed_binary(name: str) -> None:
    """Each guests/NAME.S assembles (as --32, objcopy -j .text) to guests/NAME.bin byte for byte."""
    missing = guests.assembler_missing()
    if missing:
        pytest.skip(missing)
    built, committed = guests.assemble(name), guests.load(name)
    if built != committed:
        pairs = enumerate(zip(built, committed, strict=False))
        first = next((i for i, (a, b) in pairs if a != b), min(len(built), len(committed)))
        pytest.fail(f"{name}.bin is stale (rebuild with `python -m snapproof.guests {name}`): {len(committed)} bytes "
                    f"committed, {len(built)} assembled, first difference at offset {first:#x}")


def test_marker16_is_the_six_bytes_of_the_original_proof() -> None:
    """marker16 is mov al,0x42; mov [0x1000],al; hlt and nothing else."""
    code = guests.load("marker16")
    assert code == bytes.fromhex("B0 42 A2 00 10 F4"), f"marker16.bin: expected b0 42 a2 00 10 f4, saw {code.hex(' ')}"


@pytest.mark.parametrize("name", ["storm32", "counter32", "cpustate32", "store32"])
def test_flat32_guest_fits_below_the_stacks_and_halts_in_a_loop(name: str) -> None:
    """A 32-bit guest's code ends below the lowest vCPU stack (8 vCPUs) and ends with hlt; jmp .-1."""
    code = guests.load(name)
    end = guests.FLAT32_LOAD_GPA + len(code)
    lowest_stack_page = 0x7000 - 0x400 * 8
    assert end <= lowest_stack_page, f"{name}: code ends at GPA {end:#x}, above the stacks at {lowest_stack_page:#x}"
    assert code[-3:] == b"\xf4\xeb\xfd", f"{name}: expected to end with f4 eb fd, saw {code[-3:].hex(' ')}"


def _set_constants(name: str) -> dict[str, int]:
    text = guests.source_path(name).read_text()
    return {m[1]: int(m[2], 0) for m in re.finditer(r"^\s*\.set\s+(\w+),\s*(0x[0-9a-fA-F]+|\d+)", text, re.M)}


# Tripwires: the parameter block is a contract with the committed binaries.
# Changing an offset means reassembling the guest and changing the module, together.
@pytest.mark.parametrize(("name", "module", "pairs"), [
    ("storm32", storm, {"P_REGION": "OFF_REGION", "P_NPAGES": "OFF_NPAGES", "P_STRIDE": "OFF_STRIDE",
                        "P_START0": "OFF_START0", "P_STEP": "OFF_STEP", "P_GENS": "OFF_GENERATIONS",
                        "P_CUR_GEN": "OFF_CUR_GEN", "P_DONE_GEN": "OFF_DONE_GEN", "P_MARK_PAGES": "OFF_MARK_PAGES",
                        "MARK_SYNC": "MARK_SYNC"}),
    ("counter32", counter, {"P_REGION": "OFF_REGION", "P_NPAGES": "OFF_NPAGES", "P_ITERS": "OFF_ITERATIONS",
                            "P_SYNC_EVERY": "OFF_SYNC_EVERY", "P_ITER": "OFF_ITER", "P_CHECKSUM": "OFF_CHECKSUM",
                            "P_FINAL": "OFF_FINAL", "P_DONE": "OFF_DONE", "P_SYNC_AT": "OFF_SYNC_AT",
                            "DONE_MAGIC": "DONE_MAGIC",
                            "WS_TOUCHED": "WS_TOUCHED"}),
    ("cpustate32", cpustate, {"P_ITERS": "OFF_ITERATIONS", "P_SYNC_AT": "OFF_SYNC_AT", "P_XCR0": "OFF_XCR0",
                              "P_MSR_INIT": "OFF_MSR_INIT", "P_XMM_INIT": "OFF_XMM_INIT", "P_MM_INIT": "OFF_MM_INIT",
                              "P_DR_INIT": "OFF_DR_INIT", "P_XMM": "OFF_XMM", "P_MM": "OFF_MM", "P_ITER": "OFF_ITER",
                              "P_NMIS": "OFF_NMIS", "P_NMI_AT": "OFF_NMI_AT", "P_MSR_FINAL": "OFF_MSR_FINAL",
                              "P_XMM_FINAL": "OFF_XMM_FINAL", "P_MM_FINAL": "OFF_MM_FINAL",
                              "P_DR_FINAL": "OFF_DR_FINAL", "P_DONE": "OFF_DONE", "DONE_MAGIC": "DONE_MAGIC",
                              "MSR_SYSENTER_EIP": "MSR_SYSENTER_EIP"}),
])
def test_param_block_offsets_agree_between_source_and_model(name: str, module, pairs: dict[str, str]) -> None:
    """Every .set constant of the guest's block equals the Python module's constant of the same role."""
    consts = _set_constants(name)
    assert consts.get("SYNC_PORT") == guests.SYNC_PORT, f"{name}: SYNC_PORT {consts.get('SYNC_PORT')}"
    for asm, py in pairs.items():
        assert consts[asm] == getattr(module, py), (
            f"{name}.S {asm} = {consts[asm]:#x} but guests.{module.__name__.split('.')[-1]}.{py} = "
            f"{getattr(module, py):#x}: the block is a contract, change both and reassemble")


def test_storm_param_block_layout_is_pinned() -> None:
    """StormParams.pack puts each field at its pinned offset, progress words zero, 0x40 bytes."""
    p = StormParams(region_gpa=0x10000, npages=10, stride=3, start0=4, step=7, generations=5, seed=0x1_DEADBEEF,
                    mark_pages=6)
    block = p.pack()
    assert len(block) == 0x40, f"storm block: expected 0x40 bytes, saw {len(block):#x}"
    assert struct.unpack_from("<10I", block) == (0x10000, 10, 3, 4, 7, 5, 0, 0, 0xDEADBEEF, 6)
    assert block[0x28:] == bytes(0x18), "storm block: spare words must be zero"
    assert StormParams.unpack(block) == StormParams(0x10000, 10, 3, 4, 7, 5, 0xDEADBEEF, 6)


def test_counter_param_block_layout_is_pinned() -> None:
    """CounterParams.pack puts each field at its pinned offset, outputs zero, 0x40 bytes."""
    p = CounterParams(region_gpa=0x20000, npages=3, iterations=77, sync_every=5, sync_at=11)
    block = p.pack()
    assert len(block) == 0x40, f"counter block: expected 0x40 bytes, saw {len(block):#x}"
    assert struct.unpack_from("<4I", block) == (0x20000, 3, 77, 5)
    assert block[0x10:0x20] == bytes(0x10), "counter block: output words must be zero"
    assert struct.unpack_from("<I", block, 0x20) == (11,), "counter block: sync_at at 0x20"
    assert block[0x24:] == bytes(0x1C), "counter block: spare words must be zero"
    assert CounterParams.unpack(block) == p


# -- storm: parameters and write order ------------------------------------------------------------


def test_storm_from_seed_is_pinned() -> None:
    """from_seed draws stride/start0/step by splitmix64; changing it changes every recorded storm."""
    p = StormParams.from_seed(7, region_gpa=0x10000, npages=64, generations=3)
    assert (p.stride, p.start0, p.step) == (31, 28, 2), (
        f"from_seed(7, npages=64) changed: stride/start0/step = {(p.stride, p.start0, p.step)}")


@pytest.mark.parametrize("npages", [1, 2, 3, 64, 96, 257, 4096])
def test_storm_from_seed_gives_valid_params_for_any_size(npages: int) -> None:
    """For any region size and many seeds, the stride is odd, coprime with npages and in range."""
    for seed in range(50):
        p = StormParams.from_seed(seed, npages=npages, generations=2)
        assert p == StormParams.from_seed(seed, npages=npages, generations=2), "from_seed is not deterministic"
        assert p.stride % 2 == 1 and 1 <= p.stride <= npages, f"seed {seed}: stride {p.stride}"


@pytest.mark.parametrize(("field", "value", "words"), [
    ("npages", 0, "npages 0"),
    ("stride", 4, "stride 4: must be odd"),
    ("stride", 3, "stride 3: must be odd, in [1, 12] and coprime"),
    ("start0", 12, "start0 12: must be in [0, 12)"),
    ("step", 13, "step 13"),
    ("region_gpa", 0x10001, "region_gpa 0x10001"),
    ("mark_pages", 13, "mark_pages 13: must be in [0, npages 12]"),
])
def test_storm_params_reject_a_bad_field_naming_it(field: str, value: int, words: str) -> None:
    """A parameter the guest cannot run with is refused, and the error names it."""
    good = dict(region_gpa=0x10000, npages=12, stride=5, start0=0, step=1, generations=1)
    with pytest.raises(ValueError, match=re.escape(words)):
        StormParams(**{**good, field: value})


@pytest.mark.parametrize("seed", range(6))
def test_storm_write_order_visits_every_page_once_per_generation(seed: int) -> None:
    """Each generation's sweep is a permutation of the region, starting at start_g."""
    p = StormParams.from_seed(seed, npages=96, generations=4)
    for g in range(1, 5):
        order = write_order(p, g)
        assert sorted(order) == list(range(96)), f"gen {g}: not a permutation"
        assert order[0] == (p.start0 + (g - 1) * p.step) % 96
        ranks = [storm.rank(p, g, page) for page in order]
        assert ranks == list(range(96)), f"gen {g}: rank() does not invert write_order()"


# -- storm: the instant oracle --------------------------------------------------------------------


def _set_stamp(region: bytearray, page: int, slot: int, gen: int, idx: int | None = None) -> None:
    off = page * PAGE_SIZE + (0, PAGE_SIZE - 8)[slot]
    struct.pack_into("<II", region, off, gen, page if idx is None else idx)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("generations", [3, 0])
def test_oracle_accepts_every_simulated_instant_and_pins_it(seed: int, generations: int) -> None:
    """At every instant t, alone or with the next idx store landed, the oracle finds exactly t."""
    p = StormParams.from_seed(seed, npages=8, generations=generations)
    last = p.total_writes if generations else 2 * 8 * 4
    for t in range(last + 1):
        for in_flight in (False, True) if t < last else (False,):
            v = check_instant(p, simulate(p, t, idx_in_flight=in_flight))
            assert v.ok, f"instant {t} (idx in flight: {in_flight}): {v}"
            assert (v.lo, v.hi) == (t, t), f"instant {t}: oracle says [{v.lo}, {v.hi}]"
            assert v.lo_term == storm.stream_point(p, t)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), npages=st.integers(1, 40), generations=st.integers(0, 4), data=st.data())
def test_oracle_accepts_any_simulated_instant(seed: int, npages: int, generations: int, data) -> None:
    """Any seed, size and instant: the simulated region passes and the oracle pins the instant."""
    p = StormParams.from_seed(seed, npages=npages, generations=generations)
    t = data.draw(st.integers(0, p.total_writes if generations else 6 * npages))
    v = check_instant(p, simulate(p, t))
    assert v.ok and (v.lo, v.hi) == (t, t), f"{p} at instant {t}: {v}"


def _live_reader(p: StormParams, t: int, cur_gen: int):
    """read_u32(gpa) over the block (at PARAM_BLOCK_GPA, naming ``cur_gen``) and the region at instant t."""
    region = simulate(p, t)
    block = bytearray(p.pack())
    struct.pack_into("<I", block, storm.OFF_CUR_GEN, cur_gen)

    def read(gpa: int) -> int:
        if guests.PARAM_BLOCK_GPA <= gpa < guests.PARAM_BLOCK_GPA + len(block):
            return struct.unpack_from("<I", block, gpa - guests.PARAM_BLOCK_GPA)[0]
        return struct.unpack_from("<I", region, gpa - p.region_gpa)[0]

    return read


@pytest.mark.parametrize("seed", range(3))
def test_live_position_reads_the_instant_from_memory(seed: int) -> None:
    """At every instant of three sweeps, the position read from memory alone is the instant, or one write
    short of it (a page whose last stamp is not written yet reads as if its first were not either)."""
    p = StormParams.from_seed(seed, region_gpa=0x100000, npages=13, generations=0)
    for t in range(3 * 2 * p.npages):
        seen = storm.live_position(p, guests.PARAM_BLOCK_GPA, _live_reader(p, t, t // (2 * p.npages) + 1))
        assert t - 1 <= seen <= t, f"instant {t}: live_position says {seen}"
    assert storm.live_position(p, guests.PARAM_BLOCK_GPA, _live_reader(p, 0, 0)) == 0, "a guest not started"


def test_live_position_of_a_guest_that_moves_on_is_the_start_of_its_newest_sweep() -> None:
    """A guest that starts a new sweep while it is read each time: the answer is never past what it wrote."""
    p = StormParams.from_seed(7, region_gpa=0x100000, npages=13, generations=0)
    reads = {"n": 0}
    inner = _live_reader(p, 2 * p.npages + 9, 2)

    def moving(gpa: int) -> int:
        if gpa == guests.PARAM_BLOCK_GPA + storm.OFF_CUR_GEN:
            reads["n"] += 1
            return 1 + reads["n"]  # a sweep further at each look
        return inner(gpa)

    seen = storm.live_position(p, guests.PARAM_BLOCK_GPA, moving, tries=3)
    newest = 1 + reads["n"]
    assert seen == 2 * (newest - 1) * p.npages, f"cur_gen {newest} at the last look: live_position says {seen}"


def test_reset16_rom_ends_in_the_reset_vector_and_enters_the_flat32_contract() -> None:
    """The ROM is 64 KiB, its last 16 bytes a jmp back to the code's start; the code names the guests' entry and
    parameter block."""
    rom, code = guests.rom_image("reset16"), guests.load("reset16")
    assert len(rom) == guests.ROM_SIZE and rom.endswith(code), f"ROM of {len(rom):#x} bytes"
    vector = rom[-guests.RESET_VECTOR_SIZE:]
    assert vector[0] == 0xE9, f"reset vector: expected a near jmp (e9), saw {vector.hex(' ')}"
    target = (guests.ROM_SIZE - guests.RESET_VECTOR_SIZE + 3 + struct.unpack_from("<h", vector, 1)[0]) % 0x10000
    assert target == guests.ROM_SIZE - len(code), f"reset vector jumps to {target:#x}, the code starts at " \
                                                  f"{guests.ROM_SIZE - len(code):#x}"
    consts = _set_constants("reset16")
    assert (consts["ENTRY_GPA"], consts["BLOCK_GPA"]) == (guests.FLAT32_LOAD_GPA, guests.PARAM_BLOCK_GPA), consts


def test_rom_image_refuses_code_that_does_not_end_on_a_reset_vector() -> None:
    """A guest whose length is no whole number of 16-byte vectors cannot be a ROM: refused naming it."""
    with pytest.raises(ValueError, match="'marker16' is 6 bytes"):
        guests.rom_image("marker16")


def test_oracle_names_the_torn_page_in_flight() -> None:
    """Between a page's first and last stamp, that page is torn and the verdict says so."""
    p = StormParams.from_seed(1, npages=16, generations=2)
    t = 2 * 16 + 2 * 5 + 1                      # gen 2, sixth page: first stamp written, last not yet
    v = check_instant(p, simulate(p, t))
    page = write_order(p, 2)[5]
    assert v.ok and v.torn == (page,), f"expected page {page} torn in flight, verdict: {v}"
    assert v.lo_term is not None and (v.lo_term.generation, v.lo_term.page, v.lo_term.slot) == (2, page, 1)


def test_oracle_rejects_halves_from_two_instants() -> None:
    """Half the region from one instant, half from a much later one: no single instant."""
    p = StormParams.from_seed(2, npages=64, generations=4)
    early, late = simulate(p, 2 * 64 + 10), simulate(p, 3 * 2 * 64 + 40)
    half = 32 * PAGE_SIZE
    v = check_instant(p, early[:half] + late[half:])
    assert not v.ok, f"mixed instants accepted: {v}"
    assert "no single instant" in v.message and v.page is not None
    assert f"page {v.page} (GPA {p.page_gpa(v.page):#x})" in v.message, v.message


def test_oracle_rejects_a_torn_page_away_from_the_boundary() -> None:
    """A page torn while the instant is elsewhere is named, with its two stamp generations."""
    p = StormParams.from_seed(3, npages=32, generations=3)
    t = 2 * 32 + 2 * 20                          # gen 2, 20 pages done, none in flight
    region = bytearray(simulate(p, t))
    page = write_order(p, 2)[3]                  # done long ago in this sweep
    _set_stamp(region, page, 1, 1)               # its last stamp goes back to gen 1
    v = check_instant(p, region)
    assert not v.ok and v.page == page, f"expected page {page} blamed, verdict: {v}"
    assert f"page {page} (GPA {p.page_gpa(page):#x})" in v.message and "torn" in v.message, v.message
    assert "expected gen 2" in v.message and "stamp gen 1" in v.message, v.message


def test_oracle_rejects_two_torn_pages() -> None:
    """Two torn pages cannot both be in flight; the message names both."""
    p = StormParams.from_seed(4, npages=16, generations=2)
    region = bytearray(simulate(p, 2 * 16 + 2 * 8 + 1))     # one torn page already
    other = write_order(p, 2)[2]
    _set_stamp(region, other, 1, 1)
    v = check_instant(p, region)
    assert not v.ok and "2 torn pages" in v.message, v.message
    assert f"page {other} (GPA {p.page_gpa(other):#x}): first stamp gen 2, last stamp gen 1" in v.message


def test_oracle_rejects_a_last_stamp_ahead_of_the_first() -> None:
    """A last stamp newer than the first stamp is never a state of the guest."""
    p = StormParams.from_seed(5, npages=16, generations=3)
    region = bytearray(simulate(p, 2 * 16))
    _set_stamp(region, 7, 1, 2)
    v = check_instant(p, region)
    assert not v.ok and v.page == 7, v.message
    assert "page 7 (GPA 0x17000): first stamp gen 1, last stamp gen 2" in v.message, v.message


def test_oracle_rejects_a_wrong_idx_word() -> None:
    """A stamp whose idx word is not its page index is reported with expected and seen idx."""
    p = StormParams.from_seed(6, npages=16, generations=2)
    region = bytearray(simulate(p, 2 * 16 + 7))
    _set_stamp(region, 9, 0, 1, idx=10)
    v = check_instant(p, region)
    assert not v.ok and v.page == 9 and v.gpa == 0x19000, v.message
    assert v.message == "page 9 (GPA 0x19000): first stamp gen 1: expected idx 0x9, saw 0xa"


def test_oracle_rejects_an_idx_on_a_never_written_slot_not_in_flight() -> None:
    """An idx stored into an unwritten slot is only allowed for the slot whose first write is next."""
    p = StormParams.from_seed(7, npages=16, generations=2)
    t = 2 * 4
    region = bytearray(simulate(p, t))
    page = write_order(p, 1)[9]                  # its first write is far from instant t
    _set_stamp(region, page, 0, 0, idx=page)
    v = check_instant(p, region)
    assert not v.ok and v.page == page, v.message
    assert "already stored" in v.message, v.message
    region2 = bytearray(simulate(p, t))
    _set_stamp(region2, 5 if page != 5 else 6, 1, 0, idx=3)
    v2 = check_instant(p, region2)
    assert not v2.ok and "expected idx 0 (never written), saw 0x3" in v2.message, v2.message


def test_oracle_rejects_a_generation_beyond_the_run() -> None:
    """A stamp from a generation the run never reaches is named."""
    p = StormParams.from_seed(8, npages=8, generations=2)
    region = bytearray(simulate(p, p.total_writes))
    _set_stamp(region, 3, 0, 3)
    _set_stamp(region, 3, 1, 3)
    v = check_instant(p, region)
    assert not v.ok and v.message == "page 3 (GPA 0x13000): first stamp gen 3, but the run has only 2 generations"


def test_oracle_rejects_one_page_from_after_the_instant() -> None:
    """One page already rewritten by a later write of the sweep: that page is blamed, not the rest."""
    p = StormParams.from_seed(9, npages=64, generations=3)
    t = 2 * 64 + 2 * 30
    region = bytearray(simulate(p, t))
    page = write_order(p, 2)[45]                 # gen 2 reaches it 15 pages after the instant
    _set_stamp(region, page, 0, 2)
    _set_stamp(region, page, 1, 2)
    v = check_instant(p, region)
    assert not v.ok and v.page == page, f"expected page {page} blamed, verdict: {v}"
    assert "first stamp gen 2, expected gen 1" in v.message and "1 of 64 pages off it" in v.message, v.message


def test_oracle_rejects_one_page_from_before_the_instant() -> None:
    """One page that missed its write of this sweep: that page is blamed, with the generation it lacks."""
    p = StormParams.from_seed(10, npages=64, generations=3)
    t = 2 * 64 + 2 * 50
    region = bytearray(simulate(p, t))
    page = write_order(p, 2)[10]
    _set_stamp(region, page, 0, 1)
    _set_stamp(region, page, 1, 1)
    v = check_instant(p, region)
    assert not v.ok and v.page == page, f"expected page {page} blamed, verdict: {v}"
    assert "first stamp gen 1, expected gen 2" in v.message, v.message


def test_oracle_refuses_a_region_of_the_wrong_size() -> None:
    """The snapshot must be exactly the region the params describe."""
    p = StormParams.from_seed(11, npages=4, generations=1)
    with pytest.raises(ValueError, match=r"0x3000 bytes, params say 0x4000 \(4 pages\)"):
        check_instant(p, bytes(3 * PAGE_SIZE))


def test_oracle_accepts_a_1gib_region(record_property) -> None:
    """262144 pages: the accepting path handles a 1 GiB region (its time is recorded, never asserted)."""
    p = StormParams.from_seed(12, npages=262144, generations=3)
    region = simulate(p, 2 * 262144 + 2 * 100_000 + 1)
    t0 = time.perf_counter()
    v = check_instant(p, region)
    elapsed = time.perf_counter() - t0
    assert v.ok, v.message
    record_property("check_instant_1gib_s", round(elapsed, 3))


# -- counter model --------------------------------------------------------------------------------


def test_counter_model_matches_hand_computed_values() -> None:
    """Three iterations over two pages, worked by hand: words, checksum and registers."""
    p = CounterParams(region_gpa=0x10000, npages=2, iterations=3, sync_every=2)
    f = counter.expected_final(p)
    # i=1: page 1 word 13 += 1; i=2: page 0 word 26 += 2; i=3: page 1 word 39 += 3.
    assert (f.word(1, 13), f.word(0, 26), f.word(1, 39)) == (1, 2, 3)
    assert sum(struct.unpack(f"<{2 * 1024}I", f.region)) == 6, "only three words may be nonzero"
    # c1 = 0 ^ 1 = 1; c2 = rol(1,5) ^ 2 = 34; c3 = rol(34,5) ^ 3 = 1091.
    assert f.checksum == 1091
    assert f.regs == {"ebx": 3, "ecx": 1, "edi": 1091, "ebp": 1, "eax": 1091, "eip": counter.halt_eip()}
    assert f.syncs == [0x80000002, 2]
    assert counter.read_progress(f.block) == counter.CounterProgress(3, 1091, 1091, True)


def test_counter_model_accumulates_into_revisited_words() -> None:
    """With one page, iteration i and i+1024 hit the same word: the guest adds, it does not overwrite."""
    p = CounterParams(npages=1, iterations=2048, sync_every=0)
    f = counter.expected_final(p)
    for i in (1, 500, 1024):
        w = 13 * i % 1024
        assert f.word(0, w) == i + (i + 1024 if i + 1024 <= 2048 else 0), f"word {w}"
    assert f.syncs == [0x80000001] and f.regs["ebp"] == (-2048) & 0xFFFFFFFF


def test_counter_checksum_rotates_through_the_top_bit() -> None:
    """rol by 5 carries the top bits round: rol(0x80000000, 5) = 0x10."""
    assert counter.checksum_step(0x80000000, 0) == 0x10
    assert counter.checksum_step(0xF8000001, 1) == 0x3E  # 0x3f ^ 1


def test_counter_sync_values_put_the_working_set_first() -> None:
    """Syncs: i after every sync_every-th iteration; WS_TOUCHED|npages once, before a periodic one."""
    p = CounterParams(npages=4, iterations=6, sync_every=2)
    assert counter.sync_values(p) == [2, 0x80000004, 4, 6]
    assert counter.sync_values(CounterParams(npages=8, iterations=6, sync_every=0)) == []
    assert [counter.sync_iteration(v) for v in counter.sync_values(p)] == [2, 4, 4, 6]


def test_counter_sync_at_comes_once_after_the_working_set_and_the_periodic_sync() -> None:
    """sync_at adds its iteration once; after the same iteration the working-set value comes first, sync_at last."""
    assert counter.sync_values(CounterParams(npages=8, iterations=20, sync_every=0, sync_at=5)) == [5, 0x80000008]
    p = CounterParams(npages=4, iterations=6, sync_every=2, sync_at=4)
    assert counter.sync_values(p) == [2, 0x80000004, 4, 4, 6]
    assert counter.sync_values(p, upto=3) == [2], "sync_at after the cut-off is not written yet"
    assert counter.expected_after(p, 4).syncs == [2, 0x80000004, 4, 4]


def test_counter_state_after_a_sync_is_a_prefix_of_the_final_run() -> None:
    """expected_after(i) then iterations i+1.. gives expected_final: the model composes like a resume."""
    p = CounterParams(npages=5, iterations=3000, sync_every=250)
    mid, final = counter.expected_after(p, 1250), counter.expected_final(p)
    assert final.syncs[:len(mid.syncs)] == mid.syncs and mid.syncs[-1] == 1250
    assert counter.read_progress(mid.block) == counter.CounterProgress(1250, mid.checksum, 0, False)
    assert mid.regs == {"ebx": 1250, "ecx": 0, "edi": mid.checksum, "ebp": 250}
    c = mid.checksum
    for i in range(1251, 3001):
        c = counter.checksum_step(c, i)
    assert c == final.checksum


@pytest.mark.parametrize(("field", "value", "words"), [
    ("npages", 0, "npages 0"),
    ("iterations", 0x80000000, "iterations 2147483648"),
    ("region_gpa", 0x10800, "region_gpa 0x10800"),
    ("sync_at", 10_001, "sync_at 10001: must be in [0, iterations 10000]"),
])
def test_counter_params_reject_a_bad_field_naming_it(field: str, value: int, words: str) -> None:
    """A parameter the guest cannot run with is refused, and the error names it."""
    with pytest.raises(ValueError, match=re.escape(words)):
        CounterParams(**{field: value})


def test_cpustate32_loads_at_the_contract_address() -> None:
    """cpustate32's absolute addresses (GDT, IDT, NMI gate) assume the 32-bit load address of the contract."""
    assert _set_constants("cpustate32")["LOAD"] == guests.FLAT32_LOAD_GPA


def test_cpustate_param_block_layout_is_pinned() -> None:
    """CpuStateParams.pack puts each field at its pinned offset, guest words zero, one 0x100-byte block."""
    p = CpuStateParams(iterations=77, sync_at=5, xcr0=3, msr_init=0x11, xmm_init=(1, 2, 3, 4),
                       mm_init=0x0123456789ABCDEF, dr_init=(5, 6, 7, 8))
    block = p.pack()
    assert len(block) == 0x100, f"cpustate block: expected 0x100 bytes, saw {len(block):#x}"
    assert struct.unpack_from("<8IQ4I", block) == (77, 5, 3, 0x11, 1, 2, 3, 4, 0x0123456789ABCDEF, 5, 6, 7, 8)
    assert block[0x38:] == bytes(0xC8), "cpustate block: guest and spare words must be zero"
    assert CpuStateParams.unpack(block) == p


def test_cpustate_from_seed_is_pinned_and_differs_per_seed() -> None:
    """from_seed draws every seed word by splitmix64; two seeds share no register value."""
    a, b = CpuStateParams.from_seed(1, 10, 5), CpuStateParams.from_seed(2, 10, 5)
    assert (a.msr_init, a.dr_init[0]) == (0x89025CC1, 0x71C18690), f"from_seed(1) changed: {a}"
    seen_a, seen_b = ({p.msr_init, *p.xmm_init, p.mm_init, *p.dr_init} for p in (a, b))
    assert not seen_a & seen_b, f"seeds 1 and 2 share values: {seen_a & seen_b}"


def test_cpustate_model_matches_hand_computed_values() -> None:
    """Two iterations from small seeds, worked by hand: the lanes, MM0 and SYSENTER_EIP."""
    p = CpuStateParams(iterations=2, msr_init=1, xmm_init=(1, 0, 0, 0), mm_init=0)
    # i=1, m=1: a = rol(1,5) ^ 2 = 34; b = 34; c = 34; d = 34; mm = 34 + (1 << 32); m = rol(1,3) + 34 = 42.
    one = cpustate.expected_after(p, 1)
    assert (one.xmm, one.mm, one.msr) == ((34, 34, 34, 34), 34 + (1 << 32), 42)
    # i=2, m=42: a = rol(34,5) ^ 44 = 1088 ^ 44 = 1132; b = 1166; c = 34 ^ 1166 = 1196; d = 1230;
    # mm = 34 + (1 << 32) + 1230 + (2 << 32); m = rol(42,3) + low32(mm) = 336 + 1264 = 1600.
    two = cpustate.expected_after(p, 2)
    assert (two.xmm, two.mm, two.msr) == ((1132, 1166, 1196, 1230), 1264 + (3 << 32), 1600)


def test_cpustate_expected_block_carries_the_result_and_the_inputs() -> None:
    """At HLT the block holds the inputs, the report (one NMI after sync_at, the DRs) and DONE."""
    p = CpuStateParams.from_seed(3, 40, 17)
    block = cpustate.expected_block(p)
    assert CpuStateParams.unpack(block) == p
    r = cpustate.read_result(block)
    assert r == cpustate.expected_result(p)
    assert (r.nmis, r.nmi_at, r.iteration, r.done, r.dr) == (1, 17, 40, True, p.dr_init)
    none = cpustate.read_result(bytes(cpustate.BLOCK_SIZE))
    assert none.differences(r)[0].startswith("XMM0: expected "), none.differences(r)


@pytest.mark.parametrize(("field", "value", "words"), [
    ("sync_at", 11, "sync_at 11: must be in [0, iterations 10]"),
    ("xcr0", 7, "xcr0 0x7"),
    ("mm_init", 1 << 64, "mm_init 0x10000000000000000"),
])
def test_cpustate_params_reject_a_bad_field_naming_it(field: str, value: int, words: str) -> None:
    """A parameter the guest cannot run with is refused, and the error names it."""
    with pytest.raises(ValueError, match=re.escape(words)):
        CpuStateParams(**{"iterations": 10, field: value})


def test_oracle_exact_mode_catches_a_byte_between_the_stamps() -> None:
    """Stamps alone cannot see the middle of a page; exact=True compares every byte with the simulation."""
    p = StormParams.from_seed(13, npages=16, generations=2)
    region = bytearray(simulate(p, 2 * 16 + 9, idx_in_flight=True))
    assert check_instant(p, region, exact=True).ok
    region[5 * PAGE_SIZE + 2000] = 0x5A
    assert check_instant(p, region).ok, "the stamps are untouched"
    v = check_instant(p, region, exact=True)
    assert not v.ok and v.page == 5, v.message
    assert "byte at GPA 0x157d0 is 0x5a, expected 0x00" in v.message, v.message
