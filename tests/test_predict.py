"""`resnet-hpo predict`: one CSV row per readable image, from a model or an ensemble."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from search.cli import main
from search.commands.predict import predict_command
from tests.conftest import COLOURS, tiny_dataset
from trainable import TrainConfig, UserError, fit
from trainable.data import decode_image
from trainable.fusion import EnsembleSpec
from trainable.model import ImageClassifier
from trainable.saved import (
    load_checkpoint_dir,
    load_classifier,
    load_model_dir,
    save_ensemble_dir,
    save_model_dir,
)
from trainable.train import SaveCheckpoint


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """4 readable images (one in a sub-folder), a corrupt PNG and a text file."""
    folder = tmp_path / "unlabelled"
    (folder / "more").mkdir(parents=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (20, 24), rgb).save(folder / f"{name}.png")
    shutil.copy(folder / "red.png", folder / "more" / "copy.png")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("ignored")
    return folder


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model as `resnet-hpo train` writes it: fc only, 3 epochs on images whose class is
    their brightest channel (c0 red, c1 green, c2 blue), enough to label pure colours."""
    cfg = TrainConfig(weights="none", resolution=16, unfreeze_depth=0, epochs=3, batch_size=8,
                      warmup_epochs=0)
    data = tiny_dataset(resolution=16)
    result = fit(cfg, data=data)
    save_model_dir(tmp_path / "model", cfg, result.model, {"class_names": data.class_names})
    return tmp_path / "model"


def test_one_row_per_readable_image(model_dir: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable images: broken\.png"):
        predict_command(str(model_dir), str(images), str(out))
    rows = read_rows(out)
    assert [r["image"] for r in rows] == ["blue.png", "green.png", "more/copy.png", "red.png"]
    assert list(rows[0]) == ["image", "label", "probability"]
    # the trained model tells the pure colours apart
    assert [r["label"] for r in rows] == ["c2", "c1", "c0", "c0"]
    # and each row is the model's own output for that image: a uniform colour is the same at
    # any size, so the expected input needs no decoding
    model = load_model_dir(model_dir)
    module = torch.nn.Sequential(ImageClassifier(model.model, 16), torch.nn.Softmax(-1)).eval()
    colours = [COLOURS[name] for name in ("blue", "green", "red", "red")]
    pixels = torch.tensor(colours, dtype=torch.float32).view(4, 3, 1, 1).expand(4, 3, 16, 16)
    with torch.no_grad():
        expected = module(pixels / 255)
    assert [float(r["probability"]) for r in rows] == pytest.approx(
        expected.max(1).values.tolist(), abs=1e-5)
    assert [model.class_names[i] for i in expected.argmax(1)] == [r["label"] for r in rows]


def test_probability_columns(model_dir: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    with pytest.warns(UserWarning, match="unreadable"):
        main(["predict", str(model_dir), str(images), "--output", str(out), "--probabilities",
              "--batch-size", "2"])
    rows = read_rows(out)
    assert list(rows[0]) == ["image", "label", "probability", "c0", "c1", "c2"]
    for row in rows:
        probs = [float(row[c]) for c in ("c0", "c1", "c2")]
        assert sum(probs) == pytest.approx(1, abs=1e-5)
        assert row["label"] == f"c{probs.index(max(probs))}"
        assert float(row["probability"]) == max(probs)


def train_checkpoint(directory: Path, resolution: int) -> TrainConfig:
    cfg = TrainConfig(weights="none", resolution=resolution, unfreeze_depth=0, epochs=1,
                      batch_size=8, warmup_epochs=0)

    def report(_metrics: dict[str, float], save: SaveCheckpoint) -> None:
        save(directory)

    fit(cfg, report, data=tiny_dataset(resolution=resolution))
    return cfg


def test_ensemble_and_checkpoint_directories(images: Path, tmp_path: Path) -> None:
    configs = [train_checkpoint(tmp_path / "t0", 16), train_checkpoint(tmp_path / "t1", 8)]
    spec = EnsembleSpec("average", ["c0", "c1", "c2"], ["t0", "t1"], configs)
    module = spec.build()
    for member, trial in zip(module.members, spec.trial_ids, strict=True):
        assert isinstance(member, ImageClassifier)
        member.model.load_state_dict(load_checkpoint_dir(tmp_path / trial).model.state_dict())
    save_ensemble_dir(tmp_path / "ens", spec, module, {})
    out = tmp_path / "preds.csv"
    with pytest.warns(UserWarning, match="unreadable"):
        predict_command(str(tmp_path / "ens"), str(images), str(out), all_probabilities=True)
    rows = {row["image"]: row for row in read_rows(out)}
    assert len(rows) == 4
    red = torch.from_numpy(decode_image(images / "red.png", 16))[None].float() / 255
    members = [load_classifier(tmp_path / t) for t in spec.trial_ids]  # checkpoint dirs
    with torch.no_grad():
        expected = (members[0].module(red) + members[1].module(red)) / 2
    assert [float(rows["red.png"][c]) for c in spec.class_names] == pytest.approx(
        expected[0].tolist(), abs=1e-5)


def test_user_errors(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                     ) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.jpg").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info, pytest.warns(UserWarning):
        main(["predict", str(model_dir), str(empty), "--output", str(tmp_path / "p.csv")])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()
    with pytest.raises(UserError, match="not a model directory"):
        predict_command(str(empty), str(empty), str(tmp_path / "p.csv"))
    with pytest.raises(UserError, match="no such folder"):
        predict_command(str(model_dir), str(tmp_path / "missing"), str(tmp_path / "p.csv"))


def test_a_cut_off_model_file_is_one_line_naming_it(model_dir: Path) -> None:
    weights = model_dir / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError) as err:
        load_classifier(model_dir)
    assert str(err.value).startswith(f"{weights}: not a loadable PyTorch file (")
    assert str(err.value).endswith("was it written by resnet-hpo and copied whole?")
