"""The eval-mode cache of binarized kernels (bhvit.layers.EvalCache) and the quantizers'
plain-op forward: the same values as recomputing, never a stale kernel, training untouched."""

import copy
import pickle

import pytest
import torch
from torch import nn

from bhvit import create_model
from bhvit.layers import BinaryConv2d, BinaryLinear, EvalCache, binary_layers
from bhvit.quantizers import SignActivation, WeightBinarizer, _ApproxSignFn, _WeightBinarizeFn, binarize_rows


def _layer(seed=0):
    torch.manual_seed(seed)
    return BinaryLinear(16, 8, input_quantizer=SignActivation(), kernel_quantizer=WeightBinarizer())


def _fresh_kernel(layer):
    """The kernel recomputed from the current weight, through the training path."""
    w = layer.weight.detach()
    return _WeightBinarizeFn.apply(w.reshape(w.shape[0], -1)).view(w.shape)


def _cached(layer):
    cache = layer.__dict__.get("_kernel_cache")
    return None if cache is None else cache.value


def test_kernel_is_computed_once_in_eval_mode_without_autograd():
    layer = _layer().eval()
    with torch.no_grad():
        first = layer.effective_weight()
        assert layer.effective_weight() is first
    with torch.inference_mode():
        assert layer.effective_weight() is first
    assert torch.equal(first, _fresh_kernel(layer))


@pytest.mark.parametrize("grad", [True, False], ids=["autograd-on", "autograd-off"])
def test_no_cache_in_training_mode(grad):
    layer = _layer().train()
    with torch.set_grad_enabled(grad):
        a = layer.effective_weight()
        assert layer.effective_weight() is not a
    assert _cached(layer) is None


def test_no_cache_with_autograd_on_and_the_gradient_is_unchanged():
    layer = _layer().eval()
    with torch.no_grad():
        layer.effective_weight()  # fills the cache
    k = layer.effective_weight()  # autograd on: the Function, and the cache is dropped
    assert k.grad_fn is not None and _cached(layer) is None
    g = torch.randn_like(k)
    k.backward(g)
    w = layer.weight.detach().clone().requires_grad_()
    _WeightBinarizeFn.apply(w).backward(g)
    assert torch.equal(layer.weight.grad, w.grad)


@pytest.mark.parametrize(
    "change",
    [
        "in_place",
        "indexed",
        "load_state_dict",
        "replaced_parameter",
        "double",
        "train_then_eval",
        "sgd_step",
        "fused_adamw_step",
    ],
)
def test_a_changed_weight_is_never_served_stale(change):
    layer = _layer().eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        before = layer.effective_weight()
        if change == "in_place":
            layer.weight.mul_(-1.0)
        elif change == "indexed":
            layer.weight[3] = -layer.weight[3]
        elif change == "load_state_dict":
            layer.load_state_dict(_layer(seed=1).state_dict())
        elif change == "replaced_parameter":
            layer.weight = nn.Parameter(_layer(seed=1).weight.detach().clone())
        elif change == "double":
            layer.double()
            x = x.double()
    if change == "train_then_eval":
        layer.train()
        assert _cached(layer) is None
        with torch.no_grad():
            layer.weight.add_(torch.randn_like(layer.weight))
        layer.eval()
    if change in ("sgd_step", "fused_adamw_step"):
        # trained while in eval mode (BatchNorm frozen, say), with no train() call; a fused
        # optimizer does not bump the weight's version counter
        opt = (
            torch.optim.SGD(layer.parameters(), lr=1.0)
            if change == "sgd_step"
            else torch.optim.AdamW(layer.parameters(), lr=0.5, fused=True)
        )
        layer(x).square().sum().backward()
        with torch.no_grad():
            before = layer.effective_weight()  # cached between backward and step
        opt.step()
    with torch.no_grad():
        after = layer.effective_weight()
        out = layer(x)
    assert torch.equal(after, _fresh_kernel(layer))
    assert not torch.equal(after, before)
    ref = layer.input_quantizer(x + layer.input_bias) @ _fresh_kernel(layer).t()
    assert torch.equal(out, ref)


def test_writes_that_bypass_version_counters_are_seen_after_eval():
    """``param.data`` writes are invisible to version counters (documented); ``.eval()``
    (``train(False)``) drops the cache."""
    layer = _layer().eval()
    with torch.no_grad():
        stale = layer.effective_weight()
        layer.weight.data.mul_(-1.0)
        assert layer.effective_weight() is stale  # the documented limitation
        layer.eval()
        assert torch.equal(layer.effective_weight(), _fresh_kernel(layer))


def test_functional_call_with_other_weights_is_not_confused_with_the_cache():
    layer = _layer().eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        own = layer(x)
        for seed in (1, 2, 3):  # new tensors each time (their ids and storage may be reused)
            other = _layer(seed=seed)
            params = {"weight": other.weight.detach().clone(), "input_bias": other.input_bias.detach()}
            assert torch.equal(torch.func.functional_call(layer, params, (x,)), other.eval()(x))
        assert torch.equal(layer(x), own)


def test_inference_mode_kernel_serves_later_no_grad_calls():
    layer = _layer().eval()
    x = torch.randn(2, 16)
    with torch.inference_mode():
        a = layer(x)
    with torch.no_grad():
        b = layer(x)
    assert torch.equal(a, b) and not b.is_inference()


def test_copies_and_pickles_start_empty():
    layer = _layer().eval()
    with torch.no_grad():
        layer.effective_weight()
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert _cached(clone) is None
        with torch.no_grad():
            assert torch.equal(clone.effective_weight(), _fresh_kernel(layer))


def test_conv_kernels_are_cached_too():
    torch.manual_seed(0)
    conv = BinaryConv2d(8, 8, 3, padding=1, groups=2, kernel_quantizer=WeightBinarizer()).eval()
    with torch.no_grad():
        k = conv.effective_weight()
        assert conv.effective_weight() is k and k.shape == conv.weight.shape
        assert torch.equal(k, _fresh_kernel(conv))


def test_quantizers_plain_forward_equals_the_functions():
    torch.manual_seed(0)
    x = torch.randn(1000)
    x[:4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])
    with torch.no_grad():
        assert torch.equal(SignActivation()(x), _ApproxSignFn.apply(x))
    for dtype in (torch.float32, torch.float64):
        w = torch.randn(32, 27, dtype=dtype) * 0.02
        w[0] = 0.25  # centred exactly 0: sign +1
        w[1] = -0.0
        a, b = _WeightBinarizeFn.apply(w), binarize_rows(w)
        assert torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())


def test_binary_model_outputs_are_bit_identical_with_and_without_the_cache(monkeypatch):
    torch.manual_seed(0)
    model = create_model("bhvit_micro_c32", num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        cached = [model(x), model(x)]
    assert all(_cached(m) is not None for m in binary_layers(model))
    monkeypatch.setattr(EvalCache, "usable", staticmethod(lambda module: False))
    with torch.no_grad():
        plain = model(x)
    monkeypatch.undo()
    assert torch.equal(cached[0], plain) and torch.equal(cached[1], plain)


def test_training_step_after_eval_matches_a_model_that_never_evaluated():
    """Gradients and updates are those of a model whose kernels were never cached."""
    torch.manual_seed(0)
    a = create_model("bhvit_micro_c32", num_classes=10)
    b = copy.deepcopy(a)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    a.eval()
    with torch.no_grad():
        a(x)  # fills a's caches
    a.train()
    for m in (a, b):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            assert torch.equal(pa.grad, pb.grad), name
