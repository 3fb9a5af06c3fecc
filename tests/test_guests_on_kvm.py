"""The 32-bit guests on real KVM: storm32 leaves exactly the simulated region, counter32 exactly the model.

Each test builds its own VM(s) through the conftest factories (skipped, naming
why, where /dev/kvm is missing). Guest memory: code at 0x1000, stacks below
0x7000, parameter blocks at 0x8000 + 0x100*i, data from 0x10000
(docs/CONTRACTS.md).
"""

from __future__ import annotations

import dataclasses
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from snapproof.guests import DATA_REGION_GPA, FLAT32_LOAD_GPA, PARAM_BLOCK_GPA, PARAM_BLOCK_STRIDE, counter, storm
from snapproof.guests.counter import CounterParams
from snapproof.guests.storm import StormParams
from snapproof.native.compare import describe_difference

from snapproof import guests

STACK_TOP = 0x7000
STACK_STRIDE = 0x400
RUN_TIMEOUT = 30.0   # this host may emulate every instruction (kvm_pvm); HLT comes far sooner
POLL_S = 0.0005      # between reads of a running guest's memory: leaves the shared cores to the vCPU thread
REST_AFTER_KICK = 50_000  # iterations a kicked counter32 still runs after its restore


def block_gpa(i: int) -> int:
    return PARAM_BLOCK_GPA + PARAM_BLOCK_STRIDE * i


def boot(make_memory: Callable[..., Any], make_vm: Callable[..., Any], name: str, blocks: list[bytes],
         data_size: int) -> tuple[Any, Any, list[Any]]:
    """Memory with guest ``name`` and one parameter block per vCPU, a VM over it, vCPUs at the entry."""
    mem = make_memory("memfd", DATA_REGION_GPA + data_size)
    mem.write(FLAT32_LOAD_GPA, guests.load(name))
    vm = make_vm(mem)
    vcpus = []
    for i, block in enumerate(blocks):
        mem.write(block_gpa(i), block)
        vcpu = vm.add_vcpu()
        vcpu.set_flat32(eip=FLAT32_LOAD_GPA, esp=STACK_TOP - STACK_STRIDE * i, esi=block_gpa(i))
        vcpus.append(vcpu)
    return mem, vm, vcpus


