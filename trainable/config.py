"""`TrainConfig`: every hyperparameter of one training run, with its default and allowed range.

It is the single source of truth for the CLI flags (`search.cli`), the search-space files
(`spaces`), best.yaml and the config.yaml written next to every model.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

import yaml

from trainable.errors import UserError

DEFAULT_METRIC = "val_acc"  # of a run, a search and a space that names none


def _field(default: Any, help: str, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> Any:
    """A dataclass field carrying its help text and numeric range for validation and the CLI."""
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # Data: a search decodes its data once, at the largest resolution its trials ask for.
    data: str = _field("digits", "digits | cifar10[:ROOT] | cifar100[:ROOT] | imagefolder:PATH")
    resolution: int = _field(32, "side length in pixels of the model's input; data decoded "
                             "larger is resized on the device", 8, 1024)
    val_fraction: float = _field(0.1, "share of the training images held out for validation "
                                 "when the source has no val split", 0.0, 1.0, True, True)
    # Model.
    weights: str = _field("imagenet", "imagenet (torchvision's download and cache) | none | "
                          "PATH or URI of ResNet18 weights: a state-dict file, a model "
                          "directory (resnet-hpo train), a trial checkpoint, or a search's run "
                          "directory (its best trial's checkpoint); fc is always new")
    stem: Literal["imagenet", "cifar"] = _field(
        "imagenet", "imagenet: 7x7 conv + max-pool; cifar: 3x3 conv, no max-pool "
        "(for ~32px images)")
    unfreeze_depth: int = _field(5, "stages trained, counted from the head: 0 = fc only, "
                                 "1 = +layer4, ..., 4 = +layer1, 5 = +stem", 0, 5)
    # Optimisation.
    optimizer: Literal["sgd", "adamw"] = _field("sgd", "sgd (with momentum) | adamw")
    lr: float = _field(0.05, "peak learning rate of the head (fc)", 0.0, 10.0, low_open=True)
    layer_decay: float = _field(1.0, "stage k from the head trains at lr * layer_decay**k",
                                0.0, 1.0, low_open=True)
    momentum: float = _field(0.9, "SGD momentum; AdamW's beta1", 0.0, 1.0, high_open=True)
    nesterov: bool = _field(True, "Nesterov momentum (SGD only)")
    weight_decay: float = _field(5e-5, "decoupled for AdamW, L2 for SGD; never on norm weights "
                                 "or biases", 0.0, 1.0)
    warmup_epochs: float = _field(1.0, "linear warmup per step, fractions allowed", 0.0, 1000.0)
    min_lr: float = _field(0.0, "learning rate of the head at the end of the cosine decay",
                           0.0, 10.0)
    epochs: int = _field(10, "training epochs", 1, 100_000)
    batch_size: int = _field(64, "images per step (per micro-batch with accumulation)", 1, 65_536)
    accumulate_steps: int = _field(1, "micro-batches per optimizer step", 1, 1024)
    metric: Literal["val_acc", "val_loss", "train_loss"] = _field(
        DEFAULT_METRIC, "what 'best' means: the epoch with the best value (the highest val_acc, "
        "the lowest loss) gives the kept weights, ends early stopping's wait and ranks a trial")
    early_stop_patience: int = _field(0, "stop after this many epochs without a better metric "
                                      "(0 = off)", 0, 100_000)
    # Regularisation and augmentation.
    label_smoothing: float = _field(0.1, "label smoothing of the soft targets", 0.0, 1.0,
                                    high_open=True)
    mixup_alpha: float = _field(0.0, "Beta(alpha, alpha) of mixup (0 = off)", 0.0, 100.0)
    cutmix_alpha: float = _field(0.0, "Beta(alpha, alpha) of CutMix (0 = off)", 0.0, 100.0)
    mix_prob: float = _field(1.0, "probability that a batch is mixed when an alpha is > 0",
                             0.0, 1.0)
    crop: Literal["auto", "resized", "pad", "none"] = _field(
        "auto", "random crop: resized (scale 0.25-1), pad (shift by up to 1/8 of the side), "
        "none; auto = pad up to 64px, else resized")
    flip: Literal["auto", "horizontal", "none"] = _field(
        "auto", "random horizontal flip; auto = horizontal except for digits, whose meaning a "
        "mirror changes")
    augment: Literal["none", "trivial", "randaugment", "autoaugment"] = _field(
        "none", "automatic augmentation policy, per image on the device, on uint8 images before "
        "crop and flip: trivial (TrivialAugmentWide), randaugment, autoaugment (ImageNet "
        "policy), as torchvision's")
    randaugment_n: int = _field(2, "RandAugment: ops applied in turn to each image", 1, 16)
    randaugment_m: int = _field(9, "RandAugment: magnitude, a bin of torchvision's 31 (0-30)",
                                0, 30)
    random_erasing: float = _field(0.0, "probability that an image gets a random rectangle "
                                   "erased, as torchvision's RandomErasing (0 = off)", 0.0, 1.0)
    ema_decay: float = _field(0.0, "decay per optimizer step of an exponential moving average "
                              "of the weights (and BatchNorm statistics), which is what each "
                              "epoch scores and the best epoch keeps (0 = off)", 0.0, 1.0,
                              high_open=True)
    ema_steps: int = _field(1, "optimizer steps between updates of the moving average (each "
                            "decays by ema_decay**ema_steps)", 1, 100_000)
    # Execution.
    amp: Literal["auto", "bf16", "fp16", "off"] = _field(
        "auto", "mixed precision; auto = bf16 on CUDA, off on the CPU (bf16 is far slower than "
        "fp32 on CPUs without bf16 units)")
    channels_last: bool = _field(True, "NHWC memory format on CUDA")
    compile: bool = _field(False, "torch.compile the model (pays off only on long runs)")
    seed: int = _field(0, "seed of initialisation, batch order and augmentation", 0, 2**31 - 1)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, cast_value(f.name, getattr(self, f.name)))
        self.weights = weights_location(self.weights)
        if not self.data.strip():
            raise UserError("config key 'data': must not be empty; use digits, cifar10[:ROOT], "
                            "cifar100[:ROOT] or imagefolder:PATH")
        if self.min_lr > self.lr:
            raise UserError(f"config key 'min_lr': must be <= lr ({self.lr}), got {self.min_lr}")
        if self.warmup_epochs > self.epochs:
            raise UserError(f"config key 'warmup_epochs': must be <= epochs ({self.epochs}), "
                            f"got {self.warmup_epochs}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str | None = None) -> TrainConfig:
        """Build from a plain dict (YAML, a Tune sample, CLI flags); unknown keys are errors.

        `source` (a file name, "flags") prefixes error messages.
        """
        try:
            unknown = sorted(set(values) - set(field_names()))
            if unknown:
                raise UserError(unknown_key_message(unknown[0]))
            return cls(**values)
        except UserError as e:
            raise UserError(f"{source}: {e}" if source else str(e)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_yaml_mapping(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @property
    def eval_batch_size(self) -> int:
        """Images per evaluation step: without gradients twice the training batch fits."""
        return 2 * self.batch_size


def weights_location(weights: str) -> str:
    """`weights` as a config holds it: a local path made absolute, so that the config works
    from any directory; imagenet, none and storage URIs as they are."""
    if weights in ("imagenet", "none"):
        return weights
    # imported here: trainable.storage imports pyarrow, which the CLI's flags do without
    from trainable.storage import is_uri

    return weights if is_uri(weights) else str(Path(weights).expanduser().resolve())


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


@functools.cache
def type_hints() -> dict[str, Any]:
    """TrainConfig's field types, resolved once (the annotations are strings)."""
    return get_type_hints(TrainConfig)


