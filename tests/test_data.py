import warnings
from collections import Counter
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
from PIL import Image

import trainable.data
from tests.conftest import COLOURS, write_class_tree
from trainable import Dataset, Split, UserError, load_dataset
from trainable.data import stratified_split


def image_counts(*splits: Split) -> Counter[tuple[bytes, int]]:
    return Counter((image.tobytes(), int(label)) for split in splits
                   for image, label in zip(split.images, split.labels, strict=True))


def colour_of(image: np.ndarray) -> str:
    """The class write_class_tree gave an image: its brightest mean channel."""
    return ("red", "green", "blue")[int(image.reshape(3, -1).mean(1).argmax())]


def test_digits_has_a_fixed_test_split_disjoint_from_train_and_val() -> None:
    from sklearn.datasets import load_digits

    data = load_dataset("digits", 8, 0.1)  # 8px: the original pixels, no resampling
    digits = load_digits()
    grey = np.round(digits.images * (255 / 16)).astype(np.uint8)
    everything = Split(np.repeat(grey[:, None], 3, axis=1), digits.target)
    assert data.test is not None and data.class_names == [str(d) for d in range(10)]
    # Every original image lands in exactly one split.
    assert image_counts(data.train, data.val, data.test) == image_counts(everything)
    assert len(data.test) == pytest.approx(0.2 * len(everything), abs=10)
    assert set(np.bincount(data.test.labels)) <= set(range(33, 39))  # stratified
    again = load_dataset("digits", 8, 0.1)
    assert again.test is not None
    for a, b in ((data.train, again.train), (data.val, again.val), (data.test, again.test)):
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)


def test_digits_resolution_and_layout() -> None:
    data = load_dataset("digits", 16, 0.1)
    assert data.train.images.shape[1:] == (3, 16, 16) and data.train.images.dtype == np.uint8
    assert data.train.labels.dtype == np.int64
    assert len(data.val) == pytest.approx(0.1 * (len(data.train) + len(data.val)), abs=10)


def test_stratified_split_is_seeded_disjoint_and_keeps_every_class() -> None:
    labels = np.repeat(np.arange(4), [10, 20, 2, 1])
    kept, held = stratified_split(labels, 0.2, seed=3)
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[held], minlength=4).tolist() == [2, 4, 1, 0]
    again = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(kept, again[0]) and np.array_equal(held, again[1])


def test_imagefolder_with_train_val_test_folders(split_tree: Path) -> None:
    data = load_dataset(f"imagefolder:{split_tree}", 12, 0.5)
    assert data.class_names == sorted(COLOURS)
    assert data.test is not None
    assert (len(data.train), len(data.val), len(data.test)) == (24, 9, 12)
    assert data.train.images.shape == (24, 3, 12, 12)
    for split in (data.train, data.val, data.test):
        names = [colour_of(image) for image in split.images]
        assert names == [data.class_names[label] for label in split.labels]


def test_imagefolder_without_split_folders_splits_by_class(flat_tree: Path) -> None:
    data: Dataset = load_dataset(f"imagefolder:{flat_tree}", 12, 0.2)
    assert data.class_names == ["blue", "green", "red"] and data.test is None
    assert np.bincount(data.val.labels).tolist() == [2, 2, 2]
    assert np.bincount(data.train.labels).tolist() == [8, 8, 8]
    assert image_counts(data.train, data.val) == image_counts(
        load_dataset(f"imagefolder:{flat_tree}", 12, 0.5).train,
        load_dataset(f"imagefolder:{flat_tree}", 12, 0.5).val)
    for split in (data.train, data.val):
        assert [colour_of(i) for i in split.images] == [data.class_names[c] for c in split.labels]


def save_in_every_mode(folder: Path, rgb: tuple[int, int, int]) -> int:
    """Write one solid image per awkward format; returns how many were written."""
    solid = Image.new("RGB", (10, 14), rgb)
    solid.convert("L").save(folder / "grey.png")
    solid.convert("P").save(folder / "palette.gif")
    solid.convert("RGBA").save(folder / "alpha.png")
    solid.convert("CMYK").save(folder / "cmyk.jpg")
    solid.save(folder / "upper.PNG")
    solid.save(folder / "upper.JPG", format="JPEG")
    return 6


