"""How runs execute: the process-wide torch settings they rely on, and each run's `Runtime`
(device, precision, memory format, resolution)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from trainable.augment import normalize, resize
from trainable.config import TrainConfig
from trainable.errors import UserError


def configure_torch() -> None:
    """Process-wide torch settings for training; called once by whatever owns the process
    (the CLI, a Tune trial, the tests, a benchmark), never by library code. Idempotent."""
    torch.backends.cudnn.benchmark = True
    # Weights, gradients and momentum can underflow into denormal floats, which x86 CPUs
    # compute far slower: one digits epoch at 16px, batch 16, took 125 s, 7.5 s flushed.
    torch.set_flush_denormal(True)


@dataclass
class Runtime:
    """How a run executes, derived from the config and the device: where, in what precision
    and memory format, and the side length its model sees."""
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    resolution: int

    @classmethod
    def for_config(cls, cfg: TrainConfig, device: str | torch.device | None = None) -> Runtime:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if cfg.amp == "fp16" and dev.type != "cuda":
            raise UserError("config key 'amp': fp16 needs CUDA; use bf16 or off on the CPU")
        amp = {"auto": "bf16" if dev.type == "cuda" else "off"}.get(cfg.amp, cfg.amp)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
        return cls(dev, dtype, cfg.channels_last and dev.type == "cuda", cfg.resolution)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 batch on the device -> normalised float input in the model's memory format,
        resized to the run's resolution where the data was decoded larger (a search that
        searches `resolution` decodes once, at the largest)."""
        x = normalize(resize(images_uint8, self.resolution))
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
