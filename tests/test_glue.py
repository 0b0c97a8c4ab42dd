"""Float glue kernels of the runtime: fused epilogues, binary linear, shifts, attention, GELU."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bhvit.blocks import ShiftBranches
from bhvit.runtime import kernels as K

# every compiled variant (portable/popcnt use the baseline glue, avx2 its AVX2 copy, avx512 its AVX-512 copy)
BACKENDS = [b for b in K.available_backends() if b != "numpy"] + ["numpy"]


@pytest.fixture(params=BACKENDS)
def be(request):
    prev = K.backend()
    K.set_backend(request.param)
    yield request.param
    K.set_backend(prev)


def _on(backend, fn):
    prev = K.backend()
    K.set_backend(backend)
    try:
        return fn()
    finally:
        K.set_backend(prev)


def _vec(rng, n):
    return rng.standard_normal(n).astype(np.float32)


C_BACKENDS = BACKENDS[:-1]


# --------------------------------------------------------------------------- packing with bias


def test_pack_signs_bias_equals_packing_the_sum(be):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 3, 70)).astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    x[0, 0, :5] = -b[:5]  # x + b == 0 exactly -> +1
    assert np.array_equal(K.pack_signs(x, bias=b), K.pack_signs(x + b))
    g = rng.standard_normal((3, 70)).astype(np.float32)  # one bias row per group
    assert np.array_equal(K.pack_signs(x, bias=g), K.pack_signs(x + g))
    bits = K.pack_signs(np.zeros((1, 3), np.float32), bias=np.array([0.0, -1.0, 2.0], np.float32))
    assert bits.tolist() == [[0b101]]


def test_pack_signs_affine_equals_float32_arithmetic(be):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 4, 16)).astype(np.float32)
    s, t, b = (rng.standard_normal((4, 16)).astype(np.float32) for _ in range(3))
    assert np.array_equal(K.pack_signs(x, bias=b, affine=(s, t)), K.pack_signs((x * s + t) + b))
    with pytest.raises(ValueError, match="affine"):
        K.pack_signs(x, bias=b, affine=(s[0], t[0]))
    with pytest.raises(ValueError, match="needs a bias"):
        K.pack_signs(x, affine=(s, t))


@pytest.mark.parametrize("k", [1, 7, 16, 31, 32, 48, 64, 70, 130])
def test_pack_signs_bias_every_row_length(be, k):
    # full vectors, masked tails and rows shorter than one vector, with and without a folded norm
    rng = np.random.default_rng(k)
    x = rng.standard_normal((5, 2, k)).astype(np.float32)
    s, t, b = (rng.standard_normal((2, k)).astype(np.float32) for _ in range(3))
    x[0, 1, -1] = -b[1, -1]  # x + b == 0 exactly in the last lane -> +1
    assert np.array_equal(K.pack_signs(x, bias=b), K.pack_signs(x + b))
    assert np.array_equal(K.pack_signs(x, bias=b, affine=(s, t)), K.pack_signs((x * s + t) + b))
    x[3, 1, k - 1] = np.nan  # a NaN in the last lane is reported
    with pytest.raises(ValueError, match="NaN"):
        K.pack_signs(x, bias=b)


def test_pack_signs_bias_errors(be):
    x = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match="does not fit"):
        K.pack_signs(x, bias=np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        K.pack_signs(x, bias=np.zeros((2, 8), np.float32))
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        K.pack_signs(x, bias=np.zeros(8, np.float32))


# --------------------------------------------------------------------------- epilogues


def _epi_ref(dot, scale, shift, sc, act):
    n = dot.shape[-1]
    v = dot.astype(np.float64) * scale + shift
    if sc is not None:
        c = sc.shape[-1]
        v = v + (np.tile(sc, (1, n // c)) if c < n else sc.reshape(-1, n, c // n).mean(-1) if c > n else sc)
    if act is not None:
        y = v - act[0]
        v = np.where(y >= 0, y, y * act[1]) + act[2]
    return v


@pytest.mark.parametrize("c", [16, 64, 128])
def test_epilogue_post_and_residual(be, c):
    rng = np.random.default_rng(2)
    n = 64
    dot = rng.integers(-60, 60, (9, n)).astype(np.int32)
    s, t, ps, pb = (_vec(rng, n) for _ in range(4))
    act = tuple(_vec(rng, n) for _ in range(3))
    sc = rng.standard_normal((9, c)).astype(np.float32)
    res = rng.standard_normal((9, n)).astype(np.float32)
    want = res + pb + _epi_ref(dot, s, t, sc, act) * ps
    got = K.epilogue(dot, s, t, sc, act, post=(ps, pb), residual=res)
    assert np.allclose(got, want, atol=1e-4)
    acc = res.copy()  # out without residual accumulates in place
    assert K.epilogue(dot, s, t, sc, act, out=acc, post=(ps, pb)) is acc
    assert np.allclose(acc, want, atol=1e-4)
    with pytest.raises(ValueError, match="residual"):
        K.epilogue(dot, s, t, residual=res[:, :8])


def test_epilogue_pack_gives_signs_and_pooled_means(be):
    rng = np.random.default_rng(3)
    n, c = 128, 32
    dot = rng.integers(-40, 40, (2, 5, n)).astype(np.int32)
    s, t, nb = (_vec(rng, n) for _ in range(3))
    act = tuple(_vec(rng, n) for _ in range(3))
    sc = rng.standard_normal((2, 5, c)).astype(np.float32)
    y = K.epilogue(dot, s, t, sc, act)
    bits, pooled = K.epilogue_pack(dot, s, t, sc, act, next_bias=nb, pool=c)
    assert bits.shape == (2, 5, 2) and pooled.shape == (2, 5, c)
    assert np.array_equal(bits, K.pack_signs(y + nb))
    assert np.allclose(pooled, y.reshape(2, 5, c, n // c).mean(-1), atol=1e-5)
    bits2, none = K.epilogue_pack(dot, s, t, sc, act)
    assert none is None and np.array_equal(bits2, K.pack_signs(y))
    with pytest.raises(ValueError, match="pool"):
        K.epilogue_pack(dot, s, t, pool=3)


# --------------------------------------------------------------------------- binary linear


@pytest.mark.parametrize("M", [1, 31, 32, 33, 100])
@pytest.mark.parametrize("k", [64, 100, 257])
def test_binary_linear_equals_gemm_then_epilogue(be, M, k):
    rng = np.random.default_rng(M * 1000 + k)
    N = 96
    a = K.pack_signs(rng.standard_normal((M, k)).astype(np.float32))
    b = K.pack_signs(rng.standard_normal((N, k)).astype(np.float32))
    s, t, ps, pb = (_vec(rng, N) for _ in range(4))
    act = tuple(_vec(rng, N) for _ in range(3))
    sc = rng.standard_normal((M, 32)).astype(np.float32)
    res = rng.standard_normal((M, N)).astype(np.float32)
    dot = K.xnor_gemm(a, b, k)
    want = K.epilogue(dot, s, t, sc, act, post=(ps, pb), residual=res)
    got = K.binary_linear(a, b, k, s, t, sc, act, post=(ps, pb), residual=res)
    assert np.array_equal(got, want)
    got2 = K.binary_linear(a, b, k, s, t, sc, act, post=(ps, pb), residual=res, threads=2)
    assert np.array_equal(got2, want)
    bits, pooled = K.binary_linear(a, b, k, s, t, sc, act, pack=True, next_bias=pb, pool=24)
    wbits, wpooled = K.epilogue_pack(dot, s, t, sc, act, next_bias=pb, pool=24)
    assert np.array_equal(bits, wbits) and np.array_equal(pooled, wpooled)


def test_binary_linear_errors(be):
    a = np.zeros((2, 1), np.uint64)
    s = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="pack=True"):
        K.binary_linear(a, a, 64, s[:2], s[:2], post=(s[:2], s[:2]), pack=True)
    with pytest.raises(ValueError, match="length 2"):
        K.binary_linear(a, a, 64, s, s)
    with pytest.raises(ValueError, match="does not fit"):
        K.binary_linear(a, a, 64, s[:2], s[:2], np.zeros((3, 2), np.float32))


# --------------------------------------------------------------------------- GELU, shifts


def test_gelu_matches_torch(be):
    x = np.linspace(-8, 8, 4001, dtype=np.float32)
    want = F.gelu(torch.from_numpy(x)).numpy()
    assert np.abs(K.gelu(x) - want).max() < 2e-6


def _gelu_inputs():
    rng = np.random.default_rng(3)
    special = [
        0.0,
        -0.0,
        np.inf,
        -np.inf,
        np.nan,
        1e30,
        -1e30,
        3.4e38,
        -3.4e38,
        1e-40,
        -1e-40,
        1e-45,
        -1e-45,
        1.2e-38,
        -1.2e-38,
        5.65,
        -5.65,
        8.0,
        -8.0,
        10.0,
        -10.0,
        30.0,
        -30.0,
    ]
    x = np.concatenate(
        [
            np.array(special, np.float32),
            rng.standard_normal(3000).astype(np.float32) * 4,
            np.linspace(-12, 12, 1001, dtype=np.float32),
        ]
    )
    return x


def test_gelu_identical_on_every_backend_and_limits():
    # one float32 operation sequence (rational erf, no libm): every C copy and numpy give the same bits
    x = _gelu_inputs()
    outs = [_on(b, lambda: K.gelu(x)) for b in BACKENDS]
    for o in outs[1:]:
        assert np.array_equal(o.view(np.int32), outs[0].view(np.int32))
    y = outs[0]
    finite = np.isfinite(x) & (np.abs(x) <= 8)
    want = F.gelu(torch.from_numpy(x[finite])).numpy()
    assert np.abs(y[finite] - want).max() < 2e-6
    big = np.isfinite(x) & (np.abs(x) > 8)
    assert np.array_equal(y[big], np.where(x[big] > 0, x[big], 0))
    assert y[2] == np.inf and y[3] == 0 and np.isnan(y[4])
    assert np.all(np.isnan(y) == np.isnan(x))
    # odd sizes (the vector bodies' scalar tails) and several threads
    for n in (1, 5, 17, 33, 1999):
        for b in C_BACKENDS:
            z = _on(b, lambda: K.gelu(x[n:].copy()[:n], threads=2))
            assert np.array_equal(z.view(np.int32), y[n : 2 * n].view(np.int32))


@pytest.mark.parametrize("shape,sizes", [((2, 6, 5, 8), (1, 2)), ((1, 3, 3, 16), (1, 2)), ((1, 7, 7, 4), (3,))])
def test_shift_mix_matches_training_module(be, shape, sizes):
    torch.manual_seed(0)
    mod = ShiftBranches(shape[-1], sizes)
    with torch.no_grad():
        for ls in mod.scales:
            ls.scale.normal_()
            ls.bias.normal_()
        x = torch.randn(shape)
        want = mod(x).numpy()
    scales = np.stack([ls.scale.detach().numpy() for ls in mod.scales])
    biases = np.stack([ls.bias.detach().numpy() for ls in mod.scales])
    base = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = base.copy()
    assert K.shift_mix(x.numpy(), sizes, scales, biases, out) is out
    assert np.allclose(out - base, want, atol=1e-5)


def test_shift_mix_backends_identical_and_errors():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 9, 7, 12)).astype(np.float32)
    sc, bi = rng.standard_normal((6, 12)).astype(np.float32), rng.standard_normal((6, 12)).astype(np.float32)
    outs = [_on(b, lambda: K.shift_mix(x, (1, 2), sc, bi, np.zeros_like(x), threads=2)) for b in BACKENDS]
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])
    with pytest.raises(ValueError, match="divisible by 4"):
        K.shift_mix(x[..., :6], (1,), sc[:3, :6], bi[:3, :6], np.zeros_like(x[..., :6]))
    with pytest.raises(ValueError, match="scale and bias rows"):
        K.shift_mix(x, (1, 2), sc[:3], bi[:3], np.zeros_like(x))


@pytest.mark.parametrize(
    "shape,sizes",
    [
        ((1, 9, 11, 64), (1, 2)),  # whole vectors of 16 (AVX-512), 4 at a time
        ((2, 5, 6, 128), (2, 1)),  # a smaller size after a larger one: the rolled sums restart
        ((1, 4, 7, 40), (1, 3)),  # quarters of 10 channels: vectors across quarters, scalar tail
        ((1, 3, 2, 100), (4,)),  # rolls longer than the map (wrapping more than once)
        ((1, 6, 6, 20), (0, 1)),  # k = 0: the input itself
        ((1, 1, 1, 8), (1, 2)),
    ],
)
def test_shift_mix_identical_on_every_backend(shape, sizes):
    rng = np.random.default_rng(sum(shape))
    C = shape[-1]
    x = rng.standard_normal(shape).astype(np.float32)
    sc = rng.standard_normal((3 * len(sizes), C)).astype(np.float32)
    bi = rng.standard_normal((3 * len(sizes), C)).astype(np.float32)
    base = rng.standard_normal(shape).astype(np.float32)
    outs = [_on(b, lambda: K.shift_mix(x, sizes, sc, bi, base.copy(), threads=t)) for b in BACKENDS for t in (1, 2)]
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])


# --------------------------------------------------------------------------- attention core


def test_attention_hand_computed(be):
    # one query (+1), two keys (+1, -1), d = 1, scale 1: softmax [0.8808, 0.1192];
    # levels 3, step 0.25: lv = clip(round([10.57, 1.43]), 0, 3) = [3, 1];
    # V signs [+1, -1]: out = 0.25 * (3 * 1 + 1 * -1) = 0.5
    qb = K.pack_signs(np.array([1.0], np.float32)).reshape(1, 1, 1, 1)
    kb = K.pack_signs(np.array([[1.0], [-1.0]], np.float32)).reshape(1, 1, 2, 1)
    vb = K.pack_bits(np.array([[1, 0]], np.uint8)).reshape(1, 1, 1, 1)
    out = K.attention(qb, kb, vb, 1, np.array([0.25], np.float32), np.zeros(1, np.float32), 3, 1.0)
    assert out.shape == (1, 1, 1) and out[0, 0, 0] == pytest.approx(0.5)
    # one level, zero point 0.5: every key with A >= 0 gets level 1 -> step * (1 - 1) = 0
    out = K.attention(qb, kb, vb, 1, np.array([1.0], np.float32), np.array([0.5], np.float32), 1, 1.0)
    assert out[0, 0, 0] == 0.0


@pytest.mark.parametrize("d,M", [(32, 53), (64, 50), (100, 130)])
def test_attention_matches_float_reference(d, M):
    rng = np.random.default_rng(d + M)
    Bw, h, N = 3, 2, 11
    q, k, v = (rng.standard_normal((Bw, h, n, d)).astype(np.float32) for n in (N, M, M))
    step = np.array([0.02, 0.07], np.float32)
    zp = np.array([0.3, -0.2], np.float32)
    qb, kb = K.pack_signs(q), K.pack_signs(k)
    vb = K.pack_bits(np.ascontiguousarray((v >= 0).transpose(0, 1, 3, 2)))
    # float64 reference of the same maths
    sq, sk, sv = (np.where(a >= 0, 1.0, -1.0) for a in (q, k, v))
    a = (sq @ sk.transpose(0, 1, 3, 2)) / math.sqrt(d)
    e = np.exp(a - a.max(-1, keepdims=True))
    attn = e / e.sum(-1, keepdims=True)
    lv = np.clip(np.round(attn * 3 / step.reshape(1, h, 1, 1) + zp.reshape(1, h, 1, 1)), 0, 3)
    want = ((lv @ sv) * step.reshape(1, h, 1, 1)).transpose(0, 2, 1, 3).reshape(Bw, N, h * d)
    outs = {b: _on(b, lambda: K.attention(qb, kb, vb, d, step, zp, 3, 1 / math.sqrt(d), threads=2)) for b in BACKENDS}
    for b, out in outs.items():
        assert out.shape == (Bw, N, h * d)
        close = np.isclose(out, want, atol=1e-5)
        # a level can round the other way where float32 and float64 softmax straddle .5
        assert close.mean() > 0.99, b
        assert np.abs(out - want).max() <= 2 * step.max() * 1.0001, b
    ref = outs["numpy"]
    for b, out in outs.items():
        assert np.isclose(out, ref, atol=1e-5).mean() > 0.99, b


@pytest.mark.parametrize("d,M", [(32, 53), (64, 50), (64, 64), (100, 130)])
@pytest.mark.parametrize("combine", [False, True])
def test_attention_identical_on_every_compiled_backend(d, M, combine):
    # every C variant computes the same floats in the same order (the softmax denominator in
    # attention.c's fixed lane order), so the outputs are equal bit for bit
    rng = np.random.default_rng(1000 * d + M)
    Bw, h, N = 3, 4, M if combine else 37
    q, k, v = (rng.standard_normal((Bw, h, n, d)).astype(np.float32) for n in (N, M, M))
    # wide score ranges too: keys equal to queries (window 0), and keys +-query 0 (window 1)
    k[0, :, : min(N, M)] = q[0, :, : min(N, M)]
    k[1, :, ::2], k[1, :, 1::2] = -q[1, :, :1], q[1, :, :1]
    qb, kb = K.pack_signs(q), K.pack_signs(k)
    vb = K.pack_bits(np.ascontiguousarray((v >= 0).transpose(0, 1, 3, 2)))
    step = rng.uniform(0.01, 0.1, h).astype(np.float32)
    zp = rng.uniform(-0.5, 0.5, h).astype(np.float32)
    scale, comb = 1 / math.sqrt(d), None
    if combine:
        C = h * d
        act = tuple(rng.standard_normal(C).astype(np.float32) for _ in range(3))
        ns, nt = (rng.standard_normal(C).astype(np.float32) for _ in range(2))
        q, k, v = (rng.standard_normal((Bw, N, C)).astype(np.float32) for _ in range(3))
        comb = (ns, nt, q, k, v, act)
    compiled = [b for b in K.available_backends() if b != "numpy"]
    for levels in (3, 1, 64):
        ref = None
        for b in compiled:
            for threads in (1, 2):
                out = _on(b, lambda: K.attention(qb, kb, vb, d, step, zp, levels, scale, comb, threads=threads))
                ref = out if ref is None else ref
                assert np.array_equal(out, ref), (b, levels, threads)


def test_attention_errors():
    qb = np.zeros((1, 1, 2, 1), np.uint64)
    with pytest.raises(ValueError, match="do not fit"):
        K.attention(qb, qb, np.zeros((1, 1, 3, 1), np.uint64), 64, [1.0], [0.0], 3, 1.0)
    with pytest.raises(ValueError, match="levels"):
        K.attention(qb, qb, np.zeros((1, 1, 64, 1), np.uint64), 64, [1.0], [0.0], 0, 1.0)


def test_attention_combine_equals_separate_steps(be):
    rng = np.random.default_rng(7)
    Bw, h, N, d = 2, 3, 20, 16
    C = h * d
    q, k, v = (rng.standard_normal((Bw, N, C)).astype(np.float32) for _ in range(3))
    split = lambda a: np.ascontiguousarray(a.reshape(Bw, N, h, d).transpose(0, 2, 1, 3))  # noqa: E731
    qb, kb = K.pack_signs(split(q)), K.pack_signs(split(k))
    vb = K.pack_bits(np.ascontiguousarray(split(v).transpose(0, 1, 3, 2) >= 0))
    step, zp = np.array([0.05, 0.1, 0.2], np.float32), np.zeros(3, np.float32)
    ns, nt, m1, slope, m2 = (rng.standard_normal(C).astype(np.float32) for _ in range(5))
    ctx = K.attention(qb, kb, vb, d, step, zp, 3, 0.25)
    y = (((ctx * ns + nt) + q) + k) + v - m1
    want = np.where(y < 0, y * slope, y) + m2
    got = K.attention(qb, kb, vb, d, step, zp, 3, 0.25, combine=(ns, nt, q, k, v, (m1, slope, m2)))
    assert np.allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        K.attention(qb, kb, vb, d, step, zp, 3, 0.25, combine=(ns, nt, q[:1], k, v, (m1, slope, m2)))


def test_layer_norm_matches_torch(be):
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((5, 7, 96)) * 3 + 1).astype(np.float32)
    w, b = rng.standard_normal(96).astype(np.float32), rng.standard_normal(96).astype(np.float32)
    want = F.layer_norm(torch.from_numpy(x), (96,), torch.from_numpy(w), torch.from_numpy(b), 1e-5).numpy()
    assert np.abs(K.layer_norm(x, w, b, 1e-5) - want).max() < 1e-5


@pytest.mark.parametrize("C", [1, 5, 16, 24, 64, 96, 100, 512])
def test_layer_norm_identical_on_every_c_backend(C):
    # double sums in 16 lanes (j mod 16) with one reduction order: the same bits in every C copy
    rng = np.random.default_rng(C)
    x = (rng.standard_normal((37, C)) * 3 + 2).astype(np.float32)
    w, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    outs = [_on(be, lambda: K.layer_norm(x, w, b, 1e-5, threads=2)) for be in C_BACKENDS]
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])
    want = F.layer_norm(torch.from_numpy(x), (C,), torch.from_numpy(w), torch.from_numpy(b), 1e-5).numpy()
    assert np.abs(outs[0] - want).max() < 1e-5


@pytest.mark.parametrize("n,pool", [(512, 64), (256, 32), (96, 12), (1024, 256), (2048, 512), (96, 24)])
def test_pooled_means_identical_on_every_backend(n, pool):
    # k = n / pool consecutive channels summed in order, times 1/k (AVX2 transposes 8x8 blocks)
    rng = np.random.default_rng(n)
    dot = rng.integers(-90, 90, (13, n)).astype(np.int32)
    s, t = _vec(rng, n), _vec(rng, n)
    act = tuple(_vec(rng, n) for _ in range(3))
    outs = [_on(b, lambda: K.epilogue_pack(dot, s, t, None, act, pool=pool)) for b in BACKENDS]
    for bits, pooled in outs[1:]:
        assert np.array_equal(bits, outs[0][0]) and np.array_equal(pooled, outs[0][1])
    y = K.epilogue(dot, s, t, None, act)
    assert np.allclose(outs[0][1], y.reshape(13, pool, n // pool).mean(-1), atol=1e-5)


def test_dense_matches_matmul(be):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 5, 48)).astype(np.float32)
    w = rng.standard_normal((48, 70)).astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    want = x.astype(np.float64) @ w + b
    assert np.abs(K.dense(x, w, b) - want).max() < 1e-4
    assert np.abs(K.dense(x, w, None, threads=2) - (want - b)).max() < 1e-4
    with pytest.raises(ValueError, match="does not fit"):
        K.dense(x, w.T)


@pytest.mark.parametrize("rows,k,n", [(9, 48, 64), (7, 13, 70), (1, 512, 1000), (5, 3, 5), (4, 20, 130), (17, 1, 16)])
def test_dense_every_backend_adds_in_order(rows, k, n):
    # o = bias, then o = o + x[t] * w[t] for t = 0..k-1 in float32 (one multiply, one add): exactly,
    # on every C backend and for every register tile and tail
    rng = np.random.default_rng(rows * k + n)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    want = np.broadcast_to(b, (rows, n)).copy()
    want0 = np.zeros((rows, n), np.float32)
    for t in range(k):
        want = want + x[:, t : t + 1] * w[t]
        want0 = want0 + x[:, t : t + 1] * w[t]
    for be in C_BACKENDS:
        assert np.array_equal(_on(be, lambda: K.dense(x, w, b, threads=2)), want)
        assert np.array_equal(_on(be, lambda: K.dense(x, w, None)), want0)


def test_prepared_linear_equals_binary_linear(be):
    rng = np.random.default_rng(10)
    M, k, N = 37, 100, 64
    a = K.pack_signs(rng.standard_normal((M, k)).astype(np.float32))
    b = K.pack_signs(rng.standard_normal((N, k)).astype(np.float32))
    s, t, ps, pb, nb = (_vec(rng, N) for _ in range(5))
    act = tuple(_vec(rng, N) for _ in range(3))
    sc = rng.standard_normal((M, 16)).astype(np.float32)
    res = rng.standard_normal((M, N)).astype(np.float32)
    lin = K.PreparedLinear(b, k, s, t, act, (ps, pb))
    assert np.array_equal(lin(a, sc, res), K.binary_linear(a, b, k, s, t, sc, act, post=(ps, pb), residual=res))
    bits, pooled = lin(a, sc, pack=True, next_bias=nb, pool=8)
    wbits, wpooled = K.binary_linear(a, b, k, s, t, sc, act, pack=True, next_bias=nb, pool=8)
    assert np.array_equal(bits, wbits) and np.array_equal(pooled, wpooled)
    with pytest.raises(ValueError, match="does not fit"):
        lin(a, sc[:, :3])
    with pytest.raises(ValueError, match="does not fit"):
        K.PreparedLinear(b, 200, s, t)


@pytest.mark.skipif(len(BACKENDS) < 3, reason="needs two compiled kernel variants")
def test_prepared_linear_repacks_its_panels_after_a_kernel_switch():
    """A PreparedLinear keeps its weights packed for each variant that ran it; after a switch
    it packs them for the new one instead of failing, and reuses them on a switch back."""
    rng = np.random.default_rng(11)
    M, k, N = 9, 130, 20
    a = K.pack_signs(rng.standard_normal((M, k)).astype(np.float32))
    b = K.pack_signs(rng.standard_normal((N, k)).astype(np.float32))
    s, t = _vec(rng, N), _vec(rng, N)
    lin = K.PreparedLinear(b, k, s, t)
    want = _on("numpy", lambda: K.epilogue(K.xnor_gemm(a, b, k), s, t))
    for name in [BACKENDS[0], BACKENDS[-2], BACKENDS[0]]:
        assert np.array_equal(_on(name, lambda: lin(a)), want), name
    assert len(lin._panels) == 2  # one packing per variant, kept (a call on another thread may use it)


@pytest.mark.parametrize("n,k", [(64, 8), (128, 8), (12, 8), (64, 4), (256, 4), (12, 4), (32, 3)])
def test_channel_pool_shortcut_identical_on_every_backend(n, k):
    # the shortcut of a down-projection (sc has k * n channels: their means of k), AVX2-transposed
    # for k = 8: the same additions ((0 + x0) + x1) + ... as the portable loop, bit for bit (the
    # sign of a zero included); fused into the binary linear layer as into the epilogue
    rng = np.random.default_rng(n * 10 + k)
    rows = 11
    dot = rng.integers(-90, 90, (rows, n)).astype(np.int32)
    s, t = _vec(rng, n), _vec(rng, n)
    act = tuple(_vec(rng, n) for _ in range(3))
    sc = rng.standard_normal((rows, n * k)).astype(np.float32)
    sc[0, :k] = -0.0  # a group of negative zeros: a mean of +0 in the portable order
    sc[1, k : 2 * k] = 0.0
    dot[0, 0] = dot[1, 1] = 0
    t[0] = t[1] = -0.0
    outs = [_on(b, lambda: K.epilogue(dot, s, t, sc, act)) for b in BACKENDS]
    for o in outs[1:]:
        assert np.array_equal(o.view(np.uint32), outs[0].view(np.uint32))
    assert np.allclose(outs[0], _epi_ref(dot, s, t, sc, act), atol=1e-4)
