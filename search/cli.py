"""`resnet-hpo`: the command line. Flags for hyperparameters are generated from TrainConfig."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from trainable.config import TrainConfig, field_choices, field_help, field_names, field_type
from trainable.errors import UserError

Command = Callable[[argparse.Namespace], None]


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (`--unfreeze-depth` or `--unfreeze_depth`).

    Values stay strings here: TrainConfig casts and validates them, so a bad value gets the
    same message from a flag, a YAML file or a search space.
    """
    group = parser.add_argument_group("hyperparameters (override --config)")
    defaults = TrainConfig()
    for name in field_names():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        choices = field_choices(name)
        help_text = f"{field_help(name)} (default: {getattr(defaults, name)})"
        if field_type(name) is bool:
            group.add_argument(*flags, dest=name, nargs="?", const="true", default=None,
                               metavar="true|false", help=help_text)
        else:
            group.add_argument(*flags, dest=name, default=None, help=help_text,
                               metavar="|".join(choices) if choices else name.upper())


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in field_names()
            if getattr(args, name, None) is not None}


def _train(args: argparse.Namespace) -> None:
    from search.retrain import train_command

    train_command(args.config, config_overrides(args), args.output, onnx=args.onnx,
                  device=args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-hpo",
        description="Hyperparameter search for fine-tuning ResNet18 (Ray Tune + Optuna + ASHA).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train one model (e.g. the best config of a search) and test it",
        description="Train ResNet18 with one configuration; writes config.yaml, model.pt and "
                    "metrics.json (with the test accuracy when the data has a test split).")
    train.add_argument("--config", help="YAML file of TrainConfig keys (e.g. RUN/best.yaml)")
    train.add_argument("--output", help="directory for the model (default: runs/train-TIME)")
    train.add_argument("--onnx", action="store_true", help="also export model.onnx")
    train.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available)")
    add_config_flags(train)
    train.set_defaults(run=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, category, *_: f"resnet-hpo: warning: {message}\n"
    try:
        args.run(args)
    except UserError as e:
        print(f"resnet-hpo: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("resnet-hpo: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
