"""Hostile exports and inputs for bhvit.runtime (issue 18): every one gets a one-line
RuntimeFormatError / ValueError naming the file and what is wrong, fast, and nothing runs
that the export does not describe. Tampered manifests get a recomputed manifest_sha256
(``_rewrite``), as a deliberate attacker would, so that the deeper checks are reached."""

import hashlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

import bhvit
from bhvit import runtime
from bhvit.export import export_model
from bhvit.runtime import RuntimeFormatError, kernels as K
from bhvit.runtime.format import manifest_digest
from test_runtime import _rewrite

CLASSES = [f"c{i}" for i in range(10)]
DATA = {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3], "classes": CLASSES}


def _model():
    torch.manual_seed(0)
    return bhvit.create_model("bhvit_micro_c32", num_classes=10, depths=(1, 1, 1, 1)).eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    export_model(_model(), d, data=DATA)
    return d


@pytest.fixture
def exp(base, tmp_path):
    """A fresh copy of the tiny export, to tamper with."""
    d = tmp_path / "exp"
    shutil.copytree(base, d)
    return d


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


def _edit(d, **changes):
    """Change manifest entries and recompute its digest (``_rewrite`` takes ``tensors`` as the weights)."""
    man = dict(_manifest(d), **changes)
    man["manifest_sha256"] = manifest_digest(man)
    (d / "manifest.json").write_text(json.dumps(man))


def _refused(d, match, **kw):
    """load(d) raises a one-line RuntimeFormatError naming a file of the export, quickly, and
    libbhvit's own loader (the C API, without Python's checks first) refuses it too."""
    t = time.perf_counter()
    with pytest.raises(RuntimeFormatError, match=match) as e:
        runtime.load(d, **kw)
    assert time.perf_counter() - t < 5
    msg = str(e.value)
    assert "\n" not in msg and str(d) in msg
    if K.plan_available() and not kw:
        with pytest.raises(K.PlanError) as ce:
            K.Plan(d, 10)
        assert ce.value.code in (K.PlanError.IO, K.PlanError.FORMAT) and str(ce.value)
    return msg


# --------------------------------------------------------------------------- denial of service


def test_huge_shift_size_is_refused_before_anything_runs(exp):
    # was: runtime.load loops 10^7 rolls per element (hangs)
    _rewrite(exp, config=dict(_manifest(exp)["config"], shift_sizes=[10**7, 2]))
    _refused(
        exp,
        r"manifest.json: config shift_sizes must be a list of at most 16 integers in 1..16 "
        r"\(the stage-1 map side\), got \[10000000, 2\]",
    )


@pytest.mark.parametrize(
    "change,message",
    [
        ({"heads": [0, 1, 2, 4]}, r"config heads must be a list of 4 integers in 1..65536 \(one per stage\), got \[0,"),
        ({"windows": [8, 8, 0, 2]}, r"config windows must be a list of 4 integers in 1..16384"),
        ({"stem_stride": 0}, r"config stem_stride must be an integer in 1..16384, got 0"),
        ({"msgdc_groups": 0}, r"config msgdc_groups must be an integer in 1..65536, got 0"),
        ({"msgdc_groups": 3}, r"config dims\[0\] = 32 is not divisible by msgdc_groups = 3"),
        ({"heads": [1, 1, 3, 4]}, r"config dims\[2\] = 128 is not divisible by heads\[2\] = 3"),
        ({"windows": [8, 8, 3, 2]}, r"config windows\[2\] = 3 does not divide the stage-3 map side 4"),
        ({"depths": [1, 1, 1, 10**9]}, r"config depths must be a list of 4 integers in 1..1024"),
        ({"dims": [32, "64", 128, 256]}, r"config dims must be a list of 4 integers"),
        ({"shift_sizes": "12"}, r"config shift_sizes must be a list"),
        ({"msgdc_dilations": []}, r"config msgdc_dilations must be a list of 1..16 integers"),
        ({"qd_levels": 1000}, r"config qd_levels must be an integer in 1..64, got 1000"),
        ({"img_size": True}, r"config img_size must be an integer"),
        ({"qd": "yes"}, r"config qd must be true or false, got 'yes'"),
        ({"hybrid": "both"}, r"config hybrid must be one of"),
        ({"img_size": 36}, r"config img_size \+ 2 \* stem_pad = 36 is not a multiple of 8 \* stem_stride = 16"),
    ],
)
def test_bad_config_values_get_one_line_errors(exp, change, message):
    # was: ZeroDivisionError / TypeError tracebacks, or a hang, from building the network
    _rewrite(exp, config=dict(_manifest(exp)["config"], **change))
    _refused(exp, "manifest.json: " + message)


