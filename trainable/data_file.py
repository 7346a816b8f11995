"""The decoded-data file: one per (source, resolution) on each node, mapped by every trial.

A decoded dataset is a directory of three files:

    images.npy   uint8 (rows, 3, R, R): the train, val and test splits one after another
    labels.npy   int64 (rows,)
    meta.json    source, resolution, class names, each split's [start, stop) rows, and the
                 files that could not be decoded

A writer fills the files in a hidden sibling directory, a chunk at a time, and renames it
when it is complete: a directory under its final name is always whole, and a killed decode
leaves only a hidden directory, which the next writer of that directory removes. In a run's
storage (RUN/data/KEY) meta.json is copied last, so there its presence says the same.
Writers and fetchers of one directory take a file lock, so one process per node does the
work and the others wait for it.
"""

from __future__ import annotations

import fcntl
import json
import os
import posixpath
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np
import pyarrow.fs as pafs
from tqdm import tqdm

from trainable.errors import UserError
from trainable.storage import LOCAL, copy_file, open_uri, replace_file

IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
META_FILE = "meta.json"
RUN_DATA_DIR = "data"  # RUN/data/KEY: where a search publishes its decoded data
WRITE_BUFFER_BYTES = 2**20
PROGRESS_AFTER_S = 1.0  # a job done sooner shows no progress
PROGRESS_REDRAW_S = 0.2


def is_complete(directory: Path) -> bool:
    return (directory / META_FILE).is_file()


