"""Data sources, decoded once into uint8 arrays at a fixed resolution.

A `Dataset` is a plain bundle of numpy arrays (images N x 3 x R x R uint8, int64 labels)
and class names. A search decodes it once in the driver and shares it with every trial
through Ray's object store, where numpy arrays are read zero-copy, so trials never decode
images. Augmentation happens later, batched on the training device (`trainable.augment`).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainable.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm", ".pbm"}
SPLIT_SEED = 0  # one fixed split per source, so every trial of a search sees the same val set
DIGITS_TEST_FRACTION = 0.2


@dataclass
class Split:
    images: np.ndarray  # uint8, (N, 3, R, R)
    labels: np.ndarray  # int64, (N,)

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


def load_dataset(source: str, resolution: int, val_fraction: float) -> Dataset:
    """Decode a source (digits, cifar10[:ROOT], cifar100[:ROOT], imagefolder:PATH)."""
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


def _take(split: Split, idx: np.ndarray) -> Split:
    return Split(split.images[idx], split.labels[idx])


def _split_off_val(pool: Split, val_fraction: float) -> tuple[Split, Split]:
    train_idx, val_idx = stratified_split(pool.labels, val_fraction, SPLIT_SEED)
    return _take(pool, train_idx), _take(pool, val_idx)


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


def _resize_array(images: np.ndarray, resolution: int) -> np.ndarray:
    return resize_square(torch.from_numpy(images), resolution).numpy()


def _digits(resolution: int, val_fraction: float) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 8x8, values 0..16
    images = _resize_array(np.repeat(gray[:, None], 3, axis=1), resolution)
    pool = Split(images, digits.target.astype(np.int64))
    trainval_idx, test_idx = stratified_split(pool.labels, DIGITS_TEST_FRACTION, SPLIT_SEED)
    train, val = _split_off_val(_take(pool, trainval_idx), val_fraction)
    return Dataset("digits", resolution, [str(d) for d in range(10)], train, val,
                   _take(pool, test_idx))


_CIFAR_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}


def _cifar(kind: str, root: Path, resolution: int, val_fraction: float) -> Dataset:
    from torchvision import datasets

    cls = datasets.CIFAR10 if kind == "cifar10" else datasets.CIFAR100
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
                f"{_CIFAR_ARCHIVES[kind]} or its extracted folder {cls.base_folder} in {root} "
                f"and use --data {kind}:{root}") from None

    def to_split(ds: datasets.CIFAR10) -> Split:
        images = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))
        return Split(_resize_array(images, resolution), np.asarray(ds.targets, dtype=np.int64))

    train, val = _split_off_val(to_split(train_set), val_fraction)
    return Dataset(kind, resolution, list(train_set.classes), train, val, to_split(test_set))


# --- imagefolder --------------------------------------------------------------------------

def _imagefolder(root: Path, resolution: int, val_fraction: float) -> Dataset:
    if not root.is_dir():
        raise UserError(f"imagefolder:{root}: no such folder; expected one sub-folder of "
                        "images per class (or train/, val/, test/ folders of those)")
    split_dirs = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    train_root = split_dirs.get("train", root)
    class_names = _class_names(train_root)
    skipped: list[Path] = []
    pools = {name: _decode_folder(path, class_names, resolution, skipped)
             for name, path in split_dirs.items()} or {
        "train": _decode_folder(root, class_names, resolution, skipped)}
    if skipped:
        shown = ", ".join(str(p.relative_to(root)) for p in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warnings.warn(f"imagefolder:{root}: skipped {len(skipped)} unreadable or non-image "
                      f"files ({shown}{more})", stacklevel=2)
    if "val" in pools:
        train, val = pools["train"], pools["val"]
    else:
        train, val = _split_off_val(pools["train"], val_fraction)
    return Dataset(f"imagefolder:{root}", resolution, class_names, train, val, pools.get("test"))


def _class_names(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) < 2:
        found = f"only '{names[0]}'" if names else "none"
        raise UserError(f"imagefolder:{folder}: needs one sub-folder per class and at least 2 "
                        f"classes, found {found}")
    return names


def _decode_folder(folder: Path, class_names: list[str], resolution: int,
                   skipped: list[Path]) -> Split:
    files: list[Path] = []
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
        files += images
        labels += [label] * len(images)
    cached = _cache_path(files, resolution)
    if cached.exists():
        with np.load(cached) as saved:
            skipped.extend(Path(p) for p in saved["unreadable"])
            return Split(saved["images"], saved["labels"])
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = list(pool.map(lambda p: decode_image(p, resolution), files))
    readable = [(image, label) for image, label in zip(decoded, labels, strict=True)
                if image is not None]
    unreadable = [path for path, image in zip(files, decoded, strict=True) if image is None]
    skipped.extend(unreadable)
    for label, name in enumerate(class_names):
        if not any(readable_label == label for _, readable_label in readable):
            raise UserError(f"imagefolder: class folder {folder / name} has no readable images")
    split = Split(np.stack([image for image, _ in readable]),
                  np.asarray([label for _, label in readable], dtype=np.int64))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp.npz")
    np.savez(tmp, images=split.images, labels=split.labels,
             unreadable=np.array([str(p) for p in unreadable], dtype=str))
    tmp.replace(cached)
    return split


def _cache_path(files: list[Path], resolution: int) -> Path:
    """Decoded arrays are keyed by resolution and every file's path, size and mtime."""
    digest = hashlib.sha256(f"v2 {resolution}".encode())
    for p in files:
        st = p.stat()
        digest.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return cache_dir() / "decoded" / f"{digest.hexdigest()[:24]}.npz"


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
