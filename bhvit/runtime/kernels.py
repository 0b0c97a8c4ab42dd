"""Bit-packed binary kernels of the BHViT inference runtime.

The compiled library ``_bitops*.so`` (plain C, built from ``csrc/`` by
``setup.py`` and loaded with ctypes; the same code as the standalone libbhvit) does the work; where it is missing or
fails to load, a pure-numpy implementation with the same results takes over
silently (:func:`backend` tells which one is active).

Conventions
-----------
* sign(x) = +1 if x >= 0 (``-0.0`` included), else -1.
* Packing: bit = 1 for +1, 0 for -1, little-endian into ``uint64`` words along
  the last axis: element ``k`` goes to word ``k // 64``, bit ``k % 64``.
  Padding bits at the end of the last word are 0.
* Binary dot of two packed +-1 vectors of true length K:
  ``K - 2 * popcount(a ^ b)``.  ``xnor_gemm``/``and_gemm`` count all bits of
  all words, so the padding bits must be 0 in both operands (``pack_signs`` /
  ``pack_bits`` guarantee it); ``xnor_conv2d`` ignores bits beyond
  ``cin_per_group``.
* All results are exact integers (int32); every backend gives identical output.

Choosing the implementation
---------------------------
``BHVIT_KERNELS`` (read at import) or :func:`set_backend` take ``"numpy"``,
``"c"``/``"auto"`` (the best compiled variant for this CPU) or a variant name
from :func:`available_backends` (``"c-portable"``, ``"c-popcnt"``,
``"c-avx2"``, ``"c-avx512-vpopcntdq"``).  ``threads=0`` means OpenMP's
default (all cores, or ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import ctypes
import math
import os
import sysconfig
import threading
import weakref
from pathlib import Path

import numpy as np
from ..errors import ConfigError

__all__ = [
    "pack_signs",
    "pack_bits",
    "xnor_gemm",
    "and_gemm",
    "xnor_conv2d",
    "backend",
    "set_backend",
    "available_backends",
    "library_path",
    "library_error",
    "epilogue",
    "epilogue_pack",
    "binary_linear",
    "PreparedLinear",
    "Panels",
    "gelu",
    "shift_mix",
    "attention",
    "layer_norm",
    "dense",
    "NonFiniteError",
]

_ABI_VERSION = 7  # 6: the binary linear layer only on prepared panels (bhv_binary_linear_pp); 7: the plan's profile
_HERE = Path(__file__).resolve().parent

_lib = None  # ctypes.CDLL or None
_lib_path = None  # Path of the loaded library
_lib_error = None  # why the library is not loaded, if it is not
_use_c = False  # current backend is a compiled variant


# --------------------------------------------------------------------------- loading


def _candidates():
    env = os.environ.get("BHVIT_BITOPS_LIB")
    if env:
        yield Path(env)
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    exact = _HERE / ("_bitops" + suffix)
    if exact.exists():
        yield exact
    others = [p for p in _HERE.glob("_bitops*") if p.suffix in (".so", ".pyd", ".dylib") and p != exact]
    yield from sorted(others, key=lambda p: p.stat().st_mtime, reverse=True)


class Panels(ctypes.Structure):
    """``bhv_panels`` (csrc/kernels.h): weights re-packed once for the active kernel variant."""

    _fields_ = [("variant", ctypes.c_void_p), ("N", ctypes.c_int64), ("W", ctypes.c_int64), ("Bp", ctypes.c_void_p)]


class _Transform(ctypes.Structure):
    """``bhv_transform`` (csrc/kernels.h): the output transform of a binary linear layer."""

    _fields_ = [
        *((f, ctypes.c_void_p) for f in ("scale", "shift", "sc")),
        ("sc_c", ctypes.c_int64),
        *((f, ctypes.c_void_p) for f in ("m1", "slope", "m2", "ps", "pb", "res", "out", "nb", "bits")),
        ("pool_k", ctypes.c_int64),
        ("pool", ctypes.c_void_p),
    ]


def _setup(lib):
    vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sigs = {
        "bhv_abi_version": (i32, []),
        "bhv_num_variants": (i32, []),
        "bhv_variant_name": (ctypes.c_char_p, [i32]),
        "bhv_variant_supported": (i32, [i32]),
        "bhv_backend": (ctypes.c_char_p, []),
        "bhv_select": (i32, [ctypes.c_char_p]),
        "bhv_openmp": (i32, []),
        "bhv_max_threads": (i32, []),
        "bhv_pack_signs_f32": (i32, [vp, i64, i64, vp, i32]),
        "bhv_pack_signs_f64": (i32, [vp, i64, i64, vp, i32]),
        "bhv_pack_bits_u8": (None, [vp, i64, i64, vp, i32]),
        "bhv_xnor_gemm": (i32, [vp, vp, i64, i64, i64, i64, vp, i32]),
        "bhv_and_gemm": (i32, [vp, vp, i64, i64, i64, vp, i32]),
        "bhv_xnor_conv2d": (i32, [vp, vp] + [i64] * 14 + [vp, i32]),
        "bhv_epilogue": (i32, [vp, i64, i64, vp, vp, vp, i64, vp, vp, vp, vp, vp, vp, vp, i32]),
        "bhv_epilogue_pack": (i32, [vp, i64, i64, vp, vp, vp, i64, vp, vp, vp, vp, vp, i64, vp, i32]),
        "bhv_panels_pack": (i32, [ctypes.POINTER(Panels), vp, i64, i64]),
        "bhv_panels_free": (None, [ctypes.POINTER(Panels)]),
        "bhv_panels_current": (i32, [ctypes.POINTER(Panels)]),
        "bhv_xnor_gemm_pp": (i32, [vp, ctypes.POINTER(Panels), i64, i64, vp, i32]),
        "bhv_binary_linear_pp": (i32, [vp, i64, i64, ctypes.POINTER(Panels), ctypes.POINTER(_Transform), i32]),
        "bhv_pack_signs_bias_f32": (i32, [vp, i64, i64, vp, vp, vp, i64, vp, i32]),
        "bhv_gelu": (None, [vp, i64, vp, i32]),
        "bhv_shift_mix": (i32, [vp, i64, i64, i64, i64, vp, i64, vp, vp, vp, i32]),
        "bhv_attention": (i32, [vp, vp, vp, i64, i64, i64, i64, i64, vp, vp, i64, ctypes.c_float] + [vp] * 9 + [i32]),
        "bhv_layer_norm": (None, [vp, i64, i64, vp, vp, ctypes.c_float, vp, i32]),
        "bhv_dense": (None, [vp, i64, i64, vp, i64, vp, vp, i32]),
        "bhvit_load": (i32, [ctypes.c_char_p, i32, ctypes.POINTER(vp)]),
        "bhvit_run": (i32, [vp, vp, i64, vp]),
        "bhvit_free": (None, [vp]),
        "bhvit_set_threads": (i32, [vp, i32]),
        "bhvit_last_error": (ctypes.c_char_p, []),
        "bhv_plan_profile_enable": (i32, [vp, i32]),
        "bhv_plan_set_tile": (i32, [vp, i64]),
        "bhv_plan_profile_get": (
            i32,
            [vp, i32, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_double), ctypes.POINTER(i64)],
        ),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args
    version = lib.bhv_abi_version()
    if version != _ABI_VERSION:
        raise OSError(f"ABI version {version}, expected {_ABI_VERSION} (rebuild: python setup.py build_ext --inplace)")


def _load():
    global _lib, _lib_path, _lib_error
    errors = []
    for path in _candidates():
        try:
            lib = ctypes.CDLL(str(path))
            _setup(lib)
        except (OSError, AttributeError) as e:
            errors.append(f"{path.name}: {e}")
            continue
        _lib, _lib_path, _lib_error = lib, path, None
        return
    _lib_error = "; ".join(errors) if errors else f"no _bitops library next to {_HERE}/kernels.py"


def _c_variants():
    if _lib is None:
        return []
    return [_lib.bhv_variant_name(i).decode() for i in range(_lib.bhv_num_variants()) if _lib.bhv_variant_supported(i)]


def available_backends() -> list[str]:
    """Backends usable on this machine: compiled variants (least to most preferred), then "numpy"."""
    return _c_variants() + ["numpy"]


def backend() -> str:
    """The active implementation: "c-avx512-vpopcntdq", "c-avx2", "c-popcnt", "c-portable" or "numpy"."""
    if _use_c:
        return _lib.bhv_backend().decode()
    return "numpy"


def set_backend(name: str = "auto") -> str:
    """Select the implementation ("numpy", "c"/"auto" or a variant name); returns backend().

    Raises RuntimeError if a compiled backend is asked for and the library is not
    loaded or the variant is not supported by this CPU, ValueError for unknown names.
    """
    global _use_c
    name = (name or "auto").strip().lower()
    if name == "numpy":
        _use_c = False
        return backend()
    if name == "c":
        name = "auto"
    if name != "auto" and not name.startswith("c-"):
        raise ConfigError(f"unknown kernel backend {name!r}; choose from {available_backends()} or 'auto'")
    if _lib is None:
        raise RuntimeError(f"compiled kernels not available: {_lib_error}")
    rc = _lib.bhv_select(name.encode())
    if rc == -1:
        raise ConfigError(f"unknown kernel backend {name!r}; choose from {available_backends()} or 'auto'")
    if rc == -2:
        raise RuntimeError(f"kernel backend {name!r} is not supported by this CPU")
    _use_c = True
    return backend()


def library_path():
    """Path of the loaded compiled library, or None."""
    return _lib_path


def library_error():
    """Why the compiled library is not loaded (None if it is)."""
    return _lib_error


def _init():
    global _use_c
    _load()
    choice = os.environ.get("BHVIT_KERNELS", "auto").strip().lower() or "auto"
    if choice == "numpy" or _lib is None:
        _use_c = False
        return
    try:
        set_backend(choice)
    except (RuntimeError, ValueError):
        set_backend("auto")


# --------------------------------------------------------------------------- helpers

_pinned = {}  # id(array) -> (weakref to it, data pointer): see pin()


def pin(arrays) -> None:
    """Remember the data pointers of long-lived arrays (a model's weights).

    Reading ``ndarray.ctypes.data`` costs microseconds, and a forward pass passes
    weights to the kernels about a thousand times; pinned arrays skip it. Entries
    hold weak references, so a pinned array can still be freed.
    """
    for a in arrays:
        if isinstance(a, np.ndarray):
            _pinned[id(a)] = (weakref.ref(a), a.ctypes.data)


def _ptr(a: np.ndarray):
    hit = _pinned.get(id(a))
    if hit is not None and hit[0]() is a:
        return hit[1]
    try:  # about 3x cheaper than ndarray.ctypes.data; needs a writable, non-empty buffer
        return _addressof(_c_char.from_buffer(a))
    except (TypeError, ValueError, BufferError):
        return a.ctypes.data


_addressof, _c_char = ctypes.addressof, ctypes.c_char


def _words(k: int) -> int:
    return (k + 63) // 64


def _as_words(a, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(a)
    dt = a.dtype
    if dt.kind != "u" or dt.itemsize != 8:
        raise TypeError(f"{name} must be uint64 (packed words), got {dt}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    if not dt.isnative:
        return a.astype(np.uint64)
    return np.ascontiguousarray(a)


class NonFiniteError(ValueError):
    """A NaN reached a sign (packing): the signs of NaN are undefined, so no backend packs them."""


_NAN = "pack_signs: input contains NaN"
MAX_THREADS = 4096


def _threads(threads) -> int:
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
        raise ConfigError(f"threads must be an integer >= 0 (0: all cores), got {threads!r}")
    threads = int(threads)
    if not 0 <= threads <= MAX_THREADS:
        raise ConfigError(f"threads must be >= 0 (0: all cores) and at most {MAX_THREADS}, got {threads}")
    return threads


def _check_rc(rc: int):
    if rc == -1:
        raise MemoryError("bhvit kernels: out of memory")
    if rc == 1:  # the packing kernels: a NaN among the values to pack
        raise NonFiniteError(_NAN)
    if rc != 0:
        raise RuntimeError(f"bhvit kernels: error {rc}")


def _to_uint64_words(bits: np.ndarray) -> np.ndarray:
    """bool (..., K) -> uint64 (..., ceil(K/64)) little-endian bit order (numpy path)."""
    k = bits.shape[-1]
    W = _words(k)
    pad = 64 * W - k
    if pad:
        bits = np.concatenate([bits, np.zeros(bits.shape[:-1] + (pad,), dtype=bool)], axis=-1)
    by = np.packbits(bits, axis=-1, bitorder="little")  # (..., 8W) uint8
    return np.ascontiguousarray(by).view("<u8").astype(np.uint64, copy=False).reshape(bits.shape[:-1] + (W,))


def _unpack_bits(a: np.ndarray) -> np.ndarray:
    """uint64 (..., W) -> uint8 0/1 (..., 64W), all bits (padding included)."""
    by = np.ascontiguousarray(a.astype("<u8", copy=False)).view(np.uint8)
    return np.unpackbits(by, axis=-1, bitorder="little")


def _fdtype(n: int):
    # integer sums up to n are exact in float32 below 2**24
    return np.float32 if n < (1 << 24) else np.float64


# --------------------------------------------------------------------------- packing


def pack_signs(x, bias=None, affine=None, threads: int = 0) -> np.ndarray:
    """float (..., K) -> uint64 (..., ceil(K/64)): bit = 1 where x >= 0 (-0.0 too). NaN: ValueError.

    With ``bias`` the signs of ``x + bias`` (computed in float32) are packed without
    materialising the sum: a binary layer's input bias. ``bias`` is ``(K,)`` or
    ``(G, K)`` with ``x`` of shape ``(..., G, K)`` (channel groups or heads packed
    separately, each with its own slice of the bias). ``affine`` = ``(scale, shift)``
    of the same shape as ``bias`` packs ``(x * scale + shift) + bias``: a folded norm
    in front of the layer.
    """
    if bias is not None:
        return _pack_signs_bias(x, bias, affine, _threads(threads))
    if affine is not None:
        raise ValueError("pack_signs: affine needs a bias.")
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("pack_signs needs at least one dimension")
    if x.dtype.kind not in "fiub":
        raise TypeError(f"pack_signs needs a real numeric array, got {x.dtype}")
    if x.dtype.char not in "fd":
        x = x.astype(np.float64 if x.dtype.kind in "iu" and x.dtype.itemsize >= 4 else np.float32)
    k = x.shape[-1]
    W = _words(k)
    lead = x.shape[:-1]
    if _use_c:
        x = np.ascontiguousarray(x)
        out = np.empty(lead + (W,), dtype=np.uint64)
        rows = math.prod(lead)
        if rows and k:
            fn = _lib.bhv_pack_signs_f32 if x.dtype.char == "f" else _lib.bhv_pack_signs_f64
            if fn(_ptr(x), rows, k, _ptr(out), 0):
                raise NonFiniteError(_NAN)
        return out
    if np.isnan(x).any():
        raise NonFiniteError(_NAN)
    return _to_uint64_words(x >= 0)


def _pack_signs_bias(x, bias, affine, threads):
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError("pack_signs needs at least one dimension")
    k = x.shape[-1]
    bias = np.ascontiguousarray(bias, dtype=np.float32)
    if bias.ndim not in (1, 2) or bias.shape[-1] != k or (bias.ndim == 2 and x.shape[-2:] != bias.shape):
        raise ValueError(f"bias of shape {bias.shape} does not fit input of shape {x.shape}.")
    if affine is not None:
        affine = [np.ascontiguousarray(a, dtype=np.float32) for a in affine]
        if len(affine) != 2 or any(a.shape != bias.shape for a in affine):
            raise ValueError(f"affine must be a (scale, shift) pair shaped like the bias {bias.shape}.")
    if not _use_c:
        return pack_signs((x * affine[0] + affine[1] if affine is not None else x) + bias)
    out = np.empty(x.shape[:-1] + (_words(k),), dtype=np.uint64)
    rows = math.prod(x.shape[:-1])
    if rows and k:
        sc, sh = (_ptr(affine[0]), _ptr(affine[1])) if affine is not None else (None, None)
        _check_rc(
            _lib.bhv_pack_signs_bias_f32(_ptr(x), rows, k, sc, sh, _ptr(bias), bias.size // k, _ptr(out), threads)
        )
    return out


def pack_bits(b) -> np.ndarray:
    """0/1 (bool or int) (..., K) -> uint64 (..., ceil(K/64)): bit = 1 where b != 0."""
    b = np.asarray(b)
    if b.ndim == 0:
        raise ValueError("pack_bits needs at least one dimension")
    if b.dtype.char in "?Bb":
        b8 = np.ascontiguousarray(b).view(np.uint8)
    else:
        b8 = np.ascontiguousarray(b != 0).view(np.uint8)
    k = b8.shape[-1]
    W = _words(k)
    lead = b8.shape[:-1]
    if _use_c:
        out = np.empty(lead + (W,), dtype=np.uint64)
        rows = math.prod(lead)
        if rows and k:
            _lib.bhv_pack_bits_u8(_ptr(b8), rows, k, _ptr(out), 0)
        return out
    return _to_uint64_words(b8 != 0)


# --------------------------------------------------------------------------- GEMMs


def _gemm_args(a, b):
    a = _as_words(a, "a", 2)
    b = _as_words(b, "b", 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same number of words, got {a.shape} and {b.shape}")
    return a, b


def xnor_gemm(a, b, k: int, threads: int = 0) -> np.ndarray:
    """out[m, n] = k - 2 * popcount(a[m] ^ b[n]): +-1 dot products of true length k.

    a: uint64 (M, W), b: uint64 (N, W), 0 <= k <= 64 * W; returns int32 (M, N).
    """
    a, b = _gemm_args(a, b)
    k, threads = int(k), _threads(threads)
    (M, W), N = a.shape, b.shape[0]
    if not 0 <= k <= 64 * W:
        raise ValueError(f"k={k} does not fit in {W} words")
    if _use_c:
        out = np.empty((M, N), dtype=np.int32)
        if M and N:
            _check_rc(_lib.bhv_xnor_gemm(_ptr(a), _ptr(b), M, N, W, k, _ptr(out), threads))
        return out
    # popcount(a ^ b) over all 64W bits = (64W - dot_pm) / 2 with +-1 over all bits
    dt = _fdtype(64 * W)
    ap = _unpack_bits(a).astype(dt) * 2 - 1
    bp = _unpack_bits(b).astype(dt) * 2 - 1
    dot = ap @ bp.T
    return (np.rint(dot).astype(np.int64) - (64 * W - k)).astype(np.int32)


def and_gemm(a, b, threads: int = 0) -> np.ndarray:
    """out[m, n] = popcount(a[m] & b[n]).  a: uint64 (M, W), b: uint64 (N, W); returns int32 (M, N)."""
    a, b = _gemm_args(a, b)
    threads = _threads(threads)
    (M, W), N = a.shape, b.shape[0]
    if _use_c:
        out = np.empty((M, N), dtype=np.int32)
        if M and N:
            _check_rc(_lib.bhv_and_gemm(_ptr(a), _ptr(b), M, N, W, _ptr(out), threads))
        return out
    dt = _fdtype(64 * W)
    dot = _unpack_bits(a).astype(dt) @ _unpack_bits(b).astype(dt).T
    return np.rint(dot).astype(np.int32)


# --------------------------------------------------------------------------- conv


def xnor_conv2d(
    x, w, cin_per_group: int, stride: int = 1, padding: int = 0, dilation: int = 1, threads: int = 0
) -> np.ndarray:
    """Grouped, dilated, strided 2-D convolution of +-1 maps with +-1 kernels, zero padding.

    x: uint64 (B, H, Wd, G, Wg), the channels split into G groups of cin_per_group,
       each packed into Wg = ceil(cin_per_group / 64) words;
    w: uint64 (Cout, KH, KW, Wg); output channel o reads group o // (Cout // G).
    Each in-map tap adds cin_per_group - 2 * popcount(x ^ w); taps in the padding add 0.
    Returns int32 (B, Ho, Wo, Cout), Ho = (H + 2p - d(KH-1) - 1) // s + 1 (same for Wo).
    """
    x = _as_words(x, "x", 5)
    w = _as_words(w, "w", 4)
    cpg, stride, padding, dilation = int(cin_per_group), int(stride), int(padding), int(dilation)
    threads = _threads(threads)
    B, H, Wd, G, Wg = x.shape
    Cout, KH, KW, Wg2 = w.shape
    if Wg2 != Wg:
        raise ValueError(f"x has {Wg} words per group but w has {Wg2}")
    if not 0 < cpg <= 64 * Wg or Wg != _words(cpg):
        raise ValueError(f"cin_per_group={cpg} does not match {Wg} words per group")
    if G < 1 or Cout % G:
        raise ValueError(f"Cout={Cout} is not a multiple of the {G} groups")
    if stride < 1 or dilation < 1 or padding < 0:
        raise ValueError(f"bad stride/padding/dilation {stride}/{padding}/{dilation}")
    if KH < 1 or KW < 1:
        raise ValueError(f"empty kernel {KH}x{KW}")
    Ho = (H + 2 * padding - dilation * (KH - 1) - 1) // stride + 1
    Wo = (Wd + 2 * padding - dilation * (KW - 1) - 1) // stride + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"kernel {KH}x{KW} (dilation {dilation}) larger than the padded {H}x{Wd} input")
    if _use_c:
        out = np.empty((B, Ho, Wo, Cout), dtype=np.int32)
        if B and Cout:
            _check_rc(
                _lib.bhv_xnor_conv2d(
                    _ptr(x),
                    _ptr(w),
                    B,
                    H,
                    Wd,
                    G,
                    Wg,
                    Cout,
                    KH,
                    KW,
                    cpg,
                    stride,
                    padding,
                    dilation,
                    Ho,
                    Wo,
                    _ptr(out),
                    threads,
                )
            )
        return out
    return _conv_numpy(x, w, cpg, stride, padding, dilation, Ho, Wo)


def _conv_numpy(x, w, cpg, s, p, d, Ho, Wo):
    B, H, Wd, G, Wg = x.shape
    Cout, KH, KW, _ = w.shape
    cpo = Cout // G
    dt = _fdtype(KH * KW * cpg)
    # the cpg channels of each group as +-1, the zero padding as 0 (adds nothing)
    xpm = np.zeros((B, H + 2 * p, Wd + 2 * p, G, cpg), dtype=dt)
    xpm[:, p : p + H, p : p + Wd] = _unpack_bits(x)[..., :cpg].astype(dt) * 2 - 1
    wpm = _unpack_bits(w)[..., :cpg].astype(dt) * 2 - 1  # (Cout, KH, KW, cpg)
    acc = np.zeros((B, Ho, Wo, Cout), dtype=dt)
    for kh in range(KH):
        hs = slice(kh * d, kh * d + s * (Ho - 1) + 1, s)
        for kw in range(KW):
            ws = slice(kw * d, kw * d + s * (Wo - 1) + 1, s)
            for g in range(G):
                acc[..., g * cpo : (g + 1) * cpo] += xpm[:, hs, ws, g, :] @ wpm[g * cpo : (g + 1) * cpo, kh, kw, :].T
    return np.rint(acc).astype(np.int32)


_init()


def _f32(a, n=None):
    a = np.ascontiguousarray(a, dtype=np.float32)
    if n is not None and a.shape != (n,):
        raise ValueError(f"expected a float vector of length {n}, got shape {a.shape}.")
    return a


def _epi_args(dot, scale, shift, shortcut, rprelu):
    dot = np.ascontiguousarray(dot, dtype=np.int32)
    n = dot.shape[-1]
    rows = dot.size // max(n, 1)
    scale, shift = _f32(scale, n), _f32(shift, n)
    sc = None
    if shortcut is not None:
        sc = _f32(shortcut)
        c = sc.shape[-1]
        if sc.size // max(c, 1) != rows or not (c == n or (c < n and n % c == 0) or (c > n and c % n == 0)):
            raise ValueError(f"shortcut of shape {sc.shape} does not fit an output of shape {dot.shape}.")
    acts = [_f32(a, n) for a in rprelu] if rprelu is not None else None
    return dot, n, rows, scale, shift, sc, acts


def _epi_c_args(sc, acts):
    null = None
    return (
        _ptr(sc) if sc is not None else null,
        sc.shape[-1] if sc is not None else 0,
        _ptr(acts[0]) if acts else null,
        _ptr(acts[1]) if acts else null,
        _ptr(acts[2]) if acts else null,
    )


def _group_mean(x, n):
    """Mean of groups of ``c // n`` consecutive channels, summed in order like the C kernels."""
    g = x.reshape(x.shape[:-1] + (n, x.shape[-1] // n))
    acc = g[..., 0].copy()
    for t in range(1, g.shape[-1]):
        acc += g[..., t]
    return acc * (np.float32(1.0) / np.float32(g.shape[-1]))  # 1.0f / k, as in C


def rprelu(x, move1, slope, move2):
    """RPReLU in float32 as the C kernels compute it: ``y = x - move1``, then ``y * slope`` where
    ``y < 0`` else ``y`` (``F.prelu``), plus ``move2``."""
    y = x - move1
    return np.where(y < 0, y * slope, y) + move2


def _epi_numpy(dot, scale, shift, sc, acts):
    # as the C epilogue: RPReLU's move1 is taken into the shift, (dot * scale + (shift - move1)) + sc
    n = dot.shape[-1]
    v = dot.astype(np.float32) * scale + (shift if acts is None else shift - acts[0])
    if sc is not None:
        c = sc.shape[-1]
        if c < n:
            v += np.tile(sc, (1,) * (sc.ndim - 1) + (n // c,))
        elif c > n:
            v += _group_mean(sc, n)
        else:
            v += sc
    if acts is not None:
        v = rprelu(v, np.float32(0), acts[1], acts[2])
    return v


def epilogue(
    dot, scale, shift, shortcut=None, rprelu=None, out=None, post=None, residual=None, threads: int = 0
) -> np.ndarray:
    """Fused float epilogue of a binary layer, one pass in C.

    ``y = post(act(dot * scale + shift + shortcut))`` for int32 ``dot`` of shape
    ``(..., n)``. ``shortcut`` ``(..., c)`` is added as is (``c == n``), tiled
    (``c < n``) or averaged over groups of ``c // n`` consecutive channels
    (``c > n``). ``rprelu`` is a ``(move1, slope, move2)`` triple or None; ``post``
    a LayerScale ``(scale, bias)`` pair (``bias + y * scale``) or None.
    Returns ``residual + y`` when ``residual`` is given, else ``y``. With ``out``
    given the result is written there; ``out`` without ``residual`` accumulates
    (``out += y``).
    """
    dot, n, rows, scale, shift, sc, acts = _epi_args(dot, scale, shift, shortcut, rprelu)
    posts = [_f32(a, n) for a in post] if post is not None else None
    if out is None:
        out = np.empty(dot.shape, dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != dot.shape or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous float32 array of the output's shape.")
    elif residual is None:
        residual = out
    if residual is not None:
        residual = _f32(residual)
        if residual.shape != dot.shape:
            raise ValueError(f"residual of shape {residual.shape} does not match the output {dot.shape}.")
    if _use_c:
        null = None
        rc = _lib.bhv_epilogue(
            _ptr(dot),
            rows,
            n,
            _ptr(scale),
            _ptr(shift),
            *_epi_c_args(sc, acts),
            _ptr(posts[0]) if posts else null,
            _ptr(posts[1]) if posts else null,
            _ptr(residual) if residual is not None else null,
            _ptr(out),
            _threads(threads),
        )
        _check_rc(rc)
        return out
    v = _epi_numpy(dot, scale, shift, sc, acts)
    if posts is not None:
        v = posts[1] + v * posts[0]
    if residual is not None:
        v = residual + v
    out[...] = v
    return out


def epilogue_pack(dot, scale, shift, shortcut=None, rprelu=None, next_bias=None, pool: int = 0, threads: int = 0):
    """The epilogue of a binary layer feeding another binary layer, without float output.

    Computes ``y = act(dot * scale + shift + shortcut)`` like :func:`epilogue` and
    returns ``(bits, pooled)``: ``bits`` the packed signs of ``y + next_bias`` (the
    next layer's input, ``(..., ceil(n/64))`` uint64) and, with ``pool`` = p > 0,
    ``pooled`` the means of groups of ``n // p`` consecutive channels of ``y``
    (``(..., p)`` float32, the next layer's channel-pool shortcut), else None.
    """
    dot, n, rows, scale, shift, sc, acts = _epi_args(dot, scale, shift, shortcut, rprelu)
    nb = _f32(next_bias, n) if next_bias is not None else None
    pool = int(pool)
    if pool < 0 or (pool and n % pool):
        raise ValueError(f"pool={pool} does not divide the {n} output channels.")
    bits = np.empty(dot.shape[:-1] + (_words(n),), dtype=np.uint64)
    pooled = np.empty(dot.shape[:-1] + (pool,), dtype=np.float32) if pool else None
    if _use_c:
        null = None
        if rows and n:
            rc = _lib.bhv_epilogue_pack(
                _ptr(dot),
                rows,
                n,
                _ptr(scale),
                _ptr(shift),
                *_epi_c_args(sc, acts),
                _ptr(nb) if nb is not None else null,
                _ptr(bits),
                n // pool if pool else 0,
                _ptr(pooled) if pool else null,
                _threads(threads),
            )
            _check_rc(rc)
        return bits, pooled
    v = _epi_numpy(dot, scale, shift, sc, acts)
    if pool:
        pooled[...] = _group_mean(v, pool)
    bits[...] = pack_signs(v if nb is None else v + nb)
    return bits, pooled


def binary_linear(
    a,
    b,
    k: int,
    scale,
    shift,
    shortcut=None,
    rprelu=None,
    post=None,
    residual=None,
    pack: bool = False,
    next_bias=None,
    pool: int = 0,
    threads: int = 0,
):
    """A binary linear layer: ``xnor_gemm(a, b, k)`` fused with its epilogue.

    a: uint64 ``(M, W)`` packed inputs, b: uint64 ``(N, W)`` packed weights. The
    epilogue arguments are those of :func:`epilogue` (shortcut and residual as
    ``(M, c)`` / ``(M, N)`` arrays); with ``pack=True`` those of
    :func:`epilogue_pack` and the result is ``(bits, pooled)``. Rows are processed
    in small chunks, so the int32 products never leave the cache.
    """
    a, b = _gemm_args(a, b)
    k, threads = int(k), _threads(threads)
    W = a.shape[1]
    if not 0 <= k <= 64 * W:
        raise ValueError(f"k={k} does not fit in {W} words")
    if pack and (post is not None or residual is not None):
        raise ValueError("pack=True takes no post or residual.")
    if not _use_c:
        dot = xnor_gemm(a, b, k)
        if pack:
            return epilogue_pack(dot, scale, shift, shortcut, rprelu, next_bias, pool)
        return epilogue(dot, scale, shift, shortcut, rprelu, post=post, residual=residual)
    return PreparedLinear(b, k, scale, shift, rprelu, post)(a, shortcut, residual, pack, next_bias, pool, threads)


class PreparedLinear:
    """A binary linear layer and its epilogue parameters, validated once.

    The runtime calls each layer once per forward pass; checking and converting the
    same weights on every call costs more than the kernel for small inputs. Calling
    it is :func:`binary_linear` with the stored ``b``, ``k``, ``scale``, ``shift``,
    ``rprelu`` and ``post``. They are held, not copied: treat them as frozen (the compiled
    kernels pack ``b`` once per kernel variant, at its first call). One instance may be
    called from several threads.
    """

    _panels = ()  # bhv_panels, one per kernel variant this layer has run on

    def __init__(self, b, k: int, scale, shift, rprelu=None, post=None):
        self.b = _as_words(b, "b", 2)
        self.N, self.W = self.b.shape
        self.k = int(k)
        if not 0 <= self.k <= 64 * self.W:
            raise ValueError(f"k={k} does not fit in {self.W} words")
        self.scale, self.shift = _f32(scale, self.N), _f32(shift, self.N)
        self.rprelu = [_f32(x, self.N) for x in rprelu] if rprelu is not None else None
        self.post = [_f32(x, self.N) for x in post] if post is not None else None
        m1, slope, m2 = (None if x is None else x.ctypes.data for x in (self.rprelu or [None] * 3))
        ps, pb = (None if x is None else x.ctypes.data for x in (self.post or [None] * 2))
        self._params = dict(scale=self.scale.ctypes.data, shift=self.shift.ctypes.data, m1=m1, slope=slope, m2=m2)
        self._post = dict(ps=ps, pb=pb)
        self._lock = threading.Lock()

    def __del__(self):
        for p in self._panels:
            self._free(p)

    def _prepared(self):
        """The panels for the active kernel variant, packed at their first use. Panels are
        never freed while the layer lives, so a call on another thread keeps its own."""
        with self._lock:
            for p in self._panels:
                if _lib.bhv_panels_current(ctypes.byref(p)):
                    return p
            p = Panels()
            _check_rc(_lib.bhv_panels_pack(ctypes.byref(p), _ptr(self.b), self.N, self.W))
            self._panels, self._free = (*self._panels, p), _lib.bhv_panels_free  # kept for __del__ at exit
            return p

    def __call__(
        self, a, shortcut=None, residual=None, pack: bool = False, next_bias=None, pool: int = 0, threads: int = 0
    ):
        if not (
            _use_c
            and type(a) is np.ndarray
            and a.dtype == np.uint64
            and a.ndim == 2
            and a.shape[1] == self.W
            and a.flags.c_contiguous
        ):
            post = None if pack else self.post
            args = (a, self.b, self.k, self.scale, self.shift, shortcut, self.rprelu, post, residual, pack)
            return binary_linear(*args, next_bias, pool, threads)
        M, N = a.shape[0], self.N
        t = _Transform(**self._params)
        if shortcut is not None:
            sc = _f32(shortcut)
            c = sc.shape[-1]
            if sc.shape != (M, c) or not (c == N or (c < N and N % c == 0) or (c > N and c % N == 0)):
                raise ValueError(f"shortcut of shape {sc.shape} does not fit an output of shape {(M, N)}.")
            t.sc, t.sc_c = _ptr(sc), c
        if pack:
            pool = int(pool)
            if pool < 0 or (pool and N % pool):
                raise ValueError(f"pool={pool} does not divide the {N} output channels.")
            nb = _f32(next_bias, N) if next_bias is not None else None
            bits = np.empty((M, _words(N)), dtype=np.uint64)
            pooled = np.empty((M, pool), dtype=np.float32) if pool else None
            t.nb, t.bits = (_ptr(nb) if nb is not None else None), _ptr(bits)
            if pool:
                t.pool_k, t.pool = N // pool, _ptr(pooled)
            result = bits, pooled
        else:
            if residual is not None:
                residual = _f32(residual)
                if residual.shape != (M, N):
                    raise ValueError(f"residual of shape {residual.shape} does not match the output {(M, N)}.")
                t.res = _ptr(residual)
            out = np.empty((M, N), dtype=np.float32)
            t.ps, t.pb, t.out = self._post["ps"], self._post["pb"], _ptr(out)
            result = out
        threads = _threads(threads)
        for _ in range(2 if M else 0):  # again if the kernel variant changed on another thread meanwhile
            rc = _lib.bhv_binary_linear_pp(_ptr(a), M, self.k, ctypes.byref(self._prepared()), ctypes.byref(t), threads)
            if rc != -3:
                break
        if M:
            _check_rc(rc)
        return result


# --------------------------------------------------------------------------- float glue


# erf(z) ~ z P(z^2) / Q(z^2) on [-4, 4] (glue.c's gelu1), highest power first
_ERF_P = np.array(
    [-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05]
    + [-7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02],
    np.float32,
)
_ERF_Q = np.array(
    [-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03]
    + [-1.42647390514189e-02],
    np.float32,
)


def _gelu_numpy(x: np.ndarray) -> np.ndarray:
    # the float32 operations of glue.c's gelu1, in its order (numpy rounds each one the same way)
    f = np.float32
    z = x * f(0.70710678118654752)
    z = np.where(z > f(4), f(4), z)
    z = np.where(z < f(-4), f(-4), z)
    z2 = z * z
    p, q = _ERF_P[0], _ERF_Q[0]
    for c in _ERF_P[1:]:
        p = p * z2 + c
    for c in _ERF_Q[1:]:
        q = q * z2 + c
    e = (z * p) / q
    e = np.where(e > f(1), f(1), e)
    e = np.where(e < f(-1), f(-1), e)
    h = f(0.5) * (f(1) + e)
    with np.errstate(invalid="ignore"):
        return np.where(h == f(0), f(-0.0), x * h).astype(np.float32)


def gelu(x, threads: int = 0) -> np.ndarray:
    """Exact (erf) GELU in float32: ``0.5 x (1 + erf(x / sqrt 2))``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not _use_c:
        return _gelu_numpy(x)
    out = np.empty_like(x)
    if x.size:
        _lib.bhv_gelu(_ptr(x), x.size, _ptr(out), _threads(threads))
    return out


def _roll_mean(x, k, axis):
    # the training model's order: ((x + roll(x, 1)) + roll(x, -1)) + roll(x, 2) ..., then times
    # (float32)(1 / (2k + 1)) -- glue.c's float operations, so every backend gives the same bits
    out = x.copy()
    for s in range(1, k + 1):
        out = out + np.roll(x, s, axis=axis)
        out = out + np.roll(x, -s, axis=axis)
    return out * np.float32(1.0 / (2 * k + 1))


def _channel_mix(x, k):
    a, b, c, d = np.split(x, 4, axis=-1)
    return np.concatenate([np.roll(a, k, 1), np.roll(b, -k, 1), np.roll(c, k, 2), np.roll(d, -k, 2)], -1)


def shift_mix(x, sizes, scales, biases, out, threads: int = 0) -> np.ndarray:
    """Add the LayerScaled shift branches of a BHViT block to ``out`` in place.

    x, out: float32 ``(B, H, W, C)`` (C divisible by 4). For each size ``k`` in
    ``sizes`` three branches, in order: the mean of the cyclic rolls ``-k..k`` along
    H, the same along W, and the channel quarters rolled ``+k H, -k H, +k W, -k W``;
    branch ``i`` adds ``biases[i] + y_i * scales[i]`` (``scales``, ``biases``:
    ``(3 * len(sizes), C)``). Returns ``out``.
    """
    x = _f32(x)
    if x.ndim != 4 or x.shape[-1] % 4:
        raise ValueError(f"shift_mix needs a (B, H, W, C) map with C divisible by 4, got {x.shape}.")
    if out.dtype != np.float32 or out.shape != x.shape or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous float32 array of the input's shape.")
    ks = np.ascontiguousarray(sizes, dtype=np.int64).reshape(-1)
    C = x.shape[-1]
    scales = np.ascontiguousarray(scales, dtype=np.float32).reshape(-1, C)
    biases = np.ascontiguousarray(biases, dtype=np.float32).reshape(-1, C)
    if scales.shape[0] != 3 * ks.size or biases.shape != scales.shape:
        raise ValueError(f"need {3 * ks.size} scale and bias rows for sizes {list(ks)}.")
    if (ks < 0).any():
        raise ValueError(f"shift sizes must be >= 0, got {list(ks)}.")
    if not _use_c:
        for i, k in enumerate(ks):
            for j, y in enumerate((_roll_mean(x, k, 1), _roll_mean(x, k, 2), _channel_mix(x, k))):
                out += biases[3 * i + j] + y * scales[3 * i + j]
        return out
    if ks.size and x.size:
        B, H, W, _ = x.shape
        _check_rc(
            _lib.bhv_shift_mix(
                _ptr(x), B, H, W, C, _ptr(ks), ks.size, _ptr(scales), _ptr(biases), _ptr(out), _threads(threads)
            )
        )
    return out


def dense(x, weight_t, bias=None, threads: int = 0) -> np.ndarray:
    """Float layer ``x @ weight_t + bias``: x ``(..., k)``, weight_t ``(k, n)`` (the weight transposed).

    Runs on the kernels' own threads instead of numpy's BLAS.
    """
    x = _f32(x)
    wt = _f32(weight_t)
    if wt.ndim != 2 or x.shape[-1] != wt.shape[0]:
        raise ValueError(f"dense: input {x.shape} does not fit weight_t {wt.shape}.")
    k, n = wt.shape
    b = _f32(bias, n) if bias is not None else None
    if not _use_c:
        y = x @ wt
        return (y + b if b is not None else y).astype(np.float32)
    out = np.empty(x.shape[:-1] + (n,), dtype=np.float32)
    if out.size:
        _lib.bhv_dense(
            _ptr(x),
            x.size // max(k, 1),
            k,
            _ptr(wt),
            n,
            _ptr(b) if b is not None else None,
            _ptr(out),
            _threads(threads),
        )
    return out


def layer_norm(x, weight, bias, eps: float, threads: int = 0) -> np.ndarray:
    """LayerNorm over the last dim (float32 in and out, statistics in float64)."""
    x = _f32(x)
    C = x.shape[-1]
    w, b = _f32(weight, C), _f32(bias, C)
    if not _use_c:
        x64 = x.astype(np.float64)
        mu = x64.mean(-1, keepdims=True).astype(np.float32)
        var = ((x64 - mu) ** 2).mean(-1, keepdims=True)
        inv = (1.0 / np.sqrt(var + eps)).astype(np.float32)
        return (x - mu) * inv * w + b
    out = np.empty_like(x)
    if x.size:
        _lib.bhv_layer_norm(_ptr(x), x.size // C, C, _ptr(w), _ptr(b), float(eps), _ptr(out), _threads(threads))
    return out


def attention(
    qb, kb, vb, d: int, step, zero_point, levels: int, scale: float, combine=None, threads: int = 0
) -> np.ndarray:
    """BHViT's binary attention core over windows x heads, from packed operands.

    qb: uint64 ``(Bw, h, N, ceil(d/64))`` and kb ``(Bw, h, M, ceil(d/64))``: packed
    signs of Q and K; vb: uint64 ``(Bw, h, d, ceil(M/64))``: bits of ``V >= 0`` along
    the keys. Scores ``sign(Q) sign(K)^T`` by XNOR/popcount, ``softmax(scores *
    scale)`` in float32, Quantization Decomposition into ``levels`` 0/1 planes
    (``lv = clip(round(A * levels / step + zero_point), 0, levels)``, plane s =
    ``lv >= s``), each times ``sign(V)`` by AND/popcount, summed times ``step``.
    step, zero_point: per head. Returns float32 ``(Bw, N, h * d)``.

    ``combine`` = ``(norm_scale, norm_shift, q, k, v, (move1, slope, move2))`` (q, k, v
    float32 ``(Bw, N, h * d)``, N == M) returns MSMHA's context output instead:
    ``RPReLU(((ctx * norm_scale + norm_shift) + q) + k) + v)``, in the same pass.
    """
    qb, kb, vb = (_as_words(a, n, 4) for a, n in ((qb, "qb"), (kb, "kb"), (vb, "vb")))
    Bw, h, N, Wd = qb.shape
    M = kb.shape[2]
    d, levels = int(d), int(levels)
    if kb.shape != (Bw, h, M, Wd) or Wd != _words(d) or vb.shape != (Bw, h, d, _words(M)):
        raise ValueError(f"attention operands do not fit: qb {qb.shape}, kb {kb.shape}, vb {vb.shape}, d={d}.")
    if not 1 <= levels <= 64:
        raise ValueError(f"levels must be in 1..64, got {levels}.")
    step, zp = _f32(step, h), _f32(zero_point, h)
    comb = None
    if combine is not None:
        ns, nt, q, k, v, act = combine
        if N != M:
            raise ValueError(f"combine needs as many queries as keys, got {N} and {M}.")
        comb = [_f32(ns, h * d), _f32(nt, h * d)] + [_f32(a) for a in (q, k, v)] + [_f32(a, h * d) for a in act]
        if any(a.shape != (Bw, N, h * d) for a in comb[2:5]):
            raise ValueError(f"combine's q, k, v must have shape {(Bw, N, h * d)}.")
    if _use_c:
        out = np.empty((Bw, N, h, d), dtype=np.float32)
        if out.size:
            cptr = [_ptr(a) for a in comb] if comb is not None else [None] * 8
            _check_rc(
                _lib.bhv_attention(
                    _ptr(qb),
                    _ptr(kb),
                    _ptr(vb),
                    Bw,
                    h,
                    N,
                    M,
                    d,
                    _ptr(step),
                    _ptr(zp),
                    levels,
                    float(scale),
                    *cptr,
                    _ptr(out),
                    _threads(threads),
                )
            )
        return out.reshape(Bw, N, h * d)
    dt = np.float64
    q = _unpack_bits(qb)[..., :d].astype(dt) * 2 - 1
    k = _unpack_bits(kb)[..., :d].astype(dt) * 2 - 1
    pc = np.rint((d - q @ k.transpose(0, 1, 3, 2)) / 2).astype(np.int64)  # popcount(q ^ k)
    # exp(score * scale - max) = etab[pc - min pc] with etab[i] = exp(-2 i scale) in float32, as attention.c
    etab = np.exp(np.float32(-2) * np.arange(64 * Wd + 1, dtype=np.float32) * np.float32(scale))
    e = etab[pc - pc.min(-1, keepdims=True)]
    # the denominator in attention.c's order: 16 partial sums over the keys m = l mod 16 in
    # increasing m, then the tree s_l + s_{l+8}, s_l + s_{l+4}, s_l + s_{l+2}, s_0 + s_1
    s = np.zeros(e.shape[:-1] + (16,), np.float32)
    for m0 in range(0, M, 16):
        s[..., : min(16, M - m0)] += e[..., m0 : m0 + 16]
    for w in (8, 4, 2, 1):
        s = s[..., :w] + s[..., w : 2 * w]
    attn = e / s
    hs = (1, h, 1, 1)
    lv = np.clip(np.round(attn * np.float32(levels) / step.reshape(hs) + zp.reshape(hs)), 0, levels)
    planes = lv[None] >= np.arange(1, levels + 1, dtype=np.float32).reshape(-1, 1, 1, 1, 1)
    v = _unpack_bits(vb)[..., :M].astype(dt) * 2 - 1  # (Bw, h, d, M)
    sv = planes.astype(dt).sum(0) @ v.transpose(0, 1, 3, 2)  # sum_s A^s sign(V)
    out = (np.rint(sv).astype(np.float32) * step.reshape(hs)).astype(np.float32)
    out = out.transpose(0, 2, 1, 3).reshape(Bw, N, h * d)
    if comb is not None:
        ns, nt, q, k, v, m1, slope, m2 = comb
        out = rprelu((((out * ns + nt) + q) + k) + v, m1, slope, m2)
    return out


# --------------------------------------------------------------------------- whole-network plan


class PlanError(Exception):
    """libbhvit refused an export or a run: ``code`` is the BHVIT_E_* code of bhvit.h."""

    IO, FORMAT, INPUT, NOMEM, NONFINITE = 1, 2, 3, 4, 5

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def plan_available() -> bool:
    """True when the compiled library (with its whole-network plan) is the active backend."""
    return _use_c


class Plan:
    """An export loaded and prepared by libbhvit (``bhvit_load``): one C call per forward pass.

    ``run(x)`` takes a C-contiguous float32 ``(B, C, H, W)`` array and returns float32 logits
    ``(B, num_classes)``. The weights are packed for the active kernel variant and packed again
    after :func:`set_backend` switches it.
    """

    def __init__(self, path, num_classes: int, threads: int = 0):
        if _lib is None:
            raise PlanError(PlanError.INPUT, f"the compiled library is not loaded ({_lib_error})")
        handle = ctypes.c_void_p()
        rc = _lib.bhvit_load(os.fsencode(str(path)), _threads(threads), ctypes.byref(handle))
        if rc:
            raise PlanError(rc, _lib.bhvit_last_error().decode("utf-8", "replace"))
        self._h, self._free = handle, _lib.bhvit_free
        self.num_classes = int(num_classes)

    def run(self, x: np.ndarray, threads: int = 0) -> np.ndarray:
        out = np.empty((x.shape[0], self.num_classes), dtype=np.float32)
        _lib.bhvit_set_threads(self._h, _threads(threads))
        rc = _lib.bhvit_run(self._h, _ptr(x), x.shape[0], _ptr(out))
        if rc:
            raise PlanError(rc, _lib.bhvit_last_error().decode("utf-8", "replace"))
        return out

    def profile(self, enable=None) -> dict:
        """The per-op-kind profile of the runs so far: ``{kind: (seconds, calls)}`` (thread seconds)
        plus ``"total"`` (wall seconds, runs), ``"images"`` (0, images), ``"workers"`` (the seconds
        the workers ran batch tiles, the workers of the latest run) and ``"tile"`` (0, images per
        tile of the latest run). ``enable=True``/``False`` first turns the
        profile on or off and starts its sums again (``BHVIT_PROFILE=1`` in the environment turns it
        on at load and prints the table when the plan is freed)."""
        if enable is not None:
            _lib.bhv_plan_profile_enable(self._h, 1 if enable else 0)
        name, sec, calls = ctypes.c_char_p(), ctypes.c_double(), ctypes.c_int64()
        out = {}
        n = _lib.bhv_plan_profile_get(self._h, 0, ctypes.byref(name), ctypes.byref(sec), ctypes.byref(calls))
        for i in [-1, -2, -3, -4, *range(n)]:
            _lib.bhv_plan_profile_get(self._h, i, ctypes.byref(name), ctypes.byref(sec), ctypes.byref(calls))
            out[name.value.decode()] = (sec.value, int(calls.value))
        return out

    def set_tile(self, tile: int = 0):
        """Images per batch tile (0: sized from the L2 cache, the default); the logits do not
        depend on it."""
        if _lib.bhv_plan_set_tile(self._h, int(tile)):
            raise ValueError(f"tile must be >= 0, got {tile}")

    def __del__(self):
        h = getattr(self, "_h", None)
        if h is not None and h.value:
            self._free(h)
            self._h = None
