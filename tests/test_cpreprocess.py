"""libbhvit's image preparation (bhvit_preprocess) against bhvit.runtime's prepare_image
(Pillow), bhvit_run on PPM/PGM files against the Python runtime, hostile Netpbm headers,
and `make install` (SONAME, pkg-config, a program linked against the installed library)."""

import ctypes
import os
import re
import shutil
import subprocess

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

import bhvit
from bhvit import runtime
from bhvit.export import export_model
from bhvit.runtime.image import prepare_image
from test_capi import CROSS, HAVE_ARM, QEMU, ROOT, _logits, _make

pytestmark = pytest.mark.skipif(
    shutil.which("make") is None or shutil.which("gcc") is None, reason="needs make and gcc"
)
PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    b = tmp_path_factory.mktemp("build")
    _make(b, "-j2")
    return b


@pytest.fixture(scope="module")
def lib(build):
    lib = ctypes.CDLL(str(build / "libbhvit.so"))
    lib.bhvit_last_error.restype = ctypes.c_char_p
    lib.bhvit_preprocess.argtypes = [ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p]
    return lib


class Model:
    def __init__(self, lib, path):
        self.lib, self.h = lib, ctypes.c_void_p()
        assert lib.bhvit_load(str(path).encode(), 1, ctypes.byref(self.h)) == 0, lib.bhvit_last_error()
        self.chans, self.size = lib.bhvit_in_chans(self.h), lib.bhvit_img_size(self.h)

    def prepare(self, pixels, channels=None):
        """(rc, float32 CHW) of bhvit_preprocess on a uint8 HxW or HxWxC array."""
        a = np.ascontiguousarray(pixels, np.uint8)
        h, w = a.shape[:2]
        c = (a.shape[2] if a.ndim == 3 else 1) if channels is None else channels
        out = np.full((self.chans, self.size, self.size), np.nan, np.float32)
        rc = self.lib.bhvit_preprocess(self.h, a.ctypes.data, w, h, c, out.ctypes.data)
        return rc, out

    def close(self):
        self.lib.bhvit_free(self.h)


def _export(path, in_chans=3, **data):
    torch.manual_seed(0)
    m = bhvit.create_model("bhvit_micro_c32", num_classes=10, in_chans=in_chans).eval()
    base = {"mean": [0.485, 0.456, 0.406][:in_chans], "std": [0.229, 0.224, 0.225][:in_chans]}
    export_model(m, path, data={**base, **data} if data.get("mean", 1) is not None else None)
    return path


def _vertical_first(w, h, resize):
    """Whether Pillow 13 resamples this image vertically first (the height loses more than
    twice the pixels the width does); Pillow 12 and older always go horizontally first."""
    short, long = min(w, h), max(w, h)
    nl = int(resize * long / short)
    nw, nh = (resize, nl) if w <= h else (nl, resize)
    return nw != w and nh != h and nh < h and h - nh > 2 * (w - nw)


# (width, height): smaller and larger than the resize, square, portrait, landscape,
# extreme aspect ratios, already the crop size (no resampling), a single pixel
SHAPES = [(32, 32), (17, 23), (64, 48), (48, 64), (300, 7), (5, 300), (1, 1), (33, 32), (157, 354), (640, 480)]
EXPORTS = [  # in_chans, data: the transform's four kinds and both channel conversions
    (3, {}),
    (3, {"resize": 40, "interpolation": "bicubic"}),
    (1, {"resize": 37, "interpolation": "bilinear"}),
    (1, {"interpolation": "bicubic"}),
]


@pytest.mark.parametrize("in_chans,data", EXPORTS, ids=["rgb-none", "rgb-bicubic40", "grey-bilinear37", "grey-bicubic"])
def test_c_preprocess_equals_prepare_image_exactly(lib, tmp_path, in_chans, data):
    """bhvit_preprocess gives prepare_image's float32 input bit for bit (max abs difference 0)
    on random, smooth and black-and-white images of ten shapes, grey and RGB."""
    m = Model(lib, _export(tmp_path / "exp", in_chans, **data))
    rng = np.random.default_rng(in_chans * 10 + len(data))
    compared = 0
    try:
        for i, (w, h) in enumerate(SHAPES):
            if not PILLOW_13 and _vertical_first(w, h, data.get("resize", 32)):
                continue
            for channels in (1, 3):
                shape = (h, w, 3) if channels == 3 else (h, w)
                kind = (i + channels) % 3
                if kind == 0:
                    a = rng.integers(0, 256, shape)
                elif kind == 1:  # smooth: the rounding of every pass matters
                    yy, xx = np.mgrid[0:h, 0:w]
                    a = (
                        (xx * 7 + yy * 3 + 40) % 256
                        if channels == 1
                        else np.stack([(xx * 5 + yy * (2 + c)) % 256 for c in range(3)], -1)
                    )
                else:  # black and white: the bicubic overshoot clipped at 0 and 255
                    a = rng.integers(0, 2, shape) * 255
                a = a.astype(np.uint8)
                f = tmp_path / f"{w}x{h}x{channels}.png"
                Image.fromarray(a).save(f)
                want = prepare_image(f, in_chans, 32, _data_of(tmp_path))
                rc, got = m.prepare(a)
                assert rc == 0, lib.bhvit_last_error()
                assert got.shape == want.shape == (in_chans, 32, 32)
                assert np.abs(got - want).max() == 0, (w, h, channels)
                compared += 1
    finally:
        m.close()
    assert compared >= (16 if PILLOW_13 else 10)


