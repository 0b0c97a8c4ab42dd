"""Latency of the bit-packed runtime vs PyTorch, binary GEMM throughput, peak memory.

For each model, batch size and thread count, times (interleaved, median of --runs; each timed call
follows at least 0.5 s of untimed calls of the same entry, so that no entry pays for the previous
one's cache footprint or clock):
  runtime  - bhvit.runtime on the exported binary model: libbhvit's prepared plan, one C call
  walker   - bhvit.runtime's Python graph walker over the same C kernels (the reference)
  capi     - the bhvit_run demo (C only, no Python), its own median of --runs (needs `make`)
  fp32     - the same architecture in PyTorch float32 (binary=False), eval, no_grad
  onnxrt   - ONNX Runtime float32 on the same FP twin (if onnxruntime is installed: pip install -e ".[bench]")
  binsim   - the PyTorch binary model (float tensors holding +-1), eval, no_grad
and prints fp32/runtime and onnxrt/runtime, and the 2-thread speed-up. Then the binary GEMM kernel against
torch.matmul float32 on the model's own binary-linear shapes, and the peak resident
memory of a fresh process that loads and runs each variant once.

    python benchmarks/runtime_latency.py --models bhvit_tiny bhvit_tiny_c32 --batches 1 16 --threads 1 2

``--set KEY=VALUE`` changes the binary model of the latency table (e.g. ``fp_downsample=true``);
models named ``*_c28``/``*_c32`` get 10 classes, the others 1000.
Build the C demo first (``make``) for the capi column and its memory.

Another kernel variant than the CPU's best runs everywhere with ``BHVIT_KERNELS`` (the C demo
gets the same ``--kernels``). An AVX2-only machine, approximately, on an AVX-512 one:

    BHVIT_KERNELS=c-avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/runtime_latency.py ...

(PyTorch's own kernels and oneDNN then use AVX2 at most; ONNX Runtime still picks its own.)
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import bhvit
from bhvit import runtime
from bhvit.cli import parse_overrides
from bhvit.export import export_model
from bhvit.layout import stage_mixers
from bhvit.runtime import kernels

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _classes(name: str) -> int:
    """10 classes for the small-image models (CIFAR-10, Fashion-MNIST), else ImageNet's 1000."""
    return 10 if "_c32" in name or "_c28" in name else 1000


def _binary_model(name: str, **overrides) -> torch.nn.Module:
    m = bhvit.create_model(name, num_classes=_classes(name), **overrides).train()
    c = m.cfg
    with torch.no_grad():
        m(torch.randn(2, c.in_chans, c.img_size, c.img_size))  # initialise QD steps, BN stats
    return m.eval()


def _time(fn, runs):
    fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


ONNXRT_MISSING = 'ONNX Runtime is not installed: no onnxrt column (pip install -e ".[bench]" installs it)'
_said = set()


def _say_once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        print(msg, flush=True)


