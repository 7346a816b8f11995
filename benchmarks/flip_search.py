"""Does the search find the flip that matters? Two generated class-per-folder sets of
letter-like glyphs, each searched with the quick space (which searches `flip` and `crop`):

- mirror: four classes in two mirror pairs (L and its mirror, F and its mirror). A
  horizontal flip turns one class into another, so flipping destroys the label.
- mirrored-test: three classes (L, F, P) drawn upright in train but mirrored half of the
  time in val and test. Flipping during training shows the model the mirrored views.

    python -m benchmarks.flip_search [--trials 8] [--per-class 300] [--output DIR]

For each set the script runs `resnet-hpo search --space quick`, then `resnet-hpo best`'s
retrain command, and the same command with `--flip none` and with `--flip horizontal`, and
prints the best trial's flip and crop and the three test accuracies. Expected: the best trial
of `mirror` has flip none and of `mirrored-test` flip horizontal, and its retrained test
accuracy is within a point of the better fixed choice.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from search.cli import main as resnet_hpo

GLYPHS = {
    "L": ["X....", "X....", "X....", "X....", "XXXX."],
    "F": ["XXXX.", "X....", "XXX..", "X....", "X...."],
    "P": ["XXX..", "X..X.", "XXX..", "X....", "X...."],
}
SIZE = 32
SPLITS = {"train": 1.0, "val": 0.25, "test": 0.5}  # images per class, as a share of --per-class


def glyph_mask(name: str) -> np.ndarray:
    rows = GLYPHS[name.removesuffix("-mirrored")]
    mask = np.array([[c == "X" for c in row] for row in rows])
    return mask[:, ::-1] if name.endswith("-mirrored") else mask


def render(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The glyph at a random scale, place and colour on a noisy background (SIZE px RGB)."""
    cell = int(rng.integers(3, 6))
    glyph = np.kron(mask, np.ones((cell, cell), dtype=bool))
    top, left = (int(rng.integers(0, SIZE - n + 1)) for n in glyph.shape)
    image = rng.normal(rng.uniform(40, 120), 25, (SIZE, SIZE, 3))
    ink = rng.uniform(150, 255, 3)
    region = image[top:top + glyph.shape[0], left:left + glyph.shape[1]]
    region[glyph] = ink + rng.normal(0, 15, (int(glyph.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_set(root: Path, classes: dict[str, dict[str, list[str]]], per_class: int,
              seed: int) -> Path:
    """root/<split>/<class>/<i>.png; classes[name][split] lists the glyphs drawn for it."""
    rng = np.random.default_rng(seed)
    for split, share in SPLITS.items():
        for name, views in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(round(per_class * share)):
                view = views[split][i % len(views[split])]
                Image.fromarray(render(glyph_mask(view), rng)).save(folder / f"{i:05d}.png")
    return root


def mirror_set(root: Path, per_class: int, seed: int) -> Path:
    names = ("L", "L-mirrored", "F", "F-mirrored")
    return write_set(root, {name: {split: [name] for split in SPLITS} for name in names},
                     per_class, seed)


def mirrored_test_set(root: Path, per_class: int, seed: int) -> Path:
    return write_set(root, {name: {"train": [name], "val": [name, f"{name}-mirrored"],
                                   "test": [name, f"{name}-mirrored"]} for name in GLYPHS},
                     per_class, seed)


def run(argv: list[str]) -> str:
    """One resnet-hpo command in this process; its output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        resnet_hpo(argv)
    return out.getvalue()


def test_acc(command: list[str], output: Path, *extra: str) -> float:
    run([*command[1:-2], "--output", str(output), *extra])
    metrics = json.loads((output / "metrics.json").read_text())
    return float(metrics["test_acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=300,
                        help="training images per class (val a quarter, test half of it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="also write flip_search.txt here")
    args = parser.parse_args()
    lines = [f"flip_search on {platform.machine()} ({time.strftime('%Y-%m-%d')}): "
             f"{shlex.join(sys.argv)}"]
    print(lines[0], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (("mirror", mirror_set), ("mirrored-test", mirrored_test_set)):
            data = make(Path(tmp, name), args.per_class, args.seed)
            started = time.monotonic()
            run(["search", "--space", "quick", "--data", f"imagefolder:{data}", "--trials",
                 str(args.trials), "--seed", str(args.seed), "--storage", str(Path(tmp, "runs")),
                 "--name", name])
            minutes = (time.monotonic() - started) / 60
            best_out = run(["best", str(Path(tmp, "runs", name))])
            command = shlex.split(best_out.strip().splitlines()[-1])
            best = yaml.safe_load(Path(command[command.index("--config") + 1]).read_text())
            searched = test_acc(command, Path(tmp, f"{name}-best"))
            no_flip = test_acc(command, Path(tmp, f"{name}-none"), "--flip", "none")
            flip = test_acc(command, Path(tmp, f"{name}-horizontal"), "--flip", "horizontal")
            line = (f"{name}: search {minutes:.1f} min; {best_out.splitlines()[0]}; flip="
                    f"{best['flip']} crop={best['crop']}; test_acc retrained {searched:.4f}, "
                    f"--flip none {no_flip:.4f}, --flip horizontal {flip:.4f}")
            print(line, flush=True)
            lines.append(line)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "flip_search.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
