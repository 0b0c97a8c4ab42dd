"""Bit-packed kernels of the runtime (bhvit.runtime.kernels): C variants and numpy fallback."""

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bhvit.runtime import kernels as K

C_BACKENDS = [b for b in K.available_backends() if b != "numpy"]
BACKENDS = C_BACKENDS + ["numpy"]


@pytest.fixture(params=BACKENDS)
def be(request):
    prev = K.backend()
    K.set_backend(request.param)
    assert K.backend() == request.param
    yield request.param
    K.set_backend(prev)


def _pm(x):
    """sign with zero (and -0.0) as +1, as int64 +-1."""
    return np.where(np.asarray(x) >= 0, 1, -1).astype(np.int64)


def _rand(rng, *shape):
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) < 0.05] = 0.0  # exact zeros count as +1
    return x


# --------------------------------------------------------------------------- library


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 check")
def test_c_backend_is_available_here():
    # the compiled kernels must be built (pip install -e . / python setup.py build_ext --inplace)
    assert K.library_path() is not None, K.library_error()
    assert "c-portable" in C_BACKENDS and "c-avx2" in C_BACKENDS
    K.set_backend("auto")
    assert K.backend() == C_BACKENDS[-1]


def test_env_var_forces_numpy():
    code = "from bhvit.runtime import kernels as K; print(K.backend())"
    env = dict(os.environ, BHVIT_KERNELS="numpy")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "numpy"


def test_set_backend_errors():
    prev = K.backend()
    try:
        with pytest.raises(ValueError):
            K.set_backend("cuda")
        assert K.set_backend("numpy") == "numpy"
    finally:
        K.set_backend(prev)


# --------------------------------------------------------------------------- packing


def test_pack_signs_zero_and_negative_zero(be):
    x = np.array([0.0, -0.0, -1.0, 2.0, -1e-30, 1e-30, -np.inf, np.inf], dtype=np.float32)
    w = K.pack_signs(x)
    assert w.dtype == np.uint64 and w.shape == (1,)
    assert int(w[0]) == 0b10101011
    assert K.pack_signs(x.astype(np.float64))[0] == w[0]


