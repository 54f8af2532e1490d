r"""`WalCheckpointer`: copies an SQLite file's write-ahead log into the file on a thread of its own.

SQLite checkpoints a WAL database by itself when a commit finds the log over 1,000 pages (4 MB):
that commit then syncs the log, copies its pages into the file and syncs the file, several
milliseconds on the event loop for one vendor call in every forty or so (the store's p99
latency). The store's connection raises that threshold to `FALLBACK_PAGES` and `nudge`\ s this
thread after its commits; the thread runs ``PRAGMA wal_checkpoint(PASSIVE)`` on a connection of
its own, at most every `INTERVAL` seconds, with the GIL released while SQLite syncs and copies.
A passive checkpoint never blocks a writer: commits go on appending to the log meanwhile.

The log starts over only when a checkpoint has copied all of it, which under steady load
(a commit every few milliseconds, each checkpoint's syncs taking longer) the thread rarely
manages: then the commit that finds `FALLBACK_PAGES` in the log checkpoints as before, but the
thread has synced and copied nearly all of it already, so that commit's share is a millisecond
or two, once in some 150 calls (measured: the store's p99 went from 4.2 to about 1 ms, the
longest call from ~11 to ~4 ms). ``journal_size_limit`` cuts the log file back to about
16 MB when it starts over.

Example::

    checkpointer = WalCheckpointer(pathlib.Path("state.db"))
    ...  # after each commit:
    checkpointer.nudge()
    ...
    checkpointer.stop()
"""

from __future__ import annotations

import logging
import pathlib
import sqlite3
import threading

__all__ = ["FALLBACK_PAGES", "INTERVAL", "WalCheckpointer"]

log = logging.getLogger("keybrake")

# The least time between two checkpoints, seconds. Under load (~650 vendor calls a second, ~5
# log frames each) that is ~800 pages, under `FALLBACK_PAGES`, and a page written many times
# meanwhile (budget rows, the B-trees' upper pages) is copied once. Each checkpoint is also
# this thread taking the GIL from a busy event loop: every 0.05 s, the copies were 2.2 page
# reads and 2.2 writes per call and the handovers ~1 futex call and 0.5 context switches more.
INTERVAL = 0.25
# Pages in the log (4 KiB each) at which the committing connection checkpoints itself, as
# SQLite does at 1,000 by default: the bound on the log when the thread cannot finish one.
FALLBACK_PAGES = 4000


class WalCheckpointer:
    """A daemon thread that checkpoints ``path`` after `nudge`, at most every `INTERVAL` s.

    Started by the first `nudge`; `stop` ends it (and is safe to call more than once). A
    checkpoint that fails (the file gone, a disk error) is logged and tried again on the next
    nudge: the store's own calls report the error that matters.
    """

    def __init__(self, path: pathlib.Path, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        # Checkpoints that ran (tests, diagnostics).
        self.runs = 0

    def nudge(self) -> None:
        """Ask for a checkpoint soon (cheap: sets an event; starts the thread the first time)."""
        if self._thread is None:
            with self._start_lock:
                if self._thread is None and not self._stopped.is_set():
                    thread = threading.Thread(
                        target=self._run,
                        args=(self._wake, self._stopped),
                        name="keybrake-wal-checkpoint",
                        daemon=True,
                    )
                    thread.start()
                    self._thread = thread
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread after the checkpoint it is running, if any; a later `nudge` starts
        a new one (a store closed and opened again)."""
        with self._start_lock:
            thread, self._thread = self._thread, None
            stopped, wake = self._stopped, self._wake
            self._stopped, self._wake = threading.Event(), threading.Event()
        stopped.set()
        wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self, wake: threading.Event, stopped: threading.Event) -> None:
        conn: sqlite3.Connection | None = None
        failing = False
        try:
            while True:
                wake.wait()
                if stopped.is_set():
                    return
                wake.clear()
                try:
                    if conn is None:
                        conn = sqlite3.connect(
                            self.path,
                            timeout=self.busy_timeout,
                            isolation_level=None,
                            check_same_thread=False,
                        )
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.runs += 1
                    failing = False
                except sqlite3.Error as exc:
                    if not failing:  # once per run of failures, not every INTERVAL
                        log.warning("keybrake: checkpointing %s failed: %s", self.path, exc)
                    failing = True
                    if conn is not None:
                        conn.close()
                        conn = None
                # At most one checkpoint per INTERVAL; commits meanwhile set the event again.
                if stopped.wait(INTERVAL):
                    return
        finally:
            if conn is not None:
                conn.close()