def _data_of(tmp_path):
    import json

    return json.loads((tmp_path / "exp" / "manifest.json").read_text())["data"]


def test_c_preprocess_concrete_values_and_errors(lib, tmp_path):
    m = Model(lib, _export(tmp_path / "exp", 3, resize=48, interpolation="bicubic"))
    try:
        # a flat image stays flat through both filters: (v - 255 mean) / (255 std) in float32
        for w, h in [(1, 1), (7, 300), (500, 20)]:
            rc, out = m.prepare(np.full((h, w, 3), 200, np.uint8))
            assert rc == 0
            want = (np.float32(200) - np.float32([0.485, 0.456, 0.406]) * np.float32(255)) / (
                np.float32([0.229, 0.224, 0.225]) * np.float32(255)
            )
            assert np.array_equal(out, np.broadcast_to(want[:, None, None], out.shape).astype(np.float32))
        # a grey image in each of the three channels
        g = np.random.default_rng(0).integers(0, 256, (40, 50)).astype(np.uint8)
        rc, grey = m.prepare(g)
        rc3, rgb = m.prepare(np.repeat(g[:, :, None], 3, 2))
        assert rc == rc3 == 0 and np.array_equal(grey, rgb)
        # bad arguments: BHVIT_E_INPUT (3) and a message, the output untouched
        for pixels, channels, msg in [
            (np.zeros((4, 4, 2), np.uint8), 2, b"channels must be 1 (grey) or 3 (RGB), got 2"),
            (np.zeros((4, 4, 4), np.uint8), 4, b"got 4"),
        ]:
            rc, out = m.prepare(pixels, channels)
            assert rc == 3 and msg in lib.bhvit_last_error() and np.isnan(out).all()
        px = np.zeros(16, np.uint8)
        out = np.zeros((3, 32, 32), np.float32)
        for w, h in [(0, 4), (4, -1), (2**31, 1), (1, 2**40)]:
            assert lib.bhvit_preprocess(m.h, px.ctypes.data, w, h, 3, out.ctypes.data) == 3
            assert b"out of range" in lib.bhvit_last_error()
        assert lib.bhvit_preprocess(m.h, None, 4, 4, 3, out.ctypes.data) == 3
        assert lib.bhvit_preprocess(None, px.ctypes.data, 4, 4, 3, out.ctypes.data) == 3
    finally:
        m.close()
    # an export without mean and std cannot prepare images
    m = Model(lib, _export(tmp_path / "nonorm", 3, mean=None))
    try:
        rc, _ = m.prepare(np.zeros((8, 8, 3), np.uint8))
        assert rc == 3 and b"no data mean and std" in lib.bhvit_last_error()
    finally:
        m.close()


def _write_pnm(path, magic, w, h, maxval, samples, header=None):
    """A binary Netpbm file written by hand (maxvals and comments Pillow does not write)."""
    a = np.asarray(samples)
    body = a.astype(">u2").tobytes() if maxval > 255 else a.astype(np.uint8).tobytes()
    path.write_bytes((header or f"{magic}\n{w} {h}\n{maxval}\n").encode() + body)
    return path


def _run(build, *args, env=None):
    return subprocess.run(
        [str(build / "bhvit_run"), *map(str, args)], capture_output=True, timeout=300, env=env, text=True
    )


