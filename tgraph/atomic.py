"""All-or-nothing writes of a file, or of a file and the companion file it names.

Why: tgraph writes pairs (``m.onnx`` + ``m.onnx.data``, ``m.py`` + ``m.npz``) in which the
main file refers to its companion by name. Moving two files into place one after the
other is not atomic, so `write_files` never lets a live main file name a companion that
is being replaced:

1. the new companion goes under a name no live file uses: its usual name when that is
   free, else ``<stem>.tgraph-<pid>-<hex><suffix>``;
2. the new main file, naming it, is checked and then moved into place with one
   `os.replace` (a failure up to here leaves the old pair as it was, and no new file);
3. only then is the new companion given its usual name (a hard link, then a second,
   small main file naming it), so repeated writes give the same bytes, and the old
   companion is removed. Without hard links the pair keeps the unique name.

Writers of one path are serialised with `fcntl.flock` on a hidden lock file beside it,
removed when the write ends. Where `fcntl` is missing (Windows) writers are not
serialised: each write alone is still all-or-nothing, but two writes to one path at the
same time may leave one's main file naming the other's companion, or a removed one.

Temporary files are hidden and carry their writer's pid, ``.m.onnx.tgraph-<pid>-<hex>.tmp``.
Every write first removes those in its directory whose writer process is gone (killed by
SIGKILL, or crashed), so a killed write leaves litter only until the next write there.
"""
from __future__ import annotations

import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, List, Optional

from .errors import ExportError

try:
    import fcntl
except ImportError:              # Windows: see the module docstring
    fcntl = None

TAG = "tgraph"
_TEMP = re.compile(rf"^\..+\.{TAG}-(\d+)-[0-9a-f]{{8}}\.tmp$")
_LOCK = re.compile(rf"^\..+\.{TAG}\.lock$")

WriteMain = Callable[[BinaryIO, Optional[str]], None]
WriteCompanion = Callable[[BinaryIO, str], None]
Check = Callable[[Path, Optional[Path]], None]


class WriteError(ExportError, OSError):
    """A file could not be written; names the user's path, never an internal temporary."""


def write_files(path: os.PathLike, write: WriteMain, *, companion: Optional[os.PathLike] = None,
                write_companion: Optional[WriteCompanion] = None, check: Optional[Check] = None) -> Path:
    """Write `path` (and its companion) all-or-nothing; returns `path`.

    `write(f, name)` writes the main file's bytes naming its companion `name` (None when
    there is none); it may be called twice. `write_companion(f, name)` writes the
    companion that will be called `name`. `companion` is the companion's usual path,
    given even when none is written this time: the old one is then removed.
    `check(main_tmp, companion_path)` may refuse the result before it is moved into place.
    An `OSError` comes out as a `WriteError` naming `path`.
    """
    path = Path(path)
    usual = Path(companion) if companion is not None else None
    try:
        with _locked(path):
            remove_stale_temps(path.parent)
            in_use = _write_pair(path, write, usual, write_companion, check)
            if in_use is not None and in_use != usual:
                in_use = _take_usual_name(path, write, in_use, usual)
            if usual is not None:
                _remove_old_companions(usual, keep=in_use)
    except OSError as e:
        if isinstance(e, WriteError):
            raise
        reason = e.strerror or str(e) or type(e).__name__
        raise WriteError(f"cannot write {path}: {reason}") from e
    return path


def _write_pair(path: Path, write: WriteMain, usual: Optional[Path], write_companion: Optional[WriteCompanion],
                check: Optional[Check]) -> Optional[Path]:
    """Steps 1 and 2: the new pair is live, the old companion untouched. Returns the companion's path."""
    placed: Optional[Path] = None
    main_tmp: Optional[Path] = None
    try:
        if write_companion is not None:
            assert usual is not None, "write_companion needs the companion's usual path"
            target = usual if not os.path.lexists(usual) else _unique_companion(usual)
            tmp = _write_temp(target, lambda f: write_companion(f, target.name))
            try:
                os.replace(tmp, target)
            except BaseException:
                _unlink(tmp)
                raise
            placed = target
        main_tmp = _write_temp(path, lambda f: write(f, placed.name if placed else None))
        if check is not None:
            check(main_tmp, placed)
        os.replace(main_tmp, path)
        main_tmp = None
        return placed
    except BaseException:
        for p in (main_tmp, placed):
            if p is not None:
                _unlink(p)
        raise


def _take_usual_name(path: Path, write: WriteMain, current: Path, usual: Path) -> Path:
    """Step 3: give the live companion its usual name. Returns the name the main file now uses."""
    link = _temp_name(usual)
    main_tmp: Optional[Path] = None
    try:
        os.link(current, link)
        os.replace(link, usual)                # nothing live names `usual` now: the old main file is gone
        main_tmp = _write_temp(path, lambda f: write(f, usual.name))
        os.replace(main_tmp, path)
        main_tmp = None
    except OSError:                            # no hard links here: keep the unique name, which is valid
        return current
    finally:
        for p in (link, main_tmp):
            if p is not None:
                _unlink(p)
    return usual


def _remove_old_companions(usual: Path, keep: Optional[Path]) -> None:
    """Remove companions of this main file that it no longer names (the old pair's, or a killed write's)."""
    pattern = re.compile(rf"^{re.escape(usual.stem)}\.{TAG}-\d+-[0-9a-f]{{8}}{re.escape(usual.suffix)}$")
    for p in [usual] + [usual.with_name(n) for n in _listdir(usual.parent) if pattern.match(n)]:
        if p != keep:
            _try_unlink(p)


# ------------------------------------------------------------------------------ temporaries
def _temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{TAG}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _unique_companion(usual: Path) -> Path:
    return usual.with_name(f"{usual.stem}.{TAG}-{os.getpid()}-{secrets.token_hex(4)}{usual.suffix}")


def _write_temp(target: Path, write: Callable[[BinaryIO], None]) -> Path:
    """A new hidden file beside `target` (same filesystem, so `os.replace` is atomic), synced to disk."""
    tmp = _temp_name(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def remove_stale_temps(directory: Path) -> List[str]:
    """Remove tgraph temporaries in `directory` whose writer process is gone, and unheld lock files."""
    removed = []
    for name in _listdir(directory):
        m = _TEMP.match(name)
        if m and _writer_gone(int(m.group(1))) and _try_unlink(directory / name):
            removed.append(name)
        elif _LOCK.match(name) and _remove_if_unheld(directory / name):
            removed.append(name)
    return removed


def _writer_gone(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":    # ours (another thread's), or no signal 0 to ask with
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:                              # alive, owned by someone else
        return False
    return False


def _listdir(directory: Path) -> List[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def _try_unlink(p: Path) -> bool:
    """Tidying up is best effort: a file we may not remove (another user's, a directory) stays."""
    try:
        os.unlink(p)
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------ locking
def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{TAG}.lock")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path`'s lock file; the file is removed on release."""
    if fcntl is None:
        yield
        return
    lock = _lock_path(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, lock):
                break                            # else a releasing writer removed it: lock the new one
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        _unlink(lock)                            # while still held, so no one can lock a removed file for long
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _remove_if_unheld(lock: Path) -> bool:
    """A lock file left by a killed writer (nobody holds it) is removed, by the same protocol as a release."""
    if fcntl is None:
        return False
    try:
        fd = os.open(lock, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    try:
        return _same_file(fd, lock) and _try_unlink(lock)
    finally:
        os.close(fd)
