"""The export format of the bit-packed runtime: its name and version, the manifest's digest,
and the checks of a manifest's config, data entry, layer kinds and tensor list that run
before anything is read or built (docs/EXPORT_FORMAT.md describes the format).

``bhvit.export`` writes what these checks accept and ``bhvit.runtime.load`` refuses what
they do not. No torch and no numpy beyond float32's range.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Dict, Union

import numpy as np

from ..errors import BhvitError
from ..layout import HYBRID_MIXERS, stage_mixers

EXPORT_FORMAT = "bhvit-packed"
EXPORT_VERSION = 2  # 2: the manifest carries its own SHA-256


def manifest_digest(manifest: Dict) -> str:
    """SHA-256 of a manifest's canonical JSON, without its ``manifest_sha256`` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class RuntimeFormatError(BhvitError, ValueError):
    """An export is missing, truncated, tampered with or of another version."""


# --- validation of a manifest's contents (before anything is read or built) ---------
# Limits well above every model bhvit defines; a manifest beyond them is refused before
# the runtime allocates or loops over anything it implies.
MAX_MANIFEST_BYTES = 64 << 20
MIN_STD = 1e-6  # a data std below this blows every normalised pixel up
MAX_OBJECT_KEYS = 1 << 20  # keys of one JSON object, as libbhvit's reader (json.c) bounds them
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on its JSON header
MAX_TENSORS = 100_000
MAX_ATTENTION_KEYS = 16384  # bhvit_tiny's global-attention ablation at 224 needs 3136
_INT_LIMITS = {
    "img_size": (1, 16384),
    "in_chans": (1, 1024),
    "num_classes": (1, 1_000_000),
    "stem_stride": (1, 16384),
    "stem_pad": (0, 16384),
    "msgdc_groups": (1, 65536),
    "qd_levels": (1, 64),
}
_STAGE_LIMITS = {
    "dims": (1, 65536),
    "depths": (1, 1024),
    "mlp_ratios": (1, 64),
    "heads": (1, 65536),
    "windows": (1, 16384),
}
_BOOLS = ("qd", "shift", "msgdc", "msmha")
_F32_MAX = float(np.finfo(np.float32).max)
_TENSOR_DTYPES = {"float32": 4, "float16": 2, "int64": 8}


def _json_type(v) -> str:
    return {type(None): "null", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(v), type(v).__name__
    )


def _short(v, n: int = 80) -> str:
    """repr of a (hostile) manifest value, cut to one short line."""
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


MAX_JSON_DEPTH = 64  # values nested deeper are refused, as libbhvit's reader (json.c) refuses them


MAX_NUMBER_CHARS = 400  # a longer number literal is refused, as libbhvit's reader refuses it


def _float_literal(text: str) -> float:
    """``json``'s ``parse_float``: at most MAX_NUMBER_CHARS characters, as in libbhvit."""
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError("number literal too long")
    return float(text)


def _int64(text: str) -> int:
    """``json``'s ``parse_int``: an integer literal must fit 64 bits, as in libbhvit."""
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError("number literal too long")
    v = int(text)
    if not -(1 << 63) <= v < 1 << 63:
        raise ValueError("integer out of the 64-bit range")
    return v


def json_subset_problem(value, depth: int = 0) -> Union[str, None]:
    """What puts a parsed manifest outside the JSON that both of bhvit's readers accept
    (docs/EXPORT_FORMAT.md), or None: a value nested deeper than MAX_JSON_DEPTH, a string or key
    holding NUL or a lone surrogate (``\\udc80`` escapes, undecodable file names)."""
    if depth > MAX_JSON_DEPTH:
        return "JSON nested too deeply"
    if isinstance(value, str):
        if "\0" in value:
            return "NUL in string"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "lone surrogate in string"
        return None
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, list):
        items = value
    else:
        return None
    for item in items:
        problem = json_subset_problem(item, depth + 1)
        if problem:
            return problem
    return None


