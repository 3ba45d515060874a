"""Where a cache lives: a local directory, or any location WebDataset opens (``pipe:`` commands, ``http(s)://``,
``gs://`` ...) and, through fsspec when it is installed, object stores (``s3://`` ...).

A remote cache is given as its directory's URL (``s3://bucket/caches/uni2``: members are appended after a ``/``)
or as a template with ``{}`` where the member name goes (``pipe:aws s3 cp s3://bucket/caches/uni2/{} -``,
``pipe:cat /data/cache/{}``). ``manifest.json`` and the shards are read from the same place. ``file:`` URLs
are local directories.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import IO

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


def is_remote(location: str | Path) -> bool:
    """True for ``pipe:...`` and ``scheme://...`` locations other than ``file:``."""
    if isinstance(location, Path):
        return False
    s = str(location)
    return bool(_SCHEME.match(s)) and not s.startswith("file:")


def local_path(location: str | Path) -> Path:
    """A local cache directory (``file:`` URLs included) as a Path."""
    s = str(location)
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    if s.startswith("file:"):
        return Path(s[len("file:"):])
    return Path(location)


def member_url(location: str, name: str) -> str:
    """The URL of the member ``name`` of a remote cache (template ``{}`` substituted, or appended after ``/``)."""
    if "{}" in location:
        return location.replace("{}", name)
    return location.rstrip("/") + "/" + name


def location_name(location: str | Path) -> str:
    """A short name for a cache location (its last path segment), e.g. for ``score``'s default output folder."""
    if not is_remote(location):
        return local_path(location).resolve().name
    parts = [p for p in re.split(r"[/\s:]+", str(location).replace("{}", "")) if p and p != "-"]
    return re.sub(r"[^A-Za-z0-9._-]", "_", parts[-1]) if parts else "remote"


def open_url(url: str) -> IO[bytes]:
    """Open a URL for reading: WebDataset's ``gopen`` for its schemes (``pipe:`` runs the command and reads its
    stdout; closing the stream fails when the command exited non-zero), fsspec for the others.

    Raises:
        OSError: the location cannot be opened (unknown scheme without fsspec, failing command, missing object).
    """
    from webdataset.gopen import gopen, gopen_schemes

    scheme = url.split(":", 1)[0]
    if scheme in gopen_schemes:
        try:
            handle = gopen(url, "rb")
        except Exception as err:  # noqa: BLE001 - gopen raises plain exceptions of every kind
            raise OSError(f"cannot open {url} ({type(err).__name__}: {err})") from None
        return handle if hasattr(handle, "readinto") else _Reader(handle)
    try:
        import fsspec
    except ImportError:
        raise OSError(f"cannot open {url}: the {scheme}:// scheme needs fsspec (pip install fsspec and the "
                      f"filesystem's package, e.g. s3fs), or give the cache as a pipe: command") from None
    try:
        return fsspec.open(url, "rb").open()
    except Exception as err:  # noqa: BLE001 - every fsspec backend raises its own errors
        raise OSError(f"cannot open {url} ({type(err).__name__}: {err})") from None


class _Reader(io.RawIOBase):
    """A raw binary stream over WebDataset's ``Pipe`` (which has ``read`` but no ``readinto``); closing it closes
    the pipe, which checks the command's exit status."""

    def __init__(self, handle):
        super().__init__()
        self.handle = handle

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.handle.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            super().close()
            self.handle.close()


def read_member(location: str, name: str) -> bytes:
    """The whole member ``name`` of a remote cache (closing the stream checks a ``pipe:`` command's status)."""
    url = member_url(location, name)
    stream = open_url(url)
    try:
        data = stream.read()
    finally:
        close_stream(stream, url)
    return data


def close_stream(stream: IO[bytes], url: str) -> None:
    """Close a stream from ``open_url``; a ``pipe:`` command that failed raises OSError here."""
    try:
        stream.close()
    except Exception as err:  # noqa: BLE001 - webdataset's Pipe raises plain exceptions on a non-zero status
        raise OSError(f"{url}: {err}") from None
