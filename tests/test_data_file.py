"""The decoded-data file: written a chunk at a time, never used half-written, fetched once
per node from a run's storage, and served to training without a private copy."""

from __future__ import annotations

import errno
import io
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import trainable.data
import trainable.data_file
import trainable.train as train_module
from tests.conftest import all_at_the_node_lock, write_class_tree
from trainable import Dataset, Split, TrainConfig, UserError, fit, load_dataset
from trainable.data import DecodedData, decode_dataset
from trainable.data_file import IMAGES_FILE, META_FILE, RUN_DATA_DIR, Progress
from trainable.device_images import DeviceImages

REPO = Path(__file__).resolve().parents[1]


def test_decode_writes_one_mapped_file_and_trials_get_a_small_handle() -> None:
    decoded = decode_dataset("digits", 8, 0.1)
    assert len(pickle.dumps(decoded)) < 300  # what a search gives each trial: no arrays
    data = pickle.loads(pickle.dumps(decoded)).open()
    splits = [data.train, data.val, data.test]
    stop = 0
    for split in splits:
        assert split is not None and isinstance(split.images, np.memmap)
        assert str(split.images.filename) == str(decoded.directory / IMAGES_FILE)
        assert not split.images.flags.writeable
        # train, val and test follow each other in the one file
        assert split.images.ctypes.data == splits[0].images.ctypes.data + stop * 3 * 8 * 8
        stop += len(split)
    assert stop == 1797  # every digit, once


