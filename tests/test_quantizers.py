import torch

from bhvit import ApproxSign, SignActivation, WeightBinarizer, binary_sign, regularization_loss
from bhvit import create_model


def test_binary_sign_is_exactly_two_valued_and_sign0_is_plus_one():
    x = torch.tensor([-2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0])
    assert binary_sign(x).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]


def test_approx_sign_gradient_matches_formula():
    x = torch.tensor([-1.5, -1.0, -0.75, -0.5, 0.0, 0.25, 0.5, 1.0, 1.2], requires_grad=True)
    y = ApproxSign.apply(x)
    assert y.tolist() == [-1, -1, -1, -1, 1, 1, 1, 1, 1]
    y.backward(torch.ones_like(x))
    xs = x.detach()
    expected = torch.where(
        (xs >= -1) & (xs <= 0), 2 + 2 * xs, torch.where((xs > 0) & (xs <= 1), 2 - 2 * xs, torch.zeros_like(xs))
    )
    assert torch.allclose(x.grad, expected)
    assert x.grad.tolist() == [0.0, 0.0, 0.5, 1.0, 2.0, 1.5, 1.0, 0.0, 0.0]


def test_sign_activation_module_scales_upstream_gradient():
    x = torch.tensor([0.5, -0.25], requires_grad=True)
    SignActivation()(x).backward(torch.tensor([3.0, -2.0]))
    assert x.grad.tolist() == [3.0, -3.0]


def test_weight_binarizer_two_values_per_output_channel():
    for shape in [(8, 20), (6, 4, 3, 3)]:
        w = torch.randn(shape) * 0.3
        wb = WeightBinarizer()(w)
        flat_w, flat_b = w.reshape(shape[0], -1), wb.reshape(shape[0], -1)
        alpha = flat_w.abs().mean(dim=1)
        for o in range(shape[0]):
            vals = sorted(set(flat_b[o].tolist()))
            assert len(vals) == 2
            assert abs(vals[0] + alpha[o].item()) < 1e-6 and abs(vals[1] - alpha[o].item()) < 1e-6
        centred = flat_w - flat_w.mean(dim=1, keepdim=True)
        assert torch.equal(flat_b > 0, centred >= 0)


def test_weight_binarizer_maps_a_zero_centred_weight_to_plus_alpha_like_the_export():
    # mean = (-0.0 + 0.75 - 0.75) / 3 = +0.0, so the first centred weight is -0.0: sign(0) = +1
    w = torch.tensor([[-0.0, 0.75, -0.75], [0.5, 0.5, -1.0]])
    wb = WeightBinarizer()(w)
    assert torch.allclose(wb, torch.tensor([[0.5, 0.5, -0.5], [2 / 3, 2 / 3, -2 / 3]]))
    alpha, sign = WeightBinarizer().scale_and_sign(w)
    assert torch.equal(wb, alpha[:, None] * sign)
    assert wb[0, 0].item() == 0.5


def test_weight_binarizer_ste_gradient_is_clipped_identity_of_centred_weight():
    w = torch.tensor([[2.0, 0.1, -0.3, -3.0]], requires_grad=True)
    WeightBinarizer()(w).backward(torch.ones(1, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # centred = w - mean(w) = w + 0.3 -> [2.3, 0.4, 0.0, -2.7]; clamp passes the middle two.
    # d centred / d w = I - 1/4: gradient = g*mask - mean(g*mask)
    g = torch.tensor([0.0, 2.0, 3.0, 0.0])
    assert torch.allclose(w.grad, (g - g.sum() / 4).unsqueeze(0))


def test_regularization_loss_formula():
    m = create_model("bhvit_micro_c32", num_classes=10)
    from bhvit import binary_layers

    layers = list(binary_layers(m))
    expected = torch.stack([(l.weight.abs() - 1).abs().mean() for l in layers]).mean()
    # micro depths (1, 1, 2, 1): 2 MSGDC x 3 convs, 5 MLPs x 2, 3 downsamplings, 3 MSMHA x 4
    assert len(layers) == 3 * 2 + 2 * 5 + 3 + 4 * 3
    assert torch.allclose(regularization_loss(m), expected)
    fp = create_model("bhvit_micro_c32", num_classes=10, binary=False)
    try:
        regularization_loss(fp)
        raise AssertionError("expected ValueError")
    except ValueError as e:
        assert "no layer with binarized weights" in str(e)


def test_weight_binarizer_gradient_matches_the_autograd_composition():
    # The fused Function against the same quantizer written as plain autograd ops.
    torch.manual_seed(0)
    w = (torch.randn(6, 4, 3, 3) * 0.8).requires_grad_()
    g = torch.randn(6, 4, 3, 3)
    WeightBinarizer()(w).backward(g)
    w2 = w.detach().clone().requires_grad_()
    centred = w2 - w2.mean(dim=(1, 2, 3), keepdim=True)
    clip = centred.clamp(-1.0, 1.0)
    alpha = w2.detach().abs().mean(dim=(1, 2, 3), keepdim=True)
    ((binary_sign(centred.detach()) * alpha - clip).detach() + clip).backward(g)
    assert 0 < (centred.abs() > 1).sum() < w2.numel()  # some latent weights are clipped
    assert torch.allclose(w.grad, w2.grad, atol=1e-6)
