"""Learning-rate schedule: linear warmup per step, then cosine decay to min_lr."""

import math


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of every group's peak lr before optimizer step `step` (0-based).

    Each group's lr is `lr * lr_scale * lr_factor(...)`, so the layer-wise ratios survive.
    `min_ratio` is min_lr / lr.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
