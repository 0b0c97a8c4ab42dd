"""The authors' released BHViT code (``../shared/reference/authors-release``, MIT), imported
for tests that compare bhvit with it. Nothing here is part of bhvit.

The release imports three timm names (``trunc_normal_``, ``DropPath``, ``to_2tuple``) and
``transformers`` (``ViTConfig``, output classes, ``ACT2FN``). timm cannot be installed beside
PyTorch's CPU build here (it needs torchvision), so those three names get small stand-ins
with timm's behaviour; ``transformers`` is the real package (the dev extra).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import tarfile
import types
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Optional[Path]:
    p = Path(os.environ.get("BHVIT_SHARED", ROOT.parent / "shared"))
    return p if p.is_dir() else None


def release_dir() -> Optional[Path]:
    s = shared_dir()
    p = s / "reference" / "authors-release" if s else None
    return p if p is not None and (p / "models.py").is_file() else None


def _timm_stand_ins() -> None:
    if "timm.models.layers" in sys.modules:
        return
    timm, models, layers = (types.ModuleType(n) for n in ("timm", "timm.models", "timm.models.layers"))

    def trunc_normal_(t, mean=0.0, std=1.0, a=-2.0, b=2.0):
        return nn.init.trunc_normal_(t, mean, std, a, b)

    class DropPath(nn.Module):
        """Stochastic depth per sample (timm's DropPath)."""

        def __init__(self, drop_prob=0.0):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            if self.drop_prob == 0.0 or not self.training:
                return x
            keep = 1 - self.drop_prob
            mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
            return x * mask / keep

    layers.trunc_normal_, layers.DropPath = trunc_normal_, DropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    timm.models, models.layers = models, layers
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})

    # engine.py names these in signatures and defaults; the training step of the tests uses none
    def unused(name):
        def fail(*a, **k):
            raise NotImplementedError(f"timm.{name} is not available in bhvit's tests")

        return type(name, (), {"__init__": fail})

    for mod, names in (("loss", ("LabelSmoothingCrossEntropy", "SoftTargetCrossEntropy")), ("data", ("Mixup",))):
        m = types.ModuleType(f"timm.{mod}")
        for n in names:
            setattr(m, n, unused(n))
        setattr(timm, mod, m)
        sys.modules[f"timm.{mod}"] = m
    tu = types.ModuleType("timm.utils")
    tu.ModelEma, tu.accuracy = unused("ModelEma"), unused("accuracy")
    timm.utils = tu
    sys.modules["timm.utils"] = tu


_CACHE: Dict[str, types.ModuleType] = {}