def test_attention_size_is_bounded(exp):
    # global attention is quadratic in the tokens: a 512 x 512 image with a 2x2 stem would
    # attend over 65536 tokens (the position embeddings back it with a 64 MiB file); refused
    # from the config alone
    from bhvit.runtime.format import config_problem

    cfg = dict(_manifest(exp)["config"], img_size=512, hybrid="msmha", msmha=False)
    assert config_problem(cfg) == (
        "config stage 1 attends over 65536 tokens (map side 256, window none); at most 16384"
    )
    assert config_problem(dict(cfg, img_size=256)) is None


def test_missing_config_key(exp):
    cfg = _manifest(exp)["config"]
    del cfg["windows"]
    _rewrite(exp, config=cfg)
    _refused(exp, r"config windows must be a list of 4 integers .* got None")


def test_weights_size_is_checked_before_reading(exp, monkeypatch):
    # a 2 GB (sparse) weights file: refused from its size, without reading it (was: read_bytes, then compared)
    w = exp / "model.safetensors"
    os.truncate(w, 2 << 30)
    monkeypatch.setattr(type(w), "read_bytes", lambda self: pytest.fail(f"read {self} whole"))
    _refused(exp, r"model.safetensors: 2147483648 bytes, the manifest says \d+; the file is truncated or was replaced")
    # ... and a manifest that claims 2 GB for its few tensors, before the file is opened
    man = _manifest(exp)
    _rewrite(exp, file=dict(man["file"], bytes=2 << 30))
    _refused(exp, r"manifest.json: 'file' says 2147483648 bytes, the tensors it lists take \d+ \(plus a header\)")


def test_oversized_manifest_is_not_parsed(exp):
    with open(exp / "manifest.json", "r+b") as f:
        f.truncate(65 << 20)  # sparse
    _refused(exp, r"manifest.json: larger than 64 MiB")


def test_weights_file_name_must_stay_next_to_the_manifest(exp, tmp_path):
    shutil.copy(exp / "model.safetensors", tmp_path / "outside.safetensors")
    man = _manifest(exp)
    _rewrite(exp, file=dict(man["file"], name="../outside.safetensors"))
    _refused(exp, r"file name '../outside.safetensors' is not a plain file name next to the manifest")


# --------------------------------------------------------------------------- NaN and bad floats


@pytest.mark.parametrize(
    "name,value,message",
    [
        (
            "stages.2.blocks.0.mixer.core.qd.zero_point",
            np.nan,
            r"model.safetensors: tensor stages.2.blocks.0.mixer.core.qd.zero_point has 1 NaN or infinite value",
        ),
        ("head.weight", np.inf, r"tensor head.weight has 1 NaN or infinite value"),
        ("stem.norm.scale", -np.inf, r"tensor stem.norm.scale has 1 NaN or infinite value"),
        (
            "stages.2.blocks.0.mixer.core.qd.step",
            0.0,
            r"tensor stages.2.blocks.0.mixer.core.qd.step \(the QD step\) "
            r"has a zero value; the QD levels divide by it",
        ),
        ("stem.proj.bias", 3e38, r"model.safetensors: the network's values overflow to inf/NaN on a zero image"),
    ],
)
def test_non_finite_parameters_are_refused_at_load(exp, name, value, message):
    # was: a NaN QD zero point loaded and gave garbage logits (C: NaN cast to int32)
    t = load_file(str(exp / "model.safetensors"))
    t[name] = t[name].copy()
    t[name].flat[0] = value
    _rewrite(exp, t)
    _refused(exp, message)


@pytest.mark.parametrize("kind", ["ln:nan", "ln:-1", "ln:x", "xnor"])
def test_bad_norm_kind(exp, kind):
    man = _manifest(exp)
    _rewrite(exp, kinds=dict(man["kinds"], **{"stem.norm": kind}))
    _refused(exp, r"kinds\['stem.norm'\] is .* not 'affine', 'binary', 'binary\+bn' or 'ln:<eps")


