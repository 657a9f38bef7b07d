"""The output folder of a run: checked against the run's inputs before any work, locked against
a second run writing the same folder, written as a temporary folder beside it and renamed into
place only when complete.

While a run writes ``DIR/NAME`` it keeps two things in ``DIR``:

- ``.NAME.llmq-lock``, created exclusively (a second run for the same output is refused): JSON
  naming the process that writes (``pid``, ``host``, ``process``: boot id and start time, so that
  a recycled pid is not taken for it), when it started, the output and the temporary folder;
- ``.tmp-NAME-XXXXXXXX``, the temporary folder the lock names.

Both are removed when the run ends, however it ends, except after an exception the run names
(``keep``: a stop at a safe point, for a later resume) or when the process is killed outright
(SIGKILL, a power cut). The next run for the same output then finds a lock whose process is
gone: a run asked to resume takes that lock and its temporary folder over, any other refuses to
start with the commands that resume it or remove what was left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

LOCK_SUFFIX = ".llmq-lock"


class OutputError(ValueError):
    """The output folder cannot be written without harm (or is being written by another run)."""


class OutputExistsError(FileExistsError):
    """The output folder exists and overwriting was not asked for."""


class StaleOutputError(OutputError):
    """An earlier run writing the output stopped before finishing (stopped at a safe point, or its
    process is gone): ``what`` says so, ``remove`` is the shell command that removes what it left."""

    def __init__(self, what: str, remove: str) -> None:
        super().__init__(f"{what}; continue it with --resume (same arguments), or remove what it left: {remove}")
        self.what, self.remove = what, remove


def check_apart(target: str | Path, inputs: Mapping[str | Path, str], label: str = "--out") -> None:
    """Refuse ``target`` when it is, contains or lies inside one of ``inputs`` (path -> what it is,
    e.g. ``"input model"``), links resolved: llmq never writes over what it reads."""
    target = Path(os.path.realpath(Path(target).expanduser()))
    for path, what in inputs.items():
        real = Path(os.path.realpath(Path(path).expanduser()))
        relation = ("is" if target == real else "contains" if real.is_relative_to(target)
                    else "lies inside" if target.is_relative_to(real) else None)
        if relation:
            raise OutputError(f"{label} {target} {relation} the {what} {real}: llmq never writes over its inputs, "
                              "even with --overwrite")


def check_output(out: str | Path, overwrite: bool = False, inputs: Mapping[str | Path, str] | None = None,
                 resume: bool = False) -> Path:
    """Everything :func:`atomic_output` checks before it writes, without writing anything: for
    a run to fail at once rather than after loading its model. Returns the output folder (links
    resolved). Raises ``OutputError`` (``StaleOutputError`` for what a dead run left, unless
    ``resume``) or ``OutputExistsError`` with a one-line message.
    """
    target = Path(os.path.realpath(Path(out).expanduser()))
    check_apart(target, inputs or {})
    _check_replaceable(target, overwrite)
    existing = target.parent
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create the output's folder {target.parent}: {existing} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise OutputError(f"cannot write in {existing}: {e.strerror}") from None
    if resume:
        _resumable(target)
    elif os.path.lexists(lock_path(target)):
        raise _held(target, _read_lock(target, lock_path(target)))
    return target


@contextlib.contextmanager
def atomic_output(out: str | Path, overwrite: bool = False, inputs: Mapping[str | Path, str] | None = None,
                  resume: bool = False, keep: tuple[type[BaseException], ...] = ()) -> Iterator[Path]:
    """Yield a new temporary folder beside ``out``, renamed to ``out`` when the block succeeds.

    Before anything is written: ``out`` must not be, contain or lie inside ``inputs`` (path ->
    what it is, see :func:`check_apart`); an existing ``out`` is refused without ``overwrite``,
    and even with it unless it is a checkpoint folder (has a ``config.json``) or empty; the
    output's folder must be writable and no other run may be writing ``out`` (the lock). The
    result replaces an existing ``out`` by renames, with SIGINT and SIGTERM held back meanwhile;
    without ``overwrite`` it never replaces a folder that appeared while the block ran. However
    the block ends, the temporary folder, the lock and any parent folders made are removed,
    except when it raises one of ``keep``: then they stay, the lock marked as stopped, for a run
    with ``resume``. Such a run takes over the lock of a run whose process is gone (or that
    stopped) and yields that run's temporary folder, as it was left; with no such lock it starts
    as any run. Folder permissions follow the umask.
    """
    target = check_output(out, overwrite, inputs, resume)
    created = _make_parents(target.parent)
    try:
        stale = _resumable(target) if resume else None
        lock = _take_over(target, stale) if stale else _acquire(target)
    except BaseException:
        _remove_empty(created)
        raise
    tmp = target.parent / lock["tmp"]
    kept = False
    try:
        os.makedirs(tmp, exist_ok=stale is not None)
        yield tmp
        _commit(tmp, target, overwrite)
    except keep:
        kept = True
        with contextlib.suppress(OSError):  # unmarked, the lock names a process that is about to end
            _write_lock(lock_path(target), {**lock, "stopped": time.strftime("%Y-%m-%d %H:%M:%S")})
        raise
    finally:
        if not kept:
            shutil.rmtree(tmp, ignore_errors=True)
            _release(target, lock)
            if not target.exists():
                _remove_empty(created)


def lock_path(target: Path) -> Path:
    """Where the lock of output folder ``target`` lives."""
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _check_replaceable(target: Path, overwrite: bool) -> None:
    if not os.path.lexists(target):
        return
    if not overwrite:
        raise OutputExistsError(f"output folder {target} already exists (pass --overwrite to replace it)")
    if not target.is_dir():
        raise OutputError(f"--out {target} is a file, not a checkpoint folder: not replaced, even with --overwrite")
    if not (target / "config.json").is_file() and any(target.iterdir()):
        raise OutputError(f"--out {target} is not a checkpoint folder (no config.json) and not empty: "
                          "not replaced, even with --overwrite")


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, deepest first."""
    missing = []
    p = folder
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output's folder {folder}: {e.strerror}") from None
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _identity(pid: int) -> str | None:
    """Boot id and start time of process ``pid`` (Linux), which a recycled pid does not share."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22, starttime


def _alive(info: dict) -> bool | None:
    """Whether the process a lock names still runs (None: it runs on another host); a run that
    stopped at a safe point (``stopped``) no longer does, whether or not its process has ended."""
    if info.get("stopped"):
        return False
    if info.get("host") != socket.gethostname():
        return None
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    recorded, now = info.get("process"), _identity(info["pid"])
    return recorded is None or now is None or recorded == now


def _acquire(target: Path, tmp: str | None = None) -> dict:
    """Create the lock of ``target`` (exclusively) for this process, naming the temporary folder
    ``tmp`` (default: a new name)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "process": _identity(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "out": str(target),
            "tmp": tmp or f".tmp-{target.name}-{secrets.token_hex(4)}"}
    path = lock_path(target)
    part = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:  # written whole beside, then linked into place: no run ever reads a half-written lock
        part.write_text(json.dumps(info))
        try:
            os.link(part, path)
        except FileExistsError:
            raise _held(target, _read_lock(target, path)) from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            _create_exclusively(target, path, info)  # a file system without hard links
    except OSError as e:
        raise OutputError(f"cannot write in {target.parent}: {e.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            part.unlink()
    return info


def _create_exclusively(target: Path, path: Path, info: dict) -> None:
    """Create lock ``path`` with O_EXCL then write it, where hard links are unavailable."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        raise _held(target, _read_lock(target, path)) from None
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)


def _write_lock(path: Path, info: dict) -> None:
    """Rewrite this run's own lock (through a rename: the lock is never seen half-written)."""
    part = path.with_name(f"{path.name}.{os.getpid()}")
    part.write_text(json.dumps(info))
    os.replace(part, path)


def _read_lock(target: Path, path: Path) -> dict:
    """The lock at ``path``, checked: an int pid and a temporary folder of ``target``'s own name."""
    try:
        info = json.loads(path.read_text())
        pid, tmp = info["pid"], info["tmp"]
        if type(pid) is not int or not (isinstance(tmp, str) and tmp.startswith(f".tmp-{target.name}-")
                                        and "/" not in tmp and os.sep not in tmp):
            raise ValueError(tmp)
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputError(f"{target} is locked by {path}, which cannot be read; if no llmq run is writing "
                          f"{target}, remove the lock: rm -f -- {shlex.quote(str(path))}") from None
    return info


def remove_command(target: Path, tmp: str) -> str:
    """The shell command that removes what a run writing ``target`` left: its temporary folder
    ``tmp`` (a name beside ``target``) and its lock."""
    return f"rm -rf -- {shlex.quote(str(target.parent / tmp))} {shlex.quote(str(lock_path(target)))}"


def _held(target: Path, info: dict, resume: bool = False) -> OutputError | None:
    """The error for lock ``info`` found in place for ``target``: another run is writing, or a dead
    one left things behind (None for that one when ``resume``: its folder is the one to continue)."""
    who = f"pid {info['pid']}, started {info.get('started', '?')}"
    remove = remove_command(target, info["tmp"])
    alive = _alive(info)
    if alive is None:
        return OutputError(f"{target} is being written by another llmq run ({who} on {info.get('host')}); "
                           f"if that run is gone, remove what it left: {remove}")
    if alive:
        return OutputError(f"{target} is being written by another llmq run ({who}); wait for it to end or "
                           "choose another --out")
    if resume:
        return None
    if info.get("stopped"):
        return StaleOutputError(f"an earlier run writing {target} was stopped ({who}, stopped {info['stopped']})",
                                remove)
    return StaleOutputError(f"an earlier run writing {target} stopped without finishing ({who}, no longer running)",
                            remove)


def _resumable(target: Path) -> dict | None:
    """The lock of ``target`` when its run is gone (None when there is no lock); the error of
    :func:`_held` when that run still writes."""
    path = lock_path(target)
    if not os.path.lexists(path):
        return None
    info = _read_lock(target, path)
    error = _held(target, info, resume=True)
    if error is not None:
        raise error
    return info


def _take_over(target: Path, stale: dict) -> dict:
    """The lock of ``target``, whose run is gone (``stale``, as read), made this process's, for
    the same temporary folder. The old lock is renamed aside first: of several runs taking it
    over at once, one gets it and the others are refused."""
    path = lock_path(target)
    aside = path.with_name(f"{path.name}.{os.getpid()}")
    try:
        os.rename(path, aside)
        if _read_lock(target, aside) != stale:  # another run took it over between the read and the rename
            os.rename(aside, path)
            raise FileNotFoundError
    except FileNotFoundError:
        raise OutputError(f"another llmq run took over the lock of {target} ({path}) meanwhile") from None
    aside.unlink()
    return _acquire(target, stale["tmp"])


def _release(target: Path, info: dict) -> None:
    """Remove the lock, if it is still this run's."""
    path = lock_path(target)
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("tmp") == info["tmp"]:
            path.unlink()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive while the block runs are delivered after it, to the handlers
    in place before: the renames that put a result in place are not cut in half. (Blocking them
    with a signal mask would not do: the kernel hands them to any other thread, torch's included.)
    Only the main thread can set handlers; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: arrived.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in arrived:
            signal.raise_signal(s)


def _commit(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``target``: an existing checkpoint there is renamed aside first and
    removed after (``overwrite``); else the final name is created exclusively, so that a folder
    that appeared meanwhile is never replaced."""
    old = None
    with _signals_held():
        try:
            if overwrite and os.path.lexists(target):
                _check_replaceable(target, overwrite)  # again: it may have changed while the run worked
                old = target.with_name(f".old-{target.name}-{secrets.token_hex(4)}")
                os.rename(target, old)
                try:
                    os.rename(tmp, target)
                except OSError:
                    os.rename(old, target)
                    raise
            else:
                try:
                    os.mkdir(target)
                except FileExistsError:
                    raise OutputExistsError(f"{target} appeared while this run was writing it: left as it is, "
                                            "nothing written (pass --overwrite to replace it)") from None
                try:
                    os.replace(tmp, target)  # onto the empty folder just made
                except OSError:
                    target.rmdir()
                    raise
        except OutputExistsError:
            raise
        except OSError as e:
            raise OutputError(f"cannot move the result into place at {target}: {e.strerror}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