def release_module(name: str) -> types.ModuleType:
    """A module of the release (``models``, ``losses``, ``transformer.utils_quant``), imported
    once under its own name with the release directory on ``sys.path``."""
    if name in _CACHE:
        return _CACHE[name]
    rel = release_dir()
    if rel is None:
        raise FileNotFoundError("the authors' release is not in ../shared/reference/authors-release")
    import transformers.activations  # noqa: F401  (imported before the timm stand-ins: it probes for timm)
    import transformers.modeling_outputs  # noqa: F401

    _timm_stand_ins()
    if str(rel) not in sys.path:
        sys.path.insert(0, str(rel))
    if name.startswith("transformer."):
        mod = importlib.import_module(name)
    elif name == "engine":  # it imports the release's utils.py as `utils`
        utils, saved = release_module("utils"), sys.modules.get("utils")
        sys.modules["utils"] = utils
        try:
            spec = importlib.util.spec_from_file_location("bhvit_release_engine", rel / "engine.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        finally:
            if saved is None:
                del sys.modules["utils"]
            else:
                sys.modules["utils"] = saved
    else:
        spec = importlib.util.spec_from_file_location(f"bhvit_release_{name}", rel / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    _CACHE[name] = mod
    return mod


CONFIGS = {"tiny": "configs/BHViT_tiny", "small": "configs/BHViT"}


def release_args(size: str = "tiny", **kw) -> argparse.Namespace:
    """main_new.py's args for a model (its parser's defaults for what is not given)."""
    d = dict(
        model=CONFIGS[size],
        model_type="dbhvit",
        input_size=224,
        nb_classes=1000,
        drop_path=0.0,
        replace_ln_bn=True,
        shift3=True,
        shift5=True,
        some_fp=False,
        gsb=False,
        recu=False,
        disable_layerscale=False,
        enable_cls_token=False,
        weight_bits=1,
        input_bits=1,
        lr=5e-4,
        batch_size=128,
        epochs=100,
        regularization_loss=True,
        teacher_model="configs/deit-small-patch16-224",
    )
    d.update(kw)
    return argparse.Namespace(**d)


def build_release(args: argparse.Namespace) -> nn.Module:
    """The release's model, as main_new.py builds it (quietly: it prints per shift layer)."""
    import contextlib
    import io

    models = release_module("models")
    with contextlib.redirect_stdout(io.StringIO()):
        return models.get_model(
            args, str(release_dir() / args.model), args.model_type, args.weight_bits, args.input_bits
        )


@torch.no_grad()
def randomise(model: nn.Module, seed: int) -> None:
    """Every parameter and buffer to a random value of a plausible size (none keeps its
    initial value): norms near 1, BatchNorm statistics, QD steps and zero points, the mixing
    parameters, LayerScales (the shift ones start at 0 in the release) and the weights."""
    g = torch.Generator().manual_seed(seed)

    def u(t, lo, hi):
        return torch.rand(t.shape, generator=g) * (hi - lo) + lo

    def n(t, std):
        return torch.randn(t.shape, generator=g) * std

    for name, t in model.state_dict().items():
        leaf, owner = name.rsplit(".", 1)[-1], name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if t.dtype == torch.int64:
            t.fill_(int(torch.randint(1, 10_000, (), generator=g)))
        elif leaf == "running_var":
            t.copy_(u(t, 0.5, 2.0))
        elif leaf == "running_mean":
            t.copy_(n(t, 0.2))
        elif leaf == "init_state":
            t.fill_(1.0)
        elif "att_prob_quantizer" in name and leaf == "alpha":
            t.copy_(u(t, 0.4, 1.2))  # QD step
        elif "att_prob_quantizer" in name and leaf == "zero_point":
            t.copy_(u(t, -0.3, 0.3))
        elif leaf in ("parm", "a1"):
            t.copy_(u(t, 0.1, 0.9))
        elif owner == "prelu":
            t.copy_(u(t, 0.05, 0.5))
        elif leaf == "alpha":  # LayerScales
            t.copy_(n(t, 0.1) + (0.1 if "layerscale_" not in name else 0.0))
        elif "norm" in owner and leaf == "weight":
            t.copy_(1.0 + n(t, 0.2))
        elif "position_embeddings" in leaf:
            t.copy_(n(t, 0.05))
        elif t.dim() >= 2:  # conv and linear weights
            t.copy_(n(t, 0.05))
        else:  # biases, moves
            t.copy_(n(t, 0.1))


def save_like_main_new(model: nn.Module, args: argparse.Namespace, path: Path, epoch: int = 99) -> Path:
    """``torch.save`` of the dict main_new.py writes after each epoch."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    scheduler = {"t_initial": args.epochs, "lr_min": 1e-8, "base_values": [args.lr], "t_in_epochs": True}
    scaler = {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 0,
    }
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "lr_scheduler": scheduler,
            "epoch": epoch,
            "scaler": scaler,
            "args": args,
        },
        path,
    )
    return path


def cifar_test_jpegs(n: int) -> List[bytes]:
    """The first ``n`` test JPEGs of each class of ../shared/data/cifar10-jpeg.tar.gz, in name order
    (real photographs; 32x32, enlarged by the evaluation transform)."""
    tar = shared_dir() / "data" / "cifar10-jpeg.tar.gz"
    per_class: Dict[str, List] = {}
    with tarfile.open(tar, "r:gz") as tf:
        for m in tf:
            parts = m.name.split("/")
            if m.isfile() and len(parts) >= 3 and parts[-3] == "test":
                per_class.setdefault(parts[-2], []).append((m.name, tf.extractfile(m).read()))
            if len(per_class) == 10 and all(len(v) >= n for v in per_class.values()):
                break
    out = []
    for c in sorted(per_class):
        out += [b for _, b in sorted(per_class[c])[:n]]
    return out


# --- binarizer decisions, for explaining float32 differences -----------------------------
class DecisionLog:
    """Every activation binarizer's input in execution order, as ``(kind, tensor)``: ``"sign"``
    with the sign's input, ``"qd"`` with QD's ``x / step + zero_point`` (rounded to a level)."""

    def __init__(self):
        self.calls = []

    def decisions(self, i):
        kind, x = self.calls[i]
        if kind == "sign":  # bhvit: sign(0) = +1
            return x >= 0
        if kind == "tsign":  # the release: torch.sign, sign(0) = 0
            return torch.sign(x)
        return x.round().clamp(0, 3)

    def margin(self, i, where):
        """Distance of the inputs at ``where`` from their threshold, relative to the tensor's RMS
        (signs) or in QD steps (qd)."""
        kind, x = self.calls[i]
        if kind in ("sign", "tsign"):
            return float(x[where].abs().min() / x.pow(2).mean().sqrt())
        return float(((x[where] - x[where].floor()) - 0.5).abs().min())


def first_flip(log32: DecisionLog, log64: DecisionLog):
    """``(call index, kind, flips in that call, margin in the float64 run)`` of the first
    binarizer whose float32 decisions differ from float64's, or None."""
    assert len(log32.calls) == len(log64.calls)
    for i in range(len(log32.calls)):
        d32, d64 = log32.decisions(i), log64.decisions(i)
        where = d32 != d64
        if where.any():
            return i, log32.calls[i][0], int(where.sum()), log64.margin(i, where)
    return None


def weight_flips(model32, model64, release: bool):
    """The binary layers whose weight signs differ between a float32 model and its float64
    copy: ``[(layer, flips, smallest margin)]``, the margin of a flipped weight being
    ``|W - mean(W)|`` in float64 relative to the RMS of its output channel's centred row. The
    signs are computed as each model computes them: bhvit's ``centred_signs`` (sign(0) = +1),
    the release's ``torch.sign(W - mean(W))`` (its QuantizeLinear / QuantizeConv2d forward)."""
    from bhvit.layers import binary_layers
    from bhvit.quantizers import centred_signs

    if release:
        uq = release_module("transformer.utils_quant")

        def layers(m):
            kinds = (uq.QuantizeLinear, uq.QuantizeConv2d)
            return [(n, x) for n, x in m.named_modules() if isinstance(x, kinds) and x.weight_bits == 1]

        def signs(w):
            dims = [1] if w.dim() == 2 else [1, 2, 3]
            return torch.sign(w - w.mean(dims, keepdim=True))
    else:

        def layers(m):
            keep = set(binary_layers(m))
            return [(n, x) for n, x in m.named_modules() if x in keep]

        signs = centred_signs
    out = []
    for (name, a), (_, b) in zip(layers(model32), layers(model64)):
        w32, w64 = a.weight.detach(), b.weight.detach()
        where = signs(w32) != signs(w64)
        if where.any():
            c = w64.reshape(len(w64), -1)
            c = c - c.mean(1, keepdim=True)
            rel = (c.abs() / c.pow(2).mean(1, keepdim=True).sqrt()).view(w64.shape)
            out.append((name, int(where.sum()), float(rel[where].min())))
    return out


def record_bhvit(model, log: DecisionLog):
    """Hooks on bhvit's SignActivation and QD modules; returns the handles."""
    from bhvit.qd import QuantizationDecomposition
    from bhvit.quantizers import SignActivation

    def sign_hook(mod, inp):
        log.calls.append(("sign", inp[0].detach().double()))

    def qd_hook(mod, inp):
        x = inp[0].detach().double() * mod.levels
        y = x / mod.step.detach().double().view(1, -1, 1, 1) + mod.zero_point.detach().double().view(1, -1, 1, 1)
        log.calls.append(("qd", y))

    hs = []
    for m in model.modules():
        if isinstance(m, SignActivation):
            hs.append(m.register_forward_pre_hook(sign_hook))
        elif isinstance(m, QuantizationDecomposition):
            hs.append(m.register_forward_pre_hook(qd_hook))
    return hs


class record_release:
    """Context manager: the release's BinaryQuantizer (every activation sign) and QD modules
    log their inputs into ``log``."""

    def __init__(self, model, log: DecisionLog):
        self.model, self.log = model, log

    def __enter__(self):
        uq = release_module("transformer.utils_quant")
        self.uq, self.orig = uq, uq.BinaryQuantizer.forward
        orig, log = self.orig, self.log

        def forward(ctx, input):
            log.calls.append(("tsign", input.detach().double()))
            return orig(ctx, input)

        uq.BinaryQuantizer.forward = staticmethod(forward)

        def qd_hook(mod, inp):
            x = inp[0].detach().double()
            a, z = mod.alpha.detach().double().view(1, -1, 1, 1), mod.zero_point.detach().double().view(1, -1, 1, 1)
            log.calls.append(("qd", x / a + z))

        self.hs = [
            m.register_forward_pre_hook(qd_hook)
            for m in self.model.modules()
            if isinstance(m, uq.BinaryActivation_Attention)
        ]
        return self

    def __exit__(self, *exc):
        self.uq.BinaryQuantizer.forward = staticmethod(self.orig)
        for h in self.hs:
            h.remove()


# --- one training step of the release ------------------------------------------------------
class NativeScalerOnCPU:
    """timm's NativeScaler as it behaves without CUDA (its GradScaler disabled): backward,
    optional gradient clipping, optimizer step."""

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, create_graph=False):
        loss.backward(create_graph=create_graph)
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(list(parameters), clip_grad)
        optimizer.step()


def release_train_step(model, teacher, x, y, lr: float, regularization_loss: bool) -> float:
    """One step of main_new.py's training with a teacher and no mixup: ``engine.train_one_epoch``
    (loss: DistributionLoss to the teacher) or, with ``--regularization_loss``,
    ``engine.train_one_epoch_L1`` (0.9 DistributionLoss + 0.1 L_re), AdamW as timm's
    create_optimizer makes it for ``--opt adamw --weight-decay 0``. Returns the loss; the
    gradients stay in ``.grad``."""
    import contextlib
    import io

    engine, losses = release_module("engine"), release_module("losses")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, eps=1e-8, weight_decay=0.0)
    step = engine.train_one_epoch_L1 if regularization_loss else engine.train_one_epoch
    sync = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a, **k: None  # the loop synchronises CUDA after each step
    try:
        with contextlib.redirect_stdout(io.StringIO()), torch.autocast("cpu", enabled=False):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.cuda.amp.autocast without CUDA
                stats = step(
                    model,
                    teacher,
                    losses.DistributionLoss(),
                    None,
                    [(x, y)],
                    opt,
                    torch.device("cpu"),
                    0,
                    NativeScalerOnCPU(),
                    None,
                    None,
                    None,
                )
    finally:
        torch.cuda.synchronize = sync
    return stats["loss"]


