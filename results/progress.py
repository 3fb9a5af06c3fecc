"""What is running now, on the terminal, while a case or one of its stages runs longer than a few seconds.

A 4 GiB guest's first sweep, a bulk copy, hashing a snapshot file: without this the terminal says nothing for
minutes. The case's report tells the display what runs (``now_running``: the case and its stage; the plugin
adds set-up and tear-down); a stage's long work says how far it got through the ``Progress`` its stage hands out
(``st.progress(total, what)``: call it with the bytes just done, a plain add), or the display asks (``poll``).

One thread draws, never the measured one, so no timed region waits on a terminal:

- nothing for the first ``GRACE_S`` of an activity (on a terminal) or the first ``LOG_EVERY_S`` (into a log);
- on a terminal, one line below pytest's, rewritten in place at most every ``TTY_EVERY_S``, erased (the cursor
  put back at the end of pytest's line) as soon as the activity changes, so pytest's own output reads as before;
- into a log (not a terminal), one line every ``LOG_EVERY_S`` at most: a CI log is never flooded.

A ``poll`` is called from the display's thread while its stage runs, and never after the stage ended (the stage's
end waits for a draw in progress): it must be safe to call while the stage's work runs, and what it reads must
outlive the stage (an engine's stats: the engine ABI allows spe_get_stats during a bulk copy).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

GRACE_S = 3.0       # an activity shorter than this draws nothing
TTY_EVERY_S = 0.25  # a terminal's line is redrawn at most this often
LOG_EVERY_S = 10.0  # a log gets at most one line this often
WAKE_S = 1.0        # the drawing thread looks at least this often whether an activity is due (never more, idle)
# ANSI: erase the whole line; cursor one line up; cursor to column n (1-based).
_ERASE_LINE = "\r\x1b[2K"
_UP = "\x1b[1A"


def _col(n: int) -> str:
    return f"\x1b[{n}G"


class Progress:
    """Bytes done of ``total`` of a stage's work (``what`` names it): call it with the bytes just done, from the one
    thread doing the work; or ``poll`` says the bytes done so far (see the module's note on polls)."""

    def __init__(self, total: int, what: str = "", poll: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if total < 0:
            raise ValueError(f"progress total {total}: must be >= 0 bytes")
        self.total = total
        self.what = what
        self.poll = poll
        self.done = 0
        self.started = clock()  # a poll's rate runs from here; counted bytes' from the first count
        self._clock = clock

    def __call__(self, nbytes: int) -> None:
        if not self.done:
            self.started = self._clock()
        self.done += nbytes

    def bytes_done(self) -> int:
        return int(self.poll()) if self.poll is not None else self.done


@dataclass
class _Running:
    case: str
    activity: str
    started: float
    progress: Progress | None = None


def fmt_size(n: float, unit_of: float) -> str:
    """Bytes in the unit ``unit_of`` (a total) reads best in: GiB or MiB."""
    return f"{n / (1 << 30):.2f} GiB" if unit_of >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def fmt_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e9:.2f} GB/s" if bytes_per_s >= 1e9 else f"{bytes_per_s / 1e6:.0f} MB/s"


def progress_line(case: str, activity: str, elapsed_s: float, done: int | None, progress: Progress | None,
                  now: float, width: int) -> str:
    """``  case activity: what 1.20/4.00 GiB (30%), 0.85 GB/s, 14 s``, at most ``width - 1`` columns: the case's
    name is shortened first (its parameters kept: the size and variant say most), the activity and numbers last."""
    detail = f"{elapsed_s:.0f} s"
    if progress is not None and done is not None:
        total = progress.total
        share = f" ({100 * done / total:.0f}%)" if total else ""
        spent = now - progress.started
        rate = f", {fmt_rate(done / spent)}" if spent > 0 else ""
        what = f"{progress.what} " if progress.what else ""
        detail = f"{what}{fmt_size(done, total).split()[0]}/{fmt_size(total, total)}{share}{rate}, {detail}"
    tail = f" {activity}: {detail}"
    room = width - 1 - 2 - len(tail)
    if len(case) > room:
        base, bracket, params = case.partition("[")
        keep = bracket + params if len(bracket + params) + 4 <= room else ""
        case = base[:max(0, room - len(keep) - 3)] + "..." + keep if room > 3 else ""
    return f"  {case}{tail}"[:width - 1]


class ProgressDisplay:
    """Shows what runs now once it has run long enough (the module says how); ``write`` takes text for the terminal
    (a handle of its own, not pytest's captured one), ``tty`` whether that is a terminal, ``width`` its width and
    ``column`` where pytest's current line ends (so an erased line gives the cursor back there)."""

    def __init__(self, write: Callable[[str], None], tty: bool, width: Callable[[], int] = lambda: 80,
                 column: Callable[[], int] = lambda: 0, clock: Callable[[], float] = time.monotonic,
                 grace_s: float = GRACE_S, tty_every_s: float = TTY_EVERY_S, log_every_s: float = LOG_EVERY_S) -> None:
        self.write = write
        self.tty = tty
        self.width = width
        self.column = column
        self.clock = clock
        self.first_s = grace_s if tty else log_every_s  # silent this long into an activity
        self.every_s = tty_every_s if tty else log_every_s
        self._lock = threading.Lock()
        self._running: _Running | None = None
        self._drawn_at = -math.inf
        self._shown = False   # a terminal line of ours is on screen
        self._lines = 0       # lines drawn for the current activity (into a log)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def now_running(self, case: str, activity: str) -> None:
        """``case`` is at ``activity`` from now (a stage, set-up, ...): its clock starts again."""
        with self._lock:
            self._erase_locked()
            self._running = _Running(case, activity, self.clock())

    def attach(self, progress: Progress) -> None:
        """The current activity's work, counted by ``progress`` (its clock keeps running)."""
        with self._lock:
            if self._running is not None:
                self._running.progress = progress

    def idle(self) -> None:
        """Nothing runs (pytest is about to write): erase our line."""
        with self._lock:
            self._erase_locked()
            self._running = None

    def tick(self) -> float:
        """Draw if the current activity is due; returns the seconds until the next draw could be due."""
        with self._lock:
            r = self._running
            if r is None:
                return WAKE_S
            now = self.clock()
            into = now - r.started
            if into < self.first_s:  # the activity may change meanwhile: look again soon
                return min(WAKE_S, self.first_s - into)
            since = now - self._drawn_at
            if since < self.every_s:
                return self.every_s - since
            done = None
            if r.progress is not None:
                try:
                    done = r.progress.bytes_done()
                except Exception:  # a poll that fails shows no bytes; it must never stop the run
                    r.progress.poll = None
            line = progress_line(r.case, r.activity, into, done, r.progress, now, self.width())
            if self.tty:
                self.write(("\n" if not self._shown else "\r") + line + "\x1b[K")
                self._shown = True
            else:
                # The first line of an activity leaves pytest's line (its dots) whole; pytest goes on below.
                self.write(("\n" if self._lines == 0 and self.column() else "") + line + "\n")
                self._lines += 1
            self._drawn_at = now
            return self.every_s

    def _erase_locked(self) -> None:
        if self._shown:
            self.write(_ERASE_LINE + _UP + _col(self.column() + 1))
            self._shown = False
        self._lines = 0
        self._drawn_at = -math.inf

    def start(self) -> ProgressDisplay:
        self._thread = threading.Thread(target=self._run, name="snapproof-progress", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        wait = WAKE_S
        while not self._stop.wait(wait):
            try:
                wait = max(0.01, self.tick())
            except Exception:  # a progress line must never break the run: stop drawing instead
                return

    def stop(self, timeout: float = 2.0) -> None:
        """Stop drawing (the thread joined, bounded) and erase our line."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.idle()
