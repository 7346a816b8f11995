"""Automatic augmentation policies (TrivialAugmentWide, RandAugment, AutoAugment) and random
erasing, per image, on a whole uint8 batch on the training device.

torchvision applies a policy to one image at a time, in CPU workers. Here every image of a
batch still draws its own op, magnitude and sign, from a host generator (so the draws never
wait on the device), and each op then runs once over all the images that drew it: colour
ops elementwise with a factor per image, the geometric ones (shear, translate, rotate)
through one affine grid with a matrix per image. The op lists, magnitude bins, sign rule and
fill (0) are torchvision's (torchvision/transforms/v2/_auto_augment.py);
tests/test_autoaugment.py checks every op against torchvision.transforms.v2.functional.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

Bins = Callable[[int, int, int], torch.Tensor]  # (bins, height, width) -> each bin's magnitude

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
       "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
       "Invert")
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
NUM_BINS = 31  # torchvision's num_magnitude_bins of TrivialAugmentWide and RandAugment
AUTOAUGMENT_BINS = 10
ERASING_SCALE = (0.02, 0.33)  # torchvision's RandomErasing defaults
ERASING_RATIO = (0.3, 3.3)
ERASING_TRIES = 10


def _linear(high: float) -> Bins:
    # float32 bins, as torchvision's linspace makes them
    return lambda bins, height, width: torch.linspace(0.0, high, bins).double()


def _posterize_bins(top_bits_dropped: int) -> Bins:
    return lambda bins, height, width: (
        8 - (torch.arange(bins) / ((bins - 1) / top_bits_dropped))).round().double()


def _solarize_bins(bins: int, height: int, width: int) -> torch.Tensor:
    return torch.linspace(1.0, 0.0, bins).double()


def _translate_x(bins: int, height: int, width: int) -> torch.Tensor:
    return torch.linspace(0.0, 150.0 / 331.0 * width, bins).double()


def _translate_y(bins: int, height: int, width: int) -> torch.Tensor:
    return torch.linspace(0.0, 150.0 / 331.0 * height, bins).double()


# op -> (its magnitude bins, None for ops without one; whether the magnitude takes a random sign)
Space = dict[str, tuple[Bins | None, bool]]
TRIVIAL_SPACE: Space = {
    "Identity": (None, False), "ShearX": (_linear(0.99), True), "ShearY": (_linear(0.99), True),
    "TranslateX": (_linear(32.0), True), "TranslateY": (_linear(32.0), True),
    "Rotate": (_linear(135.0), True), "Brightness": (_linear(0.99), True),
    "Color": (_linear(0.99), True), "Contrast": (_linear(0.99), True),
    "Sharpness": (_linear(0.99), True), "Posterize": (_posterize_bins(6), False),
    "Solarize": (_solarize_bins, False), "AutoContrast": (None, False), "Equalize": (None, False)}
_RAND_OPS: Space = {
    "ShearX": (_linear(0.3), True), "ShearY": (_linear(0.3), True),
    "TranslateX": (_translate_x, True), "TranslateY": (_translate_y, True),
    "Rotate": (_linear(30.0), True), "Brightness": (_linear(0.9), True),
    "Color": (_linear(0.9), True), "Contrast": (_linear(0.9), True),
    "Sharpness": (_linear(0.9), True), "Posterize": (_posterize_bins(4), False),
    "Solarize": (_solarize_bins, False), "AutoContrast": (None, False), "Equalize": (None, False)}
RANDAUGMENT_SPACE: Space = {"Identity": (None, False), **_RAND_OPS}
AUTOAUGMENT_SPACE: Space = {**_RAND_OPS, "Invert": (None, False)}
# torchvision's AutoAugmentPolicy.IMAGENET: 25 sub-policies of two (op, probability, bin)
IMAGENET_POLICY: tuple[tuple[tuple[str, float, int | None], ...], ...] = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)
SPACES = {"trivial": (TRIVIAL_SPACE, NUM_BINS), "randaugment": (RANDAUGMENT_SPACE, NUM_BINS),
          "autoaugment": (AUTOAUGMENT_SPACE, AUTOAUGMENT_BINS)}


# --- what each image draws ------------------------------------------------------------------

@functools.cache
def _tables(policy: str, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    """(each op's index in OPS, whether it is signed, its magnitude per bin: len(space) x
    bins, 0 for ops without one) of a policy's space at an image size."""
    space, bins = SPACES[policy]
    table = torch.stack([fn(bins, height, width) if fn else torch.zeros(bins, dtype=torch.float64)
                         for fn, _ in space.values()])
    return (torch.tensor([OPS.index(name) for name in space]),
            torch.tensor([signed for _, signed in space.values()]), table)


