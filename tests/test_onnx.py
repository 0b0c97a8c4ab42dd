"""ONNX export (bhvit.onnx) with a dynamic batch: binary and full-precision models, run at
batch 1 and 3 by ONNX Runtime (float32) and by onnx's reference evaluator (float64), and
compared with PyTorch.

Tolerances, on the logits (max |onnx - PyTorch|):

- float32, ONNX Runtime: ``FP32_TOL = 1e-4`` (observed 3e-7 to 4e-6; the two programs sum
  in different orders).
- float64, onnx.reference: ``FP64_TOL = 1e-8`` (observed 4e-10: the norms' epsilon is a
  float32 attribute in ONNX, which moves each norm's output by about 1e-12, and the binary
  layers amplify it; far below float32 rounding and the 1e-2 of a flipped sign).

A binary model takes the sign of values that, in a random model on random images, come
within about 1e-6 of zero: float32's rounding differences can flip one binary activation
(seen in 2 of 200 random images of bhvit_tiny_c32, with logit differences of 0.04), so
float32 agreement is not a property of the export there. Binary models are therefore
checked (1) in float64, where the differences stay below 1e-9 and no sign flips, on a
random model and random images, which tests every sign, QD rounding and binarized kernel
with input-dependent values; and (2) in float32 by ONNX Runtime on a model whose sign
thresholds are moved to +-10^4 (``_far_from_zero``) so that every value before a sign or a
QD rounding lies at least 1e-3 from its decision boundary (asserted, measured in float64):
there no float32 rounding can flip a decision, and the float32 tolerance applies.
"""

import math

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from onnx.reference import ReferenceEvaluator  # noqa: E402
from onnx.reference.op_run import OpRun  # noqa: E402

from bhvit import create_model  # noqa: E402
from bhvit.errors import ConfigError  # noqa: E402
from bhvit.onnx import INPUT_NAME, OUTPUT_NAME, check_onnx, export_onnx  # noqa: E402
from bhvit.qd import QuantizationDecomposition  # noqa: E402
from bhvit.quantizers import SignActivation  # noqa: E402

FP32_TOL = 1e-4
FP64_TOL = 1e-8
MARGIN = 1e-3  # decision margin of the float32 binary check (float32 errors are ~1e-6)

# a small BHViT (all four stages, MSGDC, MSMHA with QD, shifts, binary downsampling) that
# exports in seconds; registered models are exported by the slow test below
SMALL = dict(depths=(1, 1, 1, 1))

_erf = np.vectorize(math.erf, otypes=[np.float64])


class _Gelu(OpRun):
    """onnx.reference's Gelu/Erf is float32-accurate (3e-8); this one is exact in float64."""

    op_domain = ""

    def _run(self, x, approximate="none"):
        return ((x * 0.5 * (1.0 + _erf(x * (1 / math.sqrt(2))))).astype(x.dtype),)


def _dynamic_batch(path) -> str:
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return dims[0].dim_param


def _far_from_zero(model, t: float = 1e4):
    """Sign thresholds (input biases, attention Q/K/V biases) set to +-t, alternating over
    channels: every value before a sign is far from zero (the residual stream of a random
    bhvit_tiny reaches beyond 10 at 224, so t is large; the biases feed only the signs)."""
    with torch.no_grad():
        for mod in model.modules():
            for name in ("input_bias", "qkv_bias"):
                p = getattr(mod, name, None)
                if isinstance(p, torch.nn.Parameter):
                    signs = 1.0 - 2.0 * (torch.arange(p.shape[-1]) % 2).to(p.dtype)
                    p.copy_((t * signs).expand_as(p))
    return model


def _decision_margin(model, x) -> float:
    """The smallest distance, over every sign and QD rounding of ``model(x)``, of the value
    decided on to its decision boundary (0 for a sign, a half-integer for a rounding)."""
    margins = []

    def sign_hook(mod, args):
        margins.append(args[0].abs().min().item())

    def qd_hook(mod, args):
        v = args[0] * mod.levels / mod.step.view(1, -1, 1, 1) + mod.zero_point.view(1, -1, 1, 1)
        margins.append((v - v.floor() - 0.5).abs().min().item())

    was_training = model.training
    model.eval()  # (a training-mode forward would update BatchNorm statistics and QD steps)
    hooks = [m.register_forward_pre_hook(sign_hook) for m in model.modules() if isinstance(m, SignActivation)]
    hooks += [m.register_forward_pre_hook(qd_hook) for m in model.modules() if isinstance(m, QuantizationDecomposition)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    assert margins, "no binary decisions seen"
    return min(margins)


def _images(model, batch, seed, dtype=torch.float32):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g, dtype=dtype)


