"""Files the tool writes: checked before any work, and written so that nothing is ever lost.

    check_paths     no file written is also read, or written twice, under another option (links resolved), and
                    each can be written: a usage error (exit 2) or a one-line error (exit 1) before any work
    atomic_path     the one way to write a file: a temporary file in the target's folder, renamed over the target
                    when complete; on an error or SIGTERM / SIGHUP / SIGINT the temporary file is removed and the
                    target is the old file (or absent), never a partial one
    write_bytes / write_text    atomic_path for data already in memory
    scratch_folder  a temporary folder for files only this run reads, removed on exit, on an error or on a signal
    run_scratch_folder  one temporary folder for the whole process (weights surgery spills), removed at exit and on
                    a signal
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence, Union

from .errors import OnnxPruneError, UsageError

PathLike = Union[str, os.PathLike]
Named = tuple[str, Union[PathLike, None]]  # (what the user calls it: "-o", "--report", "the input model"; path)

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, name))
_CHUNK = 1 << 24  # data is written in chunks of 16 MiB, so a signal is handled within one chunk's write
_TEMP_PREFIX_BYTES = 100  # of the target's name in the temporary name: a target name the file system allows
#                           must not fail because its temporary name is longer


# --------------------------------------------------------------------------------------------- before any work

def check_paths(reads: Sequence[Named], writes: Sequence[Named]) -> None:
    """Refuse to write a file that this run reads, or writes under another option: a usage error naming both.
    An option may read and write its own file (`--latency-table` is updated in place). Then check that every
    output can be written."""
    given = [(what, Path(path)) for what, path in writes if path is not None]
    for index, (what, path) in enumerate(given):
        for other, read in reads:
            if read is not None and other != what and same_file(path, read):
                raise UsageError(f"{what} would overwrite {other} ({read})")
        for other, earlier in given[:index]:
            if other != what and same_file(path, earlier):
                raise UsageError(f"{what} and {other} name the same file ({path})")
    for _, path in given:
        check_writable(path)


def same_file(a: PathLike, b: PathLike) -> bool:
    """The same file or folder: equal once symbolic links are resolved, or (both existing) hard links."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # one does not exist (or cannot be looked at): nothing to overwrite there
        return False


def check_writable(path: PathLike) -> None:
    """Fail early, before any work, when the output cannot be written: a folder, a missing folder, a name too long
    for the file system, no permission."""
    target = Path(path)
    folder = target.parent
    try:
        if target.is_dir():
            raise OnnxPruneError(f"output is a directory: {target}")
        if not folder.is_dir():
            raise OnnxPruneError(f"cannot write {target}: folder {folder} does not exist")
        name_max = os.pathconf(folder, "PC_NAME_MAX")
        if len(os.fsencode(target.name)) > name_max:
            raise OnnxPruneError(f"cannot write {target}: file name too long (the file system allows {name_max} "
                                 "bytes)")
        if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
            raise OnnxPruneError(f"cannot write {target}: permission denied")
    except OSError as err:
        raise OnnxPruneError(f"cannot write {target}: {err.strerror or err}") from None


# ---------------------------------------------------------------------------------------------------- writing

def write_bytes(path: PathLike, data: bytes, what: str = "") -> None:
    """Write `data` to `path` atomically (see atomic_path)."""
    with atomic_path(path, what) as tmp:
        with open(tmp, "wb") as handle:
            _write_all(handle, data)


def write_text(path: PathLike, text: str, what: str = "") -> None:
    """Write `text` as UTF-8 to `path` atomically (see atomic_path)."""
    write_bytes(path, text.encode("utf-8"), what)


def _write_all(handle, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        handle.write(view[start:start + _CHUNK])


def resolve(path: PathLike) -> Path:
    """The file a name refers to: a symbolic link is written through, as `cp` does, not replaced."""
    return Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)


@contextmanager
def atomic_path(path: PathLike, what: str = "") -> Iterator[Path]:
    """A temporary path in the target's folder for the body to write; renamed over the target when the body ends.

    On an exception, or on SIGTERM, SIGHUP or SIGINT during the body, the temporary file is removed and the target
    is left as it was; a signal is then passed on to the handler that was there before (by default the process
    ends as the signal says, e.g. status 143 for SIGTERM in a shell). OSError becomes a one-line OnnxPruneError.
    The new file gets the permission bits of the file it replaces, or 0o666 less the umask if there is none:
    what `cp` does (mkstemp alone would give 0o600). A hard link to the old target keeps the old contents.
    """
    target = resolve(path)
    label = f"{what} {path}" if what else str(path)
    with _signals_raise():
        held = _hold_signals()
        tmp = _temporary_beside(target, label, held)
        try:
            _release_signals(held)  # a signal held meanwhile is handled here, where the clean-up below sees it
            yield tmp
            os.chmod(tmp, _mode_for(target))
            os.replace(tmp, target)
        except BaseException as exc:
            _remove(tmp)
            if isinstance(exc, OSError):
                raise OnnxPruneError(f"cannot write {label}: {exc.strerror or exc}") from None
            raise


