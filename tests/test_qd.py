import math

import pytest
import torch

from bhvit import QuantizationDecomposition


def _attn(b=2, h=4, n=10, m=12):
    return torch.softmax(torch.randn(b, h, n, m) * 2, dim=-1)


def test_qd_initialises_step_from_first_batch():
    qd = QuantizationDecomposition(4, levels=3).train()
    a = _attn()
    qd(a)
    expected = 2 * (3 * a).abs().mean(dim=(-1, -2)).mean(dim=0) / math.sqrt(3)
    assert torch.allclose(qd.step.detach(), expected)
    assert qd.initialized.item() == 1
    before = qd.step.detach().clone()
    qd(_attn())
    assert torch.equal(qd.step.detach(), before)  # only the first batch initialises


def test_qd_loaded_state_decides_initialisation():
    # The module keeps a host-side flag; loading a state dict must reset it to the buffer.
    src = QuantizationDecomposition(4).train()
    src(_attn())
    fresh = QuantizationDecomposition(4).train()
    fresh.load_state_dict(src.state_dict())
    fresh(_attn())  # initialised state loaded: the step is kept
    assert torch.equal(fresh.step.detach(), src.step.detach())

    used = QuantizationDecomposition(4).train()
    used(_attn())
    used.load_state_dict(QuantizationDecomposition(4).state_dict())  # uninitialised state
    assert used.initialized.item() == 0 and torch.equal(used.step.detach(), torch.ones(4))
    a = _attn()
    used(a)  # initialises again from this batch
    assert torch.allclose(used.step.detach(), 2 * (3 * a).abs().mean(dim=(-1, -2)).mean(dim=0) / math.sqrt(3))
    assert used.initialized.item() == 1


@pytest.mark.parametrize("levels", [1, 3])
def test_qd_output_equals_step_times_sum_of_planes(levels):
    qd = QuantizationDecomposition(4, levels=levels).train()
    a = _attn()
    qd(a)
    qd.eval()
    a = _attn()
    out = qd(a)
    planes = qd.planes(a)
    assert planes.shape == (levels, 2, 4, 10, 12)
    assert set(planes.unique().tolist()) <= {0.0, 1.0}
    recon = qd.step.view(1, -1, 1, 1) * planes.sum(0)
    assert torch.allclose(out, recon, atol=1e-6)


def test_qd_paper_example_three_planes():
    qd = QuantizationDecomposition(1, levels=3).eval()
    a = torch.tensor([0.7, 0.1, 0.2, 0.0]).view(1, 1, 1, 4)
    # 3 * A = [2.1, 0.3, 0.6, 0] -> levels [2, 0, 1, 0]
    assert qd.levels_of(a).flatten().tolist() == [2.0, 0.0, 1.0, 0.0]
    assert qd.planes(a)[:, 0, 0, 0, 0].tolist() == [1.0, 1.0, 0.0]


def test_qd_gradient_scaling_of_step():
    qd = QuantizationDecomposition(2, levels=3).eval()
    a = torch.full((1, 2, 3, 3), 1 / 3)  # 3A = 1 -> q = 1 everywhere, inside the clamp range
    qd(a).sum().backward()
    # d(q*step)/dstep via round_pass = q - x/step = 1 - 1 = 0 -> only the clamp-free LSQ term
    g = 2 / math.sqrt(a.numel() * 3)
    assert torch.allclose(qd.step.grad, torch.zeros(2) * g)
    # zero-point gradient: d(q*step)/dzp = step per element, scaled by g
    assert torch.allclose(qd.zero_point.grad, torch.full((2,), 9 * g))


def test_qd_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(B, 4, N, M\)"):
        QuantizationDecomposition(4)(torch.rand(2, 3, 5, 5))
