"""`resnet-hpo`: the command line. Flags for hyperparameters are generated from TrainConfig."""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from search import best, ensemble, predict, report
from trainable.config import TrainConfig, field_choices, field_help, field_names, field_type
from trainable.errors import UserError

Command = Callable[[argparse.Namespace], None]


def add_config_flags(parser: argparse.ArgumentParser, title: str = "hyperparameters (override "
                     "--config)", exclude: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field (`--unfreeze-depth` or `--unfreeze_depth`).

    Values stay strings here: TrainConfig casts and validates them, so a bad value gets the
    same message from a flag, a YAML file or a search space.
    """
    group = parser.add_argument_group(title)
    defaults = TrainConfig()
    for name in field_names():
        if name in exclude:
            continue
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


def _search(args: argparse.Namespace) -> None:
    from search.driver import request_from_args, resume_request, run_search

    if args.resume:
        run_search(resume_request(args), resume=True)
    else:
        if not args.space:
            raise UserError("--space is required: a shipped space (quick, default, cifar10) "
                            "or a YAML file")
        fixed = config_overrides(args) | ({"seed": args.seed} if args.seed is not None else {})
        run_search(request_from_args(args, fixed), resume=False)


def add_search_parser(commands: Any) -> None:
    search = commands.add_parser(
        "search", help="search hyperparameters with Ray Tune, Optuna and ASHA",
        description="Run a hyperparameter search; results go to STORAGE/NAME (trials.parquet, "
                    "epochs.parquet, tensorboard/). Flags override the space file.")
    search.add_argument("--space", help="shipped space name (quick, default, cifar10) or a "
                                        "YAML file")
    search.add_argument("--trials", type=int, default=16, help="number of trials (default 16)")
    search.add_argument("--sampler", help="tpe | cmaes | random | qmc | gp (Optuna, seeded)")
    search.add_argument("--scheduler", help="asha | fifo")
    search.add_argument("--max-epochs", type=int, help="epochs per trial; ASHA's max_t")
    search.add_argument("--gpus-per-trial", type=float,
                        help="GPU share of a trial, e.g. 0.25 = four trials per GPU")
    search.add_argument("--cpus-per-trial", type=float, help="CPUs reserved per trial")
    search.add_argument("--max-concurrent", type=int,
                        help="trials at once (default: as many as the cluster fits)")
    search.add_argument("--max-failures", type=int, default=2,
                        help="retries of a trial that crashed or lost its node (default 2)")
    search.add_argument("--storage", default="runs",
                        help="local directory or URI (s3://bucket/runs) (default: runs)")
    search.add_argument("--name", help="run name; the run directory is STORAGE/NAME "
                                       "(default: search-TIME)")
    search.add_argument("--address", help="join a running Ray cluster (auto, or host:port); "
                                          "default: start a local Ray")
    search.add_argument("--seed", type=int, help="seed of the sampler and of every trial's "
                        "training (default: sampler 0, trials as the space says)")
    search.add_argument("--resume", action="store_true",
                        help="continue the interrupted search STORAGE/NAME")
    add_config_flags(search, "fixed hyperparameters (override the space file)",
                     exclude=("epochs", "seed"))
    search.set_defaults(run=_search)


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
    add_search_parser(commands)
    report.add_parser(commands)
    best.add_parser(commands)
    ensemble.add_parser(commands)
    predict.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["resnet-hpo", *argv])
    warnings.formatwarning = lambda message, category, *_: f"resnet-hpo: warning: {message}\n"
    try:
        args.run(args)
    except UserError as e:
        print(f"resnet-hpo: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("resnet-hpo: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
