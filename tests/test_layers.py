import pytest
import torch
import torch.nn.functional as F

from bhvit import (
    BinaryConv2d,
    BinaryLinear,
    ChannelBatchNorm,
    LayerScale,
    LayerwiseResidual,
    RPReLU,
    SignActivation,
    WeightBinarizer,
    channel_shortcut,
)
from bhvit.blocks import ShiftBranches, window_partition, window_reverse


def test_binary_linear_full_precision_twin_is_plain_linear():
    lin = BinaryLinear(5, 3)
    with torch.no_grad():
        lin.input_bias.copy_(torch.randn(5))
    x = torch.randn(2, 4, 5)
    assert torch.allclose(lin(x), F.linear(x + lin.input_bias, lin.weight))
    assert not lin.is_binary


def test_binary_linear_uses_signs_and_scaled_signs():
    lin = BinaryLinear(7, 4, input_quantizer=SignActivation(), kernel_quantizer=WeightBinarizer())
    x = torch.randn(3, 7)
    alpha, s = WeightBinarizer().scale_and_sign(lin.weight)
    xs = torch.where(x + lin.input_bias >= 0, 1.0, -1.0)
    assert torch.allclose(lin(x), (xs @ s.t()) * alpha, atol=1e-6)
    assert lin.is_binary


@pytest.mark.parametrize("dilation,groups", [(1, 1), (3, 4), (5, 4)])
def test_binary_conv_zero_padding_contributes_zero(dilation, groups):
    conv = BinaryConv2d(
        8,
        8,
        3,
        padding=dilation,
        dilation=dilation,
        groups=groups,
        input_quantizer=SignActivation(),
        kernel_quantizer=WeightBinarizer(),
    )
    x = torch.randn(2, 8, 9, 9)
    xs = torch.where(x >= 0, 1.0, -1.0)
    p = dilation
    padded = F.pad(xs, (p, p, p, p))  # zeros around the +-1 map
    ref = F.conv2d(padded, conv.kernel_quantizer(conv.weight), dilation=dilation, groups=groups)
    assert torch.allclose(conv(x), ref, atol=1e-5)
    # corner output sees fewer valid taps: its magnitude is a multiple of alpha below the full fan-in
    assert ref.shape == (2, 8, 9, 9)