def test_attention_kernels_define_a_nan_zero_point_like_numpy():
    # C used to cast a NaN QD level to int32 (undefined: 4.3e10 here); now level 0 on every
    # backend, as numpy's clip/compare gives it (inf and -inf were already clipped alike)
    rng = np.random.default_rng(0)
    h, n, d = 2, 20, 16
    qb = K.pack_signs(rng.standard_normal((1, h, n, d)).astype(np.float32))
    kb = K.pack_signs(rng.standard_normal((1, h, n, d)).astype(np.float32))
    vb = K.pack_bits(rng.random((1, h, d, n)) < 0.5)
    st, z = np.array([0.5, 0.5], np.float32), np.array([np.nan, 0.1], np.float32)
    prev = K.backend()
    outs = {}
    try:
        for b in K.available_backends():
            K.set_backend(b)
            with np.errstate(all="ignore"):
                outs[b] = K.attention(qb, kb, vb, d, st, z, 3, 0.25)
    finally:
        K.set_backend(prev)
    for b, o in outs.items():
        assert np.array_equal(o, outs["numpy"], equal_nan=True), b
    assert (outs["numpy"][..., :d] == 0).all()  # head 0: every level 0, no plane set
    assert np.abs(outs["numpy"][..., d:]).max() > 0  # head 1: computed as usual


def test_rprelu_epilogues_give_numpys_values_for_inf_and_nan():
    # C's branch-free PReLU, 0.5 (y - |y|), made +-inf NaN where numpy gives +-inf
    rng = np.random.default_rng(3)
    n, d = 16, 16

    def vec(*shape, bad=False):
        a = rng.standard_normal(shape or (n,)).astype(np.float32)
        if bad:  # inf, -inf and NaN reach the PReLU
            a.reshape(-1)[[0, 5, 10]] = [np.inf, -np.inf, np.nan]
        return a

    dot = rng.integers(-20, 20, (5, n)).astype(np.int32)
    s, m1, slope, m2 = (vec() for _ in range(4))
    t, sc, res = vec(bad=True), vec(5, n), vec(5, n)
    slope[5] = -0.5  # -inf times a negative slope: +inf
    a, b = (K.pack_signs(rng.standard_normal(sh).astype(np.float32)) for sh in ((5, 70), (n, 70)))
    qb = K.pack_signs(rng.standard_normal((1, 1, 5, d)).astype(np.float32))
    vb = K.pack_bits(rng.random((1, 1, d, 5)) < 0.5)
    q, k, v = vec(1, 5, d, bad=True), vec(1, 5, d), vec(1, 5, d)
    cases = {
        "epilogue": lambda: K.epilogue(dot, s, t, sc, (m1, slope, m2), residual=res),
        "binary_linear": lambda: K.binary_linear(a, b, 70, s, t, sc, (m1, slope, m2), residual=res),
        "attention": lambda: K.attention(
            qb,
            qb,
            vb,
            d,
            np.array([0.5], np.float32),
            np.zeros(1, np.float32),
            3,
            0.25,
            combine=(s, t, q, k, v, (m1, slope, m2)),
        ),
    }
    prev = K.backend()
    try:
        for name, fn in cases.items():
            outs = {}
            for be in K.available_backends():
                K.set_backend(be)
                with np.errstate(all="ignore"):
                    outs[be] = fn()
            assert np.isinf(outs["numpy"]).any(), name
            for be, o in outs.items():
                assert np.array_equal(o, outs["numpy"], equal_nan=True), (name, be)
    finally:
        K.set_backend(prev)


def test_fused_packing_reports_nan_on_every_backend():
    # C's fused epilogue+packing used to pack NaN silently as -1 while numpy raised
    dot = np.arange(-4, 4, dtype=np.int32).reshape(1, 8)
    scale, shift = np.ones(8, np.float32), np.zeros(8, np.float32)
    shift[2] = np.nan
    a, b = np.zeros((1, 1), np.uint64), np.zeros((8, 1), np.uint64)
    prev = K.backend()
    try:
        for be in K.available_backends():
            K.set_backend(be)
            with pytest.raises(K.NonFiniteError, match="input contains NaN"):
                K.epilogue_pack(dot, scale, shift)
            with pytest.raises(K.NonFiniteError, match="input contains NaN"):
                K.binary_linear(a, b, 8, scale, shift, pack=True)
    finally:
        K.set_backend(prev)


# --------------------------------------------------------------------------- data entry