def test_demo_on_ppm_and_pgm_files_matches_the_python_runtime(build, tmp_path):
    """bhvit_run on PPM and PGM files (Pillow's, 8-bit maxvals other than 255, 16-bit, a
    header with comments) prints the Python runtime's logits for the same files."""
    rng = np.random.default_rng(1)
    rgb, grey = rng.integers(0, 256, (50, 70, 3)), rng.integers(0, 256, (90, 45))
    files = [tmp_path / "a.ppm", tmp_path / "b.pgm"]
    Image.fromarray(rgb.astype(np.uint8)).save(files[0])
    Image.fromarray(grey.astype(np.uint8)).save(files[1])
    assert files[0].read_bytes()[:2] == b"P6" and files[1].read_bytes()[:2] == b"P5"
    files.append(_write_pnm(tmp_path / "c.ppm", "P6", 40, 33, 100, rng.integers(0, 101, (33, 40, 3))))
    files.append(_write_pnm(tmp_path / "d.pgm", "P5", 33, 60, 1000, rng.integers(0, 1001, (60, 33))))
    files.append(_write_pnm(tmp_path / "e.PGM", "P5", 36, 36, 65535, rng.integers(0, 65536, (36, 36))))
    files.append(_write_pnm(tmp_path / "f.ppm", "P6", 30, 31, 65535, rng.integers(0, 65536, (31, 30, 3))))
    header = "P6\n# made by hand\n 41\t# width\n\n29 # height\n255\n"
    files.append(_write_pnm(tmp_path / "g.pnm", "P6", 41, 29, 255, rng.integers(0, 256, (29, 41, 3)), header))
    files.append(_write_pnm(tmp_path / "h.pgm", "P5", 40, 40, 300, rng.integers(0, 200, (40, 40))))  # all <= 255
    for in_chans, data in [(3, {"resize": 40, "interpolation": "bicubic"}), (1, {})]:
        exp = _export(tmp_path / f"exp{in_chans}", in_chans, **data)
        rt = runtime.load(exp)
        want = rt(rt.preprocess(files))
        out = _run(build, exp, *files, "--batch", "3")
        assert out.returncode == 0, out.stderr
        got = np.array([[float(v) for v in line.split()] for line in out.stdout.splitlines()], np.float32)
        assert got.shape == (len(files), 10)
        assert np.abs(got - want).max() <= 1e-6 * (float(np.abs(want).max()) + 1)  # printed with 9 digits
        out = _run(build, exp, *files[:2], "--classes")
        assert [int(line.split()[0]) for line in out.stdout.splitlines()] == list(want[:2].argmax(1))


HOSTILE = [
    (b"P3\n2 2\n255\n" + b"0 " * 12, "not a binary PGM (P5) or PPM (P6) file (plain"),
    (b"GIF89a", "not a binary PGM (P5) or PPM (P6) file"),
    (b"P6", "not a binary PGM (P5) or PPM (P6) file"),
    (b"P6\n", "truncated Netpbm header (no width)"),
    (b"P6\n4 4", "truncated Netpbm header (it ends after the height)"),
    (b"P6\n12345678901 1\n255\n", "Netpbm width has more than 10 digits"),
    (b"P6\n0 5\n255\n", "Netpbm width 0 is out of range (1 to 2147483647)"),
    (b"P6\n4 -4\n255\n", "the height is not a decimal number followed by whitespace"),
    (b"P6\n4#c\n4\n255\n", "the width is not a decimal number followed by whitespace"),
    (b"P6\n4 4\n0\n", "Netpbm maxval 0 is out of range (1 to 65535)"),
    (b"P6\n4 4\n65536\n", "Netpbm maxval 65536 is out of range"),
    (b"P6\n4 4\n255\n" + bytes(10), "truncated: 10 bytes of pixels, the header (4 x 4, maxval 255) needs 48"),
    (b"P5\n4 4\n1000\n" + bytes(31), "truncated: 31 bytes of pixels, the header (4 x 4, maxval 1000) needs 32"),
    (b"P6\n100000 100000\n255\n", "100000 x 100000 = 10000000000 pixels, more than the limit of 50000000"),
    (b"P6\n2147483647 2147483647\n255\n", "more than the limit of 50000000"),
    (b"P6\n#" + b"x" * 70000, "Netpbm header longer than 65536 bytes"),
]


