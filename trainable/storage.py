"""Storage: a local path or a URI of any pyarrow filesystem (s3://, gs://, ...), opened with
one-line errors, and files and directories copied between it and this machine's disk.

Credentials and endpoints come from the environment as pyarrow reads them (for an
S3-compatible server: AWS_ENDPOINT_URL), never from options in the URI.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from trainable.errors import UserError

LOCAL = pafs.LocalFileSystem()  # this machine's disk


def is_uri(location: str) -> bool:
    """A URI of a pyarrow filesystem (scheme://...), not a path on this machine."""
    return "://" in location


def open_uri(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path (made absolute) or a filesystem URI."""
    text = str(location)
    if not is_uri(text):
        return LOCAL, str(Path(text).resolve())
    if "?" in text:
        raise UserError(f"{text}: options in a storage URI (?...) are not supported; point at "
                        "an S3-compatible endpoint with the environment variable "
                        "AWS_ENDPOINT_URL")
    try:
        return pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{text}: cannot open storage ({e})") from None


def copy_file(source_fs: pafs.FileSystem, source: str, target_fs: pafs.FileSystem,
              target: str, *, link: bool = False) -> None:
    """Copy one file, streaming. `link`: a hard link where both ends are this machine's disk,
    for a file never changed once complete (the two names share it)."""
    if link and isinstance(source_fs, pafs.LocalFileSystem) and isinstance(
            target_fs, pafs.LocalFileSystem):
        with suppress(FileNotFoundError):
            os.unlink(target)
        try:
            os.link(source, target)
            return
        except OSError:  # another filesystem, or one without hard links
            pass
    pafs.copy_files(source, target, source_filesystem=source_fs,
                    destination_filesystem=target_fs)


def replace_file(source_fs: pafs.FileSystem, source: str, target_fs: pafs.FileSystem,
                 target: str) -> None:
    """Copy one file next to `target` (its directory created if need be), then rename it over
    `target`: readers of `target` never see a half-written file."""
    parent = posixpath.dirname(target)
    target_fs.create_dir(parent, recursive=True)
    hidden = posixpath.join(parent, f".{posixpath.basename(target)}.{uuid.uuid4().hex}.tmp")
    copy_file(source_fs, source, target_fs, hidden)
    target_fs.move(hidden, target)


def upload_dir(directory: Path, target_fs: pafs.FileSystem, target: str) -> None:
    """Copy a directory of this disk, with everything in it, to `target` (files there that
    the directory also has are replaced)."""
    pafs.copy_files(str(directory), target, source_filesystem=LOCAL,
                    destination_filesystem=target_fs)


@contextmanager
def local_copy(location: str, *, directory: bool = False) -> Iterator[Path]:
    """The file or directory `location` (a local path, or a URI of any pyarrow filesystem,
    such as a trial checkpoint in s3://) on this disk: itself, or a copy deleted after the
    block. `directory`: nothing but a directory will do. A UserError raised in the block
    names `location`, not the copy."""
    what = "directory" if directory else "file or directory"
    if not is_uri(location):
        if not (Path(location).is_dir() if directory else Path(location).exists()):
            raise UserError(f"{location}: no such {what}")
        yield Path(location)
        return
    fs, path = open_uri(location)
    with tempfile.TemporaryDirectory(prefix="resnet-hpo-") as scratch:
        copy = os.path.join(scratch, posixpath.basename(path.rstrip("/")) or "copy")
        try:
            kind = fs.get_file_info(path).type
            if kind == pafs.FileType.NotFound or (directory
                                                  and kind != pafs.FileType.Directory):
                raise UserError(f"{location}: no such {what}")
            if kind == pafs.FileType.Directory:
                os.mkdir(copy)  # copy_files makes no empty directory
                pafs.copy_files(path, copy, source_filesystem=fs, destination_filesystem=LOCAL)
            else:
                copy_file(fs, path, LOCAL, copy)
        except (OSError, pa.ArrowInvalid) as e:
            raise UserError(f"{location}: cannot copy it to this machine ({e})") from None
        try:
            yield Path(copy)
        except UserError as e:
            raise UserError(str(e).replace(copy, location.rstrip("/"))) from None


@contextmanager
def local_dir(location: str) -> Iterator[Path]:
    """The directory `location` on this disk, as local_copy gives it."""
    with local_copy(location, directory=True) as path:
        yield path
