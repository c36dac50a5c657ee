"""SIGINT / SIGTERM held back while a child process is launched and recorded (or stopped), so that a Ctrl-C or a
``kill`` cannot leave it running.

A Python signal handler runs between two bytecodes of the main thread. When SIGINT or SIGTERM lands after
``subprocess.Popen`` has started the child but before the caller has stored the Popen object (its pid), the
handler's exception (KeyboardInterrupt, the demo's ``Stopped``) unwinds past that store: the code that would stop
the child finds nothing to stop, and the child, in its own session, keeps running. Inside ``deferred()`` the two
signals are only noted; when the block ends (the child recorded), the previous handlers are put back and the first
noted signal is raised again, so they run as if it had arrived a moment later.
"""

from __future__ import annotations

import contextlib
import signal
import threading

HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred(signums=HELD):
    """Hold ``signums`` for the block (main thread only: handlers never interrupt another thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {}
    try:
        for s in signums:
            previous[s] = signal.signal(s, lambda signum, _frame: noted.append(signum))
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: not set from Python
        if noted:
            signal.raise_signal(noted[0])  # its handler runs here, before raise_signal returns