def restore(make_memory: Callable[..., Any], make_vm: Callable[..., Any], image: bytes, state: bytes) -> Any:
    """A fresh VM whose memory is ``image`` and whose one vCPU is ``state``: the resume half of a snapshot."""
    mem = make_memory("memfd", len(image))
    mem.write(0, image)
    vm = make_vm(mem)
    vcpu = vm.add_vcpu()
    vcpu.load_state(state)
    return mem, vcpu


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    """Poll a running guest's memory until ``predicate()``; fail naming ``what`` after RUN_TIMEOUT."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {RUN_TIMEOUT} s"
        time.sleep(POLL_S)


def expect_exit(ex: Any, reason: str, what: str) -> None:
    assert ex.reason.name == reason, f"{what}: expected exit {reason}, saw {ex.describe()}"


def run_collecting_syncs(vcpu: Any, what: str) -> list[int]:
    """Run to HLT, stopping at every sync-port write to record its value."""
    values = []
    while True:
        ex = vcpu.run(timeout=RUN_TIMEOUT, stop_on_sync=True)
        if ex.reason.name == "HLT":
            return values
        expect_exit(ex, "SYNC", what)
        values.append(ex.last_sync)


# -- storm32 --------------------------------------------------------------------------------------


def test_storm32_on_one_vcpu_halts_leaving_the_simulated_region(make_memory, make_vm) -> None:
    """storm32 runs its generations to HLT, signalling each, and leaves exactly simulate(params, end)."""
    p = StormParams.from_seed(21, region_gpa=DATA_REGION_GPA, npages=256, generations=4)
    mem, _, (vcpu,) = boot(make_memory, make_vm, storm.GUEST, [p.pack()], p.region_size)

    ex = vcpu.run(timeout=RUN_TIMEOUT)

    expect_exit(ex, "HLT", "storm32")
    assert (ex.sync_count, ex.last_sync) == (4, 4), f"syncs: expected 4 ending with 4, saw {ex.sync_count} " \
                                                    f"ending with {ex.last_sync}"
    region = mem.read(p.region_gpa, p.region_size)
    want = storm.simulate(p, p.total_writes)
    assert region == want, describe_difference(want, region, p.region_gpa)
    assert storm.read_progress(mem.read(block_gpa(0), storm.BLOCK_SIZE)) == storm.StormProgress(4, 4)
    v = storm.check_instant(p, region)
    assert v.ok and v.lo == v.hi == p.total_writes, v.message


def test_storm32_on_two_vcpus_leaves_each_half_simulated(make_memory, make_vm) -> None:
    """Two vCPUs storm disjoint halves concurrently, each from its own block; each half is its simulation."""
    halves = [StormParams.from_seed(30 + i, region_gpa=DATA_REGION_GPA + i * 128 * 4096, npages=128,
                                    generations=3) for i in range(2)]
    mem, _, vcpus = boot(make_memory, make_vm, storm.GUEST, [p.pack() for p in halves], 256 * 4096)

    with ThreadPoolExecutor(max_workers=2) as pool:
        exits = list(pool.map(lambda v: v.run(timeout=RUN_TIMEOUT), vcpus))

    for i, (p, ex) in enumerate(zip(halves, exits, strict=True)):
        expect_exit(ex, "HLT", f"storm32 vCPU {i}")
        assert ex.sync_count == 3, f"vCPU {i}: expected 3 syncs, saw {ex.sync_count}"
        region = mem.read(p.region_gpa, p.region_size)
        want = storm.simulate(p, p.total_writes)
        assert region == want, f"vCPU {i} half: {describe_difference(want, region, p.region_gpa)}"


def test_storm32_at_each_sync_is_the_sweep_boundary(make_memory, make_vm) -> None:
    """Stopped at sync g, the region is exactly the instant after sweep g, and the oracle pins that instant."""
    p = StormParams.from_seed(22, npages=64, generations=3)
    mem, _, (vcpu,) = boot(make_memory, make_vm, storm.GUEST, [p.pack()], p.region_size)

    for g in range(1, 4):
        ex = vcpu.run(timeout=RUN_TIMEOUT, stop_on_sync=True)
        expect_exit(ex, "SYNC", f"storm32 sweep {g}")
        assert ex.last_sync == g, f"sweep {g}: sync value {ex.last_sync}"
        region = mem.read(p.region_gpa, p.region_size)
        want = storm.simulate(p, p.sync_position(g))
        assert region == want, f"at sync {g}: {describe_difference(want, region, p.region_gpa)}"
        v = storm.check_instant(p, region)
        assert v.ok and v.lo == v.hi == p.sync_position(g), f"at sync {g}: {v}"
    expect_exit(vcpu.run(timeout=RUN_TIMEOUT), "HLT", "storm32 after its last sync")


def test_storm32_stops_at_its_mark_exactly_at_the_mark_instant(make_memory, make_vm) -> None:
    """Run with stop_on_sync, storm32 stops at its mark inside sweep 1: the region is exactly instant 2*mark_pages,
    however fast the guest ran; the generation syncs follow unchanged and it halts at the simulated end."""
    p = StormParams.from_seed(24, npages=64, generations=2, mark_pages=40)
    mem, _, (vcpu,) = boot(make_memory, make_vm, storm.GUEST, [p.pack()], p.region_size)

    ex = vcpu.run(timeout=RUN_TIMEOUT, stop_on_sync=True)

    expect_exit(ex, "SYNC", "storm32 mark")
    assert ex.last_sync == p.mark_sync, f"mark sync: expected {p.mark_sync:#x}, saw {ex.last_sync:#x}"
    region = mem.read(p.region_gpa, p.region_size)
    want = storm.simulate(p, p.mark_position)
    assert region == want, f"at the mark: {describe_difference(want, region, p.region_gpa)}"
    v = storm.check_instant(p, region)
    assert v.ok and v.lo == v.hi == p.mark_position, f"at the mark: {v}"
    after = run_collecting_syncs(vcpu, "storm32 after its mark")
    assert after == [1, 2], f"syncs after the mark: expected [1, 2] (the sweeps; the mark only once), saw {after}"
    region = mem.read(p.region_gpa, p.region_size)
    assert region == storm.simulate(p, p.total_writes), "storm32 after its mark: the region is not the simulated end"


def test_storm32_kicked_mid_sweep_is_one_instant(make_memory, make_vm) -> None:
    """A never-ending storm kicked at arbitrary moments is, each time, exactly one instant of its stream."""
    p = StormParams.from_seed(23, npages=64, generations=0)
    mem, _, (vcpu,) = boot(make_memory, make_vm, storm.GUEST, [p.pack()], p.region_size)
    seen: list[int] = []

    def done_gen() -> int:
        return storm.read_progress(mem.read(block_gpa(0), storm.BLOCK_SIZE)).done_gen

    with ThreadPoolExecutor(max_workers=1) as pool:
        for round_ in range(12):
            # Two more completed sweeps than at the last kick put the guest's stream past that kick's instant,
            # whatever its speed, so each kick's instant is a later one; then an uneven pause, so the kicks land
            # at unrelated points (any point is a right one).
            at_last_kick = done_gen()
            fut = pool.submit(vcpu.run, RUN_TIMEOUT)
            wait_for(lambda d=at_last_kick, f=fut: done_gen() >= d + 2 or f.done(),
                     f"storm32 two more sweeps before kick {round_}")
            time.sleep(0.003 + 0.0023 * round_)
            vcpu.kick()
            ex = fut.result()
            expect_exit(ex, "KICKED", f"storm32 kick {round_}")
            region = mem.read(p.region_gpa, p.region_size)
            v = storm.check_instant(p, region, exact=True)
            assert v.ok and v.lo == v.hi, f"kick {round_}: {v}"
            assert not seen or v.lo > seen[-1], f"kick {round_}: instant {v.lo} not after {seen[-1]}"
            seen.append(v.lo)
            prog = storm.read_progress(mem.read(block_gpa(0), storm.BLOCK_SIZE))
            assert v.lo_term is not None and v.lo_term.generation in (prog.cur_gen, prog.cur_gen + 1), (
                f"kick {round_}: oracle at {v.lo_term}, guest says generation {prog.cur_gen}")


# -- counter32 ------------------------------------------------------------------------------------


def check_counter_final(mem: Any, vcpu: Any, p: CounterParams, block_at: int, what: str) -> None:
    """Region, parameter block and the registers the guest determines all equal expected_final."""
    f = counter.expected_final(p)
    region = mem.read(p.region_gpa, p.region_size)
    assert region == f.region, f"{what}: {describe_difference(f.region, region, p.region_gpa)}"
    block = mem.read(block_at, counter.BLOCK_SIZE)
    assert counter.read_progress(block) == counter.read_progress(f.block), (
        f"{what}: block {counter.read_progress(block)}, expected {counter.read_progress(f.block)}")
    regs = vcpu.regs()
    got = {k: regs[k] & 0xFFFFFFFF for k in f.regs}
    assert got == f.regs, f"{what}: registers {({k: hex(v) for k, v in got.items()})}, " \
                          f"expected {({k: hex(v) for k, v in f.regs.items()})}"
    assert regs["esi"] == block_at, f"{what}: ESI {regs['esi']:#x}, expected the block at {block_at:#x}"


def test_counter32_run_to_hlt_equals_the_model(make_memory, make_vm) -> None:
    """An uninterrupted counter32 run ends with the model's region, checksum, block, registers and syncs."""
    p = CounterParams(npages=16, iterations=20_000, sync_every=1000)
    mem, _, (vcpu,) = boot(make_memory, make_vm, counter.GUEST, [p.pack()], p.region_size)

    syncs = run_collecting_syncs(vcpu, "counter32")

    want = counter.expected_final(p).syncs
    assert syncs == want, f"sync values {syncs[:6]}... ({len(syncs)}), model {want[:6]}... ({len(want)})"
    check_counter_final(mem, vcpu, p, block_gpa(0), "counter32")