def test_decoding_holds_a_few_images_at_a_time_not_the_list(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_class_tree(tmp_path / "tree", per_class=40, size=12)
    decode = trainable.data.decode_image
    live = [0]
    most = [0]
    lock = threading.Lock()

    def counted(path: Path, resolution: int) -> np.ndarray | None:
        image = decode(path, resolution)
        assert image is not None
        with lock:
            live[0] += 1
            most[0] = max(most[0], live[0])

        def gone() -> None:
            with lock:
                live[0] -= 1

        weakref.finalize(image, gone)
        return image

    monkeypatch.setattr(trainable.data, "decode_image", counted)
    data = load_dataset(f"imagefolder:{root}", 8, 0.25)
    assert len(data.train) + len(data.val) == 120
    window = trainable.data.IN_FLIGHT_PER_WORKER * (os.cpu_count() or 1)
    assert most[0] <= window + 2, f"{most[0]} decoded images alive at once"


KILLED_DECODE = """
import sys, threading
from pathlib import Path
import trainable.data
decode = trainable.data.decode_image
decoded, lock = [0], threading.Lock()
def stalling(path, resolution):
    with lock:
        decoded[0] += 1
        n = decoded[0]
    if n == 10:  # a few images in: tell the test, which kills this process
        Path(sys.argv[2]).touch()
    if n >= 10:
        threading.Event().wait()
    return decode(path, resolution)
trainable.data.decode_image = stalling
trainable.data.load_dataset(sys.argv[1], 8, 0.25)
"""


def test_a_killed_decode_is_never_used_and_its_leftovers_go(tmp_path: Path) -> None:
    root = write_class_tree(tmp_path / "tree", per_class=30, size=12)
    decoded_root = Path(os.environ["RESNET_HPO_CACHE"]) / "decoded"
    before = set(decoded_root.glob("*")) if decoded_root.exists() else set()
    in_flight = tmp_path / "ten-images-decoded"
    child = subprocess.Popen([sys.executable, "-c", KILLED_DECODE, f"imagefolder:{root}",
                              str(in_flight)],
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120
    while not in_flight.exists():  # the decode stalls there until it is killed
        assert child.poll() is None and time.monotonic() < deadline, "the decode never began"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    [partial] = decoded_root.glob(".*.tmp")
    assert not [p for p in set(decoded_root.glob("[!.]*")) - before if p.is_dir()]

    data = load_dataset(f"imagefolder:{root}", 8, 0.25)
    assert len(data.train) + len(data.val) == 90
    assert data.train.images[-1].any() and data.val.images[-1].any()  # written, not zeros
    assert not partial.exists()


def test_a_full_disk_is_one_clear_line_and_leaves_nothing_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "small-disk"
    monkeypatch.setenv("RESNET_HPO_CACHE", str(cache))

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainable.data_file.DecodedWriter, "append", full)
    with pytest.raises(UserError) as err:
        load_dataset("digits", 8, 0.1)
    assert str(err.value) == (f"{cache}: cannot write the decoded data there (No space left on "
                              "device); free some space or set RESNET_HPO_CACHE to another "
                              "folder")
    assert [p.suffix for p in (cache / "decoded").iterdir()] == [".lock"]  # no partial file


def test_a_node_fetches_published_data_once_while_its_trials_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = decode_dataset("digits", 8, 0.1)
    run = tmp_path / "run"
    published = decoded.published(str(run))
    stored = run / RUN_DATA_DIR / decoded.key
    assert (stored / IMAGES_FILE).samefile(decoded.directory / IMAGES_FILE)  # a hard link
    assert published.published(str(run)) == published  # a second publish changes nothing

    monkeypatch.setenv("RESNET_HPO_CACHE", str(tmp_path / "other-node"))
    copy_file = trainable.data_file.copy_file
    fetched: list[str] = []

    others_waiting = all_at_the_node_lock(monkeypatch, 4)

    def slow_copy_file(*args: Any, **kwargs: Any) -> None:
        fetched.append(args[1])
        others_waiting()  # the other trials wait on the lock while the first one fetches
        copy_file(*args, **kwargs)

    monkeypatch.setattr(trainable.data_file, "copy_file", slow_copy_file)
    results: list[Any] = []
    trials = [threading.Thread(target=lambda: results.append(published.open()))
              for _ in range(4)]
    for trial in trials:
        trial.start()
    for trial in trials:
        trial.join()
    assert sorted(Path(p).name for p in fetched) == sorted(["images.npy", "labels.npy",
                                                            META_FILE])
    assert published.directory == tmp_path / "other-node" / "decoded" / decoded.key
    reference = decoded.open()
    for data in results:
        assert str(data.train.images.filename).startswith(str(tmp_path / "other-node"))
        assert np.array_equal(data.train.images, reference.train.images)
        assert np.array_equal(data.val.labels, reference.val.labels)


def test_publish_copies_where_it_cannot_link(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = decode_dataset("digits", 8, 0.1)

    def cross_device(*_: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    decoded.published(str(tmp_path / "run"))
    stored = tmp_path / "run" / RUN_DATA_DIR / decoded.key
    assert sorted(p.name for p in stored.iterdir()) == ["images.npy", "labels.npy", META_FILE]
    assert not (stored / IMAGES_FILE).samefile(decoded.directory / IMAGES_FILE)
    assert (stored / IMAGES_FILE).read_bytes() == (decoded.directory / IMAGES_FILE).read_bytes()


def test_data_missing_from_the_run_and_the_node_is_one_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_HPO_CACHE", str(tmp_path / "empty-node"))
    with pytest.raises(UserError) as err:
        DecodedData("0123abcd", str(tmp_path / "run")).open()
    assert str(err.value).startswith(f"{tmp_path / 'run'}/data/0123abcd: the search's decoded "
                                     "data is not there")
    assert not list((tmp_path / "empty-node" / "decoded").glob(".*.tmp"))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_line_every_tenth_in_a_log_and_a_bar_on_a_terminal(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for stream in (io.StringIO(), Terminal()):
        if isinstance(stream, Terminal):  # tqdm waits PROGRESS_AFTER_S on its own clock
            monkeypatch.setattr(trainable.data_file, "PROGRESS_AFTER_S", 0.0)
        clock = Clock()
        progress = Progress(1000, "decoding x", stream, clock)
        for _ in range(100):
            clock.now += 0.05
            progress.advance(10)
        progress.finish()
        text = stream.getvalue()
        last = text.splitlines()[-1]
        assert last == "decoding x: 1000 images in 5.0 s (200 images/s)"
        if isinstance(stream, Terminal):
            assert "\rdecoding x: 100%" in text and "1000/1000" in text
        else:  # nothing in the first second; then one line per tenth, with the rate
            lines = text.splitlines()[:-1]
            assert [line.split("(")[1].split(")")[0] for line in lines] == [
                f"{p}%" for p in range(20, 101, 10)]
            assert all(line.endswith(" images/s") for line in lines)


def test_quick_jobs_show_no_progress() -> None:
    for stream in (io.StringIO(), Terminal()):
        progress = Progress(10, "decoding x", stream, Clock())
        progress.advance(10)
        progress.finish()
        assert stream.getvalue() == ""


def test_the_cpu_indexes_the_mapped_file_itself() -> None:
    data = load_dataset("digits", 8, 0.1)
    images = DeviceImages(data.train, torch.device("cpu"))
    assert images.resident and images.images.data_ptr() == data.train.images.ctypes.data


def test_batches_gathered_through_buffers_equal_those_indexed_in_place() -> None:
    data = load_dataset("digits", 8, 0.1)
    in_place = DeviceImages(data.train, torch.device("cpu"))
    gathered = DeviceImages(data.train, torch.device("cpu"), resident_bytes=0)
    assert not gathered.resident
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randperm(len(in_place), generator=generator)[:n] for n in (64, 64, 17, 5)]
    pairs = list(zip(in_place.batches(batches), gathered.batches(batches), strict=True))
    for (images, labels), (gathered_images, gathered_labels) in pairs:
        assert torch.equal(images, gathered_images) and torch.equal(labels, gathered_labels)


@pytest.mark.slow
def test_training_from_gathered_batches_matches_training_in_place(
        monkeypatch: pytest.MonkeyPatch) -> None:
    full = load_dataset("digits", 8, 0.1)
    data = Dataset(full.source, 8, full.class_names, Split(full.train.images[:64],
                   full.train.labels[:64]), Split(full.val.images[:32], full.val.labels[:32]),
                   None)  # slices of the map: still mapped
    cfg = TrainConfig(data="digits", resolution=8, weights="none", epochs=1, batch_size=32,
                      mixup_alpha=0.2)
    in_place = fit(cfg, data=data, device="cpu").history
    monkeypatch.setattr(train_module, "resident_budget", lambda *_: 0)
    gathered = fit(cfg, data=data, device="cpu").history
    keys = ("train_loss", "val_loss", "val_acc")
    assert [[row[k] for k in keys] for row in gathered] == [[row[k] for k in keys]
                                                            for row in in_place]
