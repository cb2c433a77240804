"""Where artifacts live: a plain local path or a URI (``s3://``, ``gs://``, ``file://``,
``hdfs://``), through ``pyarrow.fs``.

Every stage names its outputs with a string; :func:`resolve` turns it into a
``(pyarrow filesystem, path)`` pair and the helpers below read and write through it. Plain
paths (relative or absolute) are the local filesystem, exactly as before. Object stores take
their credentials and endpoint from the usual places (``AWS_*`` environment variables,
``AWS_ENDPOINT_URL`` for an S3-compatible server, instance roles) or from URI query
parameters that pyarrow understands (``s3://bucket/run?endpoint_override=host:9000&scheme=http``).

This module is the one home of atomic writes and sha256 digests in gt-ray.

Writes are all-or-nothing: locally a temporary name, fsync and rename; on an object store
an object appears only once its upload completes, so it is written under its final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` strings; plain paths (and Windows drive letters) are not URIs."""
    s = str(location)
    return "://" in s and len(s.split("://", 1)[0]) > 1


def is_local(location: str | os.PathLike) -> bool:
    """True for plain paths and ``file://`` URIs."""
    return not is_uri(location) or urlsplit(str(location)).scheme == "file"


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it.

    Plain paths are made absolute (``~`` expanded) on the local filesystem.

    Raises:
        ValueError: if the URI's scheme is unknown or its filesystem cannot be set up.
    """
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(str(location))
    except Exception as e:  # ArrowInvalid, ArrowNotImplementedError, OSError for an unknown or unbuilt scheme
        raise ValueError(f"storage location {str(location)!r}: {e}") from None


def join(location: str | os.PathLike, *names: str) -> str:
    """``location / name / ...`` for a path or a URI (a URI keeps its query string)."""
    if not is_uri(location):
        return str(Path(location, *names))
    parts = urlsplit(str(location))
    return urlunsplit(parts._replace(path=posixpath.join(parts.path or "/", *names)))


def local_path(location: str | os.PathLike) -> Path:
    """The local path of a plain path or ``file://`` URI.

    Raises:
        ValueError: for a remote URI.
    """
    if not is_local(location):
        raise ValueError(f"{location} is not on the local filesystem")
    return Path(resolve(location)[1])


def ray_storage(location: str | os.PathLike) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig``: an absolute path for a
    local location; for a remote one the path inside the filesystem plus the filesystem
    itself, so Ray uses the same endpoint and credentials as gt-ray."""
    fs, path = resolve(location)
    return (path, None) if isinstance(fs, pafs.LocalFileSystem) else (path, fs)


def makedirs(location: str | os.PathLike) -> None:
    """Create a directory and its parents (a no-op on object stores without directories)."""
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)


def exists(location: str | os.PathLike) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def list_names(location: str | os.PathLike) -> list[str]:
    """Base names of the files directly inside a directory (empty if it does not exist)."""
    fs, path = resolve(location)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    for attempt in range(3):
        try:
            infos = fs.get_file_info(selector)
            break
        except FileNotFoundError:
            # pyarrow raises despite allow_not_found when the directory or an entry appears or
            # vanishes while it lists (a corpus being written by another process, seen in CI):
            # list again; still failing, the directory is as good as not there
            if attempt == 2:
                return []
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def read_bytes(location: str | os.PathLike) -> bytes:
    """Raises FileNotFoundError if there is no such file."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(str(location))
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode()


@contextmanager
def open_output(location: str | os.PathLike, private: bool = False) -> Iterator[IO[bytes]]:
    """A binary stream that becomes ``location`` only if the block completes.

    Locally: a temporary name in the same directory, fsync, rename (parents created). On an
    object store: the object itself, which appears only when its upload completes (a killed
    process leaves nothing; an exception in the block deletes the object again).

    Args:
        private: locally, create the file readable by its owner only (mode 0600), e.g. an
            organization's submitted vector or a privacy ledger; an object store keeps its
            bucket's access rules.
    """
    fs, path = resolve(location)
    if not isinstance(fs, pafs.LocalFileSystem):
        f = fs.open_output_stream(path)
        try:
            yield f
        except BaseException:
            f.close()  # pyarrow cannot abort an upload: finish it, then remove the object
            fs.delete_file(path)
            raise
        f.close()
        return
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(location: str | os.PathLike, data: bytes, private: bool = False) -> None:
    """Write a whole file atomically (see :func:`open_output`, also for ``private``)."""
    with open_output(location, private) as f:
        f.write(data)


def write_text(location: str | os.PathLike, text: str, private: bool = False) -> None:
    write_bytes(location, text.encode(), private)


def write_json(location: str | os.PathLike, data: object, private: bool = False) -> None:
    """Write ``data`` as indented, key-sorted JSON (no NaN) atomically (see :func:`open_output`)."""
    write_text(location, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n", private)


def sha256_bytes(blob: bytes) -> str:
    """Hex sha256 of bytes: the one digest used for files, vectors and receipts."""
    return hashlib.sha256(blob).hexdigest()


def hash_file(h, location: str | os.PathLike) -> None:
    """Feed a file's bytes into the hash object ``h``, 1 MiB at a time (several files can
    go into one digest, as :func:`gt_ray.models.weights_sha256` does)."""
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def sha256(location: str | os.PathLike) -> str:
    """sha256 of one file, read 1 MiB at a time."""
    h = hashlib.sha256()
    hash_file(h, location)
    return h.hexdigest()


def copy_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a directory tree between any two locations (e.g. a local checkpoint to ``s3://``)."""
    src_fs, src_path = resolve(src)
    dst_fs, dst_path = resolve(dst)
    dst_fs.create_dir(dst_path, recursive=True)
    pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)


def absolute(location: str | os.PathLike) -> str:
    """A location that means the same from any working directory: an absolute path for a
    plain path, the URI unchanged otherwise (Ray workers do not share the driver's cwd)."""
    return str(location) if is_uri(location) else str(Path(location).expanduser().resolve())