def _signed(magnitude: torch.Tensor, signed: torch.Tensor, generator: torch.Generator
            ) -> torch.Tensor:
    """torchvision's rule: a signed op's magnitude is negated with probability 1/2."""
    negate = signed & (torch.rand(len(magnitude), generator=generator) <= 0.5)
    return torch.where(negate, -magnitude, magnitude)


def draw_ops(policy: str, n: int, height: int, width: int, generator: torch.Generator, *,
             randaugment_n: int = 2, randaugment_m: int = 9
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ops of `n` images, in the order they apply: a list of (op index into OPS, magnitude),
    each of length n, on the host. Each image draws as torchvision's policy draws for it."""
    if policy not in SPACES:
        raise ValueError(f"unknown augmentation policy {policy!r}")
    op_ids, signed, table = _tables(policy, height, width)
    if policy == "trivial":
        choice = torch.randint(len(op_ids), (n,), generator=generator)
        level = torch.randint(NUM_BINS, (n,), generator=generator)
        magnitude = _signed(table[choice, level], signed[choice], generator)
        return [(op_ids[choice], magnitude)]
    if policy == "randaugment":
        steps = []
        for _ in range(randaugment_n):
            choice = torch.randint(len(op_ids), (n,), generator=generator)
            magnitude = _signed(table[choice, randaugment_m], signed[choice], generator)
            steps.append((op_ids[choice], magnitude))
        return steps
    names = list(AUTOAUGMENT_SPACE)  # autoaugment: each image draws one of 25 sub-policies
    sub_policy = torch.randint(len(IMAGENET_POLICY), (n,), generator=generator)
    steps = []
    for step in range(2):
        entries = [p[step] for p in IMAGENET_POLICY]
        choice = torch.tensor([names.index(name) for name, _, _ in entries])[sub_policy]
        level = torch.tensor([b or 0 for _, _, b in entries])[sub_policy]
        chance = torch.tensor([p for _, p, _ in entries], dtype=torch.float64)[sub_policy]
        applies = torch.rand(n, generator=generator, dtype=torch.float64) <= chance
        magnitude = _signed(table[choice, level], signed[choice], generator)
        op = torch.where(applies, op_ids[choice], OPS.index("Identity"))
        steps.append((op, magnitude))
    return steps


def auto_augment(images: torch.Tensor, policy: str, generator: torch.Generator, *,
                 randaugment_n: int = 2, randaugment_m: int = 9) -> torch.Tensor:
    """A uint8 batch N x 3 x H x W (on any device), each image augmented by its own draws of
    `policy` (trivial | randaugment | autoaugment); `generator` is a host generator."""
    height, width = images.shape[-2:]
    for op, magnitude in draw_ops(policy, len(images), height, width, generator,
                                  randaugment_n=randaugment_n, randaugment_m=randaugment_m):
        images = apply_ops(images, op, magnitude)
    return images


# --- applying them ---------------------------------------------------------------------------

def apply_ops(images: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Image i of the uint8 batch with OPS[op[i]] of magnitude[i] applied (op and magnitude
    on the host): the images are grouped by op, each op runs once on its group, the
    geometric ones (next to each other in OPS) on theirs through one grid."""
    device = images.device
    order = torch.argsort(op, stable=True)  # on the host: no device sync
    op, magnitude = op[order], magnitude[order]
    grouped = images.index_select(0, order.to(device, non_blocking=True))
    geometric = torch.isin(op, torch.tensor([OPS.index(name) for name in GEOMETRIC]))
    parts, start = [], 0
    for k, count in zip(*(t.tolist() for t in torch.unique_consecutive(op, return_counts=True)),
                        strict=True):
        name, end = OPS[k], start + count
        if name in GEOMETRIC:
            if start == int(geometric.nonzero()[0]):  # the first of the geometric groups
                end = start + int(geometric.sum())
                matrices = _inverse_affine(op[start:end], magnitude[start:end],
                                           *images.shape[-2:])
                parts.append(_warp(grouped[start:end], matrices.to(device, non_blocking=True)))
        elif name == "Identity":
            parts.append(grouped[start:end])
        else:
            parts.append(COLOUR_OPS[name](grouped[start:end],
                                          magnitude[start:end].to(device, non_blocking=True)))
        start = start + count
    return torch.cat(parts).index_select(0, torch.argsort(order).to(device, non_blocking=True))


def _per_image(values: torch.Tensor) -> torch.Tensor:
    """N values -> N x 1 x 1 x 1 float32, to scale each image of a batch."""
    return values.to(torch.float32).view(-1, 1, 1, 1)


def _blend(image: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend with a ratio per image: image * r + other * (1 - r), uint8.
    addcmul rounds as torchvision's add_(other, alpha=1 - r) does (a fused multiply-add),
    so the result is torchvision's to the bit."""
    out = image.float().mul_(_per_image(ratio))
    return out.addcmul_(other, _per_image(1.0 - ratio)).clamp_(0, 255).to(torch.uint8)


def _grayscale(image: torch.Tensor) -> torch.Tensor:
    """torchvision's luma of a uint8 image, as float, floored."""
    r, g, b = image.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3).floor_()


def _brightness(image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    return image.float().mul(_per_image(1.0 + magnitude)).clamp_(0, 255).to(torch.uint8)


def _color(image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    return _blend(image, _grayscale(image), 1.0 + magnitude)


def _contrast(image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    mean = _grayscale(image).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(image, mean, 1.0 + magnitude)


@functools.cache
def _smooth_kernel(device: torch.device) -> torch.Tensor:
    a, b = 1.0 / 13.0, 5.0 / 13.0  # PIL's SMOOTH filter, as torchvision's adjust_sharpness
    return torch.tensor([[a, a, a], [a, b, a], [a, a, a]], device=device).expand(3, 1, 3, 3)


def _sharpness(image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_sharpness: blend with the smoothed image, the border kept."""
    if image.shape[-1] <= 2 or image.shape[-2] <= 2:
        return image
    out = image.float()
    blurred = F.conv2d(out, _smooth_kernel(image.device), groups=3).round_()
    inner = out[..., 1:-1, 1:-1]
    inner.addcmul_(blurred.sub_(inner), _per_image(1.0 - (1.0 + magnitude)))
    return out.clamp_(0, 255).to(torch.uint8)


def _posterize(image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    bits = magnitude.to(torch.int64)
    mask = (((1 << bits) - 1) << (8 - bits)).to(torch.uint8)
    return image & mask.view(-1, 1, 1, 1)


def _solarize(image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    threshold = _per_image(255.0 * magnitude)
    return torch.where(image >= threshold, image.bitwise_not(), image)


COLOUR_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Brightness": _brightness, "Color": _color, "Contrast": _contrast,
    "Sharpness": _sharpness, "Posterize": _posterize, "Solarize": _solarize,
    # per image (and channel) already in torchvision's kernels
    "AutoContrast": lambda image, _: TF.autocontrast(image),
    "Equalize": lambda image, _: TF.equalize(image),
    "Invert": lambda image, _: TF.invert(image)}


def _inverse_affine(op: torch.Tensor, magnitude: torch.Tensor, height: int, width: int
                    ) -> torch.Tensor:
    """N x 2 x 3: torchvision's inverse affine matrix (_get_inverse_affine_matrix) of each
    image's geometric op, in float64 on the host, centred coordinates."""
    n = len(op)
    zeros = torch.zeros(n, dtype=torch.float64)
    angle, shear_x, shear_y = zeros.clone(), zeros.clone(), zeros.clone()
    tx, ty, cx, cy = zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()
    is_op = {name: op == OPS.index(name) for name in GEOMETRIC}
    # the shears turn about the top-left corner (center [0, 0]); the rest about the centre
    corner = is_op["ShearX"] | is_op["ShearY"]
    cx[corner], cy[corner] = -width * 0.5, -height * 0.5
    shear = torch.rad2deg(torch.atan(magnitude))
    shear_x = torch.where(is_op["ShearX"], shear, shear_x)
    shear_y = torch.where(is_op["ShearY"], shear, shear_y)
    tx = torch.where(is_op["TranslateX"], magnitude.trunc(), tx)  # int(magnitude)
    ty = torch.where(is_op["TranslateY"], magnitude.trunc(), ty)
    # rotate(angle) is affine(-angle), after torchvision's angle % 360
    angle = torch.where(is_op["Rotate"], -torch.remainder(magnitude, 360.0), angle)

    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    cos_sy, tan_sx = torch.cos(sy), torch.tan(sx)
    a = torch.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot - sy) / cos_sy
    d = torch.cos(rot) - c * tan_sx
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = cx - m0 * (cx + tx) - m1 * (cy + ty)
    m5 = cy - m3 * (cx + tx) - m4 * (cy + ty)
    return torch.stack([m0, m1, m2, m3, m4, m5], 1).view(n, 2, 3)


def _warp(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Each uint8 image resampled (nearest, 0 outside) through its inverse matrix, as
    torchvision's affine_image builds the grid."""
    n, _, height, width = images.shape
    theta = matrices.to(torch.float32)
    base = torch.empty(1, height, width, 3, device=images.device)
    base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width,
                                      device=images.device))
    base[..., 1].copy_(torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height,
                                      device=images.device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    scale = torch.tensor([0.5 * width, 0.5 * height], device=images.device)
    rescaled = (theta.transpose(1, 2) / scale).permute(1, 0, 2).reshape(3, n * 2)
    # one product for the whole batch: (H*W x 3) @ (3 x 2N), each image's two columns
    grid = (base.view(height * width, 3) @ rescaled).view(height, width, n, 2)
    grid = grid.permute(2, 0, 1, 3).contiguous()  # grid_sample reads a strided grid slowly
    warped = F.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)
    return warped.round_().to(torch.uint8)


# --- random erasing --------------------------------------------------------------------------

def random_erasing(x: torch.Tensor, probability: float, generator: torch.Generator
                   ) -> torch.Tensor:
    """torchvision's RandomErasing (scale 0.02-0.33, ratio 0.3-3.3, value 0) per image of a
    normalised batch: with `probability`, a rectangle of the first of 10 tries that fits."""
    n, _, height, width = x.shape
    area = torch.empty(n, ERASING_TRIES, dtype=torch.float64).uniform_(
        *ERASING_SCALE, generator=generator) * (height * width)
    log_ratio = torch.empty(n, ERASING_TRIES, dtype=torch.float64).uniform_(
        math.log(ERASING_RATIO[0]), math.log(ERASING_RATIO[1]), generator=generator)
    h = (area * log_ratio.exp()).sqrt().round().long()
    w = (area / log_ratio.exp()).sqrt().round().long()
    fits = (h < height) & (w < width)
    first = fits.long().argmax(1, keepdim=True)  # the first try that fits
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    top = (torch.rand(n, generator=generator, dtype=torch.float64) * (height - h + 1)).long()
    left = (torch.rand(n, generator=generator, dtype=torch.float64) * (width - w + 1)).long()
    erase = (torch.rand(n, generator=generator) < probability) & fits.any(1)
    boxes = torch.stack([top, top + h, left, left + w, erase.long()], 1).to(x.device,
                                                                             non_blocking=True)
    rows = torch.arange(height, device=x.device).view(1, -1)
    cols = torch.arange(width, device=x.device).view(1, -1)
    in_rows = (rows >= boxes[:, :1]) & (rows < boxes[:, 1:2])
    in_cols = (cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:4])
    mask = in_rows[:, :, None] & in_cols[:, None, :] & boxes[:, 4:].bool()[:, :, None]
    return x.masked_fill(mask.unsqueeze(1), 0.0)