def test_counter32_stopped_at_a_sync_resumes_in_a_fresh_vm_to_the_same_result(make_memory, make_vm) -> None:
    """Memory + vCPU state saved at the 5th sync, loaded into a new VM, finish as the model and a straight run do."""
    p = CounterParams(npages=16, iterations=20_000, sync_every=1000)
    mem, _, (vcpu,) = boot(make_memory, make_vm, counter.GUEST, [p.pack()], p.region_size)

    # 1. Run to the 5th sync and check the paused guest is the model at that iteration.
    before = [vcpu.run(timeout=RUN_TIMEOUT, stop_on_sync=True) for _ in range(5)]
    for ex in before:
        expect_exit(ex, "SYNC", "counter32 before the snapshot")
    values = [ex.last_sync for ex in before]
    i = counter.sync_iteration(values[-1])
    mid = counter.expected_after(p, i)
    assert values == mid.syncs, f"syncs before the snapshot {values}, model {mid.syncs}"
    region = mem.read(p.region_gpa, p.region_size)
    assert region == mid.region, f"at iteration {i}: {describe_difference(mid.region, region, p.region_gpa)}"

    # 2. Snapshot: vCPU state and all of memory.
    state, image = vcpu.save_state(), mem.snapshot_bytes()

    # 3. Restore into a fresh VM and run to the end; an OUT re-executed on resume would show as a repeated sync.
    mem2, vcpu2 = restore(make_memory, make_vm, image, state)
    after = run_collecting_syncs(vcpu2, "counter32 resumed")
    assert values + after == counter.expected_final(p).syncs, (
        f"syncs across the snapshot: {values[-2:]} | {after[:3]}..., model "
        f"{counter.expected_final(p).syncs[len(values) - 2:len(values) + 3]}...")
    check_counter_final(mem2, vcpu2, p, block_gpa(0), "counter32 resumed")

    # 4. The original, continued, and the resumed copy agree on all of memory.
    expect_exit(vcpu.run(timeout=RUN_TIMEOUT), "HLT", "counter32 continued")
    straight, resumed = mem.snapshot_bytes(), mem2.snapshot_bytes()
    assert resumed == straight, f"resumed vs uninterrupted: {describe_difference(straight, resumed, 0)}"


