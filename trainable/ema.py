"""An exponential moving average of a model's weights, as torchvision's reference recipe keeps
it (references/classification: utils.ExponentialMovingAverage, --model-ema)."""

from __future__ import annotations

from typing import Any, cast

from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.models import ResNet


class WeightAverage:
    """`averaged` follows `model`: every `every` optimizer steps each weight and buffer (so the
    BatchNorm statistics too) moves to the model's by 1 - decay**every, i.e. by `decay` per
    step whatever `every` is. As in torchvision's reference, during the lr warmup each update
    restarts the average, so it starts from a copy of the weights at the first update after
    warmup."""

    def __init__(self, model: ResNet, decay: float, every: int):
        self.model = model
        self.every = every
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay ** every),
                                      use_buffers=True)

    def after_step(self, step: int, warmup_steps: int) -> None:
        """Call after optimizer step `step` of the run (counted from 0)."""
        if (step + 1) % self.every:
            return
        self.averaged.update_parameters(self.model)
        if step < warmup_steps:
            self.averaged.n_averaged.fill_(0)  # the next update copies the weights again

    @property
    def module(self) -> ResNet:
        """The averaged copy of the model."""
        return cast(ResNet, self.averaged.module)

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)
