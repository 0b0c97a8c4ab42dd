"""libbhvit without Python: the Makefile build, the kernels' self-check, the bhvit_run demo
against bhvit.runtime and PyTorch, and (where Debian's cross compiler and qemu-user are
installed) the same on ARM64 under emulation."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import bhvit
from bhvit import runtime
from bhvit.export import export_model
from test_runtime import VARIANTS, _check, _trained_like

ROOT = Path(__file__).resolve().parents[1]
CROSS = "aarch64-linux-gnu-"
QEMU = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]
HAVE_ARM = shutil.which(CROSS + "gcc") is not None and shutil.which(QEMU[0]) is not None
pytestmark = pytest.mark.skipif(
    shutil.which("make") is None or shutil.which("gcc") is None, reason="needs make and gcc"
)


def _make(build, *args):
    out = subprocess.run(["make", "-s", f"BUILD={build}", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    b = tmp_path_factory.mktemp("build")
    _make(b, "-j2")
    return b


def _demo(cmd, export, x, *args, check=True):
    out = subprocess.run(
        [*cmd, str(export), "-", *args],
        input=np.ascontiguousarray(x, np.float32).tobytes(),
        capture_output=True,
        timeout=300,
    )
    if check:
        assert out.returncode == 0, out.stderr.decode()
    return out


def _logits(out):
    return np.array([[float(v) for v in line.split()] for line in out.stdout.decode().splitlines()], np.float32)


def test_kernel_self_check(build):
    out = _make(build, "check")
    assert "ok c-portable" in out and "FAIL" not in out


# every ablation variant goes through the same plan in test_runtime.py; here the C-only path
DEMO_VARIANTS = [VARIANTS[i] for i in (0, 1, 3, 4, 8, 9, 10)]


@pytest.mark.parametrize("name,over", DEMO_VARIANTS, ids=[f"{n}-{o}" for n, o in DEMO_VARIANTS])
def test_demo_matches_the_python_runtime_and_pytorch(build, name, over, tmp_path):
    torch.manual_seed(3)
    m = _trained_like(name, **over)
    export_model(m, tmp_path)
    c = m.cfg
    x = torch.randn(5, c.in_chans, c.img_size, c.img_size)
    with torch.no_grad():
        ref = m(x).numpy()
    out = _logits(_demo([str(build / "bhvit_run")], tmp_path, x.numpy(), "--batch", "2"))
    assert out.shape == (5, 10)
    py = runtime.load(tmp_path)(x.numpy())
    assert np.abs(out - py).max() <= 1e-6 * (float(np.abs(py).max()) + 1)  # printed with 9 digits
    _check(out, ref)


def test_demo_classes_normalize_and_errors(build, tmp_path):
    torch.manual_seed(0)
    m = bhvit.create_model("bhvit_micro_c32", num_classes=10).eval()
    data = {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3], "classes": [f"class {i}" for i in range(10)]}
    export_model(m, tmp_path / "exp", data=data)
    exp = tmp_path / "exp"
    demo = [str(build / "bhvit_run")]
    pixels = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32)).astype(np.float32)
    from bhvit.runtime.image import normalize_images

    want = runtime.load(exp)(normalize_images(pixels.astype(np.uint8), data["mean"], data["std"])).argmax(1)
    lines = _demo(demo, exp, pixels, "--normalize", "--classes").stdout.decode().splitlines()
    assert lines == [f"{k} class {k}" for k in want]
    # errors: one line on stderr and a nonzero exit, never a crash
    bad = _demo(demo, tmp_path / "missing", pixels, check=False)
    assert bad.returncode == 2 and b"missing: no such export" in bad.stderr
    bad = _demo(demo, exp, pixels[:, :, :10], check=False)
    assert bad.returncode == 2 and b"are not a whole float32 image of 3 x 32 x 32" in bad.stderr
    nan = pixels.copy()
    nan[1, 0, 3, 4] = np.nan
    bad = _demo(demo, exp, nan, "--batch", "3", check=False)
    assert bad.returncode == 1 and b"NaN or infinite pixels" in bad.stderr
    bad = _demo(demo, exp, pixels, "--threads", "-1", check=False)
    assert bad.returncode == 2 and b"usage" in bad.stderr
    (exp / "model.safetensors").write_bytes(b"\0" * (exp / "model.safetensors").stat().st_size)
    bad = _demo(demo, exp, pixels, check=False)
    assert bad.returncode == 2 and b"SHA-256 does not match" in bad.stderr
    no_norm = tmp_path / "nonorm"
    export_model(m, no_norm)
    bad = _demo(demo, no_norm, pixels, "--normalize", check=False)
    assert bad.returncode == 2 and b"no data mean and std" in bad.stderr


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
def test_shared_library_exports_the_header_and_links(build, tmp_path):
    """Every function bhvit.h declares is exported by libbhvit.so, no bhvit_ symbol beyond
    them and none of the internals (bhvi_); every global of libbhvit.a is prefixed; the demo
    linked against the shared library instead of the static one gives the same logits."""
    import re

    header = (ROOT / "bhvit/runtime/csrc/bhvit.h").read_text()
    declared = set(re.findall(r"\b(bhvit_[a-z_]+)\(", header)) - {"bhvit_model"}
    nm = subprocess.run(
        ["nm", "-D", "--defined-only", str(build / "libbhvit.so")], capture_output=True, text=True, check=True
    ).stdout
    exported = {line.split()[-1] for line in nm.splitlines() if line.split()[1:2] == ["T"]}
    assert declared == {e for e in exported if e.startswith("bhvit_")}
    assert not {e for e in exported if not e.startswith(("bhvit_", "bhv_"))}
    assert {"bhv_xnor_gemm_pp", "bhv_binary_linear_pp", "bhv_select"} <= exported  # the ctypes kernels
    # the static library: every global carries the library's prefix (bhvit_ API, bhv_ kernels,
    # bhvi_ internals), so a program that links it meets no clash with its own names
    nm = subprocess.run(["nm", str(build / "libbhvit.a")], capture_output=True, text=True, check=True).stdout
    defined = {f[2] for f in (line.split() for line in nm.splitlines()) if len(f) == 3 and f[1] in "TDBR"}
    assert defined and all(n.startswith(("bhvit_", "bhv_", "bhvi_")) for n in defined), sorted(defined)
    dyn = tmp_path / "bhvit_run_dyn"
    subprocess.run(
        ["gcc", "-O1", "-o", str(dyn), str(ROOT / "bhvit/runtime/csrc/bhvit_run.c"), f"-L{build}", "-lbhvit", "-lm"],
        check=True,
        timeout=120,
    )
    torch.manual_seed(1)
    m = bhvit.create_model("bhvit_micro_c32", num_classes=10).eval()
    export_model(m, tmp_path / "exp")
    x = torch.randn(3, 3, 32, 32).numpy()
    import os

    env = {**os.environ, "LD_LIBRARY_PATH": str(build)}
    out = subprocess.run(
        [str(dyn), str(tmp_path / "exp"), "-", "--classes"],
        input=x.tobytes(),
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr.decode()
    static = _demo([str(build / "bhvit_run")], tmp_path / "exp", x, "--classes")
    assert out.stdout == static.stdout and len(out.stdout.splitlines()) == 3


@pytest.mark.slow
def test_demo_accuracy_on_a_trained_checkpoint_equals_pytorch(build, tmp_path, capsys):
    from bhvit.cli import main
    from bhvit.data import load_dataset, normalize
    from synth import trained_micro_run

    fm, run = trained_micro_run(tmp_path)
    assert main(["export", str(run), str(tmp_path / "exp")]) == 0
    model, doc = bhvit.checkpoint.load_model(run)
    ds = load_dataset("fashion-mnist", "test", str(fm))
    with torch.no_grad():
        tpred = model(normalize(ds.images, doc["data"]["mean"], doc["data"]["std"])).argmax(1).numpy()
    lines = (
        _demo(
            [str(build / "bhvit_run")],
            tmp_path / "exp",
            ds.images.numpy().astype(np.float32),
            "--normalize",
            "--classes",
            "--batch",
            "32",
        )
        .stdout.decode()
        .splitlines()
    )
    pred = np.array([int(line.split()[0]) for line in lines])
    labels = ds.labels.numpy()
    assert (pred == tpred).all()
    assert (pred == labels).mean() == (tpred == labels).mean()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_ARM, reason="needs gcc-aarch64-linux-gnu and qemu-user (apt)")
def test_aarch64_neon_under_qemu(build, tmp_path):
    arm = tmp_path / "arm"
    _make(arm, f"CROSS={CROSS}", "-j2")
    out = _make(arm, f"CROSS={CROSS}", "check", "RUN=" + " ".join(QEMU))
    assert "ok c-neon" in out and "ok c-portable" in out
    demo = QEMU + [str(arm / "aarch64-linux-gnu" / "bhvit_run")]
    for name, over in [
        ("bhvit_micro_c32", {}),
        ("bhvit_micro_c32", {"norm": "ln"}),
        ("bhvit_micro_c32", {"hybrid": "msmha", "qd": False}),
    ]:
        torch.manual_seed(4)
        m = _trained_like(name, **over)
        export_model(m, tmp_path / "exp", float16=True)
        x = torch.randn(4, 3, 32, 32).numpy()
        x86 = _logits(_demo([str(build / "bhvit_run")], tmp_path / "exp", x, "--batch", "4"))
        for kernels in ("c-neon", "c-portable"):
            got = _logits(_demo(demo, tmp_path / "exp", x, "--batch", "4", "--kernels", kernels))
            assert (got.argmax(1) == x86.argmax(1)).all()
            _check(got, x86)


@pytest.mark.skipif(__import__("release_ref").release_dir() is None, reason="needs ../shared (the authors' release)")
def test_converted_release_model_gives_pytorchs_top1_in_python_and_c(build, tmp_path):
    """The authors' BHViT-Tiny (random weights, their code's file format), converted and exported:
    on real photographs prepared with the release's evaluation transform, bhvit.runtime and the C
    demo (pixels 0..255, --normalize with the manifest's ImageNet mean/std) pick PyTorch's class."""
    import release_ref as R
    from bhvit.checkpoint import load_model
    from bhvit.release import convert_release
    from bhvit.runtime.image import decode_image, normalize_images

    args = R.release_args("tiny", nb_classes=10)
    rel = R.build_release(args)
    R.randomise(rel, 5)
    convert_release(R.save_like_main_new(rel, args, tmp_path / "c.pth"), tmp_path / "conv")
    model, doc = load_model(tmp_path / "conv")
    export_model(model, tmp_path / "exp", data=doc["data"])
    files = []
    for i, jpeg in enumerate(R.cifar_test_jpegs(1)):
        files.append(tmp_path / f"{i}.jpg")
        files[-1].write_bytes(jpeg)
    data = doc["data"]
    pixels = np.stack([decode_image(f, 3, 224, resize=256, interpolation="bicubic") for f in files])
    x = normalize_images(pixels, data["mean"], data["std"])
    with torch.no_grad():
        want = model(torch.from_numpy(x)).argmax(1).numpy()
    rt = runtime.load(tmp_path / "exp")
    assert np.array_equal(rt.preprocess(files), x)  # the manifest carries the transform
    assert np.array_equal(rt(x).argmax(1), want)
    out = _demo([str(build / "bhvit_run")], tmp_path / "exp", pixels.astype(np.float32), "--normalize")
    assert np.array_equal(_logits(out).argmax(1), want)


def test_demo_refuses_a_partial_trailing_image_and_the_api_caps_threads(build, tmp_path):
    import ctypes

    torch.manual_seed(0)
    export_model(bhvit.create_model("bhvit_micro_c32", num_classes=10).eval(), tmp_path)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32).reshape(-1)
    # was: 2 2/3 images gave 2 lines and exit status 0
    out = _demo([str(build / "bhvit_run")], tmp_path, x[: len(x) * 8 // 9], check=False)
    assert out.returncode == 2 and len(out.stdout.decode().splitlines()) == 2
    assert b"8192 bytes after image 2 are not a whole float32 image of 3 x 32 x 32" in out.stderr
    # was: bhvit_load(dir, 100000, ...) ended in SIGSEGV
    lib = ctypes.CDLL(str(build / "libbhvit.so"))
    lib.bhvit_last_error.restype = ctypes.c_char_p
    m = ctypes.c_void_p()
    assert lib.bhvit_load(str(tmp_path).encode(), 100000, ctypes.byref(m)) == 3  # BHVIT_E_INPUT
    assert b"threads must be 0 (all cores) to 4096, got 100000" in lib.bhvit_last_error()
    assert lib.bhvit_load(str(tmp_path).encode(), 1, ctypes.byref(m)) == 0
    assert lib.bhvit_set_threads(m, 100000) == 3
    lib.bhvit_free(m)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_threads_start_once_per_process_and_the_profile_prints(build, tmp_path):
    # libbhvit reuses OpenMP's thread pool: batch 1 (kernels split) and batch 4 (tiles on
    # workers) on 2 threads start at most one extra thread per process, whatever the runs
    # (was: a kernel region nested in a one-thread region started new threads, 42 per run);
    # BHVIT_PROFILE=1 prints the op-kind table at bhvit_free
    torch.manual_seed(0)
    export_model(bhvit.create_model("bhvit_micro_c32", num_classes=10).eval(), tmp_path)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    for batch in ("1", "4"):
        out = _demo(
            ["strace", "-f", "-c", "-e", "trace=clone,clone3", str(build / "bhvit_run")],
            tmp_path,
            x,
            "--threads",
            "2",
            "--batch",
            batch,
            "--repeat",
            "5",
        )
        err = out.stderr.decode()
        calls = sum(int(f[3]) for f in (ln.split() for ln in err.splitlines()) if f[-1:] in (["clone"], ["clone3"]))
        assert calls <= 1, err
    import os

    out = subprocess.run(
        [str(build / "bhvit_run"), str(tmp_path), "-", "--threads", "1", "--repeat", "3"],
        input=x[:1].tobytes(),
        capture_output=True,
        env=dict(os.environ, BHVIT_PROFILE="1"),
        timeout=120,
        check=True,
    )
    err = out.stderr.decode()
    assert "libbhvit profile: 3 runs, 3 images, 1 threads" in err and "binary conv (implicit GEMM)" in err, err
