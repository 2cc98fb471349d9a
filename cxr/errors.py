"""Errors that reach users as one clear line (the CLI prints them without a traceback), and the stop
signals turned into one."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class CxrError(Exception):
    """A user-facing failure: bad arguments, missing data, unreadable model.

    The CLI catches it, prints ``error: <message>`` and exits with ``exit_code``.
    """

    exit_code = 2


class Busy(CxrError):
    """Another run holds what this one needs (an output folder): nothing is wrong, try again later.
    Exit 75 (EX_TEMPFAIL), and no failure is reported to Prometheus: the run holding it is healthy."""

    exit_code = 75


class ImageError(CxrError):
    """An input that cannot be turned into a model input.

    ``code`` is a stable machine-readable identifier written to Parquet rows,
    HTTP error bodies and Prometheus labels; ``str(err)`` is the human message.
    """

    #: every code an ImageError may carry, documented in the README
    CODES = (
        "empty",  # zero-byte file or body
        "not_image",  # content is not a supported image format
        "corrupt",  # recognised format, but decoding failed
        "truncated",  # recognised format, data ends early
        "too_large",  # pixel count over the decompression-bomb cap
        "unsupported",  # a valid image we cannot represent (e.g. compressed DICOM without codec)
        "dicom_invalid",  # DICOM without usable pixel data
        "read_failed",  # the file could not be read at all (I/O error)
        "out_of_memory",  # the worker ran out of memory on it: not the file's fault, so a rerun retries it
    )

    def __init__(self, code: str, message: str) -> None:
        if code not in self.CODES:
            raise ValueError(f"unknown image error code {code!r}")
        super().__init__(" ".join(message.split())[:1000])  # one line: a Parquet cell, a JSON field, a log line
        self.code = code


class Terminated(KeyboardInterrupt):
    """SIGTERM (Kubernetes, docker stop) or SIGHUP (a closed terminal), taken down Ctrl-C's path: what was
    scored is flushed, Ray is stopped, and the CLI exits 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_last_termination: int | None = None  # the signal `terminate` last raised for: a library may swallow the raise


def last_termination() -> int | None:
    """The signal number of the last SIGTERM/SIGHUP turned into :class:`Terminated` in this process, if any.

    Ray Train's ``fit()`` catches the KeyboardInterrupt, aborts the run and raises ``SystemExit``: the job
    asks this to exit 143 for a SIGTERM rather than 130 as for Ctrl-C."""
    return _last_termination


def interrupt_on_termination() -> None:
    """SIGTERM and SIGHUP raise :class:`cxr.errors.Terminated` in the main thread, as Ctrl-C raises
    KeyboardInterrupt: the job flushes what it scored and stops Ray. Call it again after ``ray.init``, whose
    own handlers it replaces (``sys.exit``, no flush; or the core worker's stack dump and abort, exit 134)."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return

    def terminate(signum: int, frame: object) -> None:
        global _last_termination
        _last_termination = signum
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, terminate)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup: a closed terminal must not stop the job
        signal.signal(signal.SIGHUP, terminate)


@contextlib.contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """:func:`interrupt_on_termination` for the length of a job run in-process (``run_screen`` from a
    notebook or a scheduler's Python task): the caller's own SIGTERM and SIGHUP handlers come back after."""
    import signal

    global _last_termination
    _last_termination = None
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    interrupt_on_termination()
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in saved.items():  # None: set outside Python, which cannot be put back: the default
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def first_line(exc: BaseException | str) -> str:
    """The first line of an exception's message (its type's name when it has none): for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
