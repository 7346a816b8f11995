"""A split's images (or what a trial's frozen stages made of them) and labels served in
batches on the trial's device: resident there when they fit the trial's budget, else gathered
per batch into pinned memory and copied on a side stream while the step before runs."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from trainable.data import Split

# A split lives on the GPU as uint8 while it fits this share of the trial's part of the GPU's
# memory; larger ones are gathered per batch on the host and copied asynchronously.
DEVICE_RESIDENT_SHARE = 0.25


def resident_budget(device: torch.device, gpu_share: float = 1.0) -> int:
    """Bytes of uint8 images (or frozen stages' outputs) that may live on `device`: on a GPU,
    DEVICE_RESIDENT_SHARE of this trial's share of its memory (trials packed on one GPU each
    count their fraction); on the CPU the images are used where they are, so anything goes."""
    if device.type != "cuda":
        return sys.maxsize
    total = torch.cuda.get_device_properties(device).total_memory
    return int(total * min(gpu_share, 1.0) * DEVICE_RESIDENT_SHARE)


class DeviceImages:
    """A split's uint8 images and labels, served in batches on the device; or, given `rows`,
    those rows (of any dtype and shape, on the host or the device) in place of the images:
    the outputs of a trial's frozen stages (`trainable.frozen`).

    Images up to `resident_bytes` are indexed where they land with one copy to the device
    (on the CPU: no copy at all, the mapped file itself, whose pages the trials of a node
    share). Larger ones stay in host memory, and a background thread gathers each batch
    into pinned memory (reading the rows in file order) and copies it to the device on a
    side stream while the step before it runs.
    """

    def __init__(self, split: Split, device: torch.device, resident_bytes: int | None = None,
                 *, rows: torch.Tensor | None = None):
        with warnings.catch_warnings():  # mapped arrays are read-only; we never write
            warnings.filterwarnings("ignore", message=".*not writable.*")
            images = torch.from_numpy(split.images) if rows is None else rows
            self.host_labels = torch.from_numpy(np.ascontiguousarray(split.labels))
        self.labels = self.host_labels.to(device)
        self.device = device
        budget = resident_budget(device) if resident_bytes is None else resident_bytes
        self.resident = images.nbytes <= budget
        self.images = images.to(device) if self.resident else images

    @property
    def index_device(self) -> torch.device:
        """Where batch indices should live: there, `batches` needs no host-device copy."""
        return self.images.device

    @property
    def device_bytes(self) -> int:
        """What the images take on a GPU."""
        return self.images.nbytes if self.device.type == "cuda" and self.resident else 0

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_indices: Iterable[torch.Tensor]
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images or rows, labels) on the device for each tensor of indices, in order."""
        if not self.resident:
            yield from self._gathered(list(batch_indices))
            return
        for idx in batch_indices:
            # index_select: about 30x faster than [] for a uint8 batch on the CPU.
            yield self.images.index_select(0, idx), self.labels.index_select(0, idx)

    def _gathered(self, batch_indices: list[torch.Tensor]
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        cuda = self.device.type == "cuda"
        copy_stream = torch.cuda.Stream(self.device) if cuda else None
        buffers: list[torch.Tensor | None] = [None, None]
        copied: list[torch.cuda.Event | None] = [None, None]  # per buffer: its last copy

        def gather(slot: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                          torch.Tensor]:
            event = copied[slot]
            if event is not None:
                event.synchronize()  # the buffer's previous batch has left it
            rows, order = idx.sort()  # file order reads each page once, ahead of the next
            buffer = buffers[slot]
            if buffer is None or len(buffer) < len(idx):
                buffer = buffers[slot] = torch.empty((len(idx), *self.images.shape[1:]),
                                                     dtype=self.images.dtype, pin_memory=cuda)
            host = buffer[:len(idx)]
            torch.index_select(self.images, 0, rows, out=host)
            restore = order.argsort()  # back to the batch's own order on the device
            labels = self.host_labels.index_select(0, idx)
            if cuda:
                restore, labels = restore.pin_memory(), labels.pin_memory()
            with torch.cuda.stream(copy_stream) if cuda else contextlib.nullcontext():
                moved = [t.to(self.device, non_blocking=True) for t in (host, restore, labels)]
                if cuda:
                    copied[slot] = torch.cuda.Event()
                    copied[slot].record(copy_stream)  # type: ignore[union-attr]
            return moved[0], moved[1], moved[2]

        with ThreadPoolExecutor(max_workers=1) as gatherer:
            pending = gatherer.submit(gather, 0, batch_indices[0]) if batch_indices else None
            for i in range(len(batch_indices)):
                assert pending is not None
                images, restore, labels = pending.result()
                if i + 1 < len(batch_indices):
                    pending = gatherer.submit(gather, (i + 1) % 2, batch_indices[i + 1])
                if cuda:
                    compute = torch.cuda.current_stream(self.device)
                    compute.wait_event(copied[i % 2])  # type: ignore[arg-type]
                    for t in (images, restore, labels):
                        t.record_stream(compute)  # allocated on the copy stream
                yield images.index_select(0, restore), labels