def test_counter32_stops_at_its_sync_at_exactly_where_the_model_is(make_memory, make_vm) -> None:
    """Run with stop_on_sync, counter32 stops right after iteration sync_at: region, block and registers are the
    model's there, however fast the guest ran; it then runs on to HLT and the final model."""
    p = CounterParams(npages=16, iterations=3000, sync_every=0, sync_at=1234)
    mem, _, (vcpu,) = boot(make_memory, make_vm, counter.GUEST, [p.pack()], p.region_size)

    ex = vcpu.run(timeout=RUN_TIMEOUT, stop_on_sync=True)   # the working-set sync (iteration 16) comes first
    expect_exit(ex, "SYNC", "counter32 working set")
    ex = vcpu.run(timeout=RUN_TIMEOUT, stop_on_sync=True)

    expect_exit(ex, "SYNC", "counter32 sync_at")
    assert ex.last_sync == p.sync_at, f"sync value: expected {p.sync_at:#x}, saw {ex.last_sync:#x}"
    mid = counter.expected_after(p, p.sync_at)
    region = mem.read(p.region_gpa, p.region_size)
    assert region == mid.region, f"at sync_at: {describe_difference(mid.region, region, p.region_gpa)}"
    assert mem.read(block_gpa(0), counter.BLOCK_SIZE) == mid.block, "at sync_at: parameter block differs from model"
    regs = vcpu.regs()
    got = {k: regs[k] & 0xFFFFFFFF for k in mid.regs}
    assert got == mid.regs, f"at sync_at: registers {({k: hex(v) for k, v in got.items()})}, " \
                            f"expected {({k: hex(v) for k, v in mid.regs.items()})}"
    expect_exit(vcpu.run(timeout=RUN_TIMEOUT), "HLT", "counter32 after sync_at")
    check_counter_final(mem, vcpu, p, block_gpa(0), "counter32 after sync_at")