@pytest.mark.parametrize(
    "data,message",
    [
        ({"mean": [math.nan, 0, 0], "std": [1, 1, 1]}, r"data mean\[0\] is nan, not a finite number"),
        ({"mean": [0, 0, 0], "std": [1, 0, 1]}, r"data std\[1\] = 0 must be >= 1e-06"),
        ({"mean": [0, 0, 0], "std": [1, 1e-300, 1]}, r"data std\[1\] = 1e-300 must be >= 1e-06 \(images are divided"),
        ({"mean": [0, 0, 0], "std": [1, 1e-45, 1]}, r"data std\[1\] = 1e-45 must be >= 1e-06"),
        ({"mean": [0, 0], "std": [1, 1]}, r"data mean must be a list of 3 numbers \(one per input channel\)"),
        ({"mean": [1e39, 0, 0], "std": [1, 1, 1]}, r"data mean\[0\] = 1e\+39 overflows float32"),
        ({"mean": [0, 0, 0]}, r"data has only one of mean and std"),
        ({"mean": "0.5", "std": [1, 1, 1]}, r"data mean must be a list of 3 numbers"),
        ({"classes": ["a", "b", "c"]}, r"data classes has 3 names for the model's 10 classes"),
        ({"classes": [1] * 10}, r"data classes must be a list of strings"),
        ({"resize": 16}, r"data resize must be an integer from img_size \(32\) to 65536, got 16"),
        ({"resize": 36.0}, r"data resize must be an integer from img_size \(32\) to 65536, got 36.0"),
        ({"resize": True}, r"data resize must be an integer"),
        ({"resize": 70000}, r"data resize must be an integer from img_size \(32\) to 65536"),
        ({"interpolation": "nearest"}, r"data interpolation must be one of \['bilinear', 'bicubic'\], got 'nearest'"),
        ({"interpolation": 3}, r"data interpolation must be one of"),
    ],
)
def test_bad_data_entry_is_refused_by_load_and_by_export(exp, tmp_path, data, message):
    # was: a NaN mean/std loaded and `predict` blamed the image; too few class names crashed predict
    _rewrite(exp, data=data)
    _refused(exp, "manifest.json: " + message)
    with pytest.raises(ValueError, match="cannot export to .*: " + message):
        export_model(_model(), tmp_path / "new", data=data)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("data", [None, {"mean": None, "std": None}], ids=["null", "null-stats"])
def test_null_data_loads_without_normalisation_and_predict_says_so(exp, tmp_path, data):
    # was: "data": null passed the check, then load crashed with AttributeError on None.get
    _edit(exp, data=data)
    rt = runtime.load(exp)
    assert rt.classes is None and rt(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 10)
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    r = subprocess.run(
        [sys.executable, "-m", "bhvit", "predict", str(exp), str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "records no input normalisation (mean/std)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_export_refuses_nan_parameters(tmp_path):
    m = _model()
    with torch.no_grad():
        m.head.bias[3] = float("nan")
    with pytest.raises(ValueError, match=r"cannot export to .*: head.bias has 1 NaN or infinite value"):
        export_model(m, tmp_path / "x")
    m = _model()
    with torch.no_grad():
        m.head.bias[3] = 1e6
    with pytest.raises(ValueError, match=r"head.bias has 1 NaN or infinite value\(s\) \(they overflow float16"):
        export_model(m, tmp_path / "y", float16=True)


# --------------------------------------------------------------------------- threads, inputs


def test_bad_threads_is_blamed_on_the_argument(base):
    # was: "manifest.json: the manifest's config does not fit its tensors (threads must be >= 0 ...)"
    for bad in (-1, 10**9, 1.5, "2"):
        with pytest.raises(ValueError, match="bad threads argument: threads must be") as e:
            runtime.load(base, threads=bad)
        assert not isinstance(e.value, RuntimeFormatError) and "manifest" not in str(e.value)
    runtime.load(base, threads=1)


@pytest.fixture(scope="module")
def rt(base):
    return runtime.load(base)


def test_inputs_of_other_dtypes_and_layouts(rt):
    # a guard (these already worked): defined conversions, the same logits as float32
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref = rt(x)
    assert np.array_equal(rt(x.astype(np.float64)), ref)  # float64: converted
    assert np.array_equal(rt(np.asfortranarray(x)), ref)  # not C-contiguous
    assert np.array_equal(rt(x.transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2)), ref)
    assert np.array_equal(rt(torch.from_numpy(x).permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)), ref)
    h = x.astype(np.float16)
    assert np.array_equal(rt(h), rt(h.astype(np.float32)))  # float16: converted
    assert np.array_equal(rt(torch.from_numpy(h)), rt(h.astype(np.float32)))
    assert np.array_equal(rt(x.astype(">f4")), ref)  # big-endian


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: torch.zeros(2, 3, 32, 32, dtype=torch.bfloat16), r"got a torch.bfloat16 tensor.*pass x.float\(\)"),
        (
            lambda: torch.zeros(2, 3, 32, 32, device="meta"),
            r"torch tensor on the meta device \(shape \(2, 3, 32, 32\)\)",
        ),
        (lambda: np.full((1, 3, 32, 32), 1e39), r"input values overflow float32 \(largest \|x\| = 1e\+39"),
        (
            lambda: np.where(np.arange(3 * 32 * 32).reshape(1, 3, 32, 32) == 40, np.nan, 0.0),
            r"input contains NaN or infinite pixels \(1 of them, the first at index \(0, 0, 1, 8\): nan\)",
        ),
    ],
    ids=["bfloat16", "meta", "float64-overflow", "nan"],
)
def test_bad_inputs_get_one_line_errors(rt, make, message):
    # was: TypeError (bfloat16), NotImplementedError (meta), "pack_signs: input contains NaN" (overflow)
    with pytest.raises(ValueError, match=message) as e:
        rt(make())
    assert "\n" not in str(e.value)


