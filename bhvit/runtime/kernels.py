"""Bit-packed binary kernels of the BHViT inference runtime.

The compiled library ``_bitops*.so`` (plain C, built from ``_bitops.c`` by
``setup.py`` and loaded with ctypes) does the work; where it is missing or
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
from pathlib import Path

import numpy as np

__all__ = [
    "pack_signs", "pack_bits", "xnor_gemm", "and_gemm", "xnor_conv2d",
    "backend", "set_backend", "available_backends", "library_path", "library_error", "epilogue",
]

_ABI_VERSION = 2
_HERE = Path(__file__).resolve().parent

_lib = None            # ctypes.CDLL or None
_lib_path = None       # Path of the loaded library
_lib_error = None      # why the library is not loaded, if it is not
_use_c = False         # current backend is a compiled variant


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
        "bhv_epilogue": (i32, [vp, i64, i64, vp, vp, vp, i64, vp, vp, vp, vp, i32, i32]),
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
    return [_lib.bhv_variant_name(i).decode() for i in range(_lib.bhv_num_variants())
            if _lib.bhv_variant_supported(i)]


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
        raise ValueError(f"unknown kernel backend {name!r}; choose from {available_backends()} or 'auto'")
    if _lib is None:
        raise RuntimeError(f"compiled kernels not available: {_lib_error}")
    rc = _lib.bhv_select(name.encode())
    if rc == -1:
        raise ValueError(f"unknown kernel backend {name!r}; choose from {available_backends()} or 'auto'")
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

def _ptr(a: np.ndarray):
    return a.ctypes.data


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


def _threads(threads) -> int:
    threads = int(threads)
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    return threads


def _check_rc(rc: int):
    if rc == -1:
        raise MemoryError("bhvit kernels: out of memory")
    if rc != 0:
        raise RuntimeError(f"bhvit kernels: error {rc}")


def _to_uint64_words(bits: np.ndarray) -> np.ndarray:
    """bool (..., K) -> uint64 (..., ceil(K/64)) little-endian bit order (numpy path)."""
    k = bits.shape[-1]
    W = _words(k)
    pad = 64 * W - k
    if pad:
        bits = np.concatenate([bits, np.zeros(bits.shape[:-1] + (pad,), dtype=bool)], axis=-1)
    by = np.packbits(bits, axis=-1, bitorder="little")           # (..., 8W) uint8
    return np.ascontiguousarray(by).view("<u8").astype(np.uint64, copy=False).reshape(bits.shape[:-1] + (W,))


def _unpack_bits(a: np.ndarray) -> np.ndarray:
    """uint64 (..., W) -> uint8 0/1 (..., 64W), all bits (padding included)."""
    by = np.ascontiguousarray(a.astype("<u8", copy=False)).view(np.uint8)
    return np.unpackbits(by, axis=-1, bitorder="little")


def _fdtype(n: int):
    # integer sums up to n are exact in float32 below 2**24
    return np.float32 if n < (1 << 24) else np.float64


# --------------------------------------------------------------------------- packing

def pack_signs(x) -> np.ndarray:
    """float (..., K) -> uint64 (..., ceil(K/64)): bit = 1 where x >= 0 (-0.0 too). NaN: ValueError."""
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
                raise ValueError("pack_signs: input contains NaN")
        return out
    if np.isnan(x).any():
        raise ValueError("pack_signs: input contains NaN")
    return _to_uint64_words(x >= 0)


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

def xnor_conv2d(x, w, cin_per_group: int, stride: int = 1, padding: int = 0, dilation: int = 1,
                threads: int = 0) -> np.ndarray:
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
            _check_rc(_lib.bhv_xnor_conv2d(_ptr(x), _ptr(w), B, H, Wd, G, Wg, Cout, KH, KW, cpg,
                                           stride, padding, dilation, Ho, Wo, _ptr(out), threads))
        return out
    return _conv_numpy(x, w, cpg, stride, padding, dilation, Ho, Wo)


def _conv_numpy(x, w, cpg, s, p, d, Ho, Wo):
    B, H, Wd, G, Wg = x.shape
    Cout, KH, KW, _ = w.shape
    cpo = Cout // G
    dt = _fdtype(KH * KW * cpg)
    # the cpg channels of each group as +-1, the zero padding as 0 (adds nothing)
    xpm = np.zeros((B, H + 2 * p, Wd + 2 * p, G, cpg), dtype=dt)
    xpm[:, p:p + H, p:p + Wd] = _unpack_bits(x)[..., :cpg].astype(dt) * 2 - 1
    wpm = _unpack_bits(w)[..., :cpg].astype(dt) * 2 - 1      # (Cout, KH, KW, cpg)
    acc = np.zeros((B, Ho, Wo, Cout), dtype=dt)
    for kh in range(KH):
        hs = slice(kh * d, kh * d + s * (Ho - 1) + 1, s)
        for kw in range(KW):
            ws = slice(kw * d, kw * d + s * (Wo - 1) + 1, s)
            for g in range(G):
                acc[..., g * cpo:(g + 1) * cpo] += xpm[:, hs, ws, g, :] @ wpm[g * cpo:(g + 1) * cpo, kh, kw, :].T
    return np.rint(acc).astype(np.int32)


_init()


def _f32(a, n=None):
    a = np.ascontiguousarray(a, dtype=np.float32)
    if n is not None and a.shape != (n,):
        raise ValueError(f"expected a float vector of length {n}, got shape {a.shape}.")
    return a


def epilogue(dot, scale, shift, shortcut=None, rprelu=None, out=None, threads: int = 0) -> np.ndarray:
    """Fused float epilogue of a binary layer, one pass in C.

    ``act(dot * scale + shift + shortcut)`` for int32 ``dot`` of shape ``(..., n)``.
    ``shortcut`` ``(..., c)`` is added as is (``c == n``), tiled (``c < n``) or averaged
    over groups of ``c // n`` consecutive channels (``c > n``). ``rprelu`` is a
    ``(move1, slope, move2)`` triple or None. With ``out`` given, the result is added
    to it in place (and returned).
    """
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
    accumulate = out is not None
    if out is None:
        out = np.empty(dot.shape, dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != dot.shape or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous float32 array of the output's shape.")
    if _use_c:
        null = None
        rc = _lib.bhv_epilogue(_ptr(dot), rows, n, _ptr(scale), _ptr(shift),
                               _ptr(sc) if sc is not None else null, sc.shape[-1] if sc is not None else 0,
                               _ptr(acts[0]) if acts else null, _ptr(acts[1]) if acts else null,
                               _ptr(acts[2]) if acts else null, _ptr(out), int(accumulate), _threads(threads))
        _check_rc(rc)
        return out
    v = dot.astype(np.float32) * scale + shift
    if sc is not None:
        c = sc.shape[-1]
        if c < n:
            v += np.tile(sc, (1,) * (sc.ndim - 1) + (n // c,))
        elif c > n:
            v += sc.reshape(sc.shape[:-1] + (n, c // n)).mean(-1)
        else:
            v += sc
    if acts is not None:
        y = v - acts[0]
        v = np.where(y >= 0, y, y * acts[1]) + acts[2]
    if accumulate:
        out += v
        return out
    out[...] = v
    return out