def read_decoded(directory: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(meta, images, labels) of a complete directory; the arrays are read-only maps."""
    meta = read_meta(directory)
    return (meta, np.load(directory / IMAGES_FILE, mmap_mode="r"),
            np.load(directory / LABELS_FILE, mmap_mode="r"))


def read_meta(directory: Path) -> dict[str, Any]:
    return dict(json.loads((directory / META_FILE).read_text()))


@contextmanager
def node_lock(directory: Path) -> Iterator[None]:
    """Held while `directory` is written or fetched; released when its holder dies."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f"{directory.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _hidden_sibling(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def _remove_partial(directory: Path) -> None:
    """What killed writers or fetchers of `directory` left (call with its node_lock held)."""
    for partial in directory.parent.glob(f".{directory.name}.*.tmp"):
        shutil.rmtree(partial, ignore_errors=True)


@contextmanager
def written_whole(directory: Path) -> Iterator[Path]:
    """A hidden sibling of `directory` to write into, renamed to `directory` when the block
    ends and removed if it raises, with what killed writers left (hold its node_lock)."""
    _remove_partial(directory)
    hidden = _hidden_sibling(directory)
    hidden.mkdir(parents=True)
    try:
        yield hidden
    except BaseException:
        shutil.rmtree(hidden, ignore_errors=True)
        raise
    hidden.rename(directory)


def _create_npy(path: Path, dtype: type, shape: tuple[int, ...]) -> BinaryIO:
    """An .npy file of `shape` (zeros, sparse on disk), open at its first row for writing."""
    file = open(path, "w+b", buffering=WRITE_BUFFER_BYTES)  # noqa: SIM115 (the writer closes it)
    np.lib.format.write_array_header_1_0(file, {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
        "shape": shape})
    file.truncate(file.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return file


class DecodedWriter:
    """Writes a decoded directory split by split, in chunks of rows, never the whole array.

        with DecodedWriter(directory, rows, resolution, "digits") as writer:
            writer.start_split("train"); writer.append(images, labels); ...
            writer.finish(class_names)

    `rows` is how many images there may be; files that turn out unreadable (`skip`) leave
    unused rows at the end, which meta.json does not count. An exception inside the block
    removes everything written.
    """

    def __init__(self, directory: Path, rows: int, resolution: int, source: str):
        self.directory, self.rows, self.resolution, self.source = (
            directory, rows, resolution, source)
        self.hidden = _hidden_sibling(directory)
        self.written = 0
        self.splits: dict[str, list[int]] = {}
        self.unreadable: list[str] = []
        self.progress = Progress(rows, f"decoding {source} at {resolution}px")
        self._split = ""

    def __enter__(self) -> DecodedWriter:
        _remove_partial(self.directory)
        self.hidden.mkdir(parents=True)
        self._images = _create_npy(self.hidden / IMAGES_FILE, np.uint8,
                                   (self.rows, 3, self.resolution, self.resolution))
        self._labels = _create_npy(self.hidden / LABELS_FILE, np.int64, (self.rows,))
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._images.close()
        self._labels.close()
        if exc_type is not None:
            shutil.rmtree(self.hidden, ignore_errors=True)

    def start_split(self, name: str) -> None:
        self._split = name
        self.splits[name] = [self.written, self.written]

    def append(self, images: np.ndarray, labels: np.ndarray) -> None:
        """Rows (k, 3, R, R) uint8 with their labels, after those appended before."""
        if len(images) + self.written > self.rows:
            raise ValueError(f"{self.source}: more than the {self.rows} rows announced")
        self._images.write(np.ascontiguousarray(images, dtype=np.uint8).data)
        self._labels.write(np.ascontiguousarray(labels, dtype=np.int64).data)
        self.written += len(images)
        self.splits[self._split][1] = self.written
        self.progress.advance(len(images))

    def skip(self, name: str) -> None:
        """A file that could not be decoded: named in meta.json, given no row."""
        self.unreadable.append(name)
        self.progress.advance(1)

    def finish(self, class_names: list[str]) -> None:
        for array_file in (self._images, self._labels):
            array_file.flush()
            os.fsync(array_file.fileno())
        meta = {"source": self.source, "resolution": self.resolution,
                "class_names": class_names, "splits": self.splits, "rows": self.written,
                "unreadable": self.unreadable}
        with open(self.hidden / META_FILE, "w") as meta_file:
            json.dump(meta, meta_file)
            meta_file.flush()
            os.fsync(meta_file.fileno())
        self.hidden.rename(self.directory)
        self.progress.finish()


class Progress:
    """A long job's progress on stderr: tqdm's bar on a terminal, a line every 10% elsewhere
    (a log), each with the rate; nothing for a job done within PROGRESS_AFTER_S."""

    def __init__(self, total: int, what: str, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.what, self.clock = max(total, 1), what, clock
        self.stream = stream or sys.stderr
        self.bar = tqdm(total=total, desc=what, unit=" images", file=self.stream,
                        delay=PROGRESS_AFTER_S, mininterval=PROGRESS_REDRAW_S,
                        disable=not self.stream.isatty())
        self.done = 0
        self.started = clock()
        self.tenths = 0  # of the total, reported as lines

    def advance(self, count: int) -> None:
        self.done += count
        self.bar.update(count)
        elapsed = self.clock() - self.started
        if self.bar.disable and elapsed >= PROGRESS_AFTER_S and (
                10 * self.done // self.total > self.tenths):
            self.tenths = 10 * self.done // self.total
            print(f"{self.what}: {self.done}/{self.total} images "
                  f"({100 * self.done // self.total}%), {self.done / elapsed:,.0f} images/s",
                  file=self.stream, flush=True)

    def finish(self) -> None:
        self.bar.close()
        elapsed = self.clock() - self.started
        if elapsed >= PROGRESS_AFTER_S:
            print(f"{self.what}: {self.done} images in {elapsed:.1f} s "
                  f"({self.done / elapsed:,.0f} images/s)", file=self.stream, flush=True)


# --- a run's storage: one copy per search, fetched once per node ---------------------------
# Decoded files never change once complete, so a copy on the same disk is a hard link.

def storage_location(run_uri: str, key: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path, uri) of RUN/data/KEY, for a local path or any pyarrow URI."""
    fs, path = open_uri(run_uri)
    return (fs, posixpath.join(path.rstrip("/"), RUN_DATA_DIR, key),
            posixpath.join(run_uri.rstrip("/"), RUN_DATA_DIR, key))


def publish(directory: Path, run_uri: str, key: str) -> None:
    """Put a complete decoded directory in the run's storage, unless it is there already."""
    fs, target, _ = storage_location(run_uri, key)
    if fs.get_file_info(posixpath.join(target, META_FILE)).type == pafs.FileType.File:
        return
    fs.create_dir(target, recursive=True)
    for name in (IMAGES_FILE, LABELS_FILE):
        copy_file(LOCAL, str(directory / name), fs, posixpath.join(target, name), link=True)
    replace_file(LOCAL, str(directory / META_FILE), fs, posixpath.join(target, META_FILE))


def fetch(run_uri: str, key: str, directory: Path) -> None:
    """Copy the run's decoded data into this node's `directory` (hold its node_lock)."""
    fs, source, uri = storage_location(run_uri, key)
    if fs.get_file_info(posixpath.join(source, META_FILE)).type != pafs.FileType.File:
        raise UserError(f"{uri}: the search's decoded data is not there (or not complete); "
                        "was the run directory moved or cleaned while trials still ran?")
    with written_whole(directory) as hidden:
        for name in (IMAGES_FILE, LABELS_FILE, META_FILE):
            copy_file(fs, posixpath.join(source, name), LOCAL, str(hidden / name), link=True)
            with open(hidden / name, "rb") as file:
                os.fsync(file.fileno())