def config_problem(cfg) -> Union[str, None]:
    """What is wrong with a manifest's model config (types, bounds, consistency), or None.

    Checks every field the runtime reads, so that nothing it builds from them can fail or
    run away; whether the tensors match is checked separately."""
    if not isinstance(cfg, dict):
        return f"config is a JSON {_json_type(cfg)}, not an object"
    for k, (lo, hi) in _INT_LIMITS.items():
        v = cfg.get(k)
        if not _is_int(v) or not lo <= v <= hi:
            return f"config {k} must be an integer in {lo}..{hi}, got {_short(v)}"
    for k, (lo, hi) in _STAGE_LIMITS.items():
        v = cfg.get(k)
        if not (isinstance(v, list) and len(v) == 4 and all(_is_int(x) and lo <= x <= hi for x in v)):
            return f"config {k} must be a list of 4 integers in {lo}..{hi} (one per stage), got {_short(v)}"
    for k in _BOOLS:
        if not isinstance(cfg.get(k), bool):
            return f"config {k} must be true or false, got {_short(cfg.get(k))}"
    if cfg.get("hybrid") not in HYBRID_MIXERS:
        return f"config hybrid must be one of {sorted(HYBRID_MIXERS)}, got {_short(cfg.get('hybrid'))}"
    if cfg.get("norm", "bn") not in ("bn", "ln"):
        return f"config norm must be 'bn' or 'ln', got {_short(cfg.get('norm'))}"
    side, stride = cfg["img_size"] + 2 * cfg["stem_pad"], cfg["stem_stride"]
    if side % (8 * stride):
        return (
            f"config img_size + 2 * stem_pad = {side} is not a multiple of 8 * stem_stride = "
            f"{8 * stride} (every stage needs an integer map size)"
        )
    grid = side // stride
    v = cfg.get("msgdc_dilations")
    if not (isinstance(v, list) and 1 <= len(v) <= 16 and all(_is_int(x) and 1 <= x <= 65536 for x in v)):
        return f"config msgdc_dilations must be a list of 1..16 integers in 1..65536, got {_short(v)}"
    v = cfg.get("shift_sizes")
    if not (isinstance(v, list) and len(v) <= 16 and all(_is_int(x) and 1 <= x <= grid for x in v)):
        return (
            f"config shift_sizes must be a list of at most 16 integers in 1..{grid} (the stage-1 map "
            f"side), got {_short(v)}"
        )
    dims = cfg["dims"]
    for i in range(3):
        if dims[i + 1] % dims[i]:
            return f"config dims[{i + 1}] = {dims[i + 1]} is not a multiple of dims[{i}] = {dims[i]}"
    for i, mixer in enumerate(stage_mixers(cfg["hybrid"], cfg["msgdc"], cfg["msmha"])):
        size = grid >> i
        if cfg["shift"] and cfg["shift_sizes"] and dims[i] % 4:
            return f"config dims[{i}] = {dims[i]} is not divisible by 4 (the shift channel mix)"
        if mixer == "msgdc" and dims[i] % cfg["msgdc_groups"]:
            return f"config dims[{i}] = {dims[i]} is not divisible by msgdc_groups = {cfg['msgdc_groups']}"
        if mixer in ("msmha", "attn") and dims[i] % cfg["heads"][i]:
            return f"config dims[{i}] = {dims[i]} is not divisible by heads[{i}] = {cfg['heads'][i]}"
        if mixer == "msmha" and size % cfg["windows"][i]:
            return f"config windows[{i}] = {cfg['windows'][i]} does not divide the stage-{i + 1} map side {size}"
        if mixer in ("msmha", "attn"):  # keys per query: the cost is quadratic in it
            w = cfg["windows"][i]
            keys = size * size if mixer == "attn" else w * w + (size // w) ** 2
            if keys > MAX_ATTENTION_KEYS:
                return (
                    f"config stage {i + 1} attends over {keys} tokens (map side {size}, window "
                    f"{w if mixer == 'msmha' else 'none'}); at most {MAX_ATTENTION_KEYS}"
                )
    return None


def _float_list_problem(name, v, n, positive=False):
    if not (isinstance(v, list) and len(v) == n):
        return f"data {name} must be a list of {n} numbers (one per input channel), got {_short(v)}"
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return f"data {name}[{i}] must be a number, got {_short(x)}"
        if not math.isfinite(x):
            return f"data {name}[{i}] is {x}, not a finite number"
        if abs(x) > _F32_MAX:
            return f"data {name}[{i}] = {x} overflows float32"
        if positive and not x >= MIN_STD:
            return f"data {name}[{i}] = {x} must be >= {MIN_STD} (images are divided by it)"
    return None


MAX_RESIZE = 65536


def preprocess_problem(data: Dict, img_size: int) -> Union[str, None]:
    """What is wrong with the evaluation transform of a ``data`` entry, or None: ``resize``
    (the shorter side before the centre crop) an integer from ``img_size`` to MAX_RESIZE,
    ``interpolation`` one of :data:`bhvit.runtime.image.INTERPOLATIONS`; both optional."""
    from .image import INTERPOLATIONS

    r = data.get("resize")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or not img_size <= r <= MAX_RESIZE):
        return f"data resize must be an integer from img_size ({img_size}) to {MAX_RESIZE}, got {_short(r)}"
    i = data.get("interpolation")
    if i is not None and i not in INTERPOLATIONS:
        return f"data interpolation must be one of {list(INTERPOLATIONS)}, got {_short(i)}"
    return None


def _control(ch: str) -> bool:
    return ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F  # Unicode's Cc: C0, DEL, C1


