"""Scratch for kernels that reduce across programs within one launch (split-KV attention, split-K projections): an
fp32 buffer for the partial results and a zeroed int32 buffer of arrival tickets (the last program of a group to
take one reduces the group and sets its ticket back to 0), one pair per device and kernel family.

Grown on demand and never freed: a captured CUDA graph keeps the pointers it was given, so buffers that are
replaced stay alive, and growing during capture is refused (reserve the largest size before capturing)."""
from __future__ import annotations

import torch


def device_key(device: torch.device | str) -> torch.device:
    """The device as tensors report it: ``cuda`` becomes ``cuda:<current index>`` (the two compare unequal)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class ReductionScratch:
    def __init__(self, kernel: str, reserve: str) -> None:
        self.kernel, self.reserve = kernel, reserve  # names for the error message
        self.buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._retired: list[torch.Tensor] = []

    def current(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(partials, tickets) the launches on ``device`` use now (None before the first launch or reservation)."""
        return self.buffers.get(device_key(device))

    def get(self, device: torch.device | str, partials: int, tickets: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers of at least ``partials`` floats and ``tickets`` tickets on ``device``: the current ones when
        they are large enough (no torch op: a launcher issues the same work every step), else new ones."""
        device = device_key(device)
        current = self.buffers.get(device)
        if current is not None and current[0].numel() >= partials and current[1].numel() >= tickets:
            return current
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{self.kernel}: its scratch would grow during CUDA-graph capture; run the largest "
                               f"batch eagerly first or call {self.reserve} before capturing")
        if current is not None:
            self._retired.extend(current)
            partials, tickets = max(partials, current[0].numel()), max(tickets, current[1].numel())
        self.buffers[device] = (torch.empty(max(partials, 1), dtype=torch.float32, device=device),
                                torch.zeros(max(tickets, 1), dtype=torch.int32, device=device))
        return self.buffers[device]