def field_type(name: str) -> Any:
    """The Python type of a field: int, float, bool, str or a Literal of its choices."""
    return type_hints()[name]


def field_choices(name: str) -> tuple[str, ...] | None:
    tp = field_type(name)
    return get_args(tp) if getattr(tp, "__origin__", None) is Literal else None


def unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, field_names(), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(field_names())}"
    return f"unknown key '{key}'{hint}"


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold one mapping, with a one-line error for anything else."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise UserError(f"{path}: not valid YAML{line}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{path}: must be a mapping of key: value, got {type(values).__name__}")
    return values


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_KINDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def cast_value(name: str, value: Any, label: str | None = None, *,
               check_range: bool = True) -> Any:
    """`value` as config key `name` holds it: a YAML/CLI scalar (or a sampler's numpy scalar)
    cast to the key's type and checked against its choices and range. Anything else is one
    UserError "LABEL: must be ..., got VALUE" (LABEL: config key 'NAME')."""
    label = label or f"config key '{name}'"
    tp = field_type(name)
    choices = field_choices(name)
    if choices is not None:
        if value is False and "off" in choices:  # YAML 1.1 reads a bare `off` as false
            value = "off"
        if value not in choices:
            raise UserError(f"{label}: must be one of {', '.join(choices)}, got {value!r}")
        return value
    if tp not in _KINDS:
        raise TypeError(f"unsupported field type {tp} for {name}")
    try:
        cast = _cast_scalar(value, tp)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{label}: must be {_KINDS[tp]}, got {value!r}") from None
    if check_range and not _in_range(name, cast):
        raise UserError(f"{label}: must be in {range_text(name)}, got {cast}")
    return cast


def _cast_scalar(value: Any, tp: Any) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError
    if tp is int:
        if isinstance(value, bool):
            raise ValueError
        number = float(value) if isinstance(value, str) else value
        if float(number) != int(number):
            raise ValueError
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
        return number
    if not isinstance(value, str | Path):  # tp is str
        raise ValueError
    return str(value)


def _in_range(name: str, value: Any) -> bool:
    bounds = field_range(name)
    if bounds is None:
        return True
    low, high, low_open, high_open = bounds
    low_ok = value > low if low_open else value >= low
    high_ok = value < high if high_open else value <= high
    return bool(low_ok and high_ok)


def _metadata(name: str) -> Any:
    return next(f for f in dataclasses.fields(TrainConfig) if f.name == name).metadata


def field_help(name: str) -> str:
    return str(_metadata(name)["help"])


def field_range(name: str) -> tuple[float, float, bool, bool] | None:
    """(low, high, low_open, high_open) of a numeric field, or None."""
    meta = _metadata(name)
    if meta.get("low") is None:
        return None
    return meta["low"], meta["high"], meta["low_open"], meta["high_open"]


def range_text(name: str) -> str:
    """The allowed interval of a numeric field, e.g. '(0, 10]'."""
    bounds = field_range(name)
    if bounds is None:
        return "any value"
    low, high, low_open, high_open = bounds
    return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