def test_channel_shortcut_repeat_and_pool():
    x = torch.arange(8.0).view(1, 2, 4)
    assert channel_shortcut(x, 4).equal(x)
    assert channel_shortcut(x, 8)[0, 0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert channel_shortcut(x, 2)[0, 0].tolist() == [0.5, 2.5]
    with pytest.raises(ValueError, match="divide"):
        channel_shortcut(x, 3)


def test_rprelu_formula():
    act = RPReLU(3)
    with torch.no_grad():
        act.move1.copy_(torch.tensor([0.5, 0.0, -1.0]))
        act.slope.copy_(torch.tensor([0.1, 0.2, 0.3]))
        act.move2.copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.tensor([[0.0, -1.0, 0.0]])
    # y = x - g = [-0.5, -1, 1] -> prelu -> [-0.05, -0.2, 1] -> + z
    assert torch.allclose(act(x), torch.tensor([[0.95, 1.8, 4.0]]))


def test_layerscale_and_channel_bn():
    ls = LayerScale(4, init=0.1)
    x = torch.randn(2, 3, 4)
    assert torch.allclose(ls(x), 0.1 * x)
    bn = ChannelBatchNorm(4)
    ref = torch.nn.BatchNorm1d(4)
    y = bn(torch.randn(2, 5, 5, 4) * 3 + 1)
    assert y.shape == (2, 5, 5, 4)
    assert torch.allclose(y.reshape(-1, 4).mean(0), torch.zeros(4), atol=1e-5)
    assert set(bn.state_dict()) == set(ref.state_dict())


def test_layerwise_residual_identity_repeat_pool_shapes():
    for i, o in [(8, 8), (8, 32), (32, 8)]:
        blk = LayerwiseResidual(BinaryLinear(i, o), i, o)
        assert blk(torch.randn(2, 5, i)).shape == (2, 5, o)
    with pytest.raises(ValueError, match="in_dim=8, out_dim=12"):
        LayerwiseResidual(BinaryLinear(8, 12), 8, 12)


def test_window_partition_roundtrip_and_order():
    x = torch.arange(2 * 4 * 6 * 3.0).view(2, 4, 6, 3)
    win = window_partition(x, 2)
    assert win.shape == (2, 6, 4, 3)
    assert win[0, 1, 0].equal(x[0, 0, 2])  # second window starts at column 2
    assert window_reverse(win, 2, 4, 6).equal(x)


def test_shift_branches_values():
    sb = ShiftBranches(4, sizes=(1,))
    x = torch.randn(1, 5, 5, 4)
    h = ShiftBranches.roll_mean(x, 1, 1)
    assert torch.allclose(h[0, 2, 3], (x[0, 1, 3] + x[0, 2, 3] + x[0, 3, 3]) / 3)
    assert torch.allclose(h[0, 0, 0], (x[0, 4, 0] + x[0, 0, 0] + x[0, 1, 0]) / 3)  # cyclic
    cm = ShiftBranches.channel_mix(x, 1)
    assert cm[0, 2, 2, 0] == x[0, 1, 2, 0] and cm[0, 2, 2, 1] == x[0, 3, 2, 1]
    assert cm[0, 2, 2, 2] == x[0, 2, 1, 2] and cm[0, 2, 2, 3] == x[0, 2, 3, 3]
    assert sb(x).abs().sum() == 0  # LayerScales start at zero


@pytest.mark.parametrize(
    "hw,sizes",
    [
        ((6, 6), (1, 2)),
        ((5, 7), (1, 2)),
        ((4, 4), (1, 2)),
        ((3, 2), (1, 2)),
        ((1, 1), (1, 2)),
        ((1, 6), (3,)),
        ((2, 9), (0, 2)),
        ((3, 3), (5,)),
    ],
)
def test_shift_branches_convolution_matches_rolls(hw, sizes):
    # The module computes the branches as two cyclic depthwise convolutions; maps smaller
    # than the taps (4x4 and below here) fold offsets that coincide modulo the side.
    torch.manual_seed(0)
    mod = ShiftBranches(8, sizes)
    with torch.no_grad():
        for ls in mod.scales:
            ls.scale.normal_()
            ls.bias.normal_()
    x = torch.randn(2, *hw, 8, requires_grad=True)
    want, got = mod.forward_reference(x), mod(x)
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.allclose(got, want, atol=1e-5)
    g = torch.randn_like(want)
    params = [x] + list(mod.parameters())
    for a, b in zip(torch.autograd.grad(want, params, g), torch.autograd.grad(got, params, g)):
        assert torch.allclose(a, b, atol=1e-4)


def test_shift_branches_state_holds_only_layerscales():
    mod = ShiftBranches(8, (1, 2))
    assert sorted(mod.state_dict()) == sorted(f"scales.{i}.{n}" for i in range(6) for n in ("scale", "bias"))
    assert mod.taps_h.shape == mod.taps_w.shape == (6, 4, 5)  # (branch, channel quarter, tap)
    # the mean along H of size 2 spreads over 5 taps; the channel mix of size 1 moves
    # the first channel quarter by -1 along H and the last by +1 along W
    assert mod.taps_h[3, 0].tolist() == [1.0] * 5 and mod.divisors.tolist() == [3, 3, 1, 5, 5, 1]
    assert mod.taps_h[2, 0].tolist() == [0, 1, 0, 0, 0] and mod.taps_w[2, 3].tolist() == [0, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="shift sizes"):
        ShiftBranches(8, ())


def test_shift_branches_constants_survive_half_precision_and_follow_the_input_dtype():
    mod = ShiftBranches(8, (1, 2))
    taps, div = mod.taps_h.clone(), mod.divisors.clone()
    mod.half().float()
    assert torch.equal(mod.taps_h, taps) and torch.equal(mod.divisors, div)  # small integers
    with torch.no_grad():
        for ls in mod.scales:
            ls.scale.normal_()
    x = torch.randn(1, 6, 6, 8)
    y = mod(x.to(torch.bfloat16))  # float32 module, bfloat16 map: as the roll form, no error
    assert torch.allclose(y.float(), mod.forward_reference(x), atol=0.1, rtol=0.05)