def test_values_that_overflow_inside_the_network(exp):
    # loads (a zero image stays finite), but a large input overflows: said so, not "NaN input"
    t = load_file(str(exp / "model.safetensors"))
    t["stem.proj.weight"] = t["stem.proj.weight"] * np.float32(1e30)
    _rewrite(exp, t)
    rt = runtime.load(exp)
    with pytest.raises(
        ValueError,
        match=r"the network's values overflowed to inf/NaN on this input "
        r"\(largest \|x\| = 1e\+10\); normalise the images",
    ):
        rt(np.full((1, 3, 32, 32), 1e10, np.float32))


# --------------------------------------------------------------------------- hostile JSON


@pytest.mark.parametrize(
    "text,message",
    [
        ("[" * 100_000 + "]" * 100_000, r"JSON nested too deeply"),
        ('{"a": ' + "1" * 5000 + "}", r"not valid JSON \(number literal too long"),
        ('"just a string"', r"not a bhvit export \(a JSON string, not an object\)"),
        ("null", r"not a bhvit export \(a JSON null, not an object\)"),
    ],
    ids=["nested", "long-int", "string", "null"],
)
def test_hostile_manifest_json(exp, text, message):
    (exp / "manifest.json").write_bytes(text.encode("latin-1"))
    _refused(exp, "manifest.json: " + message)


@pytest.mark.parametrize(
    "key,value,message",
    [
        (
            "tensors",
            {"head.bias": {"dtype": "float32", "shape": [10.5]}},
            r"tensor head.bias has shape \[10.5\], not a list of 1..8 sizes",
        ),
        ("tensors", {"head.bias": {"dtype": "float32", "shape": "10"}}, r"malformed 'tensors' entry 'head.bias'"),
        ("tensors", {"head.bias": {"dtype": "object", "shape": [10]}}, r"tensor head.bias has dtype 'object'"),
        ("tensors", {"head.bias": [1, 2]}, r"malformed 'tensors' entry 'head.bias'"),
        ("file", {"name": "model.safetensors", "bytes": "12", "sha256": "0" * 64}, r"'file' needs an integer 'bytes'"),
        ("data", [1, 2], r"data is a JSON list, not an object"),
    ],
)
def test_wrong_json_types_in_the_manifest(exp, key, value, message):
    man = _manifest(exp)
    if key == "tensors":
        value = dict(man["tensors"], **value)
    _edit(exp, **{key: value})
    _refused(exp, "manifest.json: " + message)


# --------------------------------------------------------------------------- truncation, bit flips