def test_awkward_image_modes_load_as_rgb_and_bad_files_are_skipped_with_one_warning(
        tmp_path: Path) -> None:
    root = tmp_path / "tree"
    n_good = 0
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        n_good += save_in_every_mode(root / name, rgb)
    grey16 = (np.full((12, 12), 0.5) * 65535).astype(np.uint16)
    Image.fromarray(grey16).save(root / "red" / "sixteen_bit.png")
    good_png = (root / "red" / "alpha.png").read_bytes()
    (root / "red" / "truncated.png").write_bytes(good_png[:60])
    (root / "green" / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (root / "blue" / "notes.txt").write_text("labels for the blue class")
    (root / "blue" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    source = f"imagefolder:{root}"
    for attempt in ("decoded", "cached"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = load_dataset(source, 8, 0.25)
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1, (attempt, messages)
        assert "skipped 4 unreadable or non-image files" in messages[0]
        assert "and 1 more" in messages[0] and "\n" not in messages[0]
        images = np.concatenate([data.train.images, data.val.images])
        labels = np.concatenate([data.train.labels, data.val.labels])
        assert len(images) == n_good + 1 and images.shape[1:] == (3, 8, 8)
    half_grey = [image for image in images if np.all(image == 127)]
    assert len(half_grey) == 1  # the 16-bit PNG at half scale, not clipped to white
    for image, label in zip(images, labels, strict=True):
        if np.ptp(image.reshape(3, -1).mean(1)) > 40:  # grey copies carry no colour
            assert colour_of(image) == data.class_names[label]


def one_line_error(source: str) -> str:
    with pytest.raises(UserError) as err:
        load_dataset(source, 8, 0.2)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_path_is_one_clear_error(tmp_path: Path) -> None:
    message = one_line_error(f"imagefolder:{tmp_path / 'absent'}")
    assert "no such folder" in message and "one sub-folder of images per class" in message


def test_empty_folder_is_one_clear_error(tmp_path: Path) -> None:
    assert "at least 2 classes, found none" in one_line_error(f"imagefolder:{tmp_path}")


def test_single_class_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "a.png")
    assert "found only 'cats'" in one_line_error(f"imagefolder:{tmp_path}")


def test_class_folder_without_images_is_one_clear_error(tmp_path: Path) -> None:
    write_class_tree(tmp_path, per_class=2, size=8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    message = one_line_error(f"imagefolder:{tmp_path}")
    assert f"class folder {tmp_path / 'empty'} has no images" in message


def test_class_folder_of_only_corrupt_images_is_one_clear_error(tmp_path: Path) -> None:
    write_class_tree(tmp_path, per_class=2, size=8)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        message = one_line_error(f"imagefolder:{tmp_path}")
    assert "broken has no readable images" in message


def test_unreadable_folder_is_one_clear_error(flat_tree: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(folder: Path) -> list[str]:  # root may read anything, so fake the refusal
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(trainable.data, "_class_names", denied)
    message = one_line_error(f"imagefolder:{flat_tree}")
    assert message == f"imagefolder:{flat_tree}: Permission denied: {flat_tree}"


def test_unknown_source_names_the_choices() -> None:
    message = one_line_error("imagenet")
    assert "use digits, cifar10[:ROOT], cifar100[:ROOT] or imagefolder:PATH" in message


def test_cifar_without_local_copy_or_network_says_what_to_put_where(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    import torchvision.datasets.cifar

    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "cifar"
    message = one_line_error(f"cifar10:{root}")
    assert f"no local copy under {root}" in message and "network is unreachable" in message
    assert f"put cifar-10-python.tar.gz or its extracted folder cifar-10-batches-py in {root}" \
        in message
    assert f"--data cifar10:{root}" in message
    assert "cifar-100-python.tar.gz" in one_line_error(f"cifar100:{root}")
