"""The bit-packed BHViT inference runtime (numpy + XNOR/popcount kernels).

Loads an export (``bhvit.export.export_model``) and runs it: binary linears and
convolutions as XNOR + popcount on packed words, attention scores
``sign(Q) sign(K)^T`` by XNOR/popcount, and the Quantization Decomposition planes as
AND/popcount products with the packed ``sign(V)``. The float work around them runs in
fused C kernels too (``kernels.py``): each binary layer's epilogue (folded BatchNorm,
shortcut, RPReLU, LayerScale, residual) with its GEMM, folded norms and input biases
inside the sign packing, the shift branches, the attention core with softmax, LayerNorm,
GELU and the float stem/head. Here window partition and token pooling are numpy. Float32,
channels-last ``(B, H, W, C)`` throughout, as in the training model. Importing this
module does not import torch.

This graph walker is the readable reference. With the compiled library active, a loaded
runtime runs the same network through libbhvit's prepared plan instead (``csrc/model.c``:
one C call per forward pass, weights packed once, op for op the same computation);
``BHViTRuntime.plan`` is None where it falls back to the walker (the numpy backend).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Dict, Union

import numpy as np

from . import kernels as K
from ..errors import ConfigError
from ..files import open_regular
from .format import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    manifest_digest,
    RuntimeFormatError,
    MAX_MANIFEST_BYTES,
    MAX_OBJECT_KEYS,
    json_subset_problem,
    _int64,
    _float_literal,
    MAX_HEADER_BYTES,
    _F32_MAX,
    _TENSOR_DTYPES,
    _json_type,
    _short,
    _is_int,
    config_problem,
    data_problem,
    _kind_problem,
    _tensor_entries_problem,
    _expect_shapes,
)

__all__ = ["load", "BHViTRuntime", "RuntimeFormatError"]


# --- float ops -------------------------------------------------------------------
def _rprelu(x, p):
    return K.rprelu(x, p["move1"], p["slope"], p["move2"])


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


# --- the runtime -------------------------------------------------------------------
class BHViTRuntime:
    """A loaded export. Call it on a ``(B, C, H, W)`` float batch to get logits ``(B, classes)``."""

    def __init__(self, manifest: Dict, tensors: Dict[str, np.ndarray], threads: int = 0):
        self.manifest = manifest
        self.cfg = manifest["config"]
        self.kinds = manifest["kinds"]
        self.t = tensors
        self.threads = _check_threads(threads)
        self.data = manifest.get("data") or {}  # absent and null: no normalisation, no class names
        self.classes = self.data.get("classes")
        self._cache = {}
        self.plan = None  # a K.Plan once load() has prepared one
        K.pin(tensors.values())

    # -- parameters
    def _p(self, prefix: str, *names):
        return [self.t[f"{prefix}.{n}"] for n in names]

    def _norm(self, prefix, x):
        kind = self.kinds[prefix]
        if kind == "affine":
            s, t = self._p(prefix, "scale", "shift")
            return x * s + t
        w, b = self._p(prefix, "weight", "bias")
        return K.layer_norm(x, w, b, float(kind.split(":", 1)[1]), self.threads)

    def _act(self, prefix, x):
        return _rprelu(x, {n: self.t[f"{prefix}.{n}"] for n in ("move1", "slope", "move2")})

    # -- binary ops
    def _linear(self, prefix, k, layer_scale=None):
        """The K.PreparedLinear of the layer-wise residual ``prefix`` with k inputs (built on first use)."""
        key = ("linear", prefix, layer_scale)
        lin = self._cache.get(key)
        if lin is None:
            op = prefix + ".op"
            post = tuple(self._p(layer_scale, "scale", "bias")) if layer_scale else None
            lin = K.PreparedLinear(
                self._wbits(op + ".wbits", k),
                k,
                *self._p(op, "scale", "shift"),
                self._rprelu_params(prefix + ".act"),
                post,
            )
            self._cache[key] = lin
        return lin

    def _packed(self, prefix, x):
        """Rows of packed ``sign(x + input_bias)`` for the binary linear ``prefix``."""
        return K.pack_signs(x.reshape(-1, x.shape[-1]), bias=self.t.get(prefix + ".input_bias"), threads=self.threads)

    def _wbits(self, name, k):
        """The packed weights ``name`` of a binary linear with k inputs. On first use, checks that
        the bits past k in each row's last word are 0: the GEMM counts every bit."""
        wbits = self.t[name]
        if ("wbits", name) not in self._cache:
            tail = k % 64
            if wbits.shape[-1] != -(-k // 64) or (tail and np.any(wbits[:, -1] >> np.uint64(tail))):
                raise RuntimeFormatError(
                    f"{name}: {wbits.shape[-1]} words per row with bits set past the "
                    f"layer's {k} inputs, or the wrong word count; the export was "
                    "not written by `bhvit export`."
                )
            self._cache[("wbits", name)] = True
        return wbits

    def _bin_dot(self, prefix, x):
        """XNOR/popcount dot products of ``sign(x + input_bias)`` with the packed weights."""
        k = x.shape[-1]
        wbits = self._wbits(prefix + ".wbits", k)
        dot = K.xnor_gemm(self._packed(prefix, x), wbits, k, self.threads)
        return dot.reshape(x.shape[:-1] + (wbits.shape[0],))

    def _bin_conv_dot(self, prefix, xb, cin_per_group, stride, padding, dilation):
        return K.xnor_conv2d(xb, self.t[prefix + ".wbits"], cin_per_group, stride, padding, dilation, self.threads)

    def _rprelu_params(self, prefix):
        return tuple(self.t[f"{prefix}.{n}"] for n in ("move1", "slope", "move2"))

    def _residual(self, prefix, x, dot_fn, shortcut=None, layer_scale=None, residual=None):
        """Layer-wise residual ``RPReLU(norm(op(x)) + shortcut(x))`` with a fused epilogue.

        With ``layer_scale`` (a LayerScale prefix) and ``residual``, returns
        ``residual + LayerScale(...)``, still in one pass where the norm folds.
        """
        sc = x if shortcut is None else shortcut
        binary_bn = self.kinds[prefix + ".op"] == "binary+bn"  # BN folded into scale/shift
        if binary_bn and dot_fn == self._bin_dot:  # a linear: GEMM and epilogue in one prepared call
            lin = self._linear(prefix, x.shape[-1], layer_scale)
            flat = lambda a: None if a is None else a.reshape(-1, a.shape[-1])  # noqa: E731
            out = lin(self._packed(prefix + ".op", x), flat(sc), flat(residual), threads=self.threads)
            return out.reshape(x.shape[:-1] + (lin.N,))
        s, t = self._p(prefix + ".op", "scale", "shift")
        post = tuple(self._p(layer_scale, "scale", "bias")) if layer_scale else None
        dot = dot_fn(prefix + ".op", x)
        if binary_bn:
            return K.epilogue(
                dot, s, t, sc, self._rprelu_params(prefix + ".act"), post=post, residual=residual, threads=self.threads
            )
        y = self._norm(prefix + ".norm", K.epilogue(dot, s, t, threads=self.threads))  # LayerNorm
        y = self._act(prefix + ".act", y + _channel_shortcut(sc, y.shape[-1]))
        if post is not None:
            y = post[1] + y * post[0]
        return y if residual is None else residual + y

    # -- blocks
    def _stem(self, x):
        cfg = self.cfg
        k, pad = cfg["stem_stride"], cfg["stem_pad"]
        if pad:
            x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        B, C, H, W = x.shape
        x = x.transpose(0, 2, 3, 1).reshape(B, H // k, k, W // k, k, C).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(B, H // k, W // k, k * k * C)
        y = K.dense(x, self._wt("stem.proj.weight"), self.t["stem.proj.bias"], self.threads)
        return K.gelu(self._norm("stem.norm", y), self.threads) + self.t["stem.pos_embed"]

    def _downsample(self, p, x):
        x0 = self._norm(p + ".norm0", x)
        if p + ".reduce.op" in self.kinds:
            B, H, W, C = x0.shape
            ib = self.t[p + ".reduce.op.input_bias"]

            def op(prefix, inp):
                xb = K.pack_signs(inp.reshape(B, H, W, 1, C), bias=ib, threads=self.threads)
                return self._bin_conv_dot(prefix, xb, C, 2, 0, 1)

            pooled = x0.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))
            y = self._residual(p + ".reduce", x0, op, shortcut=pooled)
        else:
            B, H, W, C = x0.shape
            patches = x0.reshape(B, H // 2, 2, W // 2, 2, C).transpose(0, 1, 3, 2, 4, 5)
            y = K.dense(patches.reshape(B, H // 2, W // 2, 4 * C), self._wt(p + ".conv.weight"), None, self.threads)
            y = self._norm(p + ".norm", y)
        return y + self.t[p + ".pos_embed"]

    def _msgdc(self, p, x, mixer, norm=None):
        """``x + MSGDC(norm(x))`` (a new array).

        A folded (affine) ``norm`` is applied inside the packing; with a folded output
        norm (scale s, shift t) the branches accumulate straight into the residual:
        ``x + s * y_0 + s * y_1 + ... + (t + s * y_last)``.
        """
        cfg = self.cfg
        B, H, W, C = x.shape
        # the same choice as BHViT._mixer: "conv" is the single dense 3x3 ablation
        groups, dilations = (cfg["msgdc_groups"], cfg["msgdc_dilations"]) if mixer == "msgdc" else (1, [1])
        cg = C // groups
        affine, n = None, x
        if norm is not None and self.kinds[norm] == "affine":
            affine = [a.reshape(groups, cg) for a in self._p(norm, "scale", "shift")]
        elif norm is not None:
            n = self._norm(norm, x)
        xb = K.pack_signs(
            n.reshape(B, H, W, groups, cg),
            bias=self.t[p + ".input_bias"].reshape(groups, cg),
            affine=affine,
            threads=self.threads,
        )
        folded = self.kinds[p + ".norm"] == "affine"
        if folded:
            ns, nt = self._p(p + ".norm", "scale", "shift")
            zeros = self._zeros(C)
        out = None
        for i, d in enumerate(dilations):
            dot = self._bin_conv_dot(f"{p}.convs.{i}", xb, cg, 1, d, d)
            s, t = self._p(f"{p}.convs.{i}", "scale", "shift")
            act = self._rprelu_params(f"{p}.acts.{i}")
            # each branch: RPReLU(alpha * dot + bias), summed in place
            if folded:
                post = (ns, nt if i == len(dilations) - 1 else zeros)
                out = K.epilogue(
                    dot, s, t, None, act, out=out, post=post, residual=x if out is None else out, threads=self.threads
                )
            else:
                out = K.epilogue(dot, s, t, None, act, out=out, threads=self.threads)
        return out if folded else x + self._norm(p + ".norm", out)

    def _zeros(self, n):
        key = ("zeros", n)
        if key not in self._cache:
            self._cache[key] = np.zeros(n, dtype=np.float32)
            K.pin([self._cache[key]])
        return self._cache[key]

    def _attention(self, p, q, k, v, heads, bias):
        """Binary attention core: XNOR scores, softmax, QD planes by AND/popcount (one C call).

        ``bias`` (3, C) is added to q, k, v before their signs are taken.
        """
        Bw, N, C = q.shape
        M = k.shape[1]
        d = C // heads
        levels = self.cfg["qd_levels"] if self.cfg["qd"] else 1
        step, zp = self._p(p + ".core.qd", "step", "zero_point")

        def packed(a, n, b):  # signs of a + b per head: (Bw, n, h, Wd) -> (Bw, h, n, Wd)
            bits = K.pack_signs(a.reshape(Bw, n, heads, d), bias=b.reshape(heads, d), threads=self.threads)
            return np.ascontiguousarray(bits.transpose(0, 2, 1, 3))

        qb, kb = packed(q, N, bias[0]), packed(k, M, bias[1])
        vpos = ((v + bias[2]) >= 0).reshape(Bw, M, heads, d).transpose(0, 2, 3, 1)  # (Bw, h, d, M)
        vb = K.pack_bits(np.ascontiguousarray(vpos))
        combine = None
        if self.kinds[p + ".ctx_norm"] == "affine":  # ctx_act(ctx_norm(ctx) + q + k + v) inside the kernel
            combine = tuple(self._p(p + ".ctx_norm", "scale", "shift")) + (q, k, v, self._rprelu_params(p + ".ctx_act"))
        out = K.attention(qb, kb, vb, d, step, zp, levels, 1.0 / math.sqrt(d), combine, self.threads)
        if combine is None:
            out = self._act(p + ".ctx_act", self._norm(p + ".ctx_norm", out) + q + k + v)
        return out

    def _msmha(self, p, x, heads, window, residual):
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
            blocks = xp[:, : n * window, : n * window].reshape(B, n, window, n, window, C)
            mx = blocks.max(axis=(2, 4))
            xa = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
            av = xa[:, : n * window, : n * window].reshape(B, n, window, n, window, C).sum(axis=(2, 4))
            av = av / np.float32(window * window)
            a = self.t[p + ".pool_mix"]
            g = (av + a * (mx - av)).reshape(B, -1, C)
            tokens = np.concatenate([tokens, np.broadcast_to(g[:, None], (B, n_win) + g.shape[1:])], axis=2)
        t = K.layer_norm(
            tokens.reshape(B * n_win, -1, C),
            self.t[p + ".token_norm.weight"],
            self.t[p + ".token_norm.bias"],
            1e-5,
            self.threads,
        )
        q = self._residual(p + ".q_proj", t, self._bin_dot)
        k = self._residual(p + ".k_proj", t, self._bin_dot)
        v = self._residual(p + ".v_proj", t, self._bin_dot)
        ctx = self._attention(p, q, k, v, heads, self.t[p + ".qkv_bias"])  # includes ctx_norm, + q + k + v, ctx_act
        ctx = ctx.reshape(B, n_win, -1, C)
        local = ctx[:, :, :n_local]
        if window is not None:
            glob = ctx[:, :, n_local:].mean(axis=1)[:, :, None]  # (B, G, 1, C)
            pm = self.t[p + ".out_mix"]
            local = glob + pm * (local - glob)
            out = _window_reverse(local, window, H, W)
        else:
            out = local.reshape(B, H, W, C)
        return self._residual(p + ".out_proj", out, self._bin_dot, layer_scale=p + ".layer_scale", residual=residual)

    def _wt(self, name):
        """A float weight transposed for K.dense (cached)."""
        if name not in self._cache:
            self._cache[name] = np.ascontiguousarray(self.t[name].T)
            K.pin([self._cache[name]])
        return self._cache[name]

    def _shift_params(self, p, n_branches):
        key = p + ".shift"
        if key not in self._cache:
            names = [f"{p}.shift.scales.{i}" for i in range(n_branches)]
            self._cache[key] = (
                np.stack([self.t[n + ".scale"] for n in names]),
                np.stack([self.t[n + ".bias"] for n in names]),
            )
            K.pin(self._cache[key])
        return self._cache[key]

    def _mlp(self, p, n, x):
        """``x + LayerScale(down(up(n)))`` of the binary MLP (a new array)."""
        up, down, ls = p + ".up", p + ".down", p + ".layer_scale"
        C = n.shape[-1]
        hidden = self.t[up + ".op.wbits"].shape[0]
        if self.kinds[up + ".op"] == self.kinds[down + ".op"] == "binary+bn" and hidden > C and hidden % C == 0:
            # the hidden layer never exists in float: the up epilogue emits its packed
            # signs (down's input bias folded in) and the channel-pool shortcut of down
            bits, pooled = self._linear(up, C)(
                self._packed(up + ".op", n),
                n.reshape(-1, C),
                pack=True,
                next_bias=self.t.get(down + ".op.input_bias"),
                pool=C,
                threads=self.threads,
            )
            out = self._linear(down, hidden, ls)(bits, pooled, x.reshape(-1, C), threads=self.threads)
            return out.reshape(x.shape)
        h = self._residual(up, n, self._bin_dot)
        return self._residual(down, h, self._bin_dot, layer_scale=ls, residual=x)

    def _block(self, p, x, mixer, heads, window):
        if mixer in ("msgdc", "conv"):
            x = self._msgdc(p + ".mixer", x, mixer, norm=p + ".norm1")
        else:
            n = self._norm(p + ".norm1", x)
            x = self._msmha(p + ".mixer", n, heads, window if mixer == "msmha" else None, residual=x)
        n = self._norm(p + ".norm2", x)
        out = self._mlp(p + ".mlp", n, x)
        sizes = self.cfg["shift_sizes"] if self.cfg["shift"] else []
        if sizes:
            scales, biases = self._shift_params(p, 3 * len(sizes))
            K.shift_mix(n, sizes, scales, biases, out, self.threads)
        return out

    def _mixers(self):
        base = {"hybrid": ["msgdc", "msgdc", "msmha", "msmha"], "msgdc": ["msgdc"] * 4, "msmha": ["msmha"] * 4}[
            self.cfg["hybrid"]
        ]
        swap = {"msgdc": "msgdc" if self.cfg["msgdc"] else "conv", "msmha": "msmha" if self.cfg["msmha"] else "attn"}
        return [swap[m] for m in base]

    def check_input(self, x) -> np.ndarray:
        """``x`` as a C-contiguous float32 ``(B, C, H, W)`` array, or ValueError saying what is wrong.

        numpy arrays and CPU torch tensors of any float dtype (float16/float64 converted);
        bfloat16 and meta tensors, integer, complex or non-finite images are refused."""
        cfg = self.cfg
        want = (cfg["in_chans"], cfg["img_size"], cfg["img_size"])
        if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor (torch is not imported here)
            x = _torch_to_numpy(x)
        if not isinstance(x, np.ndarray):
            raise ConfigError(f"expected a numpy array or torch tensor, got {type(x).__name__}.")
        if x.dtype.kind != "f":
            raise ConfigError(f"expected float images (normalised like the training data), got dtype {x.dtype}.")
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ConfigError(f"expected images of shape (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}.")
        if x.shape[0] == 0:
            raise ConfigError("got an empty batch (B = 0).")
        finite = np.isfinite(x)
        if not finite.all():
            idx = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise ConfigError(
                f"input contains NaN or infinite pixels ({int(x.size - finite.sum())} of them, "
                f"the first at index {idx}: {x[idx]})."
            )
        with np.errstate(over="ignore"):
            y = np.ascontiguousarray(x, dtype=np.float32)
        if x.dtype.itemsize > 4 and not np.isfinite(y).all():
            raise ConfigError(
                f"input values overflow float32 (largest |x| = {float(np.abs(x).max()):.4g}; "
                f"float32 holds up to {_F32_MAX:.4g}); normalise the images like the training data."
            )
        return y

    def _run(self, x: np.ndarray, features: bool = False) -> np.ndarray:
        x = self._stem(x)
        cfg = self.cfg
        for i, mixer in enumerate(self._mixers()):
            if i > 0:
                x = self._downsample(f"stages.{i}.downsample", x)
            for j in range(cfg["depths"][i]):
                x = self._block(f"stages.{i}.blocks.{j}", x, mixer, cfg["heads"][i], cfg["windows"][i])
        x = self._norm("norm", x)
        if features:
            return x
        return K.dense(x.mean(axis=(1, 2)), self._wt("head.weight"), self.t["head.bias"], self.threads)

    def _plan_input(self, x):
        """``x`` for the plan when it is already a C-contiguous float32 (B, C, H, W) numpy array
        (the common case), else None: libbhvit checks its values itself (bhvit_run refuses NaN and
        inf pixels), so the plan's path skips check_input's pass over the pixels and runs it only
        to word the error when libbhvit refuses the input."""
        cfg = self.cfg
        if (
            type(x) is np.ndarray
            and x.dtype == np.float32
            and x.ndim == 4
            and x.shape[0] > 0
            and x.shape[1] == cfg["in_chans"]
            and x.shape[2] == cfg["img_size"]
            and x.shape[3] == cfg["img_size"]
            and x.flags.c_contiguous
        ):
            return x
        return None

    def _checked_run(self, x, features: bool = False) -> np.ndarray:
        plan = self.plan is not None and not features and K.plan_available()
        xin = self._plan_input(x) if plan else None
        if xin is not None:
            try:
                return self.plan.run(xin, self.threads)  # logits checked finite by libbhvit
            except K.PlanError as e:
                if e.code == K.PlanError.INPUT:
                    self.check_input(x)  # says which pixel is not finite
                if e.code != K.PlanError.NONFINITE:
                    raise ConfigError(str(e)) from None
                raise ConfigError(_overflowed(x)) from None
        return self._checked_run_slow(x, plan, features)

    def _checked_run_slow(self, x, plan: bool, features: bool = False) -> np.ndarray:
        x = self.check_input(x)
        out = None
        try:
            if plan:
                out = self.plan.run(x, self.threads)
            else:
                with np.errstate(over="ignore", invalid="ignore"):
                    out = self._run(x, features)
        except K.NonFiniteError:
            pass
        except K.PlanError as e:
            if e.code != K.PlanError.NONFINITE:
                raise ConfigError(str(e)) from None
        if out is None or not np.isfinite(out).all():
            raise ConfigError(_overflowed(x))
        return out

    def forward_features(self, x) -> np.ndarray:
        """The final normed token map ``(B, h, w, C)`` of a ``(B, C, H, W)`` batch."""
        return self._checked_run(x, features=True)

    def __call__(self, x) -> np.ndarray:
        return self._checked_run(x)

    @property
    def pretrained_cfg(self) -> Dict:
        """timm's preprocessing record of the export (:func:`bhvit.runtime.image.pretrained_cfg`),
        a view of its ``data`` entry, which ``preprocess`` and ``bhvit predict`` apply."""
        from .image import pretrained_cfg

        c = self.cfg
        return pretrained_cfg(c["in_chans"], c["img_size"], c["num_classes"], self.data)

    def preprocess(self, paths) -> np.ndarray:
        """Image files as a normalised float32 batch ``(B, C, H, W)``, prepared as the export's
        ``data`` entry says (shorter side, filter, centre crop, mean and std): the input
        ``bhvit predict`` gives the network."""
        from .image import prepare_image

        if isinstance(paths, (str, Path)):
            paths = [paths]
        return np.stack([prepare_image(p, self.cfg["in_chans"], self.cfg["img_size"], self.data) for p in paths])


def _overflowed(x: np.ndarray) -> str:
    return (
        f"the network's values overflowed to inf/NaN on this input (largest |x| = "
        f"{float(np.abs(x).max()):.4g}); normalise the images like the training data."
    )


def _torch_to_numpy(x) -> np.ndarray:
    dtype = str(getattr(x, "dtype", "")).replace("torch.", "")
    device = getattr(getattr(x, "device", None), "type", None)
    if getattr(x, "is_meta", False) or device == "meta":
        raise ConfigError(
            f"got a torch tensor on the meta device (shape {tuple(x.shape)}), which holds no values; pass real images."
        )
    if dtype == "bfloat16":
        raise ConfigError("got a torch.bfloat16 tensor, which numpy cannot represent; pass x.float().")
    try:
        return x.detach().cpu().numpy()
    except (TypeError, RuntimeError, NotImplementedError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"cannot read the torch tensor (dtype {dtype}, device {device}) as a numpy "
            f"array: {msg}; pass a CPU float32 tensor."
        ) from None


class _ReadTracker(dict):
    """The tensor dict during the load-time check: notes every name the network reads."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


def _first_tensor(t: Dict[str, np.ndarray], prefix: str, names) -> np.ndarray:
    for n in names:
        if f"{prefix}.{n}" in t:
            return t[f"{prefix}.{n}"]
    raise KeyError(f"{prefix}.{names[0]}")


def _check_structure(rt: BHViTRuntime, mpath: Path, wpath: Path = None) -> None:
    """The manifest's config must describe its tensors: one zero image runs through the
    network (every tensor the config implies exists and fits), every tensor is read, and the
    widths the runtime takes from the tensors agree with the config's."""
    cfg, t = rt.cfg, rt.t
    try:
        side, chans = int(cfg["img_size"]), int(cfg["in_chans"])
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                logits = rt._run(np.zeros((1, chans, side, side), np.float32))
            finite = bool(np.isfinite(logits).all())
        except K.NonFiniteError:
            finite = False
        if not finite:
            raise RuntimeFormatError(
                f"{wpath or mpath}: the network's values overflow to inf/NaN on a zero "
                "image; its parameters are corrupt or out of range (export a good "
                "checkpoint again)."
            )
        if logits.shape[-1] != cfg["num_classes"]:
            raise ConfigError(f"num_classes is {cfg['num_classes']}, the head has {logits.shape[-1]} outputs")
        for i, (dim, ratio) in enumerate(zip(cfg["dims"], cfg["mlp_ratios"])):
            b = f"stages.{i}.blocks.0"
            width = _first_tensor(t, b + ".norm1", ("scale", "weight")).shape[0]
            hidden = t[b + ".mlp.up.op.wbits"].shape[0]
            if (width, hidden) != (dim, dim * ratio):
                raise ConfigError(
                    f"dims[{i}] = {dim} and mlp_ratios[{i}] = {ratio}, the tensors have "
                    f"{width} channels and an MLP of {hidden}"
                )
    except RuntimeFormatError:
        raise
    except (KeyError, ValueError, IndexError, TypeError) as e:
        what = f"no tensor {e}" if isinstance(e, KeyError) else str(e)
        raise RuntimeFormatError(
            f"{mpath}: the manifest's config does not fit its tensors ({what}); it was not written by `bhvit export`."
        ) from None
    unread = sorted(set(t) - t.read)
    if unread:
        raise RuntimeFormatError(
            f"{mpath}: {len(unread)} tensor(s) that the manifest's config does not "
            f"use, e.g. {unread[:3]}; it was not written by `bhvit export`."
        )


def _read_limited(path: Path, expected: int, what: str) -> bytes:
    """Read a regular file of exactly ``expected`` bytes, checking its size before reading it."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size != expected:
                raise RuntimeFormatError(
                    f"{path}: {size} bytes, the manifest says {expected}; the file is truncated or was replaced."
                )
            blob = f.read(expected + 1)
    except OSError as e:
        raise RuntimeFormatError(f"{path}: cannot read the {what} ({e.strerror or e}).") from None
    if len(blob) != expected:
        raise RuntimeFormatError(
            f"{path}: {len(blob)} bytes, the manifest says {expected}; the file is truncated or was replaced."
        )
    return blob


def _bounded_object(pairs):
    """A JSON object as ``json`` makes it (the last of repeated keys wins), refused beyond
    MAX_OBJECT_KEYS keys."""
    if len(pairs) > MAX_OBJECT_KEYS:
        raise ValueError(f"an object with more than {MAX_OBJECT_KEYS} keys")
    return dict(pairs)


def _read_manifest(mpath: Path) -> Dict:
    try:
        with open_regular(mpath) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise RuntimeFormatError(f"{mpath}: cannot read the manifest ({e.strerror or e}).") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise RuntimeFormatError(
            f"{mpath}: larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a manifest written by `bhvit export`."
        )
    try:
        manifest = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_bounded_object, parse_int=_int64, parse_float=_float_literal
        )
    except RecursionError:
        raise RuntimeFormatError(
            f"{mpath}: JSON nested too deeply; not a manifest written by `bhvit export`."
        ) from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, over-long integer literals
        raise RuntimeFormatError(f"{mpath}: not valid JSON ({e}); the file is truncated or corrupt.") from None
    problem = json_subset_problem(manifest)
    if problem:
        raise RuntimeFormatError(f"{mpath}: not valid JSON ({problem}); not a manifest written by `bhvit export`.")
    if not isinstance(manifest, dict):
        raise RuntimeFormatError(f"{mpath}: not a bhvit export (a JSON {_json_type(manifest)}, not an object).")
    return manifest


def _check_threads(threads) -> int:
    try:
        return K._threads(threads)
    except ValueError as e:
        raise ConfigError(
            f"bad threads argument: {e} (it is the number of CPU threads, not part of the export)."
        ) from None


def _checked_manifest_and_weights(mpath: Path):
    """The manifest (checks 1-9 of docs/EXPORT_FORMAT.md) and the weights file's bytes (check 10)."""
    manifest = _read_manifest(mpath)
    if manifest.get("format") != EXPORT_FORMAT:
        raise RuntimeFormatError(f"{mpath}: not a bhvit export (format {_short(manifest.get('format'), 40)}).")
    if not (_is_int(manifest.get("version")) and manifest["version"] == EXPORT_VERSION):  # not 2.0, as in C
        raise RuntimeFormatError(
            f"{mpath}: export version {_short(manifest.get('version'), 40)} is not supported "
            f"(this runtime reads version {EXPORT_VERSION})."
        )
    try:
        digest = manifest_digest(manifest)
    except (RecursionError, ValueError):
        digest = None
    if digest is None or manifest.get("manifest_sha256") != digest:
        raise RuntimeFormatError(
            f"{mpath}: SHA-256 of the manifest does not match; it was modified "
            "(export the checkpoint again instead of editing it)."
        )

    def bad(what):
        return RuntimeFormatError(
            f"{mpath}: {what}; it was not written by `bhvit export` (export the checkpoint again)."
        )

    for key in ("config", "kinds", "tensors", "file"):
        if not isinstance(manifest.get(key), dict):
            raise bad(f"the manifest has no {key!r} object")
    cfg = manifest["config"]
    problem = config_problem(cfg)
    if problem:
        raise bad(problem)
    problem = data_problem(manifest.get("data"), cfg)
    if problem:
        raise bad(problem)
    for name, kind in manifest["kinds"].items():
        problem = _kind_problem(name, kind)
        if problem:
            raise bad(problem)
    expected = manifest["tensors"]
    problem = _tensor_entries_problem(expected)
    if problem:
        raise bad(problem)
    problem = _expect_shapes(cfg, expected)
    if problem:
        raise RuntimeFormatError(
            f"{mpath}: the manifest's config does not fit its tensors ({problem}); "
            "it was not written by `bhvit export`."
        )
    info = manifest["file"]
    name = info.get("name", "model.safetensors")
    if not (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and Path(name).name == name
        and "\\" not in name
        and "\0" not in name
    ):
        raise bad(f"file name {_short(name)} is not a plain file name next to the manifest")
    nbytes, sha = info.get("bytes"), info.get("sha256")
    if not (_is_int(nbytes) and isinstance(sha, str) and len(sha) == 64):
        raise bad(
            f"'file' needs an integer 'bytes' and a 64-digit 'sha256', got {_short(nbytes, 20)} and {_short(sha, 70)}"
        )
    data_bytes = sum(_TENSOR_DTYPES[v["dtype"]] * math.prod(v["shape"]) for v in expected.values())
    if not data_bytes + 8 <= nbytes <= data_bytes + 8 + MAX_HEADER_BYTES:
        raise bad(f"'file' says {nbytes} bytes, the tensors it lists take {data_bytes} (plus a header)")
    wpath = mpath.parent / name
    if not wpath.is_file():
        what = "not a regular file" if wpath.exists() else "missing weights file"
        raise RuntimeFormatError(f"{wpath}: {what} (export the checkpoint again).")
    blob = _read_limited(wpath, nbytes, "weights")
    if hashlib.sha256(blob).hexdigest() != sha:
        raise RuntimeFormatError(f"{wpath}: SHA-256 does not match the manifest; the file was modified.")
    return manifest, wpath, blob


def _checked_tensors(wpath: Path, blob: bytes, expected: Dict) -> Dict[str, np.ndarray]:
    """The tensors of the weights file, as listed in the manifest, finite and with nonzero QD steps."""
    from safetensors.numpy import load as st_load

    try:
        raw = st_load(blob)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise RuntimeFormatError(f"{wpath}: cannot parse safetensors ({e}).") from None
    if set(raw) != set(expected):
        missing, extra = sorted(set(expected) - set(raw)), sorted(set(raw) - set(expected))
        raise RuntimeFormatError(
            f"{wpath}: tensors differ from the manifest (missing {missing[:5]}, unexpected {extra[:5]})."
        )
    tensors = {}
    for name, arr in raw.items():
        if list(arr.shape) != expected[name]["shape"]:
            raise RuntimeFormatError(
                f"{wpath}: tensor {name} has shape {list(arr.shape)}, the manifest says {expected[name]['shape']}."
            )
        if str(arr.dtype) != expected[name]["dtype"]:
            raise RuntimeFormatError(
                f"{wpath}: tensor {name} is {arr.dtype}, the manifest says {expected[name]['dtype']}."
            )
        if name.endswith(".wbits"):
            tensors[name] = np.ascontiguousarray(arr.view(np.uint64))
            continue
        t = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(t).all():
            n_bad = int(t.size - np.isfinite(t).sum())
            raise RuntimeFormatError(
                f"{wpath}: tensor {name} has {n_bad} NaN or infinite value(s); the "
                "model it came from diverged or the file is corrupt (export a good "
                "checkpoint again)."
            )
        if name.endswith(".core.qd.step") and not t.all():
            # negative steps are a valid (if odd) trained model; a zero step divides by zero
            raise RuntimeFormatError(
                f"{wpath}: tensor {name} (the QD step) has a zero value; the QD "
                "levels divide by it (export a good checkpoint again)."
            )
        tensors[name] = t
    return tensors


def load(path: Union[str, Path], threads: int = 0) -> BHViTRuntime:
    """Load and validate an export directory (or its manifest.json).

    Checks the manifest's own SHA-256, its config (types, bounds, consistency), data and
    tensor list, the weights file's size (before reading it) and SHA-256, the tensors
    against the manifest (all float parameters finite, QD steps nonzero), and the config
    against the tensors (one zero image through the network). Every problem raises
    RuntimeFormatError (a ValueError) naming the file; a bad ``threads`` a ValueError."""
    threads = _check_threads(threads)
    p = Path(path)
    mpath = p / "manifest.json" if p.is_dir() else p
    if mpath.is_file() and mpath.suffix != ".json":
        raise RuntimeFormatError(f"{path}: expected the export directory or its manifest.json, not {mpath.name}.")
    if not mpath.is_file():
        raise RuntimeFormatError(f"{path}: no manifest.json (expected the directory written by `bhvit export`).")
    manifest, wpath, blob = _checked_manifest_and_weights(mpath)
    tensors = _checked_tensors(wpath, blob, manifest["tensors"])
    rt = BHViTRuntime(manifest, _ReadTracker(tensors), threads)
    _check_structure(rt, mpath, wpath)
    rt.t = dict(rt.t)
    if K.plan_available():
        try:
            rt.plan = K.Plan(mpath, manifest["config"]["num_classes"], threads)
        except K.PlanError as e:
            raise RuntimeFormatError(str(e)) from None
    return rt
