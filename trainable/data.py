"""Data sources, decoded once per node into one file of uint8 images at a fixed resolution.

`decode_dataset` decodes a source (in parallel over this machine's cores, a chunk at a time)
into a file in the cache (`trainable.data_file`) and returns a `DecodedData`: a small handle
that a search gives every trial. `open()` memory-maps the file as a `Dataset` of numpy arrays
(images N x 3 x R x R uint8, int64 labels), so the trials of a node share the OS page cache
and no process holds a private copy; a node without the file fetches it once from the run's
storage. Augmentation happens later, batched on the training device (`trainable.augment`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import tarfile
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from trainable.data_file import (
    DecodedWriter,
    fetch,
    is_complete,
    node_lock,
    publish,
    read_decoded,
    read_meta,
)
from trainable.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm", ".pbm"}
SPLIT_SEED = 0  # one fixed split per source, so every trial of a search sees the same val set
DIGITS_TEST_FRACTION = 0.2
CACHE_FORMAT = "v3"  # part of every key: a new layout never reads an old one
CHUNK_BYTES = 16 * 2**20  # decoded images resized together (arrays)
IN_FLIGHT_PER_WORKER = 4  # files decoded ahead of the writer, per thread
CACHE_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}

T = TypeVar("T")
U = TypeVar("U")


@dataclass
class Split:
    images: np.ndarray  # uint8, (N, 3, R, R)
    labels: np.ndarray  # int64, (N,)
    # What the rows are: the split of a decoded file (DecodedData.key:split name), else None
    key: str | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    source: str
    resolution: int
    class_names: list[str]
    train: Split
    val: Split
    test: Split | None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def summary(self) -> str:
        test = f", {len(self.test)} test" if self.test is not None else ""
        return (f"{self.source}: {self.num_classes} classes, {len(self.train)} train, "
                f"{len(self.val)} val{test} images at {self.resolution}px")


def cache_dir() -> Path:
    """Where decoded arrays and downloaded datasets live ($RESNET_HPO_CACHE)."""
    return Path(os.environ.get("RESNET_HPO_CACHE", Path.home() / ".cache" / "resnet-hpo"))


@dataclass(frozen=True)
class DecodedData:
    """Where a decoded dataset is: this node's cache, and for a search the run's storage
    (RUN/data/KEY), from which a node without it fetches it once. Small and picklable: what
    a search gives every trial instead of the arrays."""
    key: str
    run_uri: str | None = None

    @property
    def directory(self) -> Path:
        return cache_dir() / "decoded" / self.key

    def open(self) -> Dataset:
        """The arrays, memory-mapped from this node's copy (fetched first if it has none)."""
        if not is_complete(self.directory):
            if self.run_uri is None:
                raise UserError(f"{self.directory}: the decoded data is not in this node's "
                                "cache (was it removed?); run the command again to decode it")
            with node_lock(self.directory):
                if not is_complete(self.directory):
                    fetch(self.run_uri, self.key, self.directory)
        meta, images, labels = read_decoded(self.directory)
        splits = {name: Split(images[start:stop], labels[start:stop], f"{self.key}:{name}")
                  for name, (start, stop) in meta["splits"].items()}
        return Dataset(meta["source"], meta["resolution"], meta["class_names"],
                       splits["train"], splits["val"], splits.get("test"))

    def published(self, run_uri: str) -> DecodedData:
        """The same data, also in the run's storage for the trials of other nodes."""
        publish(self.directory, run_uri, self.key)
        return replace(self, run_uri=run_uri)


def load_dataset(source: str, resolution: int, val_fraction: float) -> Dataset:
    """The source's splits, decoded into this node's cache if they are not there yet."""
    return decode_dataset(source, resolution, val_fraction).open()


def decode_dataset(source: str, resolution: int, val_fraction: float) -> DecodedData:
    """Decode a source (digits, cifar10[:ROOT], cifar100[:ROOT], imagefolder:PATH) into this
    node's cache, unless an earlier decode of the same files is there."""
    kind, _, arg = source.partition(":")
    if kind == "digits" and not arg:
        return _digits(resolution, val_fraction)
    if kind in ("cifar10", "cifar100"):
        return _cifar(kind, Path(arg) if arg else cache_dir() / "datasets", resolution,
                      val_fraction)
    if kind == "imagefolder" and arg:
        root = Path(arg).expanduser()
        try:
            return _imagefolder(root, resolution, val_fraction)
        except OSError as e:  # a folder or file we may not read, a vanished mount
            raise UserError(f"imagefolder:{root}: {e.strerror or e}: {e.filename}") from None
    raise UserError(f"data source '{source}': use digits, cifar10[:ROOT], cifar100[:ROOT] or "
                    "imagefolder:PATH")


def _cache_key(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, (CACHE_FORMAT, *parts))).encode()).hexdigest()[:24]