def safe_class_name(name: str) -> str:
    """A class name as an export stores it: control characters (a newline would forge an
    output line of `bhvit predict` or `bhvit_run --classes`) written as ``\\xNN``, and the
    lone surrogates of an undecodable folder name as the bytes they stand for (``\\xNN``)."""
    out = []
    for ch in name:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # os.fsdecode's stand-in for the byte o - 0xDC00
            out.append(f"\\x{o - 0xDC00:02x}")
        elif 0xD800 <= o <= 0xDFFF:
            out.append(f"\\u{o:04x}")
        elif _control(ch):
            out.append(f"\\x{o:02x}")
        else:
            out.append(ch)
    return "".join(out)


def data_problem(data, cfg: Dict) -> Union[str, None]:
    """What is wrong with an export's ``data`` entry (normalisation and class names), or None.

    ``mean`` and ``std``: both or neither, ``in_chans`` finite float32 numbers each, std >= MIN_STD;
    ``classes``: ``num_classes`` strings; the evaluation transform (:func:`preprocess_problem`).
    Other keys (the data set's name, sizes) are kept as is."""
    if data is None:
        return None
    if not isinstance(data, dict):
        return f"data is a JSON {_json_type(data)}, not an object"
    has_mean, has_std = data.get("mean") is not None, data.get("std") is not None
    if has_mean != has_std:
        return "data has only one of mean and std (the input normalisation needs both)"
    if has_mean:
        p = _float_list_problem("mean", data["mean"], cfg["in_chans"]) or _float_list_problem(
            "std", data["std"], cfg["in_chans"], positive=True
        )
        if p:
            return p
    p = preprocess_problem(data, cfg["img_size"])
    if p:
        return p
    classes = data.get("classes")
    if classes is not None:
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            return f"data classes must be a list of strings, got {_short(classes)}"
        bad = next((c for c in classes if c != safe_class_name(c)), None)
        if bad is not None:
            return f"data classes: {_short(bad)} holds a control character or a lone surrogate"
        if len(classes) != cfg["num_classes"]:
            return (
                f"data classes has {len(classes)} names for the model's {cfg['num_classes']} classes "
                "(one name per class)"
            )
    return None


def _kind_problem(name, kind) -> Union[str, None]:
    if kind in ("affine", "binary", "binary+bn"):
        return None
    if isinstance(kind, str) and kind.startswith("ln:"):
        try:
            eps = float(kind[3:])
        except ValueError:
            eps = None
        if eps is not None and math.isfinite(eps) and 0 < eps <= 1:
            return None
    return f"kinds[{_short(name)}] is {_short(kind, 40)}, not 'affine', 'binary', 'binary+bn' or 'ln:<eps in (0, 1]>'"


def _tensor_entries_problem(tensors: Dict) -> Union[str, None]:
    if len(tensors) > MAX_TENSORS:
        return f"{len(tensors)} tensors (at most {MAX_TENSORS})"
    for name, v in tensors.items():
        if not (len(name) <= 200 and name.isprintable() and " " not in name):
            return f"tensor name {_short(name)} is not a name `bhvit export` writes"
        if not (isinstance(v, dict) and isinstance(v.get("shape"), list) and isinstance(v.get("dtype"), str)):
            return f"malformed 'tensors' entry {_short(name)} (each needs a dtype and a shape)"
        dt, shape = v["dtype"], v["shape"]
        if dt not in _TENSOR_DTYPES or (dt == "int64") != name.endswith(".wbits"):
            return (
                f"tensor {name} has dtype {_short(dt, 20)}; packed signs (.wbits) are int64, "
                "every other tensor float32 or float16"
            )
        if not (1 <= len(shape) <= 8 and all(_is_int(n) and 0 <= n < 2**31 for n in shape)):
            return f"tensor {name} has shape {_short(shape, 60)}, not a list of 1..8 sizes in 0..2**31-1"
    return None


def _expect_shapes(cfg: Dict, tensors: Dict) -> Union[str, None]:
    """The shapes the config implies for the stem, the position embeddings and the head."""
    dims, grid = cfg["dims"], (cfg["img_size"] + 2 * cfg["stem_pad"]) // cfg["stem_stride"]
    want = {
        "stem.proj.weight": [dims[0], cfg["stem_stride"] ** 2 * cfg["in_chans"]],
        "stem.pos_embed": [grid, grid, dims[0]],
        "head.weight": [cfg["num_classes"], dims[3]],
    }
    for i in range(1, 4):
        want[f"stages.{i}.downsample.pos_embed"] = [grid >> i, grid >> i, dims[i]]
    for name, shape in want.items():
        if name not in tensors:
            return f"no tensor {name!r}"
        if tensors[name]["shape"] != shape:
            return (
                f"tensor {name} has shape {tensors[name]['shape']}, the config (img_size "
                f"{cfg['img_size']}, in_chans {cfg['in_chans']}, stem_stride {cfg['stem_stride']}, "
                f"stem_pad {cfg['stem_pad']}, dims {dims}, num_classes {cfg['num_classes']}) implies {shape}"
            )
    return None