@pytest.mark.parametrize("k", [1, 5, 63, 64, 65, 127, 128, 200])
def test_pack_signs_layout_and_padding(be, k):
    rng = np.random.default_rng(k)
    x = _rand(rng, 3, 2, k)
    p = K.pack_signs(x)
    W = (k + 63) // 64
    assert p.shape == (3, 2, W) and p.dtype == np.uint64
    for idx in np.ndindex(3, 2):
        words = [int(v) for v in p[idx]]
        for j in range(k):
            assert (words[j // 64] >> (j % 64)) & 1 == int(x[idx][j] >= 0)
        if k % 64:
            assert words[-1] >> (k % 64) == 0  # padding bits are zero
    assert (K.pack_bits(x >= 0) == p).all()


def test_pack_signs_all_positive_padding(be):
    p = K.pack_signs(np.ones((4, 70), dtype=np.float32))
    assert (p[:, 0] == np.uint64(2**64 - 1)).all()
    assert (p[:, 1] == np.uint64(2**6 - 1)).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pack_signs_nan_raises(be, dtype):
    x = np.ones((3, 130), dtype=dtype)
    x[2, 129] = np.nan
    with pytest.raises(ValueError):
        K.pack_signs(x)
    x = np.ones((100,), dtype=dtype)
    x[7] = np.nan
    with pytest.raises(ValueError):
        K.pack_signs(x)


def test_pack_signs_other_dtypes_and_views(be):
    rng = np.random.default_rng(1)
    x = _rand(rng, 6, 90)
    ref = K.pack_signs(x)
    assert (K.pack_signs(x.astype(np.float16)) == ref).all()
    assert (K.pack_signs(np.asfortranarray(x)) == ref).all()
    assert (K.pack_signs(x[::2]) == ref[::2]).all()
    assert (K.pack_signs(torch.from_numpy(x)) == ref).all()
    assert K.pack_signs(np.zeros((2, 0), np.float32)).shape == (2, 0)


def test_pack_bits(be):
    rng = np.random.default_rng(2)
    b = rng.random((5, 131)) < 0.5
    p = K.pack_bits(b)
    assert p.shape == (5, 3) and p.dtype == np.uint64
    for r in range(5):
        v = sum(int(p[r, i]) << (64 * i) for i in range(3))
        assert v == sum(1 << j for j in range(131) if b[r, j])  # includes zero padding
    assert (K.pack_bits(b.astype(np.int64) * 3) == p).all()
    assert (K.pack_bits(b.astype(np.uint8)) == p).all()
    assert (K.pack_bits(b.astype(np.int8) * -1) == p).all()
    assert (K.pack_bits(b.astype(np.float32)) == p).all()


# --------------------------------------------------------------------------- GEMMs


@pytest.mark.parametrize("k", [1, 63, 64, 65, 200, 1000])
def test_xnor_and_gemm_vs_float(be, k):
    rng = np.random.default_rng(k)
    for M, N in [(1, 1), (3, 5), (17, 9), (37, 70)]:
        xa, xb = _rand(rng, M, k), _rand(rng, N, k)
        a, b = K.pack_signs(xa), K.pack_signs(xb)
        out = K.xnor_gemm(a, b, k)
        assert out.dtype == np.int32 and out.shape == (M, N)
        np.testing.assert_array_equal(out, _pm(xa) @ _pm(xb).T)
        ba, bb = (xa >= 0).astype(np.int64), (xb >= 0).astype(np.int64)
        out = K.and_gemm(a, b)
        assert out.dtype == np.int32 and out.shape == (M, N)
        np.testing.assert_array_equal(out, ba @ bb.T)


def test_gemm_blocking_shapes(be):
    # several row chunks, column blocks and ragged tiles
    rng = np.random.default_rng(3)
    M, N, k = 203, 141, 2048 + 17
    xa, xb = _rand(rng, M, k), _rand(rng, N, k)
    a, b = K.pack_signs(xa), K.pack_signs(xb)
    np.testing.assert_array_equal(K.xnor_gemm(a, b, k), _pm(xa) @ _pm(xb).T)
    bits = rng.random((M, 300)) < 0.3
    np.testing.assert_array_equal(
        K.and_gemm(K.pack_bits(bits), K.pack_bits(bits[:N])), bits.astype(np.int64) @ bits[:N].astype(np.int64).T
    )


def test_gemm_threads_identical(be):
    rng = np.random.default_rng(4)
    a = K.pack_signs(_rand(rng, 150, 300))
    b = K.pack_signs(_rand(rng, 90, 300))
    r1, r2, r0 = (K.xnor_gemm(a, b, 300, threads=t) for t in (1, 2, 0))
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(r1, r0)
    np.testing.assert_array_equal(K.and_gemm(a, b, threads=1), K.and_gemm(a, b, threads=2))


def test_gemm_empty_and_errors(be):
    a = np.zeros((0, 2), np.uint64)
    b = np.zeros((3, 2), np.uint64)
    assert K.xnor_gemm(a, b, 100).shape == (0, 3)
    assert K.and_gemm(b, a).shape == (3, 0)
    z = K.xnor_gemm(np.zeros((2, 0), np.uint64), np.zeros((3, 0), np.uint64), 0)
    assert z.shape == (2, 3) and (z == 0).all()
    with pytest.raises(ValueError):
        K.xnor_gemm(b, b, 129)  # k does not fit in 2 words
    with pytest.raises(ValueError):
        K.xnor_gemm(b, np.zeros((3, 1), np.uint64), 64)
    with pytest.raises(TypeError):
        K.xnor_gemm(b.astype(np.int64), b, 64)


def test_backends_agree():
    if not C_BACKENDS:
        pytest.skip("compiled kernels not built")
    rng = np.random.default_rng(5)
    a = rng.integers(0, 2**63, size=(40, 7), dtype=np.uint64)
    b = rng.integers(0, 2**63, size=(33, 7), dtype=np.uint64)
    prev = K.backend()
    try:
        res = {}
        for be in BACKENDS:
            K.set_backend(be)
            res[be] = (K.xnor_gemm(a, b, 448), K.and_gemm(a, b))
        for be in BACKENDS[1:]:
            np.testing.assert_array_equal(res[be][0], res[BACKENDS[0]][0])
            np.testing.assert_array_equal(res[be][1], res[BACKENDS[0]][1])
    finally:
        K.set_backend(prev)


# --------------------------------------------------------------------------- conv


def _conv_case(be, rng, B, cin, H, Wd, cout, kh, kw, groups, stride, padding, dilation, threads=0):
    cpg = cin // groups
    x = _rand(rng, B, cin, H, Wd)
    w = _rand(rng, cout, cpg, kh, kw)
    xp = K.pack_signs(x.transpose(0, 2, 3, 1).reshape(B, H, Wd, groups, cpg))
    wp = K.pack_signs(w.transpose(0, 2, 3, 1))
    out = K.xnor_conv2d(xp, wp, cpg, stride, padding, dilation, threads=threads)
    ref = F.conv2d(
        torch.from_numpy(_pm(x).astype(np.float64)),
        torch.from_numpy(_pm(w).astype(np.float64)),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    ref = ref.round().long().permute(0, 2, 3, 1).numpy()
    assert out.dtype == np.int32 and out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)
    return out


@pytest.mark.parametrize("dilation", [1, 3, 5])
def test_conv_grouped_dilated_same(be, dilation):
    rng = np.random.default_rng(dilation)
    _conv_case(be, rng, 2, 64, 9, 9, 64, 3, 3, 4, 1, dilation, dilation)


def test_conv_cin200(be):
    _conv_case(be, np.random.default_rng(6), 1, 200, 6, 7, 24, 3, 3, 1, 1, 1, 1)


def test_conv_2x2_stride2(be):
    rng = np.random.default_rng(7)
    _conv_case(be, rng, 2, 48, 8, 8, 96, 2, 2, 1, 2, 0, 1)
    _conv_case(be, rng, 1, 48, 7, 5, 20, 2, 2, 1, 2, 0, 1)  # odd sizes drop the last row/col


@pytest.mark.parametrize(
    "case",
    [
        # B, cin, H, Wd, cout, kh, kw, groups, stride, padding, dilation
        (1, 64, 7, 5, 12, 3, 3, 4, 1, 1, 1),
        (2, 32, 7, 5, 8, 3, 3, 4, 1, 3, 3),
        (1, 64, 5, 7, 16, 3, 3, 4, 1, 5, 5),  # dilation larger than the map
        (2, 20, 7, 5, 6, 3, 3, 1, 2, 1, 1),
        (1, 130, 5, 6, 9, 1, 1, 1, 1, 0, 1),
        (1, 8, 4, 4, 12, 3, 2, 2, 1, 2, 2),  # non-square kernel, odd channel counts
        (1, 64, 3, 3, 64, 3, 3, 4, 1, 1, 1),
        (1, 128, 5, 5, 8, 3, 3, 1, 1, 1, 1),  # cin_per_group a multiple of 64
        (1, 200, 5, 4, 10, 3, 3, 2, 1, 3, 3),  # 100 per group: 2 words, unaligned taps
        (2, 37, 6, 5, 5, 3, 3, 1, 2, 1, 1),
        (1, 24, 6, 6, 6, 3, 3, 3, 1, 2, 2),  # 3 groups of 8 channels
        (1, 64, 6, 7, 32, 5, 5, 16, 1, 2, 1),  # 16 groups of 4: 25 taps in 2 words
        (2, 128, 7, 6, 16, 3, 3, 4, 1, 3, 3),  # 4 groups of 32: 9 taps in 5 words (two blocks of 4)
    ],
)
def test_conv_odd_cases(be, case):
    _conv_case(be, np.random.default_rng(sum(case)), *case)


def test_conv_threads_identical(be):
    rng = np.random.default_rng(8)
    x = K.pack_signs(_rand(rng, 2, 11, 13, 4, 48))
    w = K.pack_signs(_rand(rng, 40, 3, 3, 48))
    r1 = K.xnor_conv2d(x, w, 48, 1, 3, 3, threads=1)
    r2 = K.xnor_conv2d(x, w, 48, 1, 3, 3, threads=2)
    np.testing.assert_array_equal(r1, r2)


def test_conv_errors(be):
    x = np.zeros((1, 4, 4, 2, 1), np.uint64)
    w = np.zeros((6, 3, 3, 1), np.uint64)
    with pytest.raises(ValueError):
        K.xnor_conv2d(x, np.zeros((5, 3, 3, 1), np.uint64), 16, 1, 1, 1)  # 5 % 2 groups
    with pytest.raises(ValueError):
        K.xnor_conv2d(x, w, 65, 1, 1, 1)  # needs 2 words
    with pytest.raises(ValueError):
        K.xnor_conv2d(x, w, 16, 1, 0, 3)  # no output


def test_conv_ignores_padding_bits(be):
    rng = np.random.default_rng(9)
    x = K.pack_signs(_rand(rng, 1, 6, 5, 2, 40))
    w = K.pack_signs(_rand(rng, 6, 3, 3, 40))
    ref = K.xnor_conv2d(x, w, 40, 1, 1, 1)
    junk = np.uint64(((2**64 - 1) >> 40) << 40)  # set every padding bit
    np.testing.assert_array_equal(K.xnor_conv2d(x | junk, w | junk, 40, 1, 1, 1), ref)


@pytest.mark.parametrize("n,c", [(8, 8), (16, 4), (4, 16)])
@pytest.mark.parametrize("with_act", [False, True])
def test_epilogue_matches_reference_on_every_backend(n, c, with_act):
    from bhvit.runtime import kernels as K

    rng = np.random.default_rng(0)
    dot = rng.integers(-50, 50, (3, 5, n)).astype(np.int32)
    scale, shift = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    sc = rng.standard_normal((3, 5, c)).astype(np.float32)
    act = tuple(rng.standard_normal(n).astype(np.float32) for _ in range(3)) if with_act else None
    v = dot.astype(np.float64) * scale + shift
    if c < n:
        v = v + np.tile(sc, (1, 1, n // c))
    elif c > n:
        v = v + sc.reshape(3, 5, n, c // n).mean(-1)
    else:
        v = v + sc
    if with_act:
        y = v - act[0]
        v = np.where(y >= 0, y, y * act[1]) + act[2]
    before = K.backend()
    try:
        for b in ["numpy"] + [x for x in K.available_backends() if x.startswith("c-")][:1]:
            K.set_backend(b)
            out = K.epilogue(dot, scale, shift, sc, act)
            assert np.allclose(out, v, atol=1e-4), b
            acc = np.ones_like(out)
            K.epilogue(dot, scale, shift, sc, act, out=acc)
            assert np.allclose(acc, v + 1, atol=1e-4), b
    finally:
        K.set_backend(before)
    with pytest.raises(ValueError, match="does not fit"):
        K.epilogue(dot, scale, shift, np.zeros((3, 5, 3), np.float32))
