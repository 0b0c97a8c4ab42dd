"""ONNX export of a bhvit model (a BHViT or a ReActNet, binary or full precision) with a
dynamic batch dimension.

ONNX is for interchange: running a model in another tool (ONNX Runtime, TensorRT,
OpenVINO, a converter to another framework), inspecting it in Netron. It holds a binary
model as its *float simulation*: every binary layer a float matmul or convolution of +-1
activations with +-alpha kernels (the binarized kernels are folded into the file as float
constants). That is no faster than PyTorch and far slower than the bit-packed XNOR/popcount
runtime (:mod:`bhvit.export`, :mod:`bhvit.runtime`); deploy a binary model with those.

The export uses PyTorch's ``torch.export``-based exporter (``torch.onnx.export(...,
dynamo=True)``, the default since PyTorch 2.9; the TorchScript exporter is deprecated),
which needs the ``onnx`` and ``onnxscript`` packages (``pip install 'bhvit[bench]'``).
:func:`check_onnx` runs the file in ONNX Runtime and compares it with the model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from pathlib import Path
from typing import Dict, Iterable, Optional, Union

import torch
from torch import nn

from .errors import ConfigError
from .layers import _BinaryMixin

__all__ = ["export_onnx", "check_onnx", "DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME"]

DEFAULT_OPSET = 20  # the exporter's own default (ONNX Runtime 1.17 and later run it)
INPUT_NAME = "images"  # (batch, in_chans, img_size, img_size), normalised as in training
OUTPUT_NAME = "logits"  # (batch, num_classes)

# ONNX protobuf files are limited to 2 GiB; larger weights go to an external data file.
_EXTERNAL_DATA_BYTES = 1 << 30


def _input_spec(model: nn.Module):
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "in_chans") or not hasattr(cfg, "img_size"):
        raise ConfigError(
            f"export_onnx takes a bhvit model (BHViT or ReActNet, with a .cfg), got {type(model).__name__}."
        )
    params = list(model.parameters())
    dtype = params[0].dtype if params else torch.float32
    device = params[0].device if params else torch.device("cpu")
    return cfg.in_chans, cfg.img_size, dtype, device


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ConfigError(
            f"ONNX export needs the {module} package ({e}); install onnx and onnxscript, "
            "e.g. pip install 'bhvit[bench]'."
        ) from None


class _FrozenKernel(nn.Module):
    """Stands in for a binary layer's kernel quantizer during the export: returns the
    binarized kernel PyTorch computed, so that the file holds it as a constant (the ONNX
    optimizer does not fold weight-sized subgraphs, which would otherwise binarize every
    kernel again at each inference)."""

    def __init__(self, kernel: torch.Tensor):
        super().__init__()
        self.register_buffer("kernel", kernel)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.kernel


@contextlib.contextmanager
def _frozen_kernels(model: nn.Module):
    layers = [m for m in model.modules() if isinstance(m, _BinaryMixin) and m.kernel_quantizer is not None]
    saved = [m.kernel_quantizer for m in layers]
    try:
        with torch.no_grad():
            for m in layers:
                m.kernel_quantizer = _FrozenKernel(m.kernel_quantizer(m.weight).detach().clone())
        yield
    finally:
        for m, q in zip(layers, saved):
            m.kernel_quantizer = q


def export_onnx(
    model: nn.Module,
    path: Union[str, Path],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    batch_size: int = 1,
    optimize: bool = True,
) -> Path:
    """Write ``model`` as an ONNX file at ``path`` and return the path.

    The graph is the model's eval-mode forward (BatchNorm with its running statistics,
    binarized kernels computed from the weights and folded in as constants); the model's
    own training/eval mode is restored afterwards. Input ``images``: a float tensor
    ``(batch, in_chans, img_size, img_size)`` normalised as in training; output
    ``logits``: ``(batch, num_classes)``. With ``dynamic_batch`` (default) the batch
    dimension is symbolic (``"batch"``, any size >= 1); otherwise it is ``batch_size``.
    The dtype is the model's (float32 normally; ``model.double()`` gives a float64 graph).
    Weights go into the one file (an external ``.data`` file only past 1 GiB).
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 18:
        raise ConfigError(f"opset must be an integer >= 18 (the exporter's range), got {opset!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
    _require("onnx")
    _require("onnxscript")
    in_chans, img_size, dtype, device = _input_spec(model)
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"{path}: directory {path.parent} does not exist.")
    # torch.export treats sizes 0 and 1 as constants: trace a dynamic batch at 2
    example_batch = 2 if dynamic_batch else batch_size
    x = torch.randn(
        example_batch, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0), dtype=dtype
    ).to(device)
    dynamic_shapes = {"x": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    was_training = model.training
    model.eval()
    log = io.StringIO()
    # the exporter prints its progress on stdout, logs that torchvision's ops are skipped
    # and warns about its own internals
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    try:
        with _frozen_kernels(model), torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            exporter_log.setLevel(logging.ERROR)
            torch.onnx.export(
                model,
                (x,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                external_data=n_bytes > _EXTERNAL_DATA_BYTES,
                optimize=optimize,
                verbose=False,
            )
    except BaseException:
        sys.stderr.write(log.getvalue())  # the exporter's report of what failed
        raise
    finally:
        exporter_log.setLevel(level)
        model.train(was_training)
    return path


def check_onnx(
    model: nn.Module,
    path: Union[str, Path],
    batch_sizes: Iterable[int] = (1, 3),
    seed: int = 0,
    threads: Optional[int] = None,
) -> Dict[int, float]:
    """Run the ONNX file at ``path`` in ONNX Runtime (CPU) on random inputs of each batch
    size and return ``{batch_size: max |onnx - model|}`` over the logits (the model in eval
    mode, as exported; its mode is restored). Needs ``onnxruntime``.

    A binary model's float32 simulation can differ in a whole binary activation where a
    value before a sign lies within float32 rounding of zero (the two programs sum in
    different orders), which shows as a difference far above float32 rounding in that
    image's logits; a full-precision model agrees to about 1e-6.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("check_onnx needs onnxruntime: pip install onnxruntime (or 'bhvit[bench]').") from None
    in_chans, img_size, dtype, device = _input_spec(model)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    diffs = {}
    try:
        for b in batch_sizes:
            x = torch.randn(b, in_chans, img_size, img_size, generator=gen, dtype=dtype)
            with torch.no_grad():
                ref = model(x.to(device)).cpu()
            out = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
            if out.shape != ref.shape:
                raise ConfigError(f"ONNX output shape {tuple(out.shape)} differs from the model's {tuple(ref.shape)}.")
            diffs[b] = (out.to(ref.dtype) - ref).abs().max().item()
    finally:
        model.train(was_training)
    return diffs
