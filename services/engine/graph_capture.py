"""What the two kinds of replayed steps share (decode_graphs.py, mixed_graphs.py): step
bookkeeping, and capturing a function as a CUDA graph after warming it up."""

from __future__ import annotations

from collections.abc import Callable

import torch


class StaticSteps:
    """Steps run on static buffers, from CUDA graphs once any were captured (``_graphs``)."""

    def __init__(self) -> None:
        self._graphs: dict = {}
        self.steps = 0
        """Steps run on the static buffers (replayed or eager)."""
        self.launched_at = 0.0
        """perf_counter() when the last step's inputs were ready and its device work began."""

    @property
    def captured(self) -> bool:
        return bool(self._graphs)


def capture_graph(fn: Callable[[], object], pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """``fn`` captured as a CUDA graph in memory pool ``pool`` (None: a new one), with what it
    returned during capture. It first runs twice on a side stream: that compiles its kernels
    and sets up cuBLAS workspaces, which must not happen inside a capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out
