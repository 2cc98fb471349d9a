"""Where files live: a local path or a pyarrow filesystem URI (s3://, gs://, file://...).

One place for the question "is this a URI?" and for turning a location into
(filesystem, path) and back, so training's checkpoints, screening's archive and
output, and manifests answer it the same way. No Ray, no torch.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from cxr.errors import Busy, CxrError


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` (file:// included); False for a local path."""
    return "://" in str(location)


def is_local(location: str) -> bool:
    """True where the location is on this machine's file system (a plain path or file://)."""
    return not is_uri(location) or location.startswith("file://")


def open_fs(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a pyarrow filesystem URI."""
    if is_uri(location):
        try:
            return pafs.FileSystem.from_uri(location)
        except Exception as exc:  # noqa: BLE001 - ArrowInvalid, ArrowNotImplementedError, OSError
            raise CxrError(f"cannot open {location}: {exc}") from None
    return pafs.LocalFileSystem(), str(Path(os.path.expanduser(location)).resolve())


def uri_prefix(location: str) -> str:
    """What to put before a filesystem path to give the user-facing path ('' for local)."""
    return location.split("://", 1)[0] + "://" if is_uri(location) else ""


def child_uri(location: str, fs_path: str) -> str:
    """The URI of ``fs_path`` inside ``location``'s filesystem, with ``location``'s ``?query`` kept.

    ``open_fs`` drops the query (``s3://b/ckpt?endpoint_override=minio:9000&region=x``) and the
    credentials of ``s3://KEY:SECRET@b/ckpt``; a URI rebuilt without them for another reader (Ray's
    Checkpoint) would name the default endpoint, or no credentials. Not for display: see ``uri_prefix``.
    """
    if not is_uri(location):
        return fs_path
    query = location.split("?", 1)[1] if "?" in location else ""
    authority = location.split("?", 1)[0].split("://", 1)[1].split("/", 1)[0]
    userinfo = authority.rpartition("@")[0]  # s3://KEY:SECRET@bucket/...: the credentials travel on too
    return uri_prefix(location) + (f"{userinfo}@" if userinfo else "") + fs_path + (f"?{query}" if query else "")


def join(location: str, *names: str) -> str:
    """``location``/names..., a URI's ``?query`` kept at the end: ``s3://b/out?region=x`` -> ``s3://b/out/report?region=x``
    (appending to the string would put the name inside the query)."""
    base, sep, query = location.partition("?") if is_uri(location) else (location, "", "")
    return "/".join([base.rstrip("/"), *names]) + sep + query


@contextmanager
def writable_folder(location: str) -> Iterator[Path]:
    """A local folder to write files into for ``location``: the folder itself when it is local; else a
    temporary folder whose files are uploaded to the URI when the block ends without an error.

    For writers that need real paths (matplotlib's PNGs, the HTML report): ``Path("s3://b/r")`` would
    quietly make a local folder ``./s3:/b/r`` instead.
    """
    fs, root = open_fs(location)
    if isinstance(fs, pafs.LocalFileSystem):
        yield Path(root)
        return
    with tempfile.TemporaryDirectory(prefix="cxr-upload-") as tmp:
        yield Path(tmp)
        upload_folder(Path(tmp), fs, root)


def upload_folder(local: Path, fs: pafs.FileSystem, root: str) -> None:
    """Copy a local folder's files under ``root`` of ``fs`` (replacing files of the same name)."""
    fs.create_dir(root, recursive=True)
    pafs.copy_files(str(local), root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


@contextmanager
def exclusive(location: str, lock_name: str, busy: str) -> Iterator[None]:
    """One writer at a time in a local (or mounted) folder: an flock on ``location/lock_name``, released when
    the process ends, SIGKILL included. A second writer gets :class:`cxr.errors.Busy` (``busy``: what to
    tell it). Object stores have no locks (one run per folder is then the caller's job), and a mount
    without flock support (some FUSE file systems) runs unlocked, with a warning."""
    import fcntl
    import logging

    if not is_local(location):
        yield
        return
    folder = Path(open_fs(location)[1])
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(folder / lock_name), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(busy) from None
        except OSError as exc:
            logging.getLogger("cxr").warning("warning: cannot lock %s (%s): a second run there would not be "
                                             "refused", folder / lock_name, exc.strerror or exc)
        else:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)
