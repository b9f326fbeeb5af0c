"""A lock that many processes on many machines share, and that a dead holder cannot keep."""
from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError


class FileMutex:
    """An exclusive ``flock`` on a lock file: the study mutex of file storages, the journal's append lock,
    and the zoo cache's build lock (one worker builds a zoo while the others wait for it).

    Why not Optuna's lock files (O_EXCL or symlink, broken once a grace period has passed): breaking one
    is "stat it, decide it is stale, remove it", and two waiters can both decide, the second removing the
    lock the first has just taken; both then run the critical section (CI caught two survivors of a
    dead worker healing its trial twice, so one candidate ran twice). An flock belongs to an open file:
    the kernel drops it the instant its holder dies (over NFS, the server's lock manager does), so
    nobody guesses, and survivors wait no grace period. The lock file stays on disk; it is only a name.
    ``acquire``/``release`` are what Optuna's journal backend calls on its ``lock_obj``.
    """

    def __init__(self, path: Path, no_locks_hint: str = "") -> None:
        """``no_locks_hint``: what to do instead where the file system has no locks."""
        self.path = Path(path)
        self.no_locks_hint = no_locks_hint
        self._threads = threading.Lock()  # an flock excludes open files, not two threads sharing this object
        self._fd: int | None = None

    def acquire(self) -> bool:
        self._threads.acquire()
        try:
            self._fd = self._lock()
        except OSError as exc:
            self._threads.release()
            why = ("this file system does not support file locks (NFS without a lock manager?)"
                   + (f"; {self.no_locks_hint}" if self.no_locks_hint else "")) \
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP) \
                else "check that the folder exists and is writable by every worker"
            raise ConfigError(f"cannot lock {self.path}: {exc.strerror}; {why}.") from None
        except BaseException:
            self._threads.release()
            raise
        return True

    def _lock(self) -> int:
        """The locked descriptor. Locked, the file must still be the one at ``path``: had someone removed
        it meanwhile, the next worker would lock a new file and both would be inside."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                        return fd
                except FileNotFoundError:
                    pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            self._threads.release()

    def __enter__(self) -> "FileMutex":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class SessionLock:
    """Held for a whole search by the processes using one study file: exclusive for a single-process search,
    shared by the workers of a cluster sweep. So a second search on a study is refused at once, before it
    loads a model, instead of spending the budget a second time or failing the first one's running trial;
    and a single-process search is refused while workers run (and the other way round).

    Non-blocking: a search waiting for another to end would look hung. The holder of the exclusive lock
    writes who it is into the file, for the message the next one gets.
    """

    def __init__(self, path: Path, *, shared: bool, what: str) -> None:
        """``what``: the study, as the refusal names it."""
        self.path, self.shared, self.what = Path(path), shared, what
        self._fd: int | None = None

    def acquire(self) -> None:
        import socket

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "workers of a cluster sweep"
            os.close(fd)
            how = ("workers of one study run together with `worker=N` (docs/cluster.md)" if not self.shared
                   else "stop it first, or run every process as a worker (`worker=N`)")
            raise ConfigError(
                f"{self.what} is in use by another evomerge process ({holder}); two searches on one study would "
                f"spend its budget twice. Wait for it to finish, use another study_name or run directory, or: {how}. "
                f"(Lock file: {self.path}.)") from None
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"cannot lock {self.path}: {exc.strerror}; check that the folder is writable.") from None
        if not self.shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> "SessionLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