def test_counter32_kicked_mid_run_resumes_in_a_fresh_vm_to_the_same_result(make_memory, make_vm) -> None:
    """A counter32 kicked at an arbitrary instruction, restored into a new VM, finishes exactly as the model."""
    # As many iterations as the guest allows while it runs: no guest, however fast, ends before the kick.
    p = CounterParams(npages=32, iterations=counter.MAX_ITERATIONS, sync_every=0)
    mem, _, (vcpu,) = boot(make_memory, make_vm, counter.GUEST, [p.pack()], p.region_size)

    def iteration() -> int:
        return counter.read_progress(mem.read(block_gpa(0), counter.BLOCK_SIZE)).iteration

    # 1. Run in a thread; kick once the guest's trace word shows it under way.
    with ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(vcpu.run, RUN_TIMEOUT)
        wait_for(lambda: iteration() >= 1000 or fut.done(), "counter32 at iteration 1000")
        vcpu.kick()
        ex = fut.result()
    expect_exit(ex, "KICKED", "counter32 kicked mid-run")

    # 2. The end moves to REST iterations past the kick: the guest compares against its block's word at every
    #    iteration, and the run so far is the same as one with that count from the start. Then snapshot; the
    #    region is the model at the traced iteration, or one later (kicked inside an iteration).
    it = iteration()
    p = dataclasses.replace(p, iterations=it + REST_AFTER_KICK)
    mem.write(block_gpa(0) + counter.OFF_ITERATIONS, struct.pack("<I", p.iterations))
    state, image = vcpu.save_state(), mem.snapshot_bytes()
    assert 0 < it < p.iterations, f"kicked at iteration {it} of {p.iterations}: not mid-run"
    region = mem.read(p.region_gpa, p.region_size)
    candidates = [counter.expected_after(p, j).region for j in (it, min(it + 1, p.iterations))]
    assert region in candidates, (
        f"at the kick (trace says {it}): {describe_difference(candidates[0], region, p.region_gpa)}")

    # 3. Restore into a fresh VM, run to HLT, compare with the model.
    mem2, vcpu2 = restore(make_memory, make_vm, image, state)
    ex2 = vcpu2.run(timeout=RUN_TIMEOUT)
    expect_exit(ex2, "HLT", "counter32 resumed after the kick")
    assert ex2.sync_count == 0, f"resumed run wrote {ex2.sync_count} syncs; the working-set one came long before"
    check_counter_final(mem2, vcpu2, p, block_gpa(0), "counter32 resumed after the kick")


@pytest.mark.parametrize("npages", [1, 7])
def test_counter32_signals_working_set_touched_once(make_memory, make_vm, npages: int) -> None:
    """The WS_TOUCHED|npages sync comes exactly once, right after iteration npages."""
    p = CounterParams(npages=npages, iterations=50, sync_every=0)
    mem, _, (vcpu,) = boot(make_memory, make_vm, counter.GUEST, [p.pack()], p.region_size)

    syncs = run_collecting_syncs(vcpu, "counter32")

    assert syncs == [counter.WS_TOUCHED | npages], f"syncs {[hex(s) for s in syncs]}"
    check_counter_final(mem, vcpu, p, block_gpa(0), "counter32")


