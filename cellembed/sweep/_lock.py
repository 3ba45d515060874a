"""Locks in a shared folder (NFS-safe enough for SLURM arrays): atomic create, heartbeat, stale take-over."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

STALE_SECONDS = 600.0
"""A lock whose file was not refreshed for this long belongs to a crashed job and is taken over."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


class Lock:
    """An exclusive lock file ``path`` holding host, pid and time, refreshed while held.

    ``acquire()`` creates the file with ``O_CREAT | O_EXCL`` (atomic); a lock not refreshed for ``stale``
    seconds, or held by a dead process of this host, is taken over (under a short-lived ``<path>.takeover``
    lock, so two jobs never both take it). While held, a thread touches the file every ``stale / 4`` seconds.
    Use as a context manager or call ``acquire`` / ``release``.
    """

    def __init__(self, path: str | Path, stale: float = STALE_SECONDS):
        self.path, self.stale = Path(path), stale
        self._stop: threading.Event | None = None

    def _info(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode()

    def _create(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._info())
        return True

    def _is_stale(self, path: Path) -> bool:
        """Not refreshed for ``stale`` seconds, or held by a process of this host that no longer exists."""
        try:
            if time.time() - path.stat().st_mtime > self.stale:
                return True
            holder = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return False
        return holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0)))

    def _take_over(self) -> bool:
        guard = self.path.with_name(self.path.name + ".takeover")
        if self._is_stale(guard):
            guard.unlink(missing_ok=True)
        if not self._create(guard):
            return False
        try:
            if not self._is_stale(self.path):
                return False
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(self._info())
            os.replace(tmp, self.path)
            return True
        finally:
            guard.unlink(missing_ok=True)

    def acquire(self) -> bool:
        """Take the lock if free (or stale); False when another live job holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not (self._create(self.path) or self._take_over()):
            return False
        self._stop = threading.Event()
        threading.Thread(target=self._beat, args=(self._stop,), daemon=True).start()
        return True

    def wait(self, poll: float = 2.0) -> None:
        """Block until the lock is ours."""
        while not self.acquire():
            time.sleep(poll)

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(self.stale / 4):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def holder(self) -> dict | None:
        """The host / pid / time recorded in the lock file, or None without one."""
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Lock":
        self.wait()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
