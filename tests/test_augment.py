import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainable.augment import crop_and_flip, mix, normalize, resize, soft_targets
from trainable.schedule import lr_factor


def test_soft_targets_with_smoothing_sum_to_one() -> None:
    targets = soft_targets(torch.tensor([0, 2, 1]), 4, 0.1)
    assert torch.allclose(targets.sum(1), torch.ones(3))
    assert targets[0, 0] == pytest.approx(0.9 + 0.025) and targets[0, 1] == pytest.approx(0.025)


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixed_targets_sum_to_one_and_match_the_pixels(mixup: float, cutmix: float) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16)])
        targets = soft_targets(torch.tensor([0, 1]), 2, 0.0)
        mixed, mixed_targets = mix(x, targets, mixup, cutmix, 1.0, rng)
        assert torch.allclose(mixed_targets.sum(1), torch.ones(2))
        # Image 0 (zeros) got class-1 pixels in exactly the share its target says.
        assert mixed[0].mean().item() == pytest.approx(mixed_targets[0, 1].item(), abs=1e-6)


def test_mix_prob_zero_or_no_alpha_leaves_the_batch_alone() -> None:
    x, t = torch.rand(4, 3, 8, 8), soft_targets(torch.tensor([0, 1, 0, 1]), 2, 0.0)
    rng = np.random.default_rng(0)
    for args in ((0.4, 1.0, 0.0), (0.0, 0.0, 1.0)):
        out, out_t = mix(x, t, *args, rng)
        assert out is x and out_t is t


def test_pad_crop_shifts_by_whole_pixels_without_blur() -> None:
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    out = crop_and_flip(x, "pad", False, torch.Generator().manual_seed(1))
    for i in range(2):
        values = set(out[i].flatten().round().tolist()) - {0.0}
        assert values <= set(x[i].flatten().tolist())  # only original pixels (or padding)
        assert torch.allclose(out[i], out[i].round(), atol=1e-3)  # no interpolated values


def test_flip_only_mirrors_exactly() -> None:
    x = torch.rand(64, 3, 8, 8)
    out = crop_and_flip(x, "none", True, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and 10 < sum(flipped) < 54


def test_resized_crop_keeps_shape_and_changes_images() -> None:
    x = torch.rand(8, 3, 32, 32)
    out = crop_and_flip(x, "resized", True, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.allclose(out, x)


def test_normalize_uses_imagenet_statistics() -> None:
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert normalize(x)[0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)


def test_cross_entropy_of_smoothed_and_mixed_targets_is_the_soft_target_formula() -> None:
    # training passes class probabilities to F.cross_entropy: the mean over the batch of
    # -sum(target * log_softmax), also for the bf16 logits of CPU autocast
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.tensor([0, 3, 2, 1, 0, 2])
    smoothed = soft_targets(labels, 4, 0.1)
    targets = 0.6 * smoothed + 0.4 * smoothed.flip(0)  # as `mix` mixes them
    expected = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
    assert F.cross_entropy(logits, targets).item() == pytest.approx(expected.item(), abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(logits.bfloat16(), targets)
    expected = -(targets * F.log_softmax(logits.bfloat16().float(), dim=1)).sum(1).mean()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_warmup_is_linear_per_step_then_cosine_to_min_lr() -> None:
    assert lr_factor(0, 10, 110, 0.0) == pytest.approx(0.1)
    assert lr_factor(4, 10, 110, 0.0) == pytest.approx(0.5)
    assert lr_factor(10, 10, 110, 0.0) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, 0.0) == pytest.approx(0.5)  # half-way down the cosine
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1)  # ends at min_lr / lr
    assert lr_factor(5, 0, 10, 0.0) == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.5)))


def test_resize_of_a_batch_is_antialiased_and_per_image() -> None:
    # one bright column in every 4: plain bilinear at a quarter of the size samples between
    # two dark columns and loses it; antialiasing keeps its share of the light (255 / 4)
    stripes = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    stripes[..., ::4] = 255
    plain = F.interpolate(stripes.float(), size=(8, 8), mode="bilinear", align_corners=False)
    assert plain.max() == 0
    small = resize(stripes, 8)
    assert small.shape == (2, 3, 8, 8) and small.dtype == torch.float32
    assert small[..., 1:-1].flatten().tolist() == pytest.approx([255 / 4] * 2 * 3 * 8 * 6,
                                                                abs=0.5)
    batch = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8)
    resized = resize(batch, 16)
    for i in range(3):  # batched: each image as if resized alone
        assert torch.allclose(resized[i:i + 1], resize(batch[i:i + 1], 16), atol=1e-4)
    assert resize(batch, 24) is batch  # already at the resolution: no copy, no resampling
