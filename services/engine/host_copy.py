"""Small host values onto the device without the host waiting for the device.

A plain copy from pageable host memory (``torch.tensor(values, device="cuda")``, ``.to(cuda)``)
waits for everything queued on the stream first. With a decode step launched ahead
(overlap.py) that is the whole step: the host stops preparing the next one, and the device
then idles while it does. Staged through pinned memory and copied with ``non_blocking``, the
copy takes its place in the stream's order and the host goes on; the pinned block goes back
to torch's host allocator only once the copy has run.
"""

from __future__ import annotations

import torch


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` (itself where ``device`` is the CPU)."""
    if device.type != "cuda":
        return values
    return values.pin_memory().to(device, non_blocking=True)


def device_tensor(values, device: torch.device) -> torch.Tensor:
    """An int64 tensor of ``values`` (ids, indices: nested lists too) on ``device``."""
    return to_device(torch.tensor(values, dtype=torch.long), device)
