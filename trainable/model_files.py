"""The names of the one model format (trainable/saved.py reads and writes it): its files and
the ensemble methods an ensemble.yaml may name. A leaf module without torch, so that loading
weights (trainable/weights.py) and the CLI's help can name them."""

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"
TRIAL_EPOCHS_FILE = "epochs.json"
ENSEMBLE_CONFIG_FILE = "ensemble.yaml"
ENSEMBLE_WEIGHTS_FILE = "ensemble.pt"
MODEL_ONNX_FILE = "model.onnx"
ENSEMBLE_ONNX_FILE = "ensemble.onnx"
ENSEMBLE_METHODS = ("average", "vote", "weighted", "stack", "concat")  # trainable/fusion.py