def test_demo_refuses_hostile_netpbm_files(build, tmp_path):
    exp = _export(tmp_path / "exp", 3)
    good = tmp_path / "good.ppm"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    for i, (content, msg) in enumerate(HOSTILE):
        bad = tmp_path / f"bad{i}.ppm"
        bad.write_bytes(content)
        out = _run(build, exp, good, bad)  # the good image is printed first, then the error
        assert out.returncode == 2 and len(out.stdout.splitlines()) == 1, (content[:40], out.stderr)
        assert out.stderr.strip() == f"bhvit_run: {bad}: {msg}" or (
            out.stderr.startswith(f"bhvit_run: {bad}: ") and msg in out.stderr
        ), (content[:40], out.stderr)
    missing = _run(build, exp, tmp_path / "missing.pgm")
    assert missing.returncode == 2 and "missing.pgm: cannot open (No such file or directory)" in missing.stderr
    if hasattr(os, "mkfifo"):  # a FIFO is refused, not waited on
        os.mkfifo(tmp_path / "fifo.ppm")
        out = _run(build, exp, tmp_path / "fifo.ppm")
        assert out.returncode == 2 and "fifo.ppm: not a regular file" in out.stderr
    # the pixel limit follows BHVIT_MAX_IMAGE_PIXELS, as in Python
    env = {**os.environ, "BHVIT_MAX_IMAGE_PIXELS": "63"}
    out = _run(build, exp, good, env=env)
    assert out.returncode == 2 and "8 x 8 = 64 pixels, more than the limit of 63" in out.stderr
    out = _run(build, exp, good, env={**os.environ, "BHVIT_MAX_IMAGE_PIXELS": "lots"})
    assert out.returncode == 2 and "BHVIT_MAX_IMAGE_PIXELS must be a positive integer, got 'lots'" in out.stderr
    # --normalize is for raw input; raw and image inputs do not mix
    out = _run(build, exp, good, "--normalize")
    assert out.returncode == 2 and "--normalize is for raw float32 input" in out.stderr
    out = _run(build, exp, good, tmp_path / "x.f32")
    assert out.returncode == 2 and "usage" in out.stderr
    # an export without mean and std cannot prepare images
    out = _run(build, _export(tmp_path / "nonorm", 3, mean=None), good)
    assert out.returncode == 2 and "good.ppm: the export has no data mean and std" in out.stderr


def _header_version(name):
    header = (ROOT / "bhvit/runtime/csrc/bhvit.h").read_text()
    return int(re.search(rf"^#define {name} (\d+)", header, re.M).group(1))


def _pkg_config(pc_dir, *args):
    env = {**os.environ, "PKG_CONFIG_PATH": str(pc_dir)}
    if shutil.which("pkg-config"):
        out = subprocess.run(["pkg-config", *args, "bhvit"], env=env, capture_output=True, text=True, check=True)
        return out.stdout.split()
    # no pkg-config: read the file's variables and fields ourselves
    text = (pc_dir / "bhvit.pc").read_text()
    var = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    field = dict(re.findall(r"^([\w.]+): (.*)$", text, re.M))
    expand = lambda s: re.sub(r"\$\{(\w+)\}", lambda m: var[m.group(1)], s)  # noqa: E731
    if args == ("--modversion",):
        return [field["Version"]]
    return expand(field["Cflags"]).split() + expand(field["Libs"]).split()


