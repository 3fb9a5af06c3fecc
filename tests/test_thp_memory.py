"""Transparent huge pages under guest memory, below the phases: the backings, the knobs, and what a 4 KiB fill
does to its huge-page neighbours.

Measured on kvm_pvm's 6.18.44 and Debian's 6.1 (nested), shmem_enabled=advise, MADV_HUGEPAGE:

- a plain 4 KiB write into a THP memfd allocates the whole 2 MiB folio (ShmemPmdMapped 2048 kB): the other
  511 pages exist, as zeros. That is how cloud-hypervisor #8663's daemon installed pages, and why its
  guest read zeros it never faulted for;
- a 4 KiB UFFDIO_COPY, anonymous or shmem, installs that page alone (a 4 KiB folio, neighbours absent);
- MADV_COLLAPSE (khugepaged's work, now) of a 2 MiB range with pages still missing under a MISSING-registered
  uffd: 6.18 refuses (EBUSY), anonymous and shmem; 6.1 refuses for anonymous but collapses shmem, filling the
  missing pages with zeros, so a later guest access finds them present and never faults. The lazy loader
  keeps huge pages off while pages are missing (native/restore.py); with every page in, a collapse is safe.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from snapproof.native.thp import PMD_SIZE, KnobChanges, read_knob

pytestmark = [pytest.mark.platform("linux")]

PAGE = 4096
SIZE = 8 << 20
BACKINGS = ["anonymous-thp", "memfd-thp"]


def _needs(require, backing: str) -> None:
    from snapproof.native.thp import THP_BACKING_NEEDS

    require(*THP_BACKING_NEEDS[backing])


@pytest.fixture
def image(tmp_path: Path):
    """An 8 MiB snapshot whose every page holds data (its index, then random bytes): no page is zero in the file."""
    from snapproof.native.image import SnapshotImage

    rng = random.Random(0x7B9)
    with SnapshotImage.create(tmp_path / "thp.snap", SIZE) as w:
        for page in range(SIZE // PAGE):
            w.memory[page * PAGE:(page + 1) * PAGE] = (page + 1).to_bytes(4, "little") + rng.randbytes(PAGE - 4)
        return w.finalize()


# -- the backings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backing", BACKINGS)
def test_thp_backing_starts_on_a_huge_page_boundary_and_gets_huge_pages(require, make_memory, backing):
    """THP guest memory is 2 MiB aligned and, once touched, mapped by huge page entries on 2 MiB folios."""
    _needs(require, backing)
    mem = make_memory(backing, SIZE)
    assert mem.addr % PMD_SIZE == 0, f"{mem.label} mapped at {mem.addr:#x}, not on a 2 MiB boundary"
    mem.populate()
    assert mem.huge_bytes() == SIZE, f"{mem.label}: {mem.huge_bytes():#x} of {SIZE:#x} bytes on huge page entries"
    folio = mem.folio_at(0x3000)
    if folio is not None:  # frames and /proc/kpageflags need root
        assert (folio.size, folio.thp) == (PMD_SIZE, True), f"{mem.label}: page 0x3000 is in {folio.describe()}"
    mem.write(0x3000, b"\x42")
    assert mem.read(0x3000, 1) == b"\x42" and len(mem.snapshot_bytes()) == SIZE


def test_a_plain_4k_write_into_thp_shmem_allocates_the_whole_huge_page(require, make_memory):
    """The #8663 mechanism: one byte written into a THP memfd brings its 511 neighbours into existence, as zeros."""
    _needs(require, "memfd-thp")
    mem = make_memory("memfd-thp", SIZE)
    mem.write(PMD_SIZE + 0x3000, b"\x42")
    assert mem.allocated_bytes() == PMD_SIZE, f"one 4 KiB write allocated {mem.allocated_bytes():#x} bytes of the memfd"
    assert mem.huge_bytes() == PMD_SIZE, f"mapped by huge page entries after one write: {mem.huge_bytes():#x}"


# -- a lazy restore's 4 KiB fills ---------------------------------------------------------------------------------


def _mapped_pages(mem, first: int, n: int) -> list[int]:
    from snapproof.native.wp import read_pagemap

    present, _ = read_pagemap(mem.addr + first * PAGE, n)
    return [first + i for i, p in enumerate(present) if p]


