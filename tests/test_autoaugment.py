import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from trainable.autoaugment import (
    AUTOAUGMENT_BINS,
    AUTOAUGMENT_SPACE,
    GEOMETRIC,
    IMAGENET_POLICY,
    NUM_BINS,
    OPS,
    RANDAUGMENT_SPACE,
    TRIVIAL_SPACE,
    apply_ops,
    auto_augment,
    draw_ops,
    random_erasing,
)

POLICIES = ("trivial", "randaugment", "autoaugment")


def images(n: int, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 images with structure (gradients, a bright square) and noise, so that every op
    changes them."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height).view(1, 1, -1, 1)
    x = torch.linspace(0, 1, width).view(1, 1, 1, -1)
    tint = torch.rand(n, 3, 1, 1, generator=g)
    base = 200 * tint * (0.3 * y + 0.7 * x) + 30 * torch.rand(n, 3, height, width, generator=g)
    base[..., height // 4: height // 2, width // 3: width // 2] += 60
    return base.clamp(0, 255).to(torch.uint8)


def torchvision_op(image: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    """What torchvision's policies do for op `name` of `magnitude` (the mapping of
    _AutoAugmentBase._apply_image_or_video_transform, fill None, nearest)."""
    nearest = v2.InterpolationMode.NEAREST
    if name == "Identity":
        return image
    if name in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0,
                         shear=[shear, 0.0] if name == "ShearX" else [0.0, shear],
                         interpolation=nearest, center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if name == "TranslateX" else [0, int(magnitude)]
        return TF.affine(image, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0],
                         interpolation=nearest)
    if name == "Rotate":
        return TF.rotate(image, angle=magnitude, interpolation=nearest)
    return {
        "Brightness": lambda: TF.adjust_brightness(image, 1.0 + magnitude),
        "Color": lambda: TF.adjust_saturation(image, 1.0 + magnitude),
        "Contrast": lambda: TF.adjust_contrast(image, 1.0 + magnitude),
        "Sharpness": lambda: TF.adjust_sharpness(image, 1.0 + magnitude),
        "Posterize": lambda: TF.posterize(image, int(magnitude)),
        "Solarize": lambda: TF.solarize(image, 255.0 * magnitude),
        "AutoContrast": lambda: TF.autocontrast(image),
        "Equalize": lambda: TF.equalize(image),
        "Invert": lambda: TF.invert(image),
    }[name]()


def magnitudes_of(name: str, height: int, width: int) -> list[float]:
    """Every magnitude the three policies can give `name` at this size, with both signs."""
    values: set[float] = set()
    for space, bins in ((TRIVIAL_SPACE, NUM_BINS), (RANDAUGMENT_SPACE, NUM_BINS),
                        (AUTOAUGMENT_SPACE, AUTOAUGMENT_BINS)):
        fn, signed = space.get(name, (None, False))
        if fn is not None:
            for m in fn(bins, height, width).tolist():
                values |= {m, -m} if signed else {m}
    return sorted(values) or [0.0]


@pytest.mark.parametrize("name", [n for n in OPS if n not in GEOMETRIC])
def test_each_colour_op_equals_torchvision_on_every_image(name: str) -> None:
    magnitudes = magnitudes_of(name, 32, 32)
    batch = images(len(magnitudes))
    out = apply_ops(batch, torch.full((len(batch),), OPS.index(name)),
                    torch.tensor(magnitudes, dtype=torch.float64))
    for i, m in enumerate(magnitudes):
        assert torch.equal(out[i], torchvision_op(batch[i], name, m)), (name, m)


@pytest.mark.parametrize("name", GEOMETRIC)
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_each_geometric_op_equals_torchvision_on_every_image(name: str,
                                                             size: tuple[int, int]) -> None:
    magnitudes = magnitudes_of(name, *size)
    batch = images(len(magnitudes), *size)
    out = apply_ops(batch, torch.full((len(batch),), OPS.index(name)),
                    torch.tensor(magnitudes, dtype=torch.float64))
    for i, m in enumerate(magnitudes):
        expected = torchvision_op(batch[i], name, m)
        # torchvision's matrix and grid formulas, but the matrices evaluated by torch's
        # float64 ops for the batch (torchvision: Python's math per image) and the grid as one
        # matrix product for the batch (torchvision: one per image): both may differ in the
        # last bit, and where a sampling point sits on the midpoint between two pixels,
        # nearest may then pick the other one (at most 0.6% of an image's pixels at these
        # sizes, 1.2% at 224px, all in shears)
        differs = (out[i] != expected).any(0).float().mean().item()
        assert differs <= 0.02, (name, m, differs)


def test_the_policies_use_torchvisions_ops_and_magnitude_bins() -> None:
    for ours, theirs, bins in ((TRIVIAL_SPACE, v2.TrivialAugmentWide, NUM_BINS),
                               (RANDAUGMENT_SPACE, v2.RandAugment, NUM_BINS),
                               (AUTOAUGMENT_SPACE, v2.AutoAugment, AUTOAUGMENT_BINS)):
        space = theirs._AUGMENTATION_SPACE  # private, read here only to check ours
        assert list(ours) == list(space)
        for name, (fn, signed) in space.items():
            assert ours[name][1] == signed, name
            expected = fn(bins, 24, 40)
            got = ours[name][0]
            if expected is None:
                assert got is None, name
            else:
                assert got is not None and torch.equal(got(bins, 24, 40),
                                                       expected.double()), name
    policy = v2.AutoAugment()._policies
    assert [tuple(p) for p in policy] == list(IMAGENET_POLICY)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_policy_keeps_dtype_shape_and_device_and_changes_images(policy: str) -> None:
    batch = images(64)
    out = auto_augment(batch, policy, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == batch.shape and out.device == batch.device
    changed = sum(not torch.equal(out[i], batch[i]) for i in range(64))
    assert changed > 32


@pytest.mark.parametrize("policy", POLICIES)
def test_the_same_seed_gives_the_same_output(policy: str) -> None:
    batch = images(32)
    first = auto_augment(batch, policy, torch.Generator().manual_seed(7))
    assert torch.equal(first, auto_augment(batch, policy, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, auto_augment(batch, policy,
                                               torch.Generator().manual_seed(8)))


@pytest.mark.parametrize("policy", POLICIES)
def test_images_of_one_batch_draw_different_ops(policy: str) -> None:
    steps = draw_ops(policy, 256, 32, 32, torch.Generator().manual_seed(0))
    assert len(steps) == 2 if policy != "trivial" else len(steps) == 1
    ops = steps[0][0]
    assert len(ops.unique()) >= 8  # of the 14 (trivial, randaugment) or 10 (autoaugment)


def test_randaugment_applies_n_ops_of_magnitude_m() -> None:
    steps = draw_ops("randaugment", 500, 32, 32, torch.Generator().manual_seed(0),
                     randaugment_n=3, randaugment_m=30)
    assert len(steps) == 3
    op, magnitude = steps[0]
    rotate = magnitude[op == OPS.index("Rotate")].abs()
    assert len(rotate) and torch.all(rotate == 30.0)  # bin 30 of 0-30 degrees


def test_two_images_of_a_batch_get_what_each_drew() -> None:
    batch = images(2)
    op = torch.tensor([OPS.index("Invert"), OPS.index("Rotate")])
    out = apply_ops(batch, op, torch.tensor([0.0, 90.0], dtype=torch.float64))
    assert torch.equal(out[0], TF.invert(batch[0]))
    assert torch.equal(out[1], TF.rotate(batch[1], 90.0))


def test_random_erasing_erases_a_rectangle_in_the_share_asked() -> None:
    x = torch.randn(400, 3, 32, 32) + 5  # no zeros but the erased
    out = random_erasing(x, 0.5, torch.Generator().manual_seed(0))
    erased = (out == 0).all(1)  # N x H x W
    hit = erased.flatten(1).any(1)
    assert 150 < hit.sum() < 250
    for i in hit.nonzero().squeeze(1).tolist()[:50]:
        rows, cols = erased[i].any(1).nonzero(), erased[i].any(0).nonzero()
        h, w = len(rows), len(cols)
        assert erased[i].sum() == h * w  # one rectangle
        assert 0.02 * 1024 * 0.5 <= h * w <= 0.33 * 1024 * 1.5
    assert torch.equal(out[~hit], x[~hit])
    assert torch.equal(random_erasing(x, 0.0, torch.Generator().manual_seed(0)), x)
