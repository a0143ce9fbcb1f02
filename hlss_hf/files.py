"""Files that appear whole or not at all: build beside, then swap into place.

Every writer of the project goes through here: a file or folder is written next to its target and renamed over it
only when complete (:func:`write_file_atomically`, :func:`write_folder_atomically`, :func:`swap_in`, with a
journal that :func:`recover_swap` finishes after a crash); an output is held by one run at a time
(:func:`output_lock`); a full disk is named with the path and the bytes it needed (:func:`naming_full_disk`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hlss_hf.errors import DiskFullError, OutputInUseError

logger = logging.getLogger(__name__)


def command_line() -> str:
    """The command that is running, quoted, for lock files and dataset cards."""
    return " ".join(shlex.quote(arg) for arg in [Path(sys.argv[0]).name, *sys.argv[1:]])


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` less the process umask: what ``open()`` would give a new file (mkstemp's files are 0600)."""
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


def write_file_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> Any:
    """Call ``write(tmp)`` (e.g. ``lambda tmp: torch.save(payload, tmp)``) on a temporary file beside ``path``, then
    rename it to ``path`` (the user's umask applies) and return what ``write`` returned. A failed ``write`` leaves
    ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        result = write(Path(tmp))
        os.chmod(tmp, umask_mode())  # mkstemp's 0600 would hide the file from the user's group
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return result


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` with :func:`write_file_atomically`."""
    write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_files_atomically(folder: str | os.PathLike, write, needed_bytes: int | None = None) -> None:
    """Call ``write(tmp)`` to write files into a temporary folder inside ``folder``, then move each file into
    ``folder`` (replacing same-named files): a crash while writing leaves the earlier files whole. A full disk is
    one error naming ``folder`` and ``needed_bytes`` (:func:`naming_full_disk`)."""
    folder = Path(folder)
    tmp = folder / ".write.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with naming_full_disk(folder, needed_bytes):
            write(tmp)
        for path in sorted(tmp.rglob("*")):
            target = folder / path.relative_to(tmp)
            if path.is_dir():
                target.mkdir(exist_ok=True)
            else:
                os.replace(path, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_folder_atomically(target: str | os.PathLike, write: Callable[[Path], Any]) -> Any:
    """Build a folder with ``write(tmp)`` in a temporary sibling of ``target``, then swap it in.

    An earlier ``target`` is moved aside, the new folder renamed into place, and only then is the old copy deleted
    (if the rename fails, the old copy is put back; a swap killed between its renames is finished by the next
    writer, :func:`recover_swap`). The writer holds ``target``'s lock (:func:`output_lock`) while it works. A failed
    ``write`` leaves ``target`` untouched and removes the temporary folder; one left by a killed process is removed
    by the next call (:func:`remove_stale_temporaries`). ``write`` fills the empty folder it is given (e.g.
    ``model.save_pretrained``); what it returns is returned.

    Raises:
        OutputInUseError: another process is writing ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(target):
        remove_stale_temporaries(target)
        tmp = sibling_path(target, "tmp")
        tmp.mkdir()
        try:
            result = write(tmp)
            swap_in(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return result


def sibling_path(target: Path, kind: str) -> Path:
    """A new hidden path beside `target` for a `kind` of temporary (``tmp``, ``old``), on the same file system."""
    # The pid tells this process's own temporaries from those a killed writer left (remove_stale_temporaries).
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _swap_journal(target: Path) -> Path:
    return target.parent / f".{target.name}.swap"


def swap_in(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished folder ``new`` to ``target``; an earlier ``target`` is deleted only once the new one is in
    place (if the rename fails, it is put back).

    Replacing a folder takes two renames (the old one aside, the new one in). A journal beside ``target`` names
    both while they run, so a process killed between them leaves what :func:`recover_swap` needs to finish the
    swap on the next start: ``target`` is then never missing for longer than the crash.
    """
    new, target = Path(new), Path(target)
    if not os.path.lexists(target):
        os.replace(new, target)
        return
    # os.replace cannot replace a non-empty folder: move the old one aside, move the new one in, then delete.
    old = sibling_path(target, "old")
    journal = _swap_journal(target)
    write_text_atomically(
        journal, json.dumps({"new": os.path.abspath(new), "old": os.path.abspath(old)}) + "\n"
    )
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        journal.unlink(missing_ok=True)
        raise
    journal.unlink(missing_ok=True)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_swap(target: str | os.PathLike) -> str | None:
    """Finish a :func:`swap_in` of ``target`` that a killed process left between its two renames.

    With the journal: a complete new folder still waiting is moved in (the swap completed); without it, the old
    copy is put back (rolled back); once ``target`` is in place, the old copy is deleted. Without a journal (a swap
    by an earlier version), a missing ``target`` gets its set-aside copy back. Call it holding ``target``'s lock
    (:func:`output_lock` does, when it is taken), never while another process may be swapping.

    Returns:
        ``"completed"``, ``"rolled back"``, ``"cleaned"`` (only the old copy was left), or ``None`` (nothing to do).
    """
    target = Path(os.path.abspath(target))
    journal = _swap_journal(target)
    new = old = None
    if journal.is_file():
        try:
            record = json.loads(journal.read_text(encoding="utf-8"))
            new, old = Path(record["new"]), Path(record["old"])
        except (ValueError, KeyError, TypeError):
            # A torn journal: written atomically, so the renames cannot have started; nothing to undo.
            logger.warning("%s: unreadable swap journal, removed", journal)
    elif not os.path.lexists(target):
        pattern = re.compile(rf"^\.{re.escape(target.name)}\.old-\d+-[0-9a-f]+$")
        aside = (
            [p for p in target.parent.iterdir() if pattern.match(p.name)] if target.parent.is_dir() else []
        )
        if aside:
            old = max(aside, key=lambda p: p.stat().st_mtime)  # the newest set-aside copy
    if old is None:
        journal.unlink(missing_ok=True)
        return None
    outcome = "cleaned"
    if not os.path.lexists(target):
        if new is not None and os.path.lexists(new):
            os.replace(new, target)
            outcome = "completed"
        elif os.path.lexists(old):
            os.replace(old, target)
            outcome = "rolled back"
    if os.path.lexists(old):
        _remove(old)
    journal.unlink(missing_ok=True)
    logger.warning("%s: an interrupted replacement was found and %s", target, outcome)
    return outcome


def remove_stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Delete what a killed writer left beside ``final``: ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*``.

    Holding ``final``'s lock (:func:`output_lock`), everything there but this process's own is a dead writer's:
    whoever wrote it held the lock, on whichever machine. Without the lock (a folder of this machine's temporary
    directory), a folder counts as stale when its process no longer runs here. An interrupted swap is finished
    first (:func:`recover_swap`): its set-aside copy may be the only one.

    Returns:
        The folders removed.
    """
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    locked = holds_lock(final)
    if locked:
        recover_swap(final)
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(tmp|old)-(\d+)-[0-9a-f]+$")
    for path in final.parent.iterdir():
        match = pattern.match(path.name)
        if not match or int(match.group(2)) == os.getpid():
            continue
        if not locked and match.group(1) == "old" and not os.path.lexists(final):
            continue  # maybe the only copy, set aside by a killed swap: restored under the lock, never deleted
        if locked or not _pid_alive(int(match.group(2))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


#: Locks this process holds: (thread, lock file) -> [file descriptor, depth]. A thread that holds one may take it
#: again (a converter's run, then its writer); another thread is refused like another process.
_HELD_LOCKS: dict[tuple[int, str], list[int]] = {}


def lock_file(target: str | os.PathLike) -> Path:
    """The lock file of an output folder: ``.<name>.lock`` beside it (a folder swapped in whole keeps it), there
    while a run holds it."""
    # The real path: two spellings of one folder (a symlink, `./x`) are one lock.
    target = Path(os.path.realpath(target))
    return target.with_name(f".{target.name}.lock")


def holds_lock(target: str | os.PathLike) -> bool:
    """Whether this process holds ``target``'s lock."""
    return (threading.get_ident(), str(lock_file(target))) in _HELD_LOCKS


def _holder_text(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return (
            f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}: {holder['command']}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, key: str | None = None):
    """Hold the exclusive lock on the output ``target`` for the ``with`` block; finish an interrupted swap of it.

    A run (train.py, finetune.py, a converter) holds it for as long as it runs, so a second run into the same folder
    is refused at its start. It is ``fcntl.flock`` on :func:`lock_file`: the kernel (and an NFS server's lock
    manager) releases it when the holder dies, so it is never stale and no PID is judged alive, on any machine. The
    file says who holds it, for the error; the holder deletes it on release (still holding it), and whoever locks a
    file checks that it is still the one at that path, so two processes never lock two files of one name. Taken
    again by the thread that holds it (a converter's run, then its writer), it nests.

    ``key``: the setting that named ``target`` (``training.output_dir``, ``--output``), for the error.

    Raises:
        OutputInUseError: another process holds it; the message names that process (pid, host, start, command).
    """
    import fcntl

    path = lock_file(target)
    mine = (threading.get_ident(), str(path))
    held = _HELD_LOCKS.get(mine)
    if held is not None:
        held[1] += 1
        try:
            yield path
        finally:
            held[1] -= 1
        return
    remove_new_parents = remove_new_empty_folder(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            # Not inherited by programs this run starts; a forked child (a loader worker) shares it until unlocked.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), umask_mode())
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            # A folder the user may not write beside (an output at a mount point): unguarded, as without locks.
            logger.warning(
                "%s: cannot create its lock file %s (%s); another run into it is not refused",
                target,
                path,
                error,
            )
            yield path
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(fd)
            os.close(fd)
            remove_new_parents()
            named = f"{key} {target}" if key else str(target)
            raise OutputInUseError(
                f"{named} is in use by another run ({holder}); wait for it to finish, or choose another output"
            ) from None
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # A file system without locks: the run goes on unguarded rather than not at all.
            logger.warning(
                "%s: this file system has no locks (%s); another run into it is not refused", target, error
            )
            fd = None
            break
        except BaseException:
            os.close(fd)
            raise
        try:  # the previous holder may have deleted the file between our open and our lock: lock the one there
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    if fd is None:
        path.unlink(missing_ok=True)
        yield path
        return
    try:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": command_line(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode("utf-8"), 0)
        _HELD_LOCKS[mine] = [fd, 1]
        recover_swap(target)
        yield path
    finally:
        _HELD_LOCKS.pop(mine, None)
        with contextlib.suppress(OSError):
            path.unlink()  # still locked here: nothing is left beside the output
        with contextlib.suppress(OSError):
            # Unlocked explicitly: a forked worker still holding a copy of the descriptor would keep it otherwise.
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        remove_new_parents()  # folders made only for the lock file (a run that failed before writing anything)


#: What a write says when the space ran out: errno values, and the words of libraries that report them as text
#: (safetensors' "File too large (os error 27)", torch's stream writer).
_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


_FULL_WORDS = (
    "No space left",
    "File too large",
    "Disk quota exceeded",
    "os error 28",
    "os error 27",
    "file write failed",
)


def _is_full(error: BaseException) -> bool:
    seen = 0
    while error is not None and seen < 5:  # the error and what it was raised from
        if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
            return True
        if any(words in str(error) for words in _FULL_WORDS):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


@contextlib.contextmanager
def naming_full_disk(path: str | os.PathLike, needed_bytes: int | Callable[[], int] | None = None):
    """Turn a write that ran out of space inside the block into a :class:`DiskFullError` naming ``path``, the bytes
    the write needed (``needed_bytes``, or a function giving them) and the space left there.

    Every writer library reports it its own way (an ``OSError``, safetensors' ``SafetensorError``, torch's
    ``RuntimeError``); one line then says what to free instead of a traceback.
    """
    try:
        yield
    except Exception as error:
        if isinstance(error, DiskFullError) or not _is_full(error):
            raise
        needed = needed_bytes() if callable(needed_bytes) else needed_bytes
        probe = Path(os.path.abspath(path))
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        what = f"it needs about {_megabytes(needed)}, " if needed else ""
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        raise DiskFullError(
            errno.ENOSPC,
            f"no space left writing {path} ({what}{_megabytes(free)} free there, or a file-size limit: {reason})",
        ) from error


def describe_os_error(error: OSError) -> str:
    """One line for a failed write or read: what happened to which path, without a traceback."""
    if isinstance(error, DiskFullError):
        return error.strerror
    where = error.filename or "the output"
    if error.errno == errno.ENOSPC:
        return f"no space left on the device holding {where}"
    if error.errno == errno.EDQUOT:
        return f"disk quota exceeded writing {where}"
    if error.errno == errno.EFBIG:
        return f"file too large writing {where} (a file-size limit, or the file system's)"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where}"
    if error.errno == errno.EROFS:
        return f"read-only file system: {where}"
    return f"{error.strerror or type(error).__name__}: {where}"


def remove_new_empty_folder(path: str | os.PathLike) -> Callable[[], None]:
    """Remember which part of `path` does not exist yet; the returned function removes that part again if it is
    still empty (a run that failed before writing anything leaves nothing behind; anything written stays)."""
    path = Path(path).absolute()
    first_new = None
    probe = path
    while not probe.exists() and probe != probe.parent:
        first_new, probe = probe, probe.parent

    def cleanup() -> None:
        if first_new is None:
            return
        folder = path
        while True:
            try:
                folder.rmdir()  # only ever an empty folder
            except OSError:
                return
            if folder == first_new:
                return
            folder = folder.parent

    return cleanup
