"""The file names of the one model format (trainable/saved.py reads and writes them): a leaf
module, so that loading weights (trainable/weights.py) can name them without importing the
model code that loads weights."""

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"
TRIAL_EPOCHS_FILE = "epochs.json"
ENSEMBLE_CONFIG_FILE = "ensemble.yaml"
ENSEMBLE_WEIGHTS_FILE = "ensemble.pt"
MODEL_ONNX_FILE = "model.onnx"
ENSEMBLE_ONNX_FILE = "ensemble.onnx"
