"""`resnet-hpo`: the command line. Flags for hyperparameters are generated from TrainConfig.

Every subcommand's parser is defined here, and its module (which may import torch, Ray or
Optuna) is imported only when it runs, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings
from collections.abc import Sequence
from typing import Any, TypeAlias

from search.defaults import (
    DEFAULT_CONFIRM_SEEDS,
    DEFAULT_KEEP_CHECKPOINTS,
    DEFAULT_TRIALS,
    DEFAULT_WARM_START_TOP,
)
from trainable.config import TrainConfig, field_choices, field_help, field_names, field_type
from trainable.errors import UserError
from trainable.model_files import ENSEMBLE_METHODS

DEVICE_HELP = "cuda, cuda:1 or cpu (default: cuda if available)"
RUN_HELP = "run directory of a search (STORAGE/NAME)"
MODEL_COMMANDS = ("train", "ensemble", "predict")  # they run models in this process


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


# --- what each subcommand runs -------------------------------------------------------------

def _train(args: argparse.Namespace) -> None:
    from search.commands.train import train_command

    train_command(args.config, config_overrides(args), args.output, onnx=args.onnx,
                  device=args.device)


def _search(args: argparse.Namespace) -> None:
    from search.run.driver import add_trials, new_search, resume_search
    from search.run.request import continue_request, request_from_args

    if args.resume or args.add_trials is not None:
        request = continue_request(args, config_overrides(args))
        (resume_search if args.resume else add_trials)(request)
    else:
        if not args.space:
            raise UserError("--space is required: a shipped space (quick, default, cifar10) "
                            "or a YAML file")
        fixed = config_overrides(args) | ({"seed": args.seed} if args.seed is not None else {})
        new_search(request_from_args(args, fixed))


def _results(args: argparse.Namespace) -> None:
    from search.views.results import results_command

    results_command(args.run_dir, args.top)


def _best(args: argparse.Namespace) -> None:
    from search.views.best import best_command

    best_command(args.run_dir, args.output)


def _ensemble(args: argparse.Namespace) -> None:
    from search.ensembles.ensemble import ensemble_command

    ensemble_command(args.run_dir, args.top, args.method, args.output, onnx=args.onnx,
                     device=args.device)


def _dashboard(args: argparse.Namespace) -> None:
    from search.views.dashboard import dashboard_command

    dashboard_command(args.run_dir, args.host, args.port)


def _predict(args: argparse.Namespace) -> None:
    from search.commands.predict import predict_command

    predict_command(args.model_dir, args.images, args.output, args.probabilities,
                    args.device, args.batch_size)


# --- parsers -------------------------------------------------------------------------------

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_train_parser(commands: Subcommands) -> None:
    train = commands.add_parser(
        "train", help="train one model (e.g. the best config of a search) and test it",
        description="Train ResNet18 with one configuration; writes config.yaml, model.pt and "
                    "metrics.json (with the test accuracy when the data has a test split).")
    train.add_argument("--config", help="YAML file of TrainConfig keys (e.g. RUN/best.yaml)")
    train.add_argument("--output", help="directory for the model (default: runs/train-TIME)")
    train.add_argument("--onnx", action="store_true", help="also export model.onnx")
    train.add_argument("--device", help=DEVICE_HELP)
    add_config_flags(train)
    train.set_defaults(run=_train)


def add_search_parser(commands: Subcommands) -> None:
    search = commands.add_parser(
        "search", help="search hyperparameters with Ray Tune, Optuna and ASHA",
        description="Run a hyperparameter search; results go to STORAGE/NAME (trials.parquet, "
                    "epochs.parquet, tensorboard/). Flags override the space file.")
    search.add_argument("--space", help="shipped space name (quick, default, cifar10) or a "
                                        "YAML file")
    search.add_argument("--trials", type=int,
                        help=f"number of trials (default {DEFAULT_TRIALS}; with --budget: until "
                             "it is spent)")
    search.add_argument("--budget", metavar="TIME",
                        help="start no trial that would exceed this wall time (45s, 90m, 2h) or "
                             "GPU-hours summed over trials (1.5gpu-h); running trials are "
                             "stopped at their next epoch once it is spent. With --trials, "
                             "whichever comes first")
    search.add_argument("--confirm", type=int, metavar="K",
                        help="after the search, train its K best configs again for the "
                             "max epochs with new seeds (--confirm-seeds) and hand over the "
                             "one with the best mean (default 0: the best trial). With "
                             "--budget its cost (K x R runs at the mean epoch time seen, in "
                             "parallel) is held back from the first epoch on; it is unknown "
                             "before, so only K above --trials is refused at the start")
    search.add_argument("--confirm-seeds", type=int, metavar="R",
                        help="new seeds per confirmed config, none a search trial used "
                             f"(default {DEFAULT_CONFIRM_SEEDS})")
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
    search.add_argument("--seed", type=int, help="seed of every trial's training and, unless "
                        "--sampler-seed, of the sampler (default: sampler 0, trials as the "
                        "space says)")
    search.add_argument("--sampler-seed", type=int, metavar="SEED",
                        help="seed of the sampler only (default: --seed, else 0)")
    search.add_argument("--resume", action="store_true",
                        help="continue the interrupted search STORAGE/NAME")
    search.add_argument("--add-trials", type=int, metavar="N",
                        help="run N more trials in the finished search STORAGE/NAME: same "
                             "space and data, the sampler conditioned on every earlier trial")
    search.add_argument("--warm-start", metavar="RUN",
                        help="start from an earlier search's run directory: its best configs "
                             "are the first trials, its finished trials the sampler's history")
    search.add_argument("--warm-start-top", type=int, default=DEFAULT_WARM_START_TOP,
                        metavar="K", help="how many of the earlier run's best configs go "
                                          "first (default %(default)s)")
    search.add_argument("--keep-checkpoints", metavar="K",
                        help="keep the checkpoints (about 100 MB each) of the K best finished "
                             "trials, for ensembles and --weights RUN, and delete the others' "
                             "as trials finish; 'all' keeps every one (default "
                             f"{DEFAULT_KEEP_CHECKPOINTS})")
    add_config_flags(search, "fixed hyperparameters (override the space file)",
                     exclude=("epochs", "seed"))
    search.set_defaults(run=_search)


def add_results_parser(commands: Subcommands) -> None:
    results = commands.add_parser(
        "results", help="leaderboard, hyperparameter importances and plots of a search",
        description="Print the best trials (at their best epoch), Optuna's fANOVA "
                    "importances, GPU-hours and early stops; write PNG plots to RUN/plots/.")
    results.add_argument("run_dir", metavar="RUN", help=RUN_HELP)
    results.add_argument("--top", type=int, default=10, metavar="K",
                         help="trials in the table and learning curves (default: 10)")
    results.set_defaults(run=_results)


def add_best_parser(commands: Subcommands) -> None:
    best = commands.add_parser(
        "best", help="write the best trial's config and print the command that retrains it",
        description="Pick the best trial by the search metric at its best epoch (after "
                    "`search --confirm`: the config with the best confirmed mean), write its "
                    "full config to RUN/best.yaml and print the `resnet-hpo train` command "
                    "that retrains it for the epochs at which it was best (confirmed at).")
    best.add_argument("run_dir", metavar="RUN", help=RUN_HELP)
    best.add_argument("--output", metavar="FILE",
                      help="write the config here instead of RUN/best.yaml")
    best.set_defaults(run=_best)


def add_ensemble_parser(commands: Subcommands) -> None:
    ensemble = commands.add_parser(
        "ensemble", help="combine the best trials of a search and evaluate the ensemble",
        description="Load the best-epoch checkpoints of the top K trials, evaluate each and "
                    "their ensemble on the validation split (and the test split when there "
                    "is one), save the ensemble as one module and record the result in "
                    "RUN/ensemble.json. Prints how often the members disagree and writes "
                    "their confusion matrices to DIR and RUN/plots/confusion_matrices.png.")
    ensemble.add_argument("run_dir", metavar="RUN", help=RUN_HELP)
    ensemble.add_argument("--top", type=int, default=3, metavar="K",
                          help="members: the K best trials by the search metric (default 3)")
    ensemble.add_argument("--method", choices=(*ENSEMBLE_METHODS, "all"), default="average",
                          help="average the probabilities; majority vote; weighted average "
                               "(weights fitted on the validation split); stack (a logistic "
                               "regression on the probabilities, fitted on the validation "
                               "split); concat (a linear head on the members' features, "
                               "trained on the training split); all: evaluate every method "
                               "and save the best by the search's metric on val (default average)")
    ensemble.add_argument("--output", metavar="DIR",
                          help="directory for the ensemble (default: RUN/ensemble)")
    ensemble.add_argument("--onnx", action="store_true", help="also export ensemble.onnx")
    ensemble.add_argument("--device", help=DEVICE_HELP)
    ensemble.set_defaults(run=_ensemble)


def add_predict_parser(commands: Subcommands) -> None:
    predict = commands.add_parser(
        "predict", help="predict the classes of a folder of images into a CSV",
        description="Classify every image under IMAGES with a model written by `resnet-hpo "
                    "train` or an ensemble written by `resnet-hpo ensemble`; writes one CSV "
                    "row per readable image: image, label, probability.")
    predict.add_argument("model_dir", metavar="MODEL_DIR",
                         help="model or ensemble directory, or a trial checkpoint (a local "
                              "path or a URI: s3://...)")
    predict.add_argument("images", metavar="IMAGES", help="folder of images (sub-folders too)")
    predict.add_argument("--output", default="predictions.csv", metavar="CSV",
                         help="CSV file to write (default predictions.csv)")
    predict.add_argument("--probabilities", action="store_true",
                         help="add one column per class with its probability")
    predict.add_argument("--batch-size", type=int, default=64, help="images per batch (64)")
    predict.add_argument("--device", help=DEVICE_HELP)
    predict.set_defaults(run=_predict)


def add_dashboard_parser(commands: Subcommands) -> None:
    dashboard = commands.add_parser(
        "dashboard", help="watch a search's Optuna study in the browser (optuna-dashboard)",
        description="Serve optuna-dashboard on the search's Optuna study (RUN/study.journal): "
                    "the history of the trials, hyperparameter importances, parallel "
                    "coordinates and every trial's learning curve, live while the search "
                    "runs. Needs pip install 'resnet-hpo[dashboard]'. A remote run (s3://...) "
                    "is shown as this machine's copy of its journal: live where the search's "
                    "driver runs, else copied when the command starts.")
    dashboard.add_argument("run_dir", metavar="RUN", help=RUN_HELP)
    dashboard.add_argument("--host", default="127.0.0.1",
                           help="address to listen on (default 127.0.0.1: this machine only; "
                                "the dashboard has no login)")
    dashboard.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    dashboard.set_defaults(run=_dashboard)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-hpo",
        description="Hyperparameter search for fine-tuning ResNet18 (Ray Tune + Optuna + ASHA).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in (add_train_parser, add_search_parser, add_results_parser,
                       add_best_parser, add_ensemble_parser, add_dashboard_parser,
                       add_predict_parser):
        add_parser(commands)
    return parser


# --- the process ---------------------------------------------------------------------------

def configure_process(command: str) -> None:
    """Everything process-wide the commands rely on, set here and nowhere in library code.
    Idempotent, since tests call `main` many times in one process."""
    import optuna

    if command in MODEL_COMMANDS:  # the others never import torch (about 2 s)
        from trainable.runtime import configure_torch

        configure_torch()
    warnings.formatwarning = lambda message, category, *_: f"resnet-hpo: warning: {message}\n"
    # Optuna logs every study it creates, and warns that samplers make_sampler builds on
    # purpose (TPE with constant_liar, QMC, GP) are experimental.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Tune's own console output and result files: ProgressPrinter, ResultsWriter and
    # TensorBoardWriter replace them. setdefault: a value the user exported wins.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["resnet-hpo", *argv])
    configure_process(args.command)
    try:
        args.run(args)
    except UserError as e:
        print(f"resnet-hpo: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("resnet-hpo: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