def _positions(n, k=12):
    return sorted({0, 1, n // 2, n - 1} | set(np.random.default_rng(n).integers(0, n, k).tolist()))


def test_truncated_and_bit_flipped_manifest(exp):
    blob = (exp / "manifest.json").read_bytes()
    for cut in _positions(len(blob)):
        (exp / "manifest.json").write_bytes(blob[:cut])
        _refused(exp, "manifest.json: ")
    for pos in _positions(len(blob)):
        for bit in (0, 5):
            (exp / "manifest.json").write_bytes(blob[:pos] + bytes([blob[pos] ^ (1 << bit)]) + blob[pos + 1 :])
            _refused(exp, "manifest.json: ")


def test_truncated_and_bit_flipped_weights(exp):
    w = exp / "model.safetensors"
    blob = w.read_bytes()
    header = 8 + int.from_bytes(blob[:8], "little")
    for cut in _positions(len(blob)):
        w.write_bytes(blob[:cut])
        _refused(exp, r"model.safetensors: \d+ bytes, the manifest says \d+")
    for pos in _positions(len(blob)) + _positions(header):
        w.write_bytes(blob[:pos] + bytes([blob[pos] ^ 4]) + blob[pos + 1 :])
        _refused(exp, r"model.safetensors: SHA-256 does not match the manifest")


def test_bit_flipped_weights_with_recomputed_digests(exp):
    # a deliberate edit: the manifest agrees with the flipped file, so the parser and the
    # tensor checks see it. Either it loads (a changed but valid value) or a RuntimeFormatError.
    w = exp / "model.safetensors"
    blob = w.read_bytes()
    header = 8 + int.from_bytes(blob[:8], "little")
    man = _manifest(exp)
    outcomes = set()
    for pos in _positions(8, 4) + _positions(header, 16):
        flipped = blob[:pos] + bytes([blob[pos] ^ 0x10]) + blob[pos + 1 :]
        w.write_bytes(flipped)
        _rewrite(exp, file=dict(man["file"], sha256=hashlib.sha256(flipped).hexdigest()))
        try:
            runtime.load(exp)
            outcomes.add("loaded")
        except RuntimeFormatError as e:
            assert "\n" not in str(e) and str(exp) in str(e)
            outcomes.add("refused")
    assert "refused" in outcomes


def test_pickle_renamed_to_safetensors_never_runs(exp, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Evil())
    assert not marker.exists()
    size = (exp / "model.safetensors").stat().st_size
    blob = payload + b"\0" * (size - len(payload))  # pickle stops at STOP: still a valid pickle
    (exp / "model.safetensors").write_bytes(blob)
    man = _manifest(exp)
    _rewrite(exp, file=dict(man["file"], sha256=hashlib.sha256(blob).hexdigest()))
    _refused(exp, r"model.safetensors: cannot parse safetensors")
    assert not marker.exists()
    man = _manifest(exp)
    assert man["manifest_sha256"] == manifest_digest(man)  # the deep check was reached


# --------------------------------------------------------------------------- file modes


def test_export_files_get_normal_modes(tmp_path):
    # exports are for sharing: 0644 under the usual umask 022, not mkstemp's 0600
    old = os.umask(0o022)
    try:
        export_model(_model(), tmp_path / "exp", data=DATA)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "manifest.json"):
        assert (tmp_path / "exp" / name).stat().st_mode & 0o777 == 0o644, name


@pytest.fixture
def no_hang():
    """A test that would wait forever (opening a FIFO blocks for a writer) fails after 20 s."""
    import signal

    def fail(*_):
        raise TimeoutError("blocked: a FIFO was opened for reading")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize(
    "name,message",
    [("manifest.json", "no manifest.json"), ("model.safetensors", "model.safetensors: not a regular file")],
)
def test_a_fifo_in_an_export_is_refused_not_waited_on(exp, name, message, no_hang):
    # was: libbhvit (bhvit_run, and the plan under bhvit.runtime) opened it before checking,
    # and waited for a writer forever
    (exp / name).unlink()
    os.mkfifo(exp / name)
    _refused(exp, message)


def test_predict_on_a_fifo_says_so(base, tmp_path):
    os.mkfifo(tmp_path / "x.png")
    r = subprocess.run(
        [sys.executable, "-m", "bhvit", "predict", str(base), str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "x.png: cannot read image (a FIFO, not a regular file)" in r.stderr


def test_repeated_and_numerous_keys_read_alike_in_python_and_c(exp):
    """The last of repeated keys wins in both readers (and the digest is of that); an object of
    more than 2^20 keys is refused by both (libbhvit's duplicate scan was quadratic: 100,000
    keys took 15 s)."""
    man = _manifest(exp)
    body = json.dumps(dict(man, manifest_sha256="X"))
    dup = body.replace('"data": {', '"data": {"classes": 7, ', 1)  # repeated, the later one valid
    (exp / "manifest.json").write_text(dup.replace('"X"', json.dumps(manifest_digest(json.loads(dup)))))
    assert runtime.load(exp).classes == CLASSES
    if K.plan_available():
        K.Plan(exp, 10)
    many = dict(man, data=dict(man["data"], **{f"k{i}": 0 for i in range((1 << 20) + 1)}))
    many["manifest_sha256"] = manifest_digest(many)
    (exp / "manifest.json").write_text(json.dumps(many))
    _refused(exp, r"manifest.json: not valid JSON \(an object with more than 1048576 keys\)")


def _with_header(exp, edit):
    """The export's weights file with its safetensors header changed by ``edit`` (a dict ->
    dict), the data section kept, and the manifest's size and digests made consistent."""
    w = exp / "model.safetensors"
    blob = w.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(edit(json.loads(blob[8 : 8 + n]))).encode()
    header += b" " * (-len(header) % 8)
    new = len(header).to_bytes(8, "little") + header + blob[8 + n :]
    w.write_bytes(new)
    man = _manifest(exp)
    _edit(exp, file=dict(man["file"], bytes=len(new), sha256=hashlib.sha256(new).hexdigest()))


def _shift_first(header, delta):
    """The first tensor (by offset) moved ``delta`` bytes (its neighbours' bytes then overlap or
    leave a gap); its end stays within the file."""
    name = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = header[name]["data_offsets"]
    header[name]["data_offsets"] = [a + delta, b + delta]
    return header


@pytest.mark.parametrize("delta,where", [(4, "gap"), (-4, "overlap")])
def test_overlapping_or_gapped_tensor_offsets_are_refused_by_both_readers(exp, delta, where):
    # was: libbhvit accepted them, Python refused
    if delta < 0:  # an overlap: the second tensor starts 4 bytes early

        def edit(h):
            names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
            a, b = h[names[1]]["data_offsets"]
            h[names[1]]["data_offsets"] = [a - 4, b - 4]
            return h
    else:

        def edit(h):
            return _shift_first(h, 4)

    _with_header(exp, edit)
    _refused(exp, r"model.safetensors")


def test_a_weights_dtype_other_than_the_manifests_is_refused_by_both_readers(exp):
    # was: libbhvit took a float16 tensor where the manifest says float32 (it widens both)
    from safetensors.numpy import load_file, save_file

    t = load_file(str(exp / "model.safetensors"))
    name = next(k for k in t if k.endswith("head.bias"))
    t[name] = t[name].astype(np.float16)
    save_file(t, str(exp / "model.safetensors"))
    blob = (exp / "model.safetensors").read_bytes()
    man = _manifest(exp)
    _edit(exp, file=dict(man["file"], bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest()))
    _refused(exp, r"head.bias")


def test_one_export_at_a_time_per_directory_and_a_killed_ones_temp_files_go(tmp_path):
    # was: two exports into one directory could pair one's manifest with the other's weights
    from bhvit.rundir import RunLock, RunLocked

    out = tmp_path / "exp"
    out.mkdir()
    for name in (".model.safetensors.k1ll3d.tmp", ".manifest.json.abc_9.tmp", ".notes.abc.tmp"):
        (out / name).write_text("partial")
    with RunLock(out):  # as another export holding it would
        with pytest.raises(RunLocked, match="in use by another bhvit run"):
            export_model(_model(), out, data=DATA)
    export_model(_model(), out, data=DATA)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "manifest.json", ".notes.abc.tmp"} <= names
    assert not any(n.startswith((".model.", ".manifest.")) for n in names)
    assert runtime.load(out).classes == CLASSES


# The manifest's JSON subset (docs/EXPORT_FORMAT.md): each case is a value (raw bytes) put in
# the manifest's data entry, and whether both readers accept it.
_NEST = 63  # data.x's value is at depth 2: 63 nested arrays reach depth 64, the deepest allowed
JSON_CASES = [
    (b'"caf\\u00e9 \\ud83d\\ude00"', True),
    ('"café 😀"'.encode(), True),
    (b"[9223372036854775807, -9223372036854775808, -0, 1e5, 1.5E-3]", True),
    (b"[" * _NEST + b"]" * _NEST, True),
    (b"[" * (_NEST + 1) + b"]" * (_NEST + 1), False),
    (b'"a\\u0000b"', False),
    (b'"\\udc80"', False),
    (b'"\\ud83d"', False),
    (b'"\\ud83dx"', False),
    (b"9223372036854775808", False),
    (b"-9223372036854775809", False),
    (b"02", False),
    (b"0x10", False),
    (b"1.", False),
    (b".5", False),
    (b"1e", False),
    (b'"\xc0\x80"', False),  # an overlong NUL
    (b'"\xed\xa0\x80"', False),  # an encoded surrogate
    (b'"\xf4\x90\x80\x80"', False),  # above U+10FFFF
    (b'"\x01"', False),  # a raw control character
    (b"0." + b"0" * 397 + b"1", True),  # a number literal of 400 characters
    (b"0." + b"0" * 398 + b"1", False),  # of 401
]


@pytest.mark.parametrize("value,accepted", JSON_CASES, ids=[str(i) for i in range(len(JSON_CASES))])
def test_both_readers_accept_exactly_the_manifest_json_subset(exp, value, accepted):
    # was: Python accepted NUL escapes, integers >= 2^63, nesting deeper than 64 and lone
    # surrogates (canonicalised differently by C), C accepted 02 and overlong UTF-8
    man = _manifest(exp)
    del man["manifest_sha256"]
    text = json.dumps(man).encode().replace(b'"data": {', b'"data": {"x": ' + value + b", ", 1)
    try:
        digest = manifest_digest(json.loads(text.decode("utf-8")))
    except ValueError:
        digest = "0" * 64
    (exp / "manifest.json").write_bytes(text[:-1] + b', "manifest_sha256": "' + digest.encode() + b'"}')
    if accepted:
        runtime.load(exp)
        if K.plan_available():
            K.Plan(exp, 10)
    else:  # by the JSON reader itself, not by a digest that could not be computed
        _refused(exp, r"manifest.json: not valid JSON")
        if K.plan_available():
            with pytest.raises(K.PlanError, match="not valid JSON"):
                K.Plan(exp, 10)


def test_version_must_be_the_integer_2(exp):
    _edit(exp, version=2.0)
    _refused(exp, r"manifest.json: export version 2.0 is not supported")


def test_class_names_with_control_characters_are_escaped_on_export_and_refused_by_readers(exp, tmp_path):
    # was: a "\n" in a class name forged output lines of predict and bhvit_run --classes, and a
    # non-UTF-8 folder name (a lone surrogate) exported, then both readers refused the export
    names = [f"c{i}" for i in range(8)] + ["two\nlines", "caf\udce9"]
    export_model(_model(), tmp_path / "e", data=dict(DATA, classes=names))
    assert runtime.load(tmp_path / "e").classes[8:] == ["two\\x0alines", "caf\\xe9"]
    if K.plan_available():
        K.Plan(tmp_path / "e", 10)
    for bad in ("two\nlines", "x\x85y"):
        _rewrite(exp, data=dict(DATA, classes=[*CLASSES[:9], bad]))
        _refused(exp, r"manifest.json: data classes: .* holds a control character")


def test_a_shape_whose_product_wraps_64_bits_is_refused_by_both_readers(exp):
    # was: signed overflow in libbhvit: [2^30, 8, 2^30, 2] wrapped to 0 elements and passed
    man = _manifest(exp)
    name = next(k for k in man["tensors"] if k.endswith("head.bias"))
    tensors = dict(man["tensors"], **{name: {"dtype": "float32", "shape": [1 << 30, 8, 1 << 30, 2]}})
    _edit(exp, tensors=tensors)
    _refused(exp, r"manifest.json")


def test_null_resize_and_interpolation_mean_absent(exp, tmp_path):
    # was: accepted by both readers, then int(None) crashed predict with a traceback
    _rewrite(exp, data=dict(DATA, resize=None, interpolation=None))
    Image.new("RGB", (40, 36)).save(tmp_path / "x.png")
    assert runtime.load(exp).preprocess([tmp_path / "x.png"]).shape == (1, 3, 32, 32)
    (tmp_path / "not.png").write_text("not an image")
    with pytest.raises(OSError, match="cannot identify image file .*not.png"):
        runtime.load(exp).preprocess([tmp_path / "not.png"])
