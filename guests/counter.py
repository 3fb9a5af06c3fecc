"""The counter guest's host half: parameter block and a Python model of its run.

``counter32`` (guests/counter32.S) runs ``iterations`` iterations; iteration i
adds i into the u32 at word ``(13*i) mod 1024`` of page ``i mod npages`` and
folds i into a checksum, ``rol(c, 5) ^ i``. ``expected_final`` computes what an
uninterrupted run leaves behind (region, checksum, registers, parameter block,
sync values), so a run resumed from a mid-run snapshot can be compared to the
model as well as to an uninterrupted run. ``expected_after`` gives the same at
any iteration, e.g. the one a sync exit reports. ``sync_at`` makes the guest
signal one chosen iteration: a host that runs it with stop_on_sync stops there
by the guest's own count, whatever the guest's speed.
"""

from __future__ import annotations

import array
import struct
import sys
from dataclasses import dataclass

from snapproof.guests import DATA_REGION_GPA, FLAT32_LOAD_GPA, load

GUEST = "counter32"
PAGE_SIZE = 4096
WORDS_PER_PAGE = PAGE_SIZE // 4
WORD_MULTIPLIER = 13   # odd: over 1024 consecutive iterations the word offset takes every value

# Parameter block (u32 little-endian words), shared with guests/counter32.S.
# Changing an offset breaks the committed counter32.bin: change both together.
OFF_REGION = 0x00      # GPA of page 0 (4 KiB aligned)
OFF_NPAGES = 0x04      # pages in the working set, >= 1
OFF_ITERATIONS = 0x08  # < 0x80000000, so sync values never collide with WS_TOUCHED
OFF_SYNC_EVERY = 0x0C  # periodic sync interval; 0 = none
OFF_ITER = 0x10        # guest writes: last iteration completed
OFF_CHECKSUM = 0x14    # guest writes: checksum after OFF_ITER
OFF_FINAL = 0x18       # guest writes at the end: final checksum
OFF_DONE = 0x1C        # guest writes DONE_MAGIC last, just before hlt
OFF_SYNC_AT = 0x20     # the one iteration after which the guest syncs its number; 0 = none
BLOCK_SIZE = 0x40      # the rest is spare, zero

DONE_MAGIC = 0x454E4F44          # b"DONE" as a little-endian u32
WS_TOUCHED = 0x80000000          # sync value | npages: every page of the working set written once
MAX_ITERATIONS = 0x7FFFFFFF

_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class CounterParams:
    """One vCPU's counter run: what the guest reads from its parameter block."""

    region_gpa: int = DATA_REGION_GPA
    npages: int = 16
    iterations: int = 10_000
    sync_every: int = 1000
    sync_at: int = 0

    def __post_init__(self) -> None:
        if self.region_gpa % PAGE_SIZE or not 0 <= self.region_gpa <= _U32:
            raise ValueError(f"region_gpa {self.region_gpa:#x}: must be a 4 KiB aligned 32-bit GPA")
        if self.npages < 1 or self.region_gpa + self.npages * PAGE_SIZE > 1 << 32:
            raise ValueError(f"npages {self.npages}: must be >= 1 and end below 4 GiB")
        if not 0 <= self.iterations <= MAX_ITERATIONS:
            raise ValueError(f"iterations {self.iterations}: must be in [0, {MAX_ITERATIONS:#x}]")
        if not 0 <= self.sync_every <= _U32:
            raise ValueError(f"sync_every {self.sync_every}: must fit a u32 (0 = no periodic sync)")
        if not 0 <= self.sync_at <= self.iterations:
            raise ValueError(f"sync_at {self.sync_at}: must be in [0, iterations {self.iterations}] (0 = none)")

    def pack(self) -> bytes:
        """The parameter block the host writes at the vCPU's block GPA (output words zero)."""
        block = bytearray(BLOCK_SIZE)
        struct.pack_into("<4I", block, OFF_REGION, self.region_gpa, self.npages, self.iterations,
                         self.sync_every)
        struct.pack_into("<I", block, OFF_SYNC_AT, self.sync_at)
        return bytes(block)

    @classmethod
    def unpack(cls, block: bytes) -> CounterParams:
        region_gpa, npages, iterations, sync_every = struct.unpack_from("<4I", block, OFF_REGION)
        (sync_at,) = struct.unpack_from("<I", block, OFF_SYNC_AT)
        return cls(region_gpa, npages, iterations, sync_every, sync_at)

    @property
    def region_size(self) -> int:
        return self.npages * PAGE_SIZE

    def word_gpa(self, i: int) -> int:
        """GPA of the u32 iteration i adds into."""
        return self.region_gpa + (i % self.npages) * PAGE_SIZE + 4 * (WORD_MULTIPLIER * i % WORDS_PER_PAGE)