def _decoded(key: str, write: Callable[[Path], None]) -> DecodedData:
    """The handle of `key`, after `write(directory)` made it if this node has none; one
    process per node writes, the others wait and find it written."""
    decoded = DecodedData(key)
    if is_complete(decoded.directory):
        return decoded
    try:
        with node_lock(decoded.directory):
            if not is_complete(decoded.directory):
                write(decoded.directory)
    except OSError as e:
        cache = cache_dir()
        if e.errno in CACHE_WRITE_ERRORS or Path(e.filename or "/").is_relative_to(cache):
            raise UserError(f"{cache}: cannot write the decoded data there ({e.strerror}); "
                            "free some space or set RESNET_HPO_CACHE to another folder") from None
        raise
    return decoded


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """Indices (kept, held_out): `fraction` of every class held out, at least one image of
    each class with two or more."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_held = min(len(idx) - 1, max(1, round(len(idx) * fraction))) if len(idx) > 1 else 0
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def _split_off_val(indices: np.ndarray, labels: np.ndarray,
                   val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """`indices` (into `labels`) split into (train, val), stratified by class."""
    train, val = stratified_split(labels[indices], val_fraction, SPLIT_SEED)
    return indices[train], indices[val]


def resize_square(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 N x C x H x W -> uint8 N x C x R x R: shorter side to R (antialiased), centre crop."""
    h, w = images.shape[-2:]
    if (h, w) != (resolution, resolution):
        scale = resolution / min(h, w)
        size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
        images = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True,
                               align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
        top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        images = images[..., top:top + resolution, left:left + resolution]
    return images.contiguous()