def _check_float32(model, path, margin_checked: bool):
    """Export, then ONNX Runtime at batch 1 and 3 against PyTorch in float32."""
    export_onnx(model, path)
    assert _dynamic_batch(path) == "batch"
    if margin_checked:
        # check_onnx's inputs: one generator seeded 0, batch 1 then batch 3, float32
        cfg, g = model.cfg, torch.Generator().manual_seed(0)
        probe = torch.cat([torch.randn(b, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g) for b in (1, 3)])
        assert _decision_margin(model.double(), probe.double()) > MARGIN
        model.float()
    diffs = check_onnx(model, path, batch_sizes=(1, 3), seed=0)
    assert set(diffs) == {1, 3}
    assert max(diffs.values()) <= FP32_TOL, diffs
    return diffs


def test_full_precision_model_runs_in_onnxruntime_at_any_batch(tmp_path):
    torch.manual_seed(0)
    model = create_model("bhvit_micro_c28", num_classes=10, binary=False, **SMALL)
    model.train()
    _check_float32(model, tmp_path / "fp.onnx", margin_checked=False)
    assert model.training  # the export runs the eval-mode graph and restores the mode


def test_binary_model_float64_graph_equals_pytorch_at_any_batch(tmp_path):
    """Random weights, random images: every sign and QD rounding decided on real values."""
    torch.manual_seed(0)
    model = create_model("bhvit_micro_c28", num_classes=10, **SMALL).double().eval()
    path = export_onnx(model, tmp_path / "binary64.onnx")
    assert _dynamic_batch(path) == "batch"
    session = ReferenceEvaluator(str(path), new_ops=[_Gelu])
    for batch in (1, 3):
        x = _images(model, batch, seed=batch, dtype=torch.float64)
        with torch.no_grad():
            ref = model(x).numpy()
        out = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        assert out.dtype == np.float64 and out.shape == ref.shape
        assert np.abs(out - ref).max() <= FP64_TOL


def test_binary_model_runs_in_onnxruntime_at_any_batch(tmp_path):
    torch.manual_seed(0)
    model = _far_from_zero(create_model("bhvit_micro_c28", num_classes=10, **SMALL))
    _check_float32(model, tmp_path / "binary.onnx", margin_checked=True)


def test_check_onnx_sees_a_flipped_sign(tmp_path):
    """The float32 check is sharp: a binary kernel changed after export shows."""
    torch.manual_seed(0)
    model = _far_from_zero(create_model("bhvit_micro_c28", num_classes=10, **SMALL))
    path = export_onnx(model, tmp_path / "binary.onnx", dynamic_batch=False, batch_size=3)
    assert _dynamic_batch(path) == ""
    with torch.no_grad():
        w = model.stages[0].blocks[0].mlp.up.op.weight
        w.neg_()  # flips every sign of the binarized kernel (the kernel cache sees it)
    assert max(check_onnx(model, path, batch_sizes=(3,)).values()) > 1e-3


def test_export_refuses_what_it_cannot_export(tmp_path):
    model = create_model("bhvit_micro_c28", num_classes=10, **SMALL)
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(model, tmp_path / "m.onnx", opset=11)
    with pytest.raises(ConfigError, match="batch_size"):
        export_onnx(model, tmp_path / "m.onnx", batch_size=0)
    with pytest.raises(ConfigError, match="bhvit model"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="does not exist"):
        export_onnx(model, tmp_path / "missing" / "m.onnx")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, binary",
    # the 224 layout (4x4 stem, 7x7 windows), the greyscale padded stem and the ReActNet
    # baseline; the other registered models differ from these only in widths and depths
    [("bhvit_tiny", True), ("bhvit_micro_c28", False), ("reactnet_c32", True)],
)
def test_registered_model_layouts_export_with_a_dynamic_batch(tmp_path, name, binary):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, binary=binary)
    if binary:
        _far_from_zero(model)
    _check_float32(model, tmp_path / f"{name}.onnx", margin_checked=binary)