# -- cpustate32 -----------------------------------------------------------------------------------


def test_cpustate32_on_two_vcpus_ends_as_the_model(make_memory, make_cpustate32_vm) -> None:
    """Each vCPU, answered at its sync with one NMI, ends with the model's XMM0, MM0, SYSENTER_EIP, DR0-DR3
    and NMI record in its block, byte for byte, and its EIP just past the hlt."""
    from snapproof.guests import cpustate

    mem = make_memory("memfd", 1 << 20)
    vm, params = make_cpustate32_vm(mem, [11, 12], 400, [150, 399])
    for i, (vcpu, p) in enumerate(zip(vm.vcpus, params, strict=True)):
        ex = vcpu.run(timeout=RUN_TIMEOUT, stop_on_sync=True)
        expect_exit(ex, "SYNC", f"cpustate32 vCPU {i}")
        assert ex.last_sync == p.sync_at, f"vCPU {i}: sync {ex.last_sync:#x}, expected {p.sync_at:#x}"
        at_sync = cpustate.expected_after(p, p.sync_at)
        block = mem.read(cpustate.block_gpa(i), cpustate.BLOCK_SIZE)
        seen = (struct.unpack_from("<4I", block, cpustate.OFF_XMM), struct.unpack_from("<Q", block, cpustate.OFF_MM)[0])
        assert seen == (at_sync.xmm, at_sync.mm), f"vCPU {i} at its sync: round trip {seen}, model {at_sync}"
        vcpu.inject_nmi()
        expect_exit(vcpu.run(timeout=RUN_TIMEOUT), "HLT", f"cpustate32 vCPU {i} after the NMI")
    for i, (vcpu, p) in enumerate(zip(vm.vcpus, params, strict=True)):
        block = mem.read(cpustate.block_gpa(i), cpustate.BLOCK_SIZE)
        diffs = cpustate.read_result(block).differences(cpustate.expected_result(p))
        assert not diffs, f"vCPU {i}: {'; '.join(diffs)}"
        want = cpustate.expected_block(p)
        assert block == want, f"vCPU {i} block: {describe_difference(want, block, cpustate.block_gpa(i))}"
        eip = vcpu.regs()["eip"]
        assert eip == cpustate.halt_eip(), f"vCPU {i}: EIP {eip:#x}, expected {cpustate.halt_eip():#x}"


def test_storm32_registers_say_which_instant_it_stands_at(make_memory, make_vm) -> None:
    """Stopped anywhere (a run's deadline, each sweep's sync, the halt), storm32's EIP, EBP and ECX name the instant
    its region holds: the instant oracle's ``at`` is read off the vCPU, as a snapshot's saved state gives it."""
    p = StormParams.from_seed(23, npages=64, generations=40)
    mem, _, (vcpu,) = boot(make_memory, make_vm, storm.GUEST, [p.pack()], p.region_size)
    seen: set[int] = set()
    stops = 0
    while True:
        # A deadline far shorter than the run: the vCPU stops wherever it is, mid-page or between sweeps.
        ex = vcpu.run(timeout=0.0002, stop_on_sync=True)
        regs = vcpu.regs()
        eip = regs["eip"]
        t = storm.instant_of_registers(p, eip, regs["ebp"], regs["ecx"])
        v = storm.check_instant(p, mem.read(p.region_gpa, p.region_size), at=t)
        assert v.ok, f"stop {stops} at EIP {eip:#x} ({ex.describe()}): registers say {storm.describe_instant(p, t)}; " \
                     f"{v.message}"
        seen.add(eip)
        stops += 1
        if ex.reason.name == "HLT":
            break
        assert ex.reason.name in ("TIMEOUT", "SYNC"), f"stop {stops}: {ex.describe()}"
    assert t == p.total_writes and stops > p.generations, f"{stops} stops, last at {storm.describe_instant(p, t)}"
    print(f"{stops} stops at {len(seen)} distinct EIPs, each the instant the region holds")
