"""Training-step cost of BHViT models: forward + backward per image (CPU or CUDA).

Prints, per model, the median over several runs of (forward + backward) time for a
batch, divided by the batch size, and images/s. Models run side by side in one
process, interleaved run by run, so machine noise hits them alike.

    python benchmarks/train_speed.py --models bhvit_tiny bhvit_tiny_c32 --batch 32 --threads 2 --runs 5
    python benchmarks/train_speed.py --device cuda --batch 128 --runs 10 [--amp]
    python benchmarks/train_speed.py --models bhvit_micro_c28 --compile   # eager vs torch.compile
    python benchmarks/train_speed.py --device cuda --cuda-graph   # eager vs one CUDA graph per step
    python benchmarks/train_speed.py --models bhvit_tiny_c32 --shift-reference  # shift branches as rolls
    python benchmarks/train_speed.py --models bhvit_tiny_c28 --count-ops   # PyTorch ops per step
"""

from __future__ import annotations

import argparse
import collections
import copy
import statistics
import time

import torch

import bhvit
from bhvit.blocks import ShiftBranches


# Operators that only re-describe memory: no kernel runs for them.
_VIEW_OPS = {
    "view",
    "_unsafe_view",
    "reshape",
    "alias",
    "detach",
    "t",
    "transpose",
    "permute",
    "expand",
    "as_strided",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "narrow",
    "lift_fresh",
}