def _temporary_beside(target: Path, label: str, held: set[int] | None) -> Path:
    """An empty hidden file in the target's folder (same file system, so the rename is atomic). The caller holds
    the signals while it is created and named, so none can leave it behind; on failure they are released here."""
    stem = os.fsdecode(os.fsencode(target.name)[:_TEMP_PREFIX_BYTES])
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        return Path(tmp)
    except BaseException as err:
        _release_signals(held)
        if isinstance(err, OSError):
            raise OnnxPruneError(f"cannot write {label}: {err.strerror or err}") from None
        raise


def _mode_for(target: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(target).st_mode) & 0o777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o077)  # reading the umask means setting it (strictly, for that instant); it is put back
    os.umask(mask)
    return mask


def _remove(tmp: Path) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------- scratch space

@contextmanager
def scratch_folder(prefix: str = "onnxprune-") -> Iterator[Path]:
    """A new temporary folder for files that only this run reads (activations spilled to disk), removed with all it
    holds when the body ends: normally, on an error, or on SIGTERM / SIGHUP / SIGINT, which are then passed on as
    atomic_path passes them on. Signals are held while it is created, so none can leave it behind."""
    with _signals_raise():
        held = _hold_signals()
        try:
            folder = Path(tempfile.mkdtemp(prefix=prefix))
        except BaseException as err:
            _release_signals(held)
            if isinstance(err, OSError):
                raise OnnxPruneError(f"cannot create a temporary folder: {err.strerror or err}") from None
            raise
        try:
            _release_signals(held)
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


_RUN_SCRATCH: list[Path] = []  # the process's scratch folder, once made


def run_scratch_folder() -> Path:
    """A temporary folder that lives as long as the process, for files a returned model still reads (the weights
    surgery writes for a model past RAM, read until the model is saved): made on first use, removed at exit and on
    SIGTERM / SIGHUP / SIGINT, which are then passed on to the handlers that were there before."""
    if not _RUN_SCRATCH:
        held = _hold_signals()
        try:
            _RUN_SCRATCH.append(Path(tempfile.mkdtemp(prefix="onnxprune-run-")))
            atexit.register(_remove_run_scratch)
            if _in_main_thread():
                _install(_removing_run_scratch, _BEFORE_RUN_SCRATCH)
        except OSError as err:
            raise OnnxPruneError(f"cannot create a temporary folder: {err.strerror or err}") from None
        finally:
            _release_signals(held)
    return _RUN_SCRATCH[0]


_BEFORE_RUN_SCRATCH: dict[int, object] = {}  # the handlers run_scratch_folder's handler passes signals on to


def _removing_run_scratch(signum: int, frame: object) -> None:
    _remove_run_scratch()
    _restore(_BEFORE_RUN_SCRATCH)
    _pass_on(signum, _BEFORE_RUN_SCRATCH[signum])


def _remove_run_scratch() -> None:
    while _RUN_SCRATCH:
        shutil.rmtree(_RUN_SCRATCH.pop(), ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- signals

class _Signalled(BaseException):
    """Raised by the handler that is in place during a write, so the write unwinds through its clean-up."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def _signals_raise() -> Iterator[None]:
    """While the body runs, SIGTERM, SIGHUP and SIGINT raise _Signalled (only in the main thread, where Python runs
    handlers, and not for a signal that is ignored, as under nohup). The previous handlers come back at the end; a
    signal that arrived is then passed on to its previous handler."""
    previous: dict[int, object] = {}
    arrived: list[int] = []

    def handler(signum: int, frame: object) -> None:
        arrived.append(signum)
        if len(arrived) == 1:  # a second signal during the clean-up must not interrupt it
            raise _Signalled(signum)

    try:
        if _in_main_thread():
            _install(handler, previous)
        yield
    except _Signalled as caught:
        _restore(previous)
        _pass_on(caught.signum, previous[caught.signum])
    finally:
        _restore(previous)


def _install(handler, previous: dict[int, object]) -> None:
    for signum in _SIGNALS:
        old = signal.getsignal(signum)
        if old not in (signal.SIG_IGN, None):  # None: set outside Python, could not be put back
            previous[signum] = old
            signal.signal(signum, handler)


def _restore(previous: dict[int, object]) -> None:
    """Put the previous handlers back, signals held meanwhile: one arriving now goes to the previous handler, not
    to ours half-way through (which would raise where nothing catches it)."""
    held = _hold_signals()
    try:
        for signum, old in previous.items():
            signal.signal(signum, old)
    finally:
        _release_signals(held)


def _pass_on(signum: int, old: object) -> None:
    """Do what the signal would have done without us: the default action ends the process (its status says which
    signal); a Python handler is called (SIGINT's raises KeyboardInterrupt; an enclosing write's unwinds that one)."""
    if old == signal.SIG_DFL:
        os.kill(os.getpid(), signum)
        raise SystemExit(128 + signum)  # reached only if the signal is blocked
    old(signum, None)
    raise OnnxPruneError(f"write interrupted by {signal.Signals(signum).name}")


def _hold_signals() -> set[int] | None:
    if not _in_main_thread() or not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


def _release_signals(held: set[int] | None) -> None:
    if held is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
