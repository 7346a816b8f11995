"""One ResNet18 fine-tuning run, usable without Ray: `fit(TrainConfig(...), report)`."""

from trainable.config import TrainConfig
from trainable.data import Dataset, Split, load_dataset
from trainable.errors import UserError
from trainable.train import FitResult, TrainingDiverged, fit

__all__ = ["Dataset", "FitResult", "Split", "TrainConfig", "TrainingDiverged", "UserError",
           "fit", "load_dataset"]