def count_ops(fn) -> "collections.Counter":
    """The ATen operators ``fn()`` dispatches, by name, views left out."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in _VIEW_OPS:
                self.counts[name] += 1
            return func(*args, **(kwargs or {}))

    with _Count() as c:
        fn()
    return c.counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["bhvit_tiny", "bhvit_tiny_c32"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU)")
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="also time each model under torch.compile (as `bhvit train --compile`), "
        "side by side with eager, and print the compile time and the speed-up",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="also time each model's step (with an optimizer step, as `bhvit train "
        "--cuda-graph`) replayed as a CUDA graph, side by side with the same step "
        "eager, and print the speed-up",
    )
    p.add_argument(
        "--shift-reference",
        action="store_true",
        help="also time each model with its shift branches computed by their definition "
        "(rolls, ShiftBranches.forward_reference) instead of the depthwise "
        "convolutions, side by side, and print the speed-up",
    )
    p.add_argument(
        "--count-ops",
        action="store_true",
        help="also print the PyTorch operators one training step dispatches (forward "
        "and backward, views left out): in eager mode on a GPU each is a kernel "
        "launch, and at these model sizes launches bound the step time",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every model, e.g. binary=false",
    )
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    if args.cuda_graph and (not cuda or args.amp or args.compile):
        p.error("--cuda-graph needs --device cuda, without --amp and --compile.")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from bhvit.cli import parse_overrides

    over = parse_overrides(args.set)

    setups = []
    for name in args.models:
        m = bhvit.create_model(name, num_classes=args.num_classes, **over).to(args.device).train()
        c = m.cfg
        x = torch.randn(args.batch, c.in_chans, c.img_size, c.img_size, device=args.device)
        y = torch.randint(0, args.num_classes, (args.batch,), device=args.device)
        setups.append((name, m, x, y))

    if args.shift_reference:
        for name, m, x, y in list(setups):
            ref = copy.deepcopy(m)
            for mod in ref.modules():
                if isinstance(mod, ShiftBranches):
                    mod.forward = mod.forward_reference
            setups.append((f"{name}+rolls", ref, x, y))

    amp_dtype = torch.float16 if cuda else torch.bfloat16

    def step(m, x, y):
        m.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(args.device).type, dtype=amp_dtype, enabled=args.amp):
            loss = torch.nn.functional.cross_entropy(m(x).float(), y)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()

    if args.cuda_graph:
        # With an optimizer step (what the graph replaces includes it): the same step eager
        # (model+opt) and graphed (model+graph), each on its own copy of the model.
        from bhvit.cudagraph import GraphedStep
        from bhvit.train import make_optimizer

        def with_optimizer(m, capturable):
            # Eager training uses the plain fused AdamW: the baseline must too.
            opt = make_optimizer(m.parameters(), 1e-4, 0.0, args.device, capturable=capturable)

            def fn(x, y):
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(m(x).float(), y)
                loss.backward()
                opt.step()
                return (loss.detach(),)

            return fn

        for name, m, x, y in list(setups):
            eager_fn = with_optimizer(m, False)
            graphed = GraphedStep(with_optimizer(copy.deepcopy(m), True))
            setups.append((f"{name}+opt", eager_fn, x, y))
            setups.append((f"{name}+graph", graphed, x, y))

        def call(m, x, y):
            if isinstance(m, torch.nn.Module):
                step(m, x, y)
            else:
                m(x, y)
                torch.cuda.synchronize()
    else:
        call = step

    for entry in list(setups):  # warm-up (CUDA: kernel selection; QD initialisation; graph capture)
        name, m, x, y = entry
        try:
            for _ in range(5 if args.cuda_graph else 2):
                call(m, x, y)
        except Exception as e:  # noqa: BLE001 - a failed graph drops that variant, not the run
            if not name.endswith("+graph"):
                raise
            print(f"{name}: left out, the CUDA graph failed ({type(e).__name__}: {str(e)[:300]})")
            setups.remove(entry)
    if args.count_ops:
        for name, m, x, y in setups:
            if not isinstance(m, torch.nn.Module):  # the --cuda-graph variants
                continue
            counts = count_ops(lambda: step(m, x, y))
            top = ", ".join(f"{op} {n}" for op, n in counts.most_common(6))
            print(f"{name}: {sum(counts.values())} ops per training step ({top}, ...)")
    compile_s = {}
    if args.compile:
        for name, m, x, y in list(setups):
            cm = torch.compile(m, dynamic=False, backend=args.compile)
            t = time.perf_counter()
            step(cm, x, y)
            compile_s[name] = time.perf_counter() - t
            step(cm, x, y)
            setups.append((f"{name}+compile", cm, x, y))
    times = {name: [] for name, *_ in setups}
    for _ in range(args.runs):
        for name, m, x, y in setups:
            t = time.perf_counter()
            call(m, x, y)
            times[name].append(time.perf_counter() - t)

    where = torch.cuda.get_device_name() if cuda else f"{args.threads} threads"
    print(
        f"forward+backward, batch {args.batch}, {where}{', autocast' if args.amp else ''}, median of "
        f"{args.runs} (torch {torch.__version__})"
    )
    print(f"{'model':<20} {'ms/image':>10} {'images/s':>10} {'min..max ms/image':>20}")
    for name, ts in times.items():
        med = statistics.median(ts) / args.batch
        print(
            f"{name:<20} {med * 1e3:>10.2f} {1 / med:>10.1f} "
            f"{min(ts) / args.batch * 1e3:>9.2f}..{max(ts) / args.batch * 1e3:.2f}"
        )
    for name, sec in compile_s.items():
        ratio = statistics.median(times[name]) / statistics.median(times[f"{name}+compile"])
        print(f"{name}: torch.compile ({args.compile}) took {sec:.0f}s; compiled step {ratio:.2f}x as fast as eager")
    for name in times:
        if name.endswith("+graph") and f"{name[: -len('+graph')]}+opt" in times:
            base = name[: -len("+graph")]
            ratio = statistics.median(times[f"{base}+opt"]) / statistics.median(times[name])
            print(f"{base}: training step with optimizer as one CUDA graph: {ratio:.2f}x as fast as eager")
        if name.endswith("+rolls"):
            base = name[: -len("+rolls")]
            ratio = statistics.median(times[name]) / statistics.median(times[base])
            print(f"{base}: shift branches as convolutions: step {ratio:.3f}x as fast as with rolls")


if __name__ == "__main__":
    main()