@dataclass(frozen=True)
class CounterProgress:
    """The guest's output words in its parameter block."""

    iteration: int
    checksum: int
    final: int
    done: bool


def read_progress(block: bytes) -> CounterProgress:
    it, checksum, final, done = struct.unpack_from("<4I", block, OFF_ITER)
    return CounterProgress(it, checksum, final, done == DONE_MAGIC)


def checksum_step(checksum: int, i: int) -> int:
    return (((checksum << 5) | (checksum >> 27)) & _U32) ^ i


def sync_values(params: CounterParams, upto: int | None = None) -> list[int]:
    """Sync-port values the guest writes during iterations 1..upto (default: all), in order."""
    last = params.iterations if upto is None else upto
    n, every, at = params.npages, params.sync_every, params.sync_at
    # (iteration, order within it, value): after one iteration the guest writes working set, periodic, sync_at.
    out = []
    if n <= last:
        out.append((n, 0, WS_TOUCHED | n))
    if every:
        out.extend((i, 1, i) for i in range(every, last + 1, every))
    if 0 < at <= last:
        out.append((at, 2, at))
    return [v for _, _, v in sorted(out)]


def sync_iteration(value: int) -> int:
    """The iteration after which the guest wrote sync ``value``."""
    return value & ~WS_TOUCHED & _U32


@dataclass(frozen=True)
class CounterState:
    """The guest's state after some iterations, as the model computes it."""

    iteration: int
    region: bytes
    checksum: int
    regs: dict[str, int]      # registers the guest determines (at HLT when final)
    block: bytes              # the whole parameter block, inputs and outputs
    syncs: list[int]          # sync values written so far, in order

    def word(self, page: int, word: int) -> int:
        return struct.unpack_from("<I", self.region, page * PAGE_SIZE + 4 * word)[0]


def expected_after(params: CounterParams, iteration: int) -> CounterState:
    """The region, checksum, block and loop registers after ``iteration`` iterations.

    Registers: EBX = i, ECX = i mod npages, EDI = checksum, EBP = iterations
    left until the next periodic sync (wrapping down from 0 when there is none).
    """
    if not 0 <= iteration <= params.iterations:
        raise ValueError(f"iteration {iteration}: outside [0, {params.iterations}]")
    n = params.npages
    words = array.array("I", bytes(params.region_size))
    checksum = 0
    for i in range(1, iteration + 1):
        j = (i % n) * WORDS_PER_PAGE + (WORD_MULTIPLIER * i) % WORDS_PER_PAGE
        words[j] = (words[j] + i) & _U32
        checksum = (((checksum << 5) | (checksum >> 27)) & _U32) ^ i
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        words.byteswap()
    every = params.sync_every
    ebp = every - iteration % every if every else (-iteration) & _U32
    regs = {"ebx": iteration, "ecx": iteration % n, "edi": checksum, "ebp": ebp}
    block = bytearray(params.pack())
    if iteration:
        struct.pack_into("<2I", block, OFF_ITER, iteration, checksum)
    return CounterState(iteration=iteration, region=words.tobytes(), checksum=checksum, regs=regs,
                        block=bytes(block), syncs=sync_values(params, iteration))


def halt_eip() -> int:
    """EIP after the guest's final hlt: counter32 ends with ``halt: hlt; jmp halt`` (F4 EB FD)."""
    code = load(GUEST)
    if code[-3:] != b"\xf4\xeb\xfd":
        raise ValueError(f"{GUEST}.bin does not end with hlt; jmp .-1 (ends {code[-3:].hex(' ')})")
    return FLAT32_LOAD_GPA + len(code) - 2


# ``addl %ebx, (%eax,%edx,4)``: the read-modify-write into the region, the guest's first store.
REGION_STORE = b"\x01\x1c\x90"


def region_store_eip() -> int:
    """EIP of counter32's store into its region: where a vCPU whose first write KVM refused stops."""
    code = load(GUEST)
    if code.count(REGION_STORE) != 1:
        raise ValueError(f"{GUEST}.bin holds {code.count(REGION_STORE)} copies of the region store "
                         f"({REGION_STORE.hex(' ')}), expected exactly one")
    return FLAT32_LOAD_GPA + code.index(REGION_STORE)


def expected_final(params: CounterParams) -> CounterState:
    """What an uninterrupted run leaves at HLT: region, checksum, registers, block, syncs.

    At HLT, EAX = EDI = the final checksum and EIP is just past the hlt.
    """
    state = expected_after(params, params.iterations)
    block = bytearray(state.block)
    struct.pack_into("<2I", block, OFF_FINAL, state.checksum, DONE_MAGIC)
    regs = dict(state.regs, eax=state.checksum, eip=halt_eip())
    return CounterState(iteration=state.iteration, region=state.region, checksum=state.checksum,
                        regs=regs, block=bytes(block), syncs=state.syncs)
