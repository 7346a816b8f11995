"""What `resnet-hpo search` is asked for: a new search from the space file and the flags, or
a search to continue from its search.json; every flag checked before anything starts."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.distributions import CategoricalDistribution

from search.defaults import (
    DEFAULT_CONFIRM_SEEDS,
    DEFAULT_KEEP_CHECKPOINTS,
    DEFAULT_TRIALS,
    DEFAULT_WARM_START_TOP,
)
from search.run.budget import Budget, parse_budget
from search.run.confirm import check_confirm
from search.rundir import SEARCH_FILE, TRIALS_FILE, RunDir, SearchRun
from spaces import SearchSpace, load_space, parse_space
from trainable.config import TrainConfig
from trainable.errors import UserError
from trainable.model import build_model
from trainable.storage import is_uri

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class SearchRequest:
    """What `resnet-hpo search` was asked for, after the space file and the flags."""
    space: SearchSpace
    # of a new or resumed search; of --add-trials: how many more; None: until the budget
    # is spent
    trials: int | None
    name: str
    storage: str
    gpus_per_trial: float
    cpus_per_trial: float
    max_concurrent: int | None
    max_failures: int
    address: str | None
    seed: int  # the sampler's
    command_line: str  # as the user typed it, for search.json
    warm_start: str | None = None  # an earlier run directory to start from (--warm-start)
    warm_start_top: int = DEFAULT_WARM_START_TOP  # how many of its best configs go first
    budget: Budget | None = None  # --budget: no trial starts once it would be exceeded
    confirm: int = 0  # --confirm K: the best configs trained again after the search
    confirm_seeds: int = DEFAULT_CONFIRM_SEEDS  # --confirm-seeds R: new seeds for each
    # --keep-checkpoints: the finished trials, the best first, that keep their checkpoints
    # (None: all of them)
    keep_checkpoints: int | None = DEFAULT_KEEP_CHECKPOINTS

    @property
    def run_uri(self) -> str:
        return run_uri(self.storage, self.name)


def run_uri(storage: str, name: str) -> str:
    """The run directory of the search `name` in `storage`: STORAGE/NAME."""
    return f"{storage.rstrip('/')}/{name}"


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only (no '/'), "
                        "so the run stays inside the storage directory")
    return name


def resolve_storage(storage: str) -> str:
    return storage if is_uri(storage) else str(Path(storage).expanduser().resolve())


def check_fixed_flags(space: SearchSpace, fixed: dict[str, Any]) -> None:
    """A flag fixes its config key for every trial, so one the space searches is refused:
    it would take the key out of the search unseen, and a space that searches nothing else
    would run one trial again and again."""
    for param in space.params:
        if param.name in fixed:
            flag = f"--{param.name.replace('_', '-')} {fixed[param.name]}"
            sampler = (f" (--sampler-seed {fixed['seed']} seeds only the sampler)"
                       if param.name == "seed" else "")
            raise UserError(f"{flag} fixes config key '{param.name}', which the space "
                            f"{space.source} searches; leave it out, or remove "
                            f"'{param.name}' from the space's search{sampler}")


def resolve_weights(weights: str) -> str:
    """`weights` as a config holds them: a search's run directory becomes its best trial's
    checkpoint directory (SearchRun.handed_over); other values stay as they are."""
    if weights in ("imagenet", "none"):
        return weights
    rundir = RunDir.open(weights)
    if not rundir.exists(SEARCH_FILE):
        return weights
    run = SearchRun.open(weights) if rundir.exists(TRIALS_FILE) else None
    best = run.handed_over if run is not None else None
    if best is None or not best["checkpoint_path"]:
        raise UserError(f"weights {weights}: no trial of this search has a checkpoint and "
                        "a score yet, so it has no best trial to start from; wait for one, or "
                        "use other weights")
    return str(best["checkpoint_path"])


def check_weights(cfg: TrainConfig) -> None:
    """The UserError that a model of `cfg` would raise for its weights, raised now: before
    data is read or anything is written. imagenet is left to the trials, since the driver
    may lack the network their nodes have."""
    if cfg.weights not in ("imagenet", "none"):
        build_model(cfg, num_classes=1)


def resolve_space_weights(space: SearchSpace) -> SearchSpace:
    """The space with its fixed weights resolved (resolve_weights); every weights value its
    trials can have is checked with every stem they can have. A searched choice is used as
    written, so it must be written as a config holds it."""
    choices = {p.name: p.distribution.choices for p in space.params
               if isinstance(p.distribution, CategoricalDistribution)}
    for choice in choices.get("weights", ()):
        held = resolve_weights(TrainConfig(weights=str(choice)).weights)
        if held != choice:
            raise UserError(f"{space.source}: key 'search.weights': the choice {choice!r} "
                            f"stands for {held}; write it so, or fix weights instead (a "
                            "searched choice is used as written)")
    if "weights" in space.fixed:
        resolved = resolve_weights(space.fixed["weights"])
        if resolved != space.fixed["weights"]:
            space = space.replace(fixed={"weights": resolved})
    config = space.config({})
    for weights in choices.get("weights", (config.weights,)):
        for stem in choices.get("stem", (config.stem,)):
            check_weights(config.replace(weights=weights, stem=stem))
    return space


def request_from_args(args: Any, fixed: dict[str, Any]) -> SearchRequest:
    """A new search: the space file, overridden by the flags; `fixed` holds the config
    flags."""
    space_file = load_space(args.space)
    scheduler = {k: v for k, v in (("name", args.scheduler), ("max_epochs", args.max_epochs))
                 if v is not None}
    space = space_file.replace(sampler=args.sampler, scheduler=scheduler, fixed=fixed)
    check_fixed_flags(space_file, fixed)  # after replace, which checks the values
    resources = space.resources

    def pick(flag: Any, key: str, default: Any) -> Any:
        return flag if flag is not None else resources.get(key, default)

    trials = check_trials(args.trials, args.budget)
    confirm, confirm_seeds = check_confirm(args.confirm, args.confirm_seeds, trials)
    keep_checkpoints = check_keep_checkpoints(args.keep_checkpoints, confirm)
    if args.warm_start_top < 1:
        raise UserError(f"--warm-start-top must be >= 1, got {args.warm_start_top}")
    gpus, cpus = pick(args.gpus_per_trial, "gpus_per_trial", 0.0), pick(
        args.cpus_per_trial, "cpus_per_trial", 1.0)
    if gpus < 0 or cpus < 0 or (gpus == 0 and cpus == 0):
        raise UserError(f"--gpus-per-trial {gpus:g} --cpus-per-trial {cpus:g}: both must be "
                        ">= 0 and one of them > 0")
    budget = check_budget(args.budget)
    max_concurrent = pick(args.max_concurrent, "max_concurrent", None)
    if max_concurrent is not None and max_concurrent < 1:
        raise UserError(f"--max-concurrent must be >= 1, got {max_concurrent}")
    sampler_seed = next((s for s in (args.sampler_seed, args.seed) if s is not None), 0)
    space = resolve_space_weights(space)  # reads the weights: after the quick checks
    return SearchRequest(
        space=space, trials=trials,
        name=check_name(args.name or time.strftime("search-%Y%m%d-%H%M%S")),
        storage=resolve_storage(args.storage), gpus_per_trial=float(gpus),
        cpus_per_trial=float(cpus), max_concurrent=max_concurrent,
        max_failures=args.max_failures, address=args.address, seed=sampler_seed,
        command_line=args.command_line, warm_start=args.warm_start,
        warm_start_top=args.warm_start_top, budget=budget, confirm=confirm,
        confirm_seeds=confirm_seeds, keep_checkpoints=keep_checkpoints)


def check_keep_checkpoints(keep: str | None, confirm: int) -> int | None:
    """--keep-checkpoints K (or its default), at least --confirm's K: the config a confirm
    hands over is one of its best trials, and `--weights RUN` starts from its checkpoint."""
    least = max(1, confirm)
    if keep is None:
        return max(DEFAULT_KEEP_CHECKPOINTS, least)
    if keep == "all":
        return None
    if not (keep.isdigit() and int(keep) >= least):
        why = f" (--confirm {confirm})" if confirm > 1 else ""
        raise UserError(f"--keep-checkpoints must be 'all' or a whole number >= {least}{why}, "
                        f"got {keep!r}")
    return int(keep)


def check_trials(trials: int | None, budget: str | None) -> int | None:
    """--trials, or its default: DEFAULT_TRIALS, or no limit when a --budget ends the
    search."""
    if trials is None:
        return None if budget is not None else DEFAULT_TRIALS
    if trials < 1:
        raise UserError(f"--trials must be >= 1, got {trials}")
    return trials


def check_budget(text: str | None) -> Budget | None:
    """--budget; one for GPU-hours on trials or a cluster without GPUs is refused by
    search/run/cluster.py's check_resources, which knows both."""
    return None if text is None else parse_budget(text)