def _onnx_session(fpm, x, threads):
    """An ONNX Runtime session of the FP twin for inputs shaped like x, or None (saying why
    once when onnxruntime is not installed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        _say_once(ONNXRT_MISSING)
        return None
    path = tempfile.mktemp(suffix=".onnx")
    try:
        torch.onnx.export(fpm, (x,), path, input_names=["x"], output_names=["y"], dynamo=False)
    except Exception as e:  # the exporter's own error types
        print(f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); no onnxrt column")
        return None
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _capi_ms(export, x, threads, runs):
    demo = ROOT / "build" / "bhvit_run"
    if not demo.exists():
        return float("nan")
    out = subprocess.run(
        [str(demo), str(export), "-", "--batch", str(x.shape[0]), "--threads", str(threads), "--repeat", str(runs)]
        + ["--kernels", kernels.backend()],  # the variant the Python entry runs (BHVIT_KERNELS)
        input=x.tobytes(),
        capture_output=True,
        check=True,
    )
    return float(out.stderr.decode().split("median ")[1].split(" ms")[0])


def _warm(f, seconds: float = 0.5):
    """Untimed calls of f for at least ``seconds`` (at least one): the caches then hold this
    entry's data and the core runs at this entry's clock, not the previous entry's (after
    PyTorch's float work the runtime's next calls run 2-4 % slower for a few hundred ms)."""
    end = time.perf_counter() + seconds
    f()
    while time.perf_counter() < end:
        f()


def latency(args, rows):
    for name in args.models:
        binm = _binary_model(name, **args.overrides)
        fpm = bhvit.create_model(name, num_classes=binm.cfg.num_classes, binary=False).eval()
        d = tempfile.mkdtemp()
        export_model(binm, d)
        rt = runtime.load(d)
        c = binm.cfg
        for threads in args.threads:
            torch.set_num_threads(threads)
            rt.threads = threads
            for batch in args.batches:
                x = torch.randn(batch, c.in_chans, c.img_size, c.img_size)
                xn = x.numpy()
                sess = _onnx_session(fpm, x, threads)
                fns = {"runtime": lambda: rt(xn), "walker": lambda: rt._run(xn), "fp32": lambda: fpm(x)}
                if sess is not None:
                    fns["onnxrt"] = lambda: sess.run(None, {"x": xn})
                res = {k: [] for k in fns}
                with torch.no_grad():
                    for _ in range(args.runs):
                        for k, f in fns.items():
                            _warm(f)
                            t = time.perf_counter()
                            f()
                            res[k].append(time.perf_counter() - t)
                med = {k: statistics.median(v) * 1e3 for k, v in res.items()}
                med["capi"] = _capi_ms(d, np.ascontiguousarray(xn), threads, max(args.runs, 5))
                rows.append((name, threads, batch, med))
                print(format_row(name, threads, batch, med), flush=True)
    one = {(n, t, b): m["runtime"] for n, t, b, m in rows}
    for (n, t, b), ms in one.items():
        if t == 2 and (n, 1, b) in one:
            print(f"{n:<16} batch {b:>2}: 2 threads {one[(n, 1, b)] / ms:.2f}x faster than 1")


def format_row(name: str, threads: int, batch: int, med: dict) -> str:
    """One line of the latency table (milliseconds); the onnxrt column only where it was timed."""
    line = (
        f"{name:<16} threads {threads} batch {batch:>2}: runtime {med['runtime']:8.1f} ms | capi "
        f"{med['capi']:8.1f} | walker {med['walker']:8.1f} | fp32 {med['fp32']:8.1f} "
        f"({med['fp32'] / med['runtime']:.2f}x)"
    )
    if "onnxrt" in med:
        line += f" | onnxrt {med['onnxrt']:8.1f} ({med['onnxrt'] / med['runtime']:.2f}x)"
    return line


def gemm(args):
    """xnor_gemm vs torch.matmul float32 on bhvit_tiny's binary linear shapes at 224."""
    c = bhvit.create_model("bhvit_tiny", num_classes=1000).cfg
    shapes = []  # (rows, in, out) of every binary linear at batch 1, from the config
    grid = (c.img_size + 2 * c.stem_pad) // c.stem_stride
    for i, mixer in enumerate(stage_mixers(c.hybrid, c.msgdc, c.msmha)):
        side, dim = grid >> i, c.dims[i]
        rows = side * side
        if mixer in ("msmha", "attn"):
            w = c.windows[i] if mixer == "msmha" else side
            tokens = rows + (side // w) ** 4 if mixer == "msmha" else rows  # windows x (w*w + globals)
            shapes += [(tokens, dim, dim), (rows, dim, dim)]
        shapes += [(rows, dim, dim * c.mlp_ratios[i]), (rows, dim * c.mlp_ratios[i], dim)]
    print(
        f"\nbinary GEMM ({kernels.backend()}, weights packed once) vs torch.matmul float32, bhvit_tiny linear "
        "shapes, batch 1; bit-MACs per cycle per thread at the /proc/cpuinfo clock"
    )
    print(f"{'M x K x N':>20} {'threads':>7} {'xnor ms':>9} {'fp32 ms':>9} {'speedup':>8} {'MAC/cyc':>8}")
    lib, mhz = kernels._lib, _cpu_mhz()
    for M, K, N in sorted(set(shapes)):
        a = torch.randn(M, K)
        w = torch.randn(K, N)
        ap = kernels.pack_signs(a.numpy())
        wp = kernels.pack_signs(w.t().contiguous().numpy())
        pan = kernels.Panels()
        out = np.empty((M, N), np.int32)
        kernels._check_rc(lib.bhv_panels_pack(ctypes.byref(pan), wp.ctypes.data, N, wp.shape[1]))
        kernels._check_rc(lib.bhv_xnor_gemm_pp(ap.ctypes.data, ctypes.byref(pan), M, K, out.ctypes.data, 1))
        assert np.array_equal(out, kernels.xnor_gemm(ap, wp, K)), (M, K, N)  # times what is right
        for threads in args.threads:
            torch.set_num_threads(threads)
            tx = statistics.median(
                _time(
                    lambda: lib.bhv_xnor_gemm_pp(ap.ctypes.data, ctypes.byref(pan), M, K, out.ctypes.data, threads),
                    args.runs * 5,
                )
            )
            tf = statistics.median(_time(lambda: torch.matmul(a, w), args.runs * 5))
            rate = M * K * N / tx / (mhz * 1e6) / threads
            print(
                f"{f'{M}x{K}x{N}':>20} {threads:>7} {tx * 1e3:>9.3f} {tf * 1e3:>9.3f} {tf / tx:>7.2f}x {rate:>8.1f}",
                flush=True,
            )
        lib.bhv_panels_free(ctypes.byref(pan))


def _cpu_mhz() -> float:
    try:
        return max(float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz"))
    except (OSError, ValueError):
        return float("nan")


RSS_SNIPPET = r"""
import sys
kind, name, path, classes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if kind == "runtime":  # a deployment process: numpy + bhvit.runtime, no torch
    import numpy as np
    from bhvit import runtime
    rt = runtime.load(path, threads=1); c = rt.cfg
    rt(np.random.randn(1, c["in_chans"], c["img_size"], c["img_size"]).astype(np.float32))
else:
    import torch, bhvit
    torch.set_num_threads(1)
    m = bhvit.create_model(name, num_classes=classes, binary=(kind == "binsim")).eval()
    c = m.cfg
    with torch.no_grad():
        m(torch.randn(1, c.in_chans, c.img_size, c.img_size))
assert kind != "runtime" or "torch" not in sys.modules
# VmHWM: this process's peak resident set (ru_maxrss would include the forking parent's)
print([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


BASE_SNIPPET = r"""
import sys
if sys.argv[1] == "runtime":
    import numpy, bhvit.runtime
else:
    import torch, numpy, bhvit, bhvit.model
print([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


def _vmhwm(code, *argv):
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def peak_rss(args):
    print(
        "\npeak resident memory (VmHWM) of a process that loads and runs one image (MiB); the runtime "
        "process imports numpy + bhvit.runtime only, the PyTorch ones torch + bhvit"
    )
    floors = {k: _vmhwm(BASE_SNIPPET, k) for k in ("runtime", "torch")}
    print(f"import-only floors: numpy + bhvit.runtime {floors['runtime']:.1f} | torch + bhvit {floors['torch']:.1f}")
    for name in args.models:
        d = tempfile.mkdtemp()
        export_model(_binary_model(name), d)
        vals = {kind: _vmhwm(RSS_SNIPPET, kind, name, d, str(_classes(name))) for kind in ("runtime", "fp32", "binsim")}
        demo, capi = ROOT / "build" / "bhvit_run", float("nan")
        if demo.exists():
            c = bhvit.create_model(name, num_classes=_classes(name)).cfg
            img = np.zeros((1, c.in_chans, c.img_size, c.img_size), np.float32).tobytes()
            t = subprocess.run(
                ["/usr/bin/time", "-f", "%M", str(demo), d, "-", "--threads", "1"],
                input=img,
                capture_output=True,
                check=True,
            )
            capi = int(t.stderr.decode().split()[-1]) / 1024
        loads = _time(lambda: runtime.load(d, threads=1), 5)
        print(
            f"{name:<16} runtime {vals['runtime']:8.1f} | capi {capi:8.1f} | fp32 {vals['fp32']:8.1f} | binsim "
            f"{vals['binsim']:8.1f} | load {statistics.median(loads) * 1e3:.1f} ms (Python, incl. the C plan)"
        )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["bhvit_tiny", "bhvit_tiny_c32"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--skip", nargs="*", default=[], choices=["latency", "gemm", "rss"])
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model setting of the binary model in the latency table (repeatable), e.g. fp_downsample=true",
    )
    args = p.parse_args()
    try:
        args.overrides = parse_overrides(args.set)
    except ValueError as e:
        p.error(str(e))
    print(f"CPU: {_cpu_name()}; kernels: {kernels.backend()}; torch {torch.__version__}")
    rows = []
    if "latency" not in args.skip:
        latency(args, rows)
    if "gemm" not in args.skip:
        gemm(args)
    if "rss" not in args.skip:
        peak_rss(args)


if __name__ == "__main__":
    main()
