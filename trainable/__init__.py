"""One ResNet18 fine-tuning run, usable without Ray: `configure_torch()` once per process,
then `fit(TrainConfig(...), report)`.

The names that need torch load on first use (PEP 562), so that `import trainable.config`
(the CLI's flags, the space loader) does not import torch.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from trainable.config import TrainConfig as TrainConfig
from trainable.errors import UserError as UserError

if TYPE_CHECKING:
    from trainable.data import Dataset as Dataset
    from trainable.data import Split as Split
    from trainable.data import load_dataset as load_dataset
    from trainable.runtime import configure_torch as configure_torch
    from trainable.train import FitResult as FitResult
    from trainable.train import TrainingDiverged as TrainingDiverged
    from trainable.train import fit as fit

_TORCH_MODULE_OF = {"Dataset": "trainable.data", "Split": "trainable.data",
                    "load_dataset": "trainable.data", "configure_torch": "trainable.runtime",
                    "FitResult": "trainable.train", "TrainingDiverged": "trainable.train",
                    "fit": "trainable.train"}


def __getattr__(name: str) -> Any:
    if name not in _TORCH_MODULE_OF:
        raise AttributeError(f"module 'trainable' has no attribute {name!r}")
    return getattr(import_module(_TORCH_MODULE_OF[name]), name)