def continue_request(args: Any, fixed: dict[str, Any]) -> SearchRequest:
    """--resume or --add-trials N: the request the search was started with, from its
    search.json; the space, data, sampler and seed stay as they were (Tune restores them on
    --resume; --add-trials samples the same space, its sampler seeded past the trials
    before)."""
    flag = "--resume" if args.resume else "--add-trials"
    if args.resume and args.add_trials is not None:
        raise UserError("--resume and --add-trials: give one; resume an interrupted search "
                        "first, then add trials")
    if args.resume and args.budget is not None:
        raise UserError(f"--budget {args.budget} with --resume: a resumed search goes on with "
                        "the budget it was started with; give --budget to a new search or to "
                        "--add-trials")
    ignored = [f"--{key.replace('_', '-')}" for key in (
        "space", "warm_start", "sampler", "scheduler", "max_epochs", "gpus_per_trial",
        "cpus_per_trial", "seed", "sampler_seed", "confirm", "confirm_seeds",
        "keep_checkpoints", *fixed)
        if getattr(args, key, None) is not None]
    if ignored:
        raise UserError(f"{flag} goes on with the search's own space, resources and history; "
                        f"leave out {', '.join(ignored)}")
    if args.add_trials is not None and args.add_trials < 1:
        raise UserError(f"--add-trials must be >= 1, got {args.add_trials}")
    if not args.name:
        raise UserError(f"{flag} needs --name NAME of the search to continue")
    name, storage = check_name(args.name), resolve_storage(args.storage)
    run = RunDir.open(run_uri(storage, name))
    if not run.exists(SEARCH_FILE):
        raise UserError(f"{flag}: there is no search named {name!r} in {storage} "
                        f"({run.uri} holds no {SEARCH_FILE})")
    meta = run.read_json(SEARCH_FILE)
    # --resume goes on with the budget of the part it resumes (the search or its last
    # --add-trials), and from what that part spent (search/run/budget.py)
    last_part = [meta, *meta.get("added", [])][-1]
    budget = check_budget(last_part.get("budget") if args.resume else args.budget)
    space = parse_space(meta["space_text"], meta["space_file"]).replace(
        sampler=meta["sampler"], scheduler=meta["scheduler"], fixed=meta["fixed"])
    confirm = (meta.get("confirm") or {}) if args.resume else {}  # --resume finishes it
    return SearchRequest(
        space=space, trials=meta["trials"] if args.resume else args.add_trials, name=name,
        storage=storage, gpus_per_trial=meta["gpus_per_trial"],
        cpus_per_trial=meta["cpus_per_trial"], max_concurrent=args.max_concurrent,
        max_failures=args.max_failures, address=args.address, seed=meta["seed"],
        command_line=meta["command"] if args.resume else args.command_line, budget=budget,
        confirm=confirm.get("top", 0),
        confirm_seeds=confirm.get("seeds_per_config", DEFAULT_CONFIRM_SEEDS),
        # a search from before --keep-checkpoints kept every checkpoint
        keep_checkpoints=meta.get("keep_checkpoints"))
