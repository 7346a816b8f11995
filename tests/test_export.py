from pathlib import Path

import numpy as np
import pytest
import torch

from search.cli import main
from trainable.model import ImageClassifier
from trainable.saved import load_model_dir


@pytest.mark.slow
def test_onnx_export_matches_pytorch(flat_tree: Path, tmp_path: Path) -> None:
    import onnxruntime

    out = tmp_path / "out"
    main(["train", "--data", f"imagefolder:{flat_tree}", "--epochs", "1", "--weights", "none",
          "--resolution", "16", "--batch-size", "8", "--device", "cpu", "--onnx",
          "--output", str(out)])
    saved = load_model_dir(out)
    images = torch.rand(5, 3, 16, 16)  # a batch size other than the export example's
    with torch.no_grad():
        expected = ImageClassifier(saved.model, 16).eval()(images).numpy()
    session = onnxruntime.InferenceSession(str(out / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    assert logits.shape == (5, 3)
    # A one-epoch model's logits reach the thousands, where float32 resolves only ~1e-4,
    # so the tolerance is relative as well as absolute.
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-4)
    assert (logits.argmax(1) == expected.argmax(1)).all()