# --- comparing a converted model with the release's ------------------------------------------
TOL = 1e-4  # float32: largest logit difference / largest |logit|
TOL_64 = 1e-9  # float64


def _logits(model, x, release):
    with torch.no_grad():
        return model(x).logits if release else model(x)


def _explain(rel, ours, x, twins):
    """Why an input's float32 logits differ: for each model, its binary weights whose float32
    sign differs from float64's, and its first activation binarizer (sign or QD level)
    whose float32 decision differs from float64's, with their margins."""
    found = {}
    for name, model, release in (("release", rel, True), ("bhvit", ours, False)):
        m64 = twins[name]
        logs = []
        for m in (model, m64):
            log = DecisionLog()
            if release:
                with record_release(m, log):
                    _logits(m, x.to(next(m.parameters()).dtype), True)
            else:
                hs = record_bhvit(m, log)
                _logits(m, x.to(next(m.parameters()).dtype), False)
                for h in hs:
                    h.remove()
            logs.append(log)
        found[name] = {"weights": weight_flips(model, m64, release), "first": first_flip(*logs)}
    return found


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def compare(rel, ours, inputs, n64=2):
    """Per input (batch 1): the float32 relative logit difference and top-1 agreement; the
    exceptions beyond TOL with their explanation. On the first ``n64`` inputs (and every
    exception) also float64: the two models against each other (``rel64``, ``top1_64``), and
    each float32 model against the release in float64, the exact result (``release_vs_exact``,
    ``bhvit_vs_exact``: relative difference, top-1 agreement)."""
    twins = {"release": copy.deepcopy(rel).double(), "bhvit": copy.deepcopy(ours).double()}
    rows = []
    for i, x in enumerate(inputs):
        x = x.reshape(1, 3, 224, 224)
        a, b = _logits(rel, x, True), _logits(ours, x, False)
        row = {"rel": _rel(b, a), "top1": int(a.argmax()) == int(b.argmax())}
        if row["rel"] > TOL or i < n64:
            a64, b64 = _logits(twins["release"], x.double(), True), _logits(twins["bhvit"], x.double(), False)
            row["rel64"], row["top1_64"] = _rel(b64, a64), int(a64.argmax()) == int(b64.argmax())
            row["release_vs_exact"] = (_rel(a.double(), a64), int(a.argmax()) == int(a64.argmax()))
            row["bhvit_vs_exact"] = (_rel(b.double(), a64), int(b.argmax()) == int(a64.argmax()))
        if row["rel"] > TOL:
            row["why"] = _explain(rel, ours, x, twins)
        rows.append(row)
    return rows