def test_make_install_soname_pkg_config_and_a_linked_program(build, tmp_path):
    major, minor, patch = (
        _header_version(n) for n in ("BHVIT_API_VERSION", "BHVIT_VERSION_MINOR", "BHVIT_VERSION_PATCH")
    )
    version = f"{major}.{minor}.{patch}"
    # staged install (DESTDIR) into a prefix with a space in it
    stage, prefix = tmp_path / "stage", "/opt/bh vit"
    _make(build, "install", f"DESTDIR={stage}", f"PREFIX={prefix}")
    root = stage / prefix.lstrip("/")
    lib = root / "lib"
    assert (root / "include/bhvit.h").read_bytes() == (ROOT / "bhvit/runtime/csrc/bhvit.h").read_bytes()
    assert (lib / f"libbhvit.so.{version}").is_file() and not (lib / f"libbhvit.so.{version}").is_symlink()
    assert os.readlink(lib / f"libbhvit.so.{major}") == f"libbhvit.so.{version}"
    assert os.readlink(lib / "libbhvit.so") == f"libbhvit.so.{major}"
    assert (lib / "libbhvit.a").is_file() and os.access(root / "bin/bhvit_run", os.X_OK)
    pc = (lib / "pkgconfig/bhvit.pc").read_text()
    assert f"prefix={prefix}\n" in pc and f"Version: {version}\n" in pc and "Libs: -L${libdir} -lbhvit\n" in pc
    assert re.search(r"^Libs.private: (-fopenmp )?-lm$", pc, re.M)
    _make(build, "uninstall", f"DESTDIR={stage}", f"PREFIX={prefix}")
    assert not [p for p in stage.rglob("*") if not p.is_dir()]
    # a real prefix: pkg-config's flags build a program against the installed library
    prefix = tmp_path / "usr"
    _make(build, "install", f"PREFIX={prefix}")
    lib = prefix / "lib"
    if shutil.which("readelf"):
        dyn = subprocess.run(["readelf", "-d", str(lib / "libbhvit.so")], capture_output=True, text=True).stdout
        assert f"Library soname: [libbhvit.so.{major}]" in dyn
    assert _pkg_config(lib / "pkgconfig", "--modversion") == [version]
    flags = _pkg_config(lib / "pkgconfig", "--cflags", "--libs")
    assert f"-I{prefix}/include" in flags and f"-L{lib}" in flags and "-lbhvit" in flags
    prog = tmp_path / "preprocess_check"
    subprocess.run(
        ["gcc", "-O1", "-o", str(prog), str(ROOT / "tests/c/preprocess_check.c"), *flags], check=True, timeout=120
    )
    if shutil.which("readelf"):
        dyn = subprocess.run(["readelf", "-d", str(prog)], capture_output=True, text=True).stdout
        assert f"Shared library: [libbhvit.so.{major}]" in dyn
    exp = _export(tmp_path / "exp", 3, resize=36, interpolation="bicubic")
    a = np.random.default_rng(2).integers(0, 256, (45, 60, 3)).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    env = {**os.environ, "LD_LIBRARY_PATH": str(lib)}
    out = subprocess.run(
        [str(prog), str(exp), "60", "45", "3"], input=a.tobytes(), env=env, capture_output=True, timeout=120
    )
    assert out.returncode == 0, out.stderr.decode()
    got = np.frombuffer(out.stdout, np.float32)
    x = runtime.load(exp).preprocess(tmp_path / "a.png")
    assert got.size == x.size + 10 and np.array_equal(got[: x.size].reshape(x.shape), x)
    want = runtime.load(exp)(x)[0]
    assert np.abs(got[x.size :] - want).max() <= 1e-5 * (float(np.abs(want).max()) + 1)
    # the same with the run path in the program (-Wl,-rpath) instead of LD_LIBRARY_PATH
    subprocess.run(
        ["gcc", "-o", str(prog), str(ROOT / "tests/c/preprocess_check.c"), *flags, f"-Wl,-rpath,{lib}"],
        check=True,
        timeout=120,
    )
    out2 = subprocess.run([str(prog), str(exp), "60", "45", "3"], input=a.tobytes(), capture_output=True, timeout=120)
    assert out2.returncode == 0 and out2.stdout == out.stdout
    out = subprocess.run(
        [str(prefix / "bin/bhvit_run"), str(exp), "-"], input=x.tobytes(), capture_output=True, timeout=120
    )
    assert out.returncode == 0 and np.abs(_logits(out)[0] - want).max() <= 1e-5 * (float(np.abs(want).max()) + 1)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_ARM, reason="needs gcc-aarch64-linux-gnu and qemu-user (apt)")
def test_aarch64_preprocess_is_bit_exact_under_qemu(tmp_path):
    """The ARM64 build prepares images bit for bit as Pillow does on x86 (no fused multiply-add
    in the weights), and its bhvit_run reads PPM files."""
    arm = tmp_path / "arm"
    _make(arm, f"CROSS={CROSS}", "-j2")
    out_dir = arm / CROSS.rstrip("-")
    prog = out_dir / "preprocess_check"
    subprocess.run(
        [
            CROSS + "gcc",
            "-O2",
            "-I",
            str(ROOT / "bhvit/runtime/csrc"),
            "-o",
            str(prog),
            str(ROOT / "tests/c/preprocess_check.c"),
            str(out_dir / "libbhvit.a"),
            "-fopenmp",
            "-lm",
        ],
        check=True,
        timeout=120,
    )
    exp = _export(tmp_path / "exp", 3, resize=40, interpolation="bicubic")
    rng = np.random.default_rng(3)
    for w, h in [(70, 50), (157, 354), (31, 33)]:
        a = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        Image.fromarray(a).save(tmp_path / "a.ppm")
        out = subprocess.run(
            [*QEMU, str(prog), str(exp), str(w), str(h), "3"], input=a.tobytes(), capture_output=True, timeout=300
        )
        assert out.returncode == 0, out.stderr.decode()
        x = prepare_image(tmp_path / "a.ppm", 3, 32, _data_of(tmp_path))
        assert np.array_equal(np.frombuffer(out.stdout, np.float32)[: x.size].reshape(x.shape), x)
        demo = subprocess.run(
            [*QEMU, str(out_dir / "bhvit_run"), str(exp), str(tmp_path / "a.ppm"), "--classes"],
            capture_output=True,
            timeout=300,
        )
        assert demo.returncode == 0 and int(demo.stdout.split()[0]) == int(runtime.load(exp)(x[None]).argmax())
