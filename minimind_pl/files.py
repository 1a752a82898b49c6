"""Files that are complete or absent: atomic writes and the temporaries of killed writers.

``atomic_file`` writes a file so that a kill at any moment (``kill -9``, out of memory, a preempted node) leaves
either the previous file or the new one, complete. Checkpoints (``checkpoint_io.AtomicCheckpointIO``), the token
cache and the data tools write through it. Plain Python: no torch, no Lightning.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Optional

# A file being written is named <target>.tmp-<host>-<pid>-<token>: never *.ckpt, so nothing takes it for a
# checkpoint, and the host and process id tell a later writer whether its writer is still alive.
TEMP_MARK = ".tmp-"
_TEMP_NAME = re.compile(rf"^.+{re.escape(TEMP_MARK)}(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{8}}$")


def temporary_path(target: Path) -> Path:
    """A new name beside ``target`` (same folder, so the same filesystem) for writing its next version."""
    return target.with_name(f"{target.name}{TEMP_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale_temporaries(folder: Path, in_progress: Iterable[str] = (), folders: bool = False) -> list[Path]:
    """Temporary files (or, with ``folders``, temporary folders: the token cache builds one) in ``folder`` left
    behind by writers that were killed.

    A file counts as stale when it was made on this host by a process that is gone, or by this very process
    but is not in ``in_progress`` (a restarted container reuses its host name and process ids). Files of other
    hosts are left alone: their writers may still be alive.
    """
    host, own, busy = socket.gethostname(), os.getpid(), set(in_progress)
    stale = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _TEMP_NAME.match(path.name)
        if not match or match["host"] != host or str(path) in busy or path.is_dir() != folders:
            continue
        pid = int(match["pid"])
        if pid == own or not _process_alive(pid):
            stale.append(path)
    return stale


def fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX; a no-op where folders cannot be opened or synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; it has no folder entries to sync either
        return
    try:
        os.fsync(fd)
    except OSError as error:  # some filesystems (network, FUSE) refuse fsync on folders
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EACCES):
            raise
    finally:
        os.close(fd)


#: Temporary files this process is writing through ``atomic_file`` without a set of its own: never stale.
_WRITING_NOW: set[str] = set()


@contextlib.contextmanager
def atomic_file(target: Path, in_progress: Optional[set[str]] = None) -> Iterator[BinaryIO]:
    """A binary file to write whose content becomes ``target`` only when the block ends without an error, so that
    readers only ever see the old or the complete new file.

    The data goes to a temporary file beside ``target``, is flushed and fsynced, renamed over ``target``
    (``os.replace``: atomic on POSIX and Windows), and the rename is fsynced with the folder. Temporary files of
    earlier writers that were killed are removed first; ``in_progress`` holds the temporary files this process
    is writing right now, which are not stale (by default the process-wide set: two files written at once in one
    folder keep each other's temporaries).
    """
    in_progress = _WRITING_NOW if in_progress is None else in_progress
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(folder, in_progress):
        stale.unlink(missing_ok=True)
    temporary = temporary_path(target)
    in_progress.add(str(temporary))
    try:
        with open(temporary, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:  # an error, or a second signal: never leave the half-written file behind
        temporary.unlink(missing_ok=True)
        raise
    finally:
        in_progress.discard(str(temporary))
    fsync_folder(folder)


def write_atomically(target: Path, write: Callable[[BinaryIO], None], in_progress: set[str]) -> None:
    """Write ``target`` through ``write(file)`` atomically (see ``atomic_file``)."""
    with atomic_file(target, in_progress) as file:
        write(file)