def check(rows):
    """What the tests require of a set of compared inputs: in float64 the same logits (to
    TOL_64) and the same top-1 on every input; in float32 the logits within TOL and the same
    top-1 on every input but the exceptions, each of which has a float32 binarizer decision
    of one of the models that differs from float64's and sat within float rounding of its
    threshold (a weight sign, or, with no weight flipped in that model, the first activation
    decision). How often exceptions change the top-1 is measured by
    benchmarks/release_equivalence.py, with the release's own float32 error as the baseline."""
    for r in rows:
        if "rel64" in r:
            assert r["rel64"] < TOL_64 and r["top1_64"], r
        if r["rel"] <= TOL:
            assert r["top1"], r
            continue
        why = [w for w in r["why"].values() if w["weights"] or w["first"]]
        assert why, r
        for w in why:
            for _, _, margin in w["weights"]:
                assert margin < 1e-5, r
            if not w["weights"]:
                assert w["first"][3] < 1e-5, r


def step_batch(num_classes: int, batch: int):
    """A float64 teacher (a fixed small model) and a random batch for comparing training steps."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, num_classes))
    teacher = teacher.double().eval().requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(batch, 3, 224, 224, generator=g, dtype=torch.float64)
    return teacher, x, torch.randint(0, num_classes, (batch,), generator=g)


def release_lre(model):
    """The release's L_re on a bhvit model: the layers whose names its engine.py matches (the
    MSGDC convs, Q/K/V and every `dense` linear): bhvit's binary layers but the downsampling."""
    from bhvit.layers import binary_layers

    down = {m for n, m in model.named_modules() if ".downsample." in n}
    return torch.stack([(m.weight.abs() - 1).abs().mean() for m in binary_layers(model) if m not in down]).mean()