@pytest.mark.parametrize("backing", BACKINGS)
def test_a_4k_uffdio_copy_into_thp_memory_installs_that_page_alone(require, image, backing):
    """Even with huge pages left on (the guard removed), the lazy loader's 4 KiB fill is one 4 KiB page: none of its
    huge page's neighbours appear."""
    from snapproof.native.inject import FaultInjection
    from snapproof.native.restore import restore_memory

    _needs(require, backing)
    require("uffd", "uffd.MISSING_SHMEM")
    target = PMD_SIZE + 0x5000
    with restore_memory(image, "lazy-uffd", thp=True, lazy_backing=backing.removesuffix("-thp"),
                        inject=FaultInjection.LAZY_UFFD_THP_UNGUARDED) as restored:
        mem = restored.memory
        assert mem.read(target, 4) == image.read_memory(target, 4)
        unit = PMD_SIZE // PAGE
        mapped = _mapped_pages(mem, unit, unit)
        assert mapped == [target // PAGE], f"pages mapped in the huge page around {target:#x}: " \
                                           f"{[hex(p * PAGE) for p in mapped]}"
        assert mem.allocated_bytes() in (0, PAGE), f"the memfd holds {mem.allocated_bytes():#x} bytes after one fill"
        folio = mem.folio_at(target)
        assert folio is None or folio.size == PAGE, f"the page filled is in {folio.describe() if folio else None}"
        assert restored.zero_filled_pages() == []


@pytest.mark.parametrize("backing", BACKINGS)
def test_collapsing_a_half_restored_range_never_exposes_missing_pages_with_the_guard(require, image, record_property,
                                                                                     backing):
    """With the lazy loader's guard (MADV_NOHUGEPAGE while pages are missing) the kernel refuses to collapse; without
    it the kernel decides, and what it did is recorded: on a kernel that collapses, the missing pages are exposed."""
    from snapproof.native.inject import FaultInjection
    from snapproof.native.restore import restore_memory

    _needs(require, backing)
    require("uffd", "uffd.MISSING_SHMEM")
    target = PMD_SIZE + 0x5000
    lazy_backing = backing.removesuffix("-thp")
    with restore_memory(image, "lazy-uffd", thp=True, lazy_backing=lazy_backing) as restored:
        restored.memory.read(target, 1)
        err = restored.memory.collapse(PMD_SIZE, PMD_SIZE)
        assert err != 0, "the kernel collapsed a half-restored range although huge pages were off (MADV_NOHUGEPAGE)"
        assert restored.zero_filled_pages() == []
        restored.lazy.prefetch_all()
        assert restored.memory.collapse(PMD_SIZE, PMD_SIZE) == 0, "every page restored: the collapse should go through"
        assert restored.memory.huge_bytes() >= PMD_SIZE and restored.zero_filled_pages() == []
    with restore_memory(image, "lazy-uffd", thp=True, lazy_backing=lazy_backing,
                        inject=FaultInjection.LAZY_UFFD_THP_UNGUARDED) as restored:
        restored.memory.read(target, 1)
        err = restored.memory.collapse(PMD_SIZE, PMD_SIZE)
        exposed = restored.zero_filled_pages()
        outcome = "collapsed" if err == 0 else f"refused ({os.strerror(err)})"
        record_property("unguarded_collapse", outcome)
        record_property("pages_exposed", len(exposed))
        print(f"{backing}, kernel {os.uname().release}: collapse of a half-restored 2 MiB without the guard: "
              f"{outcome}; {len(exposed)} never-restored pages now mapped")
        if err == 0:
            assert len(exposed) == PMD_SIZE // PAGE - 1, f"collapsed, yet {len(exposed)} pages exposed"
        else:
            assert exposed == [], f"refused, yet pages exposed: {[hex(o) for o in exposed[:8]]}"


# -- the knobs ---------------------------------------------------------------------------------------------------


def test_knob_changes_put_every_knob_back_newest_first(tmp_path: Path):
    """KnobChanges keeps each knob's first value and restores them all, whatever was set in between."""
    a, b = tmp_path / "enabled", tmp_path / "shmem_enabled"
    a.write_text("always [madvise] never\n")
    b.write_text("always within_size advise [never] deny force\n")
    changes = KnobChanges()
    changes.set(a, "always")
    changes.set(b, "advise")
    changes.set(a, "never")
    assert (a.read_text(), b.read_text()) == ("never\n", "advise\n")
    changes.restore()
    assert (read_knob(a), read_knob(b)) == ("madvise", "never")
    assert changes.before == {}


def test_knob_value_is_the_bracketed_word(tmp_path: Path):
    knob = tmp_path / "enabled"
    knob.write_text("always inherit [madvise] never\n")
    assert read_knob(knob) == "madvise"
    assert read_knob(tmp_path / "absent") is None
