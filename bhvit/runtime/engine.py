"""The bit-packed BHViT inference runtime (numpy + XNOR/popcount kernels).

Loads an export (``bhvit.export.export_model``) and runs it: binary linears and
convolutions as XNOR + popcount on packed words, attention scores
``sign(Q) sign(K)^T`` by XNOR/popcount, and the Quantization Decomposition planes as
AND/popcount products with the packed ``sign(V)``. Everything else (stem, norms folded
to affines, RPReLU, softmax, pooling, shifts, head) is plain vectorised numpy in
float32. Channels-last ``(B, H, W, C)`` throughout, as in the training model.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np

from . import kernels as K

__all__ = ["load", "BHViTRuntime", "RuntimeFormatError"]

EXPORT_FORMAT = "bhvit-packed"
EXPORT_VERSION = 1


class RuntimeFormatError(ValueError):
    """An export is missing, truncated, tampered with or of another version."""


# --- float ops -------------------------------------------------------------------
def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), evaluated in float64.
    x = x.astype(np.float64)
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
               + 0.254829592) * t * np.exp(-a * a)
    return s * y


def _gelu(x: np.ndarray) -> np.ndarray:
    return (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))).astype(np.float32)


def _rprelu(x, p):
    y = x - p["move1"]
    # max/min instead of np.where: same values, several times faster in numpy
    return np.maximum(y, 0) + np.minimum(y, 0) * p["slope"] + p["move2"]


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _window_partition(x, w):
    B, H, W, C = x.shape
    x = x.reshape(B, H // w, w, W // w, w, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // w) * (W // w), w * w, C)


def _window_reverse(win, w, H, W):
    B, C = win.shape[0], win.shape[-1]
    return win.reshape(B, H // w, W // w, w, w, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def _channel_shortcut(x, out_dim):
    c = x.shape[-1]
    if c == out_dim:
        return x
    if out_dim % c == 0:
        return np.tile(x, (1,) * (x.ndim - 1) + (out_dim // c,))
    return x.reshape(x.shape[:-1] + (out_dim, c // out_dim)).mean(-1)


def _roll_mean(x, k, axis):
    out = x.copy()
    for s in range(1, k + 1):
        out += np.roll(x, s, axis=axis) + np.roll(x, -s, axis=axis)
    return out / np.float32(2 * k + 1)


def _channel_mix(x, k):
    a, b, c, d = np.split(x, 4, axis=-1)
    return np.concatenate([np.roll(a, k, 1), np.roll(b, -k, 1), np.roll(c, k, 2), np.roll(d, -k, 2)], -1)


# --- the runtime -------------------------------------------------------------------
class BHViTRuntime:
    """A loaded export. Call it on a ``(B, C, H, W)`` float batch to get logits ``(B, classes)``."""

    def __init__(self, manifest: Dict, tensors: Dict[str, np.ndarray], threads: int = 0):
        self.manifest = manifest
        self.cfg = manifest["config"]
        self.kinds = manifest["kinds"]
        self.t = tensors
        self.threads = threads
        self.classes = manifest.get("data", {}).get("classes")
        self.data = manifest.get("data", {})

    # -- parameters
    def _p(self, prefix: str, *names):
        return [self.t[f"{prefix}.{n}"] for n in names]

    def _norm(self, prefix, x):
        kind = self.kinds[prefix]
        if kind == "affine":
            s, t = self._p(prefix, "scale", "shift")
            return x * s + t
        w, b = self._p(prefix, "weight", "bias")
        return _layer_norm(x, w, b, float(kind.split(":", 1)[1]))

    def _act(self, prefix, x):
        return _rprelu(x, {n: self.t[f"{prefix}.{n}"] for n in ("move1", "slope", "move2")})

    # -- binary ops
    def _bin_dot(self, prefix, x):
        """XNOR/popcount dot products of ``sign(x + input_bias)`` with the packed weights."""
        wbits = self.t[prefix + ".wbits"]
        k = x.shape[-1]
        ib = self.t.get(prefix + ".input_bias")
        if ib is not None:
            x = x + ib
        dot = K.xnor_gemm(K.pack_signs(x.reshape(-1, k)), wbits, k, self.threads)
        return dot.reshape(x.shape[:-1] + (wbits.shape[0],))

    def _bin_conv_dot(self, prefix, xb, cin_per_group, stride, padding, dilation):
        return K.xnor_conv2d(xb, self.t[prefix + ".wbits"], cin_per_group, stride, padding, dilation,
                             self.threads)

    def _rprelu_params(self, prefix):
        return tuple(self.t[f"{prefix}.{n}"] for n in ("move1", "slope", "move2"))

    def _residual(self, prefix, x, dot_fn, shortcut=None):
        """Layer-wise residual ``RPReLU(norm(op(x)) + shortcut(x))`` with a fused epilogue."""
        dot = dot_fn(prefix + ".op", x)
        s, t = self._p(prefix + ".op", "scale", "shift")
        sc = x if shortcut is None else shortcut
        if self.kinds[prefix + ".op"] == "binary+bn":  # BN folded into scale/shift
            return K.epilogue(dot, s, t, sc, self._rprelu_params(prefix + ".act"), threads=self.threads)
        y = self._norm(prefix + ".norm", K.epilogue(dot, s, t, threads=self.threads))  # LayerNorm
        return self._act(prefix + ".act", y + _channel_shortcut(sc, y.shape[-1]))

    def _layerscale(self, prefix, x):
        s, b = self._p(prefix, "scale", "bias")
        return x * s + b

    # -- blocks
    def _stem(self, x):
        cfg = self.cfg
        k, pad = cfg["stem_stride"], cfg["stem_pad"]
        if pad:
            x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        B, C, H, W = x.shape
        x = x.transpose(0, 2, 3, 1).reshape(B, H // k, k, W // k, k, C).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(B, H // k, W // k, k * k * C)
        y = x @ self.t["stem.proj.weight"].T + self.t["stem.proj.bias"]
        return _gelu(self._norm("stem.norm", y)) + self.t["stem.pos_embed"]

    def _downsample(self, p, x):
        x0 = self._norm(p + ".norm0", x)
        if p + ".reduce.op" in self.kinds:
            B, H, W, C = x0.shape
            ib = self.t[p + ".reduce.op.input_bias"]

            def op(prefix, inp):
                xb = K.pack_signs((inp + ib).reshape(B, H, W, 1, C))
                return self._bin_conv_dot(prefix, xb, C, 2, 0, 1)

            pooled = x0.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))
            y = self._residual(p + ".reduce", x0, op, shortcut=pooled)
        else:
            B, H, W, C = x0.shape
            patches = x0.reshape(B, H // 2, 2, W // 2, 2, C).transpose(0, 1, 3, 2, 4, 5)
            y = patches.reshape(B, H // 2, W // 2, 4 * C) @ self.t[p + ".conv.weight"].T
            y = self._norm(p + ".norm", y)
        return y + self.t[p + ".pos_embed"]

    def _msgdc(self, p, x, mixer):
        cfg = self.cfg
        B, H, W, C = x.shape
        # the same choice as BHViT._mixer: "conv" is the single dense 3x3 ablation
        groups, dilations = (cfg["msgdc_groups"], cfg["msgdc_dilations"]) if mixer == "msgdc" else (1, [1])
        cg = C // groups
        xb = K.pack_signs((x + self.t[p + ".input_bias"]).reshape(B, H, W, groups, cg))
        out = None
        for i, d in enumerate(dilations):
            dot = self._bin_conv_dot(f"{p}.convs.{i}", xb, cg, 1, d, d)
            s, t = self._p(f"{p}.convs.{i}", "scale", "shift")
            # each branch: RPReLU(alpha * dot + bias), summed in place
            out = K.epilogue(dot, s, t, None, self._rprelu_params(f"{p}.acts.{i}"), out=out,
                             threads=self.threads)
        return self._norm(p + ".norm", out)

    def _attention(self, p, q, k, v, heads):
        """Binary attention core: XNOR scores, softmax, QD planes by AND/popcount."""
        Bw, N, C = q.shape
        M = k.shape[1]
        d = C // heads
        levels = self.cfg["qd_levels"] if self.cfg["qd"] else 1
        step, zp = self._p(p + ".core.qd", "step", "zero_point")

        def split(a, n):
            return a.reshape(Bw, n, heads, d).transpose(0, 2, 1, 3)

        qb = K.pack_signs(np.ascontiguousarray(split(q, N)))   # (Bw, h, N, Wd)
        kb = K.pack_signs(np.ascontiguousarray(split(k, M)))   # (Bw, h, M, Wd)
        vpos = (split(v, M) >= 0).transpose(0, 1, 3, 2)         # (Bw, h, d, M): v is +1
        vb = K.pack_bits(np.ascontiguousarray(vpos))           # (Bw, h, d, Wm)
        scale = np.float32(1.0 / math.sqrt(d))
        scores = np.empty((Bw, heads, N, M), dtype=np.int32)
        for b in range(Bw):
            for h in range(heads):
                scores[b, h] = K.xnor_gemm(qb[b, h], kb[b, h], d, self.threads)
        attn = _softmax(scores.astype(np.float32) * scale)
        hs = (1, heads, 1, 1)
        lv = np.clip(np.round(attn * np.float32(levels) / step.reshape(hs) + zp.reshape(hs)), 0, levels)
        planes = lv[None] >= np.arange(1, levels + 1, dtype=np.float32).reshape(-1, 1, 1, 1, 1)
        pb = K.pack_bits(planes)                                  # (L, Bw, h, N, Wm)
        acc = -planes.sum(-1, dtype=np.int64)[..., None].sum(0)   # -popcount(A^s), summed over s
        hits = np.zeros((Bw, heads, N, d), dtype=np.int64)
        for s_ in range(levels):
            for b in range(Bw):
                for h in range(heads):
                    hits[b, h] += K.and_gemm(pb[s_, b, h], vb[b, h], self.threads)
        # sum_s A^s @ sign(V) = sum_s (2 * popcount(A^s & V+) - popcount(A^s))
        out = ((2 * hits + acc).astype(np.float32) * step.reshape(hs)).astype(np.float32)
        return out.transpose(0, 2, 1, 3).reshape(Bw, N, C)

    def _msmha(self, p, x, heads, window):
        B, H, W, C = x.shape
        if window is None:
            tokens = x.reshape(B, 1, H * W, C)
        else:
            tokens = _window_partition(x, window)
        n_win, n_local = tokens.shape[1], tokens.shape[2]
        if window is not None:
            pad = (window - 1) // 2
            n = H // window
            xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
            blocks = xp[:, :n * window, :n * window].reshape(B, n, window, n, window, C)
            mx = blocks.max(axis=(2, 4))
            xa = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
            av = xa[:, :n * window, :n * window].reshape(B, n, window, n, window, C).sum(axis=(2, 4))
            av = av / np.float32(window * window)
            a = self.t[p + ".pool_mix"]
            g = (av + a * (mx - av)).reshape(B, -1, C)
            tokens = np.concatenate([tokens, np.broadcast_to(g[:, None], (B, n_win) + g.shape[1:])], axis=2)
        t = _layer_norm(tokens.reshape(B * n_win, -1, C), self.t[p + ".token_norm.weight"],
                        self.t[p + ".token_norm.bias"], 1e-5)
        q = self._residual(p + ".q_proj", t, self._bin_dot)
        k = self._residual(p + ".k_proj", t, self._bin_dot)
        v = self._residual(p + ".v_proj", t, self._bin_dot)
        bias = self.t[p + ".qkv_bias"]
        ctx = self._attention(p, q + bias[0], k + bias[1], v + bias[2], heads)
        ctx = self._act(p + ".ctx_act", self._norm(p + ".ctx_norm", ctx) + q + k + v)
        ctx = ctx.reshape(B, n_win, -1, C)
        local = ctx[:, :, :n_local]
        if window is not None:
            glob = ctx[:, :, n_local:].mean(axis=1)[:, :, None]  # (B, G, 1, C)
            pm = self.t[p + ".out_mix"]
            local = glob + pm * (local - glob)
            out = _window_reverse(local, window, H, W)
        else:
            out = local.reshape(B, H, W, C)
        return self._layerscale(p + ".layer_scale", self._residual(p + ".out_proj", out, self._bin_dot))

    def _block(self, p, x, mixer, heads, window):
        n = self._norm(p + ".norm1", x)
        if mixer in ("msgdc", "conv"):
            x = x + self._msgdc(p + ".mixer", n, mixer)
        else:
            x = x + self._msmha(p + ".mixer", n, heads, window if mixer == "msmha" else None)
        n = self._norm(p + ".norm2", x)
        h = self._residual(p + ".mlp.up", n, self._bin_dot)
        h = self._residual(p + ".mlp.down", h, self._bin_dot)
        out = x + self._layerscale(p + ".mlp.layer_scale", h)
        sizes = self.cfg["shift_sizes"] if self.cfg["shift"] else []
        for i, k in enumerate(sizes):
            for j, y in enumerate((_roll_mean(n, k, 1), _roll_mean(n, k, 2), _channel_mix(n, k))):
                out = out + self._layerscale(f"{p}.shift.scales.{3 * i + j}", y)
        return out

    def _mixers(self):
        base = {"hybrid": ["msgdc", "msgdc", "msmha", "msmha"], "msgdc": ["msgdc"] * 4,
                "msmha": ["msmha"] * 4}[self.cfg["hybrid"]]
        swap = {"msgdc": "msgdc" if self.cfg["msgdc"] else "conv",
                "msmha": "msmha" if self.cfg["msmha"] else "attn"}
        return [swap[m] for m in base]

    def check_input(self, x) -> np.ndarray:
        cfg = self.cfg
        want = (cfg["in_chans"], cfg["img_size"], cfg["img_size"])
        if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor
            x = x.detach().cpu().numpy()
        if not isinstance(x, np.ndarray):
            raise ValueError(f"expected a numpy array or torch tensor, got {type(x).__name__}.")
        if x.dtype.kind != "f":
            raise ValueError(f"expected float images (normalised like the training data), got dtype {x.dtype}.")
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"expected images of shape (B, {want[0]}, {want[1]}, {want[2]}), "
                             f"got {tuple(x.shape)}.")
        if not np.isfinite(x).all():
            raise ValueError("input contains NaN or infinite pixels.")
        return np.ascontiguousarray(x, dtype=np.float32)

    def forward_features(self, x) -> np.ndarray:
        x = self._stem(self.check_input(x))
        cfg = self.cfg
        for i, mixer in enumerate(self._mixers()):
            if i > 0:
                x = self._downsample(f"stages.{i}.downsample", x)
            for j in range(cfg["depths"][i]):
                x = self._block(f"stages.{i}.blocks.{j}", x, mixer, cfg["heads"][i], cfg["windows"][i])
        return self._norm("norm", x)

    def __call__(self, x) -> np.ndarray:
        f = self.forward_features(x).mean(axis=(1, 2))
        return (f @ self.t["head.weight"].T + self.t["head.bias"]).astype(np.float32)


def load(path: Union[str, Path], threads: int = 0) -> BHViTRuntime:
    """Load and validate an export directory (or its manifest.json)."""
    p = Path(path)
    mpath = p / "manifest.json" if p.is_dir() else p
    if not mpath.is_file():
        raise RuntimeFormatError(f"{path}: no manifest.json (expected the directory written by `bhvit export`).")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RuntimeFormatError(f"{mpath}: not valid JSON ({e}); the file is truncated or corrupt.") from None
    if manifest.get("format") != EXPORT_FORMAT:
        raise RuntimeFormatError(f"{mpath}: not a bhvit export (format {manifest.get('format')!r}).")
    if manifest.get("version") != EXPORT_VERSION:
        raise RuntimeFormatError(f"{mpath}: export version {manifest.get('version')} is not supported "
                                 f"(this runtime reads version {EXPORT_VERSION}).")
    info = manifest.get("file", {})
    wpath = mpath.parent / info.get("name", "model.safetensors")
    if not wpath.is_file():
        raise RuntimeFormatError(f"{wpath}: missing weights file.")
    blob = wpath.read_bytes()
    if len(blob) != info.get("bytes"):
        raise RuntimeFormatError(f"{wpath}: {len(blob)} bytes, the manifest says {info.get('bytes')}; "
                                 "the file is truncated or was replaced.")
    if hashlib.sha256(blob).hexdigest() != info.get("sha256"):
        raise RuntimeFormatError(f"{wpath}: SHA-256 does not match the manifest; the file was modified.")
    from safetensors.numpy import load as st_load

    try:
        raw = st_load(blob)
    except Exception as e:
        raise RuntimeFormatError(f"{wpath}: cannot parse safetensors ({e}).") from None
    expected = manifest.get("tensors", {})
    if set(raw) != set(expected):
        missing, extra = sorted(set(expected) - set(raw)), sorted(set(raw) - set(expected))
        raise RuntimeFormatError(f"{wpath}: tensors differ from the manifest (missing {missing[:5]}, "
                                 f"unexpected {extra[:5]}).")
    tensors = {}
    for name, arr in raw.items():
        if list(arr.shape) != expected[name]["shape"]:
            raise RuntimeFormatError(f"{wpath}: tensor {name} has shape {list(arr.shape)}, the manifest "
                                     f"says {expected[name]['shape']}.")
        if name.endswith(".wbits"):
            tensors[name] = np.ascontiguousarray(arr.view(np.uint64))
        else:
            tensors[name] = np.ascontiguousarray(arr, dtype=np.float32)
    return BHViTRuntime(manifest, tensors, threads)
