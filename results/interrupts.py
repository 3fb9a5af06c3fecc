"""An interrupted run ends interrupted: SIGINT, SIGTERM and SIGHUP stop the run in order, its exit status
is pytest's INTERRUPTED (2), and the run record says which signal came, during what, and what finished.

Why pytest's own KeyboardInterrupt handling is not enough (tests/test_reliability_interrupt.py shows each):

- Python installs its SIGINT handler only when SIGINT is at SIG_DFL as the interpreter starts. A run
  started as a background job of a shell without job control (``pytest &`` or ``... & wait`` in a CI
  script, ``nohup``) inherits SIGINT *ignored*, and hands that on to every child it starts: a SIGINT
  is lost and the run reports success.
- SIGTERM and SIGHUP (a CI system cancelling a job, a closed terminal) end Python at once: no fixture
  is torn down, no run record is written.
- A KeyboardInterrupt raised inside a fixture's teardown skips every finalizer after it (pytest's
  teardown catches Exception only): WP left armed, handler threads, fds and mappings left behind.

So the three signals share one handler. While tests set up and run, it raises KeyboardInterrupt,
pytest's orderly interrupt. While fixtures are torn down, and from the end of the session on (the
last teardown, the reports, the run record, host settings put back), it only notes the signal: the
teardown runs to its end, then the interrupt is raised (after a test's teardown) or the exit status
made INTERRUPTED (after the session). An interrupt that test code swallowed is raised again at the
next test boundary, and a run that saw a signal never exits 0 whatever happened to the exception.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import threading
import traceback
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

# SIGHUP does not exist on Windows: only the signals this platform has are handled.
HANDLED_SIGNALS = tuple(s for name in ("SIGINT", "SIGTERM", "SIGHUP") if (s := getattr(signal, name, None)))


@dataclass(frozen=True)
class Interruption:
    signal: str   # "SIGTERM"; "KeyboardInterrupt" when one reached pytest without a signal this guard saw
    during: str   # "phases/...::test[x] (call)", "between tests", "collection", "session finish"

    def describe(self) -> str:
        return f"{self.signal} during {self.during}"


class InterruptGuard:
    """The handler of SIGINT, SIGTERM and SIGHUP for one pytest run, what it saw, and its hooks
    (registered as a plugin of its own, as pytest-benchmark hands its hooks to a session object)."""

    def __init__(self) -> None:
        self.interruption: Interruption | None = None
        self.where = "startup"
        self._deferring = 0
        self._pending = False       # a signal came while deferring: raise once the deferred part ends
        self._acknowledged = False  # pytest caught a KeyboardInterrupt: the session is already stopping
        self._previous: dict[int, Any] = {}
        self._session: pytest.Session | None = None
        self._interrupt: BaseException | None = None  # the KeyboardInterrupt pytest caught

    # -- the handler ------------------------------------------------------------------------------

    def install(self) -> bool:
        """Handle the signals from now on (an inherited SIG_IGN included); False off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False  # signal.signal() would refuse; pytest_keyboard_interrupt still marks the run
        for sig in HANDLED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return True

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.interruption is None:
            self.interruption = Interruption(name, self.where)
        if self._deferring:
            self._pending = True
            return
        raise KeyboardInterrupt(f"{name} ({self.where})")

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Signals in this block are noted, not raised: the block (a teardown) runs to its end."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1

    def raise_if_interrupted(self) -> None:
        """KeyboardInterrupt if a signal came that pytest has not acted on: deferred until now, or raised
        earlier and swallowed by the code it landed in."""
        owed = self._pending or not self._acknowledged  # deferred until now, or raised and swallowed
        if self.interruption is None or self._deferring or not owed:
            return
        self._pending = False
        raise KeyboardInterrupt(f"{self.interruption.describe()}; raised at {self.where}")

    # -- hooks ------------------------------------------------------------------------------------

    def pytest_configure(self, config: pytest.Config) -> None:
        self.where = "configure"

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self._session = session
        self.where = "collection"

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.where = "before the first test"

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, None, None]:
        self.raise_if_interrupted()  # one the test before this one swallowed
        self.where = f"{item.nodeid} (setup)"
        return (yield)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        self.where = f"{item.nodeid} (call)"
        return (yield)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, None, None]:
        self.where = f"{item.nodeid} (teardown)"
        try:
            with self.deferred():
                return (yield)
        finally:
            self.where = "between tests"
            self.raise_if_interrupted()  # the test's fixtures are down: now the run stops

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        self._acknowledged = True
        self._interrupt = excinfo.value
        if self.interruption is None:  # raised without a signal we saw: the run is interrupted all the same
            self.interruption = Interruption("KeyboardInterrupt", self.where)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> Generator[None, None, None]:
        self.where = "session finish"
        # From here to the end of pytest_unconfigure (the last fixtures, the reports, the run record, host
        # settings put back) everything runs to its end: a signal only marks the run interrupted.
        self._deferring += 1
        try:
            return (yield)
        finally:
            self._release_what_the_interrupt_cut_through()
            self._mark_exit_status()

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self._mark_exit_status()
        self.restore()

    def _release_what_the_interrupt_cut_through(self) -> None:
        """An interrupt that landed as a cleanup began (a close() in a test body, the host probe's VM)
        left that object to its finalizer, but pytest keeps the interrupt's traceback to the end of the
        run, and with it every frame it cut through and their locals. Clear those frames (the report
        is already drawn from them) and collect (a vCPU and its VM refer to each other): the finalizers
        release what the cleanups could not, now, not at exit."""
        exc, self._interrupt = self._interrupt, None
        seen: set[int] = set()
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            traceback.clear_frames(exc.__traceback__)  # every frame but those still running
            for frame, _ in traceback.walk_tb(exc.__traceback__):
                # Python 3.11/3.12: pytest's traceback walk read f_locals, a dict the clear leaves full;
                # reading it again syncs the cleared locals into it, dropping them there too.
                _ = frame.f_locals
            exc = exc.__context__
        if seen:
            gc.collect()

    def _mark_exit_status(self) -> None:
        # pytest returns session.exitstatus after pytest_unconfigure: a run that saw a signal never exits 0.
        if self.interruption is not None and self._session is not None:
            self._session.exitstatus = pytest.ExitCode.INTERRUPTED


GUARD_NAME = "snapproof-interrupt-guard"


def interruption(config: pytest.Config) -> Interruption | None:
    """The signal (or KeyboardInterrupt) that interrupted this run so far, or None."""
    found = config.pluginmanager.get_plugin(GUARD_NAME)
    return None if found is None else found.interruption


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    # The earliest hook a plugin gets: called as this module is registered, which pyproject.toml's
    # ``-p snapproof.results.interrupts`` does before the entry-point plugins load (hypothesis alone takes
    # 0.3 s, several times that on a busy host). A run that started with SIGINT ignored loses every
    # SIGINT before this point: the kernel discards it, no code of ours can see it.
    if pluginmanager.get_plugin(GUARD_NAME) is None:
        guard = InterruptGuard()
        guard.install()
        pluginmanager.register(guard, GUARD_NAME)