def _write_arrays(directory: Path, source: str, resolution: int, class_names: list[str],
                  splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Decoded arrays in memory (split -> (images N x 3 x H x W uint8, labels, the indices
    of the split's rows)), resized a chunk at a time into a decoded directory."""
    rows = max(1, CHUNK_BYTES // (3 * resolution**2))
    with DecodedWriter(directory, sum(len(idx) for *_, idx in splits.values()), resolution,
                       source) as writer:
        for name, (images, labels, indices) in splits.items():
            writer.start_split(name)
            for start in range(0, len(indices), rows):
                chunk = indices[start:start + rows]
                writer.append(resize_square(torch.from_numpy(np.ascontiguousarray(
                    images[chunk])), resolution).numpy(), labels[chunk])
        writer.finish(class_names)


def _digits(resolution: int, val_fraction: float) -> DecodedData:
    def write(directory: Path) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        grey = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 8x8, values 0..16
        images = np.repeat(grey[:, None], 3, axis=1)
        labels = digits.target.astype(np.int64)
        trainval, test = stratified_split(labels, DIGITS_TEST_FRACTION, SPLIT_SEED)
        train, val = _split_off_val(trainval, labels, val_fraction)
        _write_arrays(directory, "digits", resolution, [str(d) for d in range(10)],
                      {name: (images, labels, idx)
                       for name, idx in (("train", train), ("val", val), ("test", test))})

    return _decoded(_cache_key("digits", resolution, val_fraction), write)


_CIFAR_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}


def _cifar(kind: str, root: Path, resolution: int, val_fraction: float) -> DecodedData:
    from torchvision import datasets

    cls = datasets.CIFAR10 if kind == "cifar10" else datasets.CIFAR100

    def write(directory: Path) -> None:
        try:
            train_set, test_set = cls(str(root), train=True), cls(str(root), train=False)
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    train_set = cls(str(root), train=True, download=True)
                    test_set = cls(str(root), train=False)
            except (OSError, RuntimeError, tarfile.TarError) as e:
                raise UserError(
                    f"{kind}: no local copy under {root} and the download failed ({e}); put "
                    f"{_CIFAR_ARCHIVES[kind]} or its extracted folder {cls.base_folder} in "
                    f"{root} and use --data {kind}:{root}") from None

        def arrays(ds: datasets.CIFAR10) -> tuple[np.ndarray, np.ndarray]:
            return ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets, dtype=np.int64)

        (train_images, train_labels), (test_images, test_labels) = (
            arrays(train_set), arrays(test_set))
        train, val = _split_off_val(np.arange(len(train_labels)), train_labels, val_fraction)
        _write_arrays(directory, kind, resolution, list(train_set.classes), {
            "train": (train_images, train_labels, train),
            "val": (train_images, train_labels, val),
            "test": (test_images, test_labels, np.arange(len(test_labels)))})

    return _decoded(_cache_key(kind, root.resolve(), resolution, val_fraction), write)


# --- imagefolder --------------------------------------------------------------------------

@dataclass
class _Files:
    """Image files of one split, with their labels and the folder they were listed from."""
    folder: Path
    paths: list[Path]
    labels: np.ndarray

    def take(self, idx: np.ndarray) -> _Files:
        return _Files(self.folder, [self.paths[i] for i in idx], self.labels[idx])


def _imagefolder(root: Path, resolution: int, val_fraction: float) -> DecodedData:
    if not root.is_dir():
        raise UserError(f"imagefolder:{root}: no such folder; expected one sub-folder of "
                        "images per class (or train/, val/, test/ folders of those)")
    split_dirs = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    train_root = split_dirs.get("train", root)
    class_names = _class_names(train_root)
    skipped: list[Path] = []  # files that are no images; those that fail to decode follow
    splits = {name: _list_folder(path, class_names, skipped)
              for name, path in split_dirs.items()} or {
        "train": _list_folder(root, class_names, skipped)}
    key_parts: list[object] = [f"imagefolder:{root.resolve()}", resolution]
    if "val" not in splits:
        train, val = _split_off_val(np.arange(len(splits["train"].labels)),
                                    splits["train"].labels, val_fraction)
        splits = {"train": splits["train"].take(train), "val": splits["train"].take(val),
                  **{k: v for k, v in splits.items() if k != "train"}}
        key_parts.append(val_fraction)  # the split depends on it; given folders do not
    for name, files in splits.items():
        key_parts.append(name)
        for p in files.paths:
            st = p.stat()
            key_parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    source = f"imagefolder:{root}"

    def write(directory: Path) -> None:
        readable: dict[Path, np.ndarray] = {}  # class folder's parent -> readable per class
        with DecodedWriter(directory, sum(len(f.paths) for f in splits.values()), resolution,
                           source) as writer:
            for name, files in splits.items():
                writer.start_split(name)
                counts = _decode_files(writer, files, resolution, root, len(class_names))
                readable[files.folder] = readable.get(files.folder, 0 * counts) + counts
            for folder, counts in readable.items():
                for label in np.flatnonzero(counts == 0):
                    raise UserError(f"imagefolder: class folder {folder / class_names[label]} "
                                    "has no readable images")
            writer.finish(class_names)

    decoded = _decoded(_cache_key(*key_parts), write)
    shown = [str(p.relative_to(root)) for p in skipped] + read_meta(decoded.directory)[
        "unreadable"]
    if shown:
        more = f" and {len(shown) - 3} more" if len(shown) > 3 else ""
        warnings.warn(f"imagefolder:{root}: skipped {len(shown)} unreadable or non-image "
                      f"files ({', '.join(shown[:3])}{more})", stacklevel=3)
    return decoded


def _class_names(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) < 2:
        found = f"only '{names[0]}'" if names else "none"
        raise UserError(f"imagefolder:{folder}: needs one sub-folder per class and at least 2 "
                        f"classes, found {found}")
    return names


def _list_folder(folder: Path, class_names: list[str], skipped: list[Path]) -> _Files:
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        class_dir = folder / name
        entries = sorted(class_dir.rglob("*")) if class_dir.is_dir() else []
        entries = [p for p in entries if p.is_file()]
        images = [p for p in entries
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
        skipped.extend(sorted(set(entries) - set(images)))
        if not images:
            raise UserError(f"imagefolder: class folder {class_dir} has no images (looked for "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
        paths += images
        labels += [label] * len(images)
    return _Files(folder, paths, np.asarray(labels, dtype=np.int64))


def _decode_files(writer: DecodedWriter, files: _Files, resolution: int, root: Path,
                  num_classes: int) -> np.ndarray:
    """Decode into the writer in parallel, in order; returns the readable images per class."""
    readable = np.zeros(num_classes, dtype=np.int64)
    workers = os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = _in_order(pool, lambda p: decode_image(p, resolution), files.paths,
                            IN_FLIGHT_PER_WORKER * workers)
        for path, label, image in zip(files.paths, files.labels, decoded, strict=True):
            if image is None:
                writer.skip(str(path.relative_to(root)))
            else:
                writer.append(image[None], label[None])
                readable[label] += 1
    return readable


def _in_order(pool: ThreadPoolExecutor, fn: Callable[[T], U], items: Iterable[T],
              ahead: int) -> Iterator[U]:
    """`map` that keeps at most `ahead` results waiting, not every item's."""
    pending: deque[Future[U]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def decode_image(path: Path, resolution: int) -> np.ndarray | None:
    """RGB uint8 3 x R x R, or None for a corrupt, truncated or unsupported file."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as file:
            image: Image.Image = ImageOps.exif_transpose(file)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
                grey = np.asarray(image, dtype=np.float64)
                peak = 65535.0 if image.mode.startswith("I;16") else max(grey.max(), 1.0)
                image = Image.fromarray(np.round(grey * (255.0 / peak)).astype(np.uint8))
            elif image.mode == "P":  # palette transparency converts cleanly only through RGBA
                image = image.convert("RGBA")
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    tensor = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
    return resize_square(tensor, resolution)[0].numpy()
