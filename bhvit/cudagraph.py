"""A whole training step as one CUDA graph (``bhvit train --cuda-graph``).

In eager mode every PyTorch operator of a step is launched from the host, and for the
small BHViT models (thousands of operators per step, mostly element-wise) the host's
launch work, not the GPU's arithmetic, bounds the step. A CUDA graph records the step's
kernels once and replays them with one launch. Unlike ``torch.compile`` nothing is
compiled: capturing costs about one step.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional, Sequence, Tuple

import torch

from .errors import ConfigError

__all__ = ["GraphedStep", "GraphCaptureError"]


class GraphCaptureError(RuntimeError):
    """Capturing the step failed. Nothing of the captured step ran, so the caller can go
    on with eager steps (after dropping the gradients the capture left)."""


class GraphedStep:
    """Run ``fn(*inputs)``, one whole training step, as a CUDA graph.

    ``fn`` does everything a step does (zero the gradients, forward, loss, backward,
    optimizer step) and returns a tuple of tensors (e.g. the detached loss and logits).
    It must not synchronise with the host (no ``.item()``, no data-dependent Python
    control flow) and must run the same operators on every call; the inputs keep their
    shapes and dtypes. The optimizer must be capturable: see ``bhvit.train.make_optimizer``.

    - The first ``warmup`` calls run ``fn`` eagerly on a side stream. They are real
      training steps; they also do what happens only once (optimizer state, cuDNN and
      cuBLAS workspaces, QD's start from data), which a graph could not record.
    - The next call captures ``fn`` on static copies of its inputs, then replays it.
    - Every later call copies its inputs into those buffers and replays the graph.

    Each call returns the graph's own output tensors, which the next call overwrites:
    use them (or enqueue work that reads them) before calling again. ``captures`` counts
    the graphs recorded.
    """

    def __init__(self, fn: Callable[..., Tuple[torch.Tensor, ...]], warmup: int = 3):
        if warmup < 1:
            raise ConfigError(
                f"GraphedStep: warmup must be >= 1 (lazy initialisation cannot be captured), got {warmup}."
            )
        self.fn = fn
        self._eager_left = warmup
        self._graph = None
        self._static: Optional[Tuple[torch.Tensor, ...]] = None
        self._out: Optional[Tuple[torch.Tensor, ...]] = None
        self._stream = None
        self._device = None  # the inputs' CUDA device: streams and graph live there
        self.captures = 0

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def __call__(self, *inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if self._graph is not None:
            for s, v in zip(self._static, inputs):
                if s.shape != v.shape or s.dtype != v.dtype:
                    raise ConfigError(
                        f"GraphedStep: the graph was captured for inputs of shape "
                        f"{tuple(s.shape)} ({s.dtype}), got {tuple(v.shape)} ({v.dtype}); "
                        "a CUDA graph replays fixed shapes (drop partial batches)."
                    )
                s.copy_(v, non_blocking=True)
            self._replay()
            return self._out
        if self._device is None and inputs:
            self._device = inputs[0].device
        if self._eager_left > 0:
            self._eager_left -= 1
            with self._on_side_stream():
                return self.fn(*inputs)
        self._static = tuple(v.clone() for v in inputs)
        try:
            self._out = self._capture(self._static)
        except Exception as e:
            raise GraphCaptureError(
                f"capturing the training step as a CUDA graph failed "
                f"({type(e).__name__}: {e}). Something in the step synchronises "
                "with the host or cannot be captured."
            ) from e
        self.captures += 1
        self._replay()
        return self._out

    # --- the CUDA parts (a test replaces these to run the bookkeeping on the CPU) -----
    def _side_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self._device)
        return self._stream

    @contextlib.contextmanager
    def _on_side_stream(self):
        with torch.cuda.device(self._device):
            cur, side = torch.cuda.current_stream(), self._side_stream()
            side.wait_stream(cur)
            with torch.cuda.stream(side), warnings.catch_warnings():
                # A capturable optimizer warns when it steps outside a graph: here it must.
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                yield
            cur.wait_stream(side)

    def _capture(self, static: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        graph, failed = torch.cuda.CUDAGraph(), None
        try:
            with torch.cuda.device(self._device), warnings.catch_warnings():
                # An empty graph means the step ran on another device or stream: replaying
                # it would silently do nothing.
                warnings.filterwarnings("error", message=".*CUDA Graph is empty.*")
                with torch.cuda.graph(graph, stream=self._side_stream()):
                    try:
                        out = self.fn(*static)
                    except Exception as e:
                        failed = e  # ending the capture raises an error of its own
                        raise
        except Exception as e:
            raise failed or e
        self._graph = graph  # only once the capture has succeeded
        return out

    def _replay(self) -> None:
        with torch.cuda.device(self._device):
            self._graph.replay()
