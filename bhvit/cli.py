"""Command line: ``bhvit info | list | train | eval | recipe | strip | export | predict | convert``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .config import add_train_arguments, parse_overrides, positive_int, thread_count, train_config_from_args
from .errors import ConfigError


def _info_checkpoint(args):
    """``bhvit info RUN_DIR``: the model a run directory or checkpoint .json describes, and the
    name to print (its config only: the weights are not read)."""
    from .checkpoint import model_config_of, read_checkpoint_json
    from .model import BHViT

    if args.set or args.img_size is not None or args.num_classes is not None:
        raise ConfigError(
            f"{args.name}: --set, --img-size and --num-classes apply to a named model; a checkpoint's "
            "model is the one it was trained as."
        )
    doc, p = read_checkpoint_json(args.name)
    cfg = model_config_of(doc, p)
    name = (doc.get("train_config") or {}).get("model")
    return BHViT(cfg), f"{p} ({name + ', ' if isinstance(name, str) else ''}{cfg.num_classes} classes)"


def cmd_info(args) -> int:
    from .costs import complexity, format_complexity, format_summary, summary
    from .model import create_model, get_config, list_models

    if args.name not in list_models() and (os.path.exists(args.name) or args.name.endswith((".json", ".safetensors"))):
        model, name = _info_checkpoint(args)
    elif args.name not in list_models():
        raise ConfigError(
            f"unknown model {args.name!r}, and no run directory or checkpoint of that name; give a "
            "model name (`bhvit list`), a run directory or a checkpoint .json."
        )
    else:
        overrides = parse_overrides(args.set)
        if args.img_size is not None:
            overrides["img_size"] = args.img_size
        # default: the config's own class count (10 for the *_c32 / *_c28 models)
        num_classes = args.num_classes or get_config(args.name, **overrides).num_classes
        model, name = create_model(args.name, num_classes=num_classes, **overrides), args.name
    c = complexity(model)
    if args.json:
        print(json.dumps({k: v for k, v in c.items() if k != "per_module"}))
    else:
        print(format_complexity(name, c))
    if args.layers:
        print()
        print(format_summary(summary(model)))
    return 0


def cmd_list(args) -> int:
    from .model import list_models

    for name in list_models():
        print(name)
    return 0


def _train_config(args, **changes):
    return train_config_from_args(args, **changes)


def cmd_train(args) -> int:
    from .train import train

    result = train(_train_config(args))
    if result.get("world_size", 1) == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "rank_checksums"}))
    return 0


def cmd_recipe(args) -> int:
    """Stage 1: full-precision teacher; stage 2: binary student distilled from it (with
    ``--act-epochs``, stage 2 is split into binary activations first, then everything binary)."""
    from pathlib import Path

    from .train import train

    out = Path(args.out)
    t_over = dict(parse_overrides(args.overrides), binary=False)
    if args.resume:  # each stage continues where it stopped, or starts if it never did
        args.resume = "auto"
    t_cfg = _train_config(
        args,
        out=str(out / "teacher"),
        overrides=t_over,
        kd_lambda=0.0,
        re_beta=0.0,
        epochs=args.teacher_epochs or args.epochs,
    )
    if args.act_epochs < 0:
        raise ConfigError(f"--act-epochs must be >= 0, got {args.act_epochs}.")
    n_stages = 3 if args.act_epochs else 2
    stage = f"stage 1/{n_stages}"
    if args.resume and (out / "teacher" / "final.json").exists():
        if not _skip_finished_stage(out / "teacher", t_cfg.epochs, stage, "teacher"):
            train(t_cfg)  # continued to the new epoch count by its own --resume
            students = [d for d in ("student_acts", "student") if (out / d / "last.json").exists()]
            if students:
                print(
                    f"note: {' and '.join(str(out / d) for d in students)} began distilling from the teacher's "
                    "earlier weights; they go on from the continued teacher (another --out trains students "
                    "from it alone)",
                    flush=True,
                )
    else:
        print(f"{stage}: full-precision teacher -> {out / 'teacher'}", flush=True)
        train(t_cfg)
    t_best = str(out / "teacher" / "best.json")
    init_from = t_best if args.init_from_teacher else None
    summary = {}
    if args.act_epochs:
        # Two-step binarization: 1-bit activations with float weights first, then the
        # fully binary student starts from that step's last weights.
        acts = out / "student_acts"
        a_cfg = _train_config(
            args,
            out=str(acts),
            teacher=t_best,
            init_from=init_from,
            epochs=args.act_epochs,
            overrides=dict(parse_overrides(args.overrides), binary_weights=False),
        )
        if args.resume and (acts / "final.json").exists():
            if _skip_finished_stage(acts, a_cfg.epochs, "stage 2/3", "binary-activation step"):
                a_result = json.loads((acts / "final.json").read_text())
            else:
                a_result = train(a_cfg)
        else:
            print(f"stage 2/3: binary activations, float weights, distilled from the teacher -> {acts}", flush=True)
            a_result = train(a_cfg)
        summary = {"acts_step_top1": a_result["test_top1"], "acts_step_best_top1": a_result["best_top1"]}
        init_from = str(acts / "last.json")
    print(f"stage {n_stages}/{n_stages}: binary student distilled from the teacher -> {out / 'student'}", flush=True)
    s_cfg = _train_config(args, out=str(out / "student"), teacher=t_best, init_from=init_from)
    result = train(s_cfg)
    teacher_final = json.loads((out / "teacher" / "final.json").read_text())
    print(
        json.dumps(
            {
                "teacher_top1": teacher_final["test_top1"],
                "teacher_best_top1": teacher_final["best_top1"],
                **summary,
                "student_top1": result["test_top1"],
                "student_best_top1": result["best_top1"],
                "run_dir": str(out),
            }
        )
    )
    return 0


def _skip_finished_stage(run, epochs: int, stage: str, what: str) -> bool:
    """``recipe --resume`` on a stage whose run finished (``run/final.json``): whether to skip
    it. A stage trained for fewer epochs than asked now is continued to them (False); one
    trained for as many, or more, is kept as it is (True). A line says which."""
    from .checkpoint import read_checkpoint_json

    planned = (read_checkpoint_json(run / "last.json")[0].get("train_config") or {}).get("epochs")
    if not isinstance(planned, int) or planned == epochs:
        print(f"{stage}: {what} already trained in {run}", flush=True)
        return True
    if planned < epochs:
        print(f"{stage}: {what} in {run} was trained for {planned} epoch(s); continuing it to {epochs}", flush=True)
        return False
    print(
        f"{stage}: {what} in {run} was trained for {planned} epoch(s), more than the {epochs} asked now; "
        "using it as it is",
        flush=True,
    )
    return True


def _eval_dataset(args, name, data, cfg, seed):
    """The dataset ``bhvit eval`` scores, and its loader when it is streamed: an ImageFolder
    with the checkpoint's recorded evaluation transform (e.g. a converted release model) is
    decoded batch by batch with it, never all at once (ImageNet's 50,000 images would not fit);
    anything else is decoded into memory as in training."""
    from .data import DATASETS, image_folder_root, load_dataset

    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}.")
    folder = image_folder_root(name, args.data_dir) if name in DATASETS else None
    if folder is not None and (data.get("resize") is not None or data.get("interpolation") is not None):
        from .runtime.image import eval_transform
        from .stream import StreamingImageFolder, StreamLoader

        resize, interpolation = eval_transform(data, cfg.img_size)
        ds = StreamingImageFolder(
            folder,
            args.split,
            cfg.in_chans,
            cfg.img_size,
            classes=data.get("classes"),
            subset=args.subset,
            seed=seed,
            skip_bad=args.skip_bad,
            resize=resize,
            interpolation=interpolation,
        )
        return ds, StreamLoader(ds, train=False, workers=args.workers)
    ds = load_dataset(
        name,
        args.split,
        args.data_dir,
        channels=cfg.in_chans,
        size=cfg.img_size,
        skip_bad=args.skip_bad,
        cache_dir=args.cache_dir,
        classes=data.get("classes"),
    )
    return (ds.subset(args.subset, seed) if args.subset else ds), None


def _export_manifest(path):
    """The manifest.json of ``path`` if it is an export (its directory or the file), else None."""
    from pathlib import Path

    p = Path(path)
    p = p / "manifest.json" if p.is_dir() else p
    return p if p.name == "manifest.json" and p.is_file() else None


def _eval_export(args, manifest) -> int:
    """``bhvit eval EXPORT``: the export scored through the bit-packed runtime, with the
    dataset, class order and preprocessing its manifest records."""
    import time
    import types

    import torch

    import bhvit.runtime
    from .runtime import kernels
    from .train import evaluate

    if args.device not in ("cpu", "auto"):
        raise ConfigError(f"an export runs on the CPU (bhvit's runtime); --device {args.device} does not apply.")
    rt = bhvit.runtime.load(manifest.parent, threads=args.threads or 0)
    data = rt.data
    name = args.data or data.get("name")
    if name is None:
        raise ConfigError("--data is required: the export does not name its dataset.")
    if not data.get("mean") or not data.get("std"):
        raise ConfigError(f"{manifest}: the export records no input normalisation (mean/std) to prepare images with.")
    cfg = types.SimpleNamespace(**{k: rt.cfg[k] for k in ("in_chans", "img_size", "num_classes")})
    ds, loader = _eval_dataset(args, name, data, cfg, 0)
    if ds.num_classes != cfg.num_classes:
        raise ConfigError(f"dataset has {ds.num_classes} classes but the export has {cfg.num_classes}.")

    class Runtime(torch.nn.Module):  # evaluate()'s model: logits from the runtime
        def forward(self, x):
            return torch.from_numpy(rt(x.numpy()))

    t0 = time.perf_counter()
    res = evaluate(Runtime(), ds, data["mean"], data["std"], args.batch_size, "cpu", progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    res.update(
        export=str(manifest.parent),
        data=name,
        split=args.split,
        kernels=kernels.backend(),
        images_per_s=round(res["count"] / seconds, 1),
    )
    print(json.dumps(res))
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    manifest = _export_manifest(args.checkpoint)
    if manifest is not None:
        if args.save_logits:
            raise ConfigError("--save-logits is for checkpoints; bhvit.runtime.load(EXPORT) gives an export's logits.")
        return _eval_export(args, manifest)

    from .checkpoint import load_model
    from .data import load_dataset
    from .train import evaluate

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise ConfigError(f"--device must be auto, cpu or an available cuda device, got {args.device!r}.")
    model, doc = load_model(args.checkpoint, map_location=device)
    data = doc.get("data", {})
    if args.data_dir is None and (args.data is None or args.data == data.get("name")):
        args.data_dir = doc.get("train_config", {}).get("data_dir")
    name = args.data or data.get("name")
    if name is None:
        raise ConfigError("--data is required: the checkpoint does not name its dataset.")
    cfg = model.cfg
    seed = doc.get("train_config", {}).get("seed", 0)  # --subset: the same images as training's --test-subset N
    ds, loader = _eval_dataset(args, name, data, cfg, seed)
    if ds.num_classes != cfg.num_classes:
        raise ConfigError(f"dataset has {ds.num_classes} classes but the model has {cfg.num_classes}.")
    if "mean" in data:
        mean, std = data["mean"], data["std"]
    else:
        mean, std = load_dataset(
            name,
            "train",
            args.data_dir,
            channels=cfg.in_chans,
            size=cfg.img_size,
            skip_bad=args.skip_bad,
            cache_dir=args.cache_dir,
        ).channel_stats()
    logits_file = None
    if args.save_logits:
        logits_file = Path(args.save_logits)
        if logits_file.suffix != ".npz":
            logits_file = logits_file.with_name(logits_file.name + ".npz")  # as numpy.savez names it
        if not logits_file.parent.is_dir():
            raise ConfigError(f"--save-logits {args.save_logits}: directory {logits_file.parent} does not exist.")
    res = evaluate(
        model,
        ds,
        mean,
        std,
        args.batch_size,
        device,
        progress=not args.no_progress,
        return_logits=logits_file is not None,
        loader=loader,
    )
    if logits_file is not None:
        import numpy as np

        np.savez(logits_file, logits=res.pop("logits").numpy(), labels=ds.labels.numpy())
        res["logits_file"] = str(logits_file)
    # 1-based, as in the training log and metrics.jsonl (the file names count from 0)
    epoch = doc.get("metrics", {}).get("epoch", doc["epoch"] + 1 if "epoch" in doc else None)
    res.update(checkpoint=str(args.checkpoint), data=name, split=args.split, epoch=epoch)
    print(json.dumps(res))
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    from .checkpoint import load_model, resolve_checkpoint
    from .export import export_model

    model, doc = load_model(args.checkpoint)
    manifest = export_model(model, args.out, data=doc.get("data"), float16=args.float16)
    sz = manifest["size"]
    ckpt_file = resolve_checkpoint(args.checkpoint).parent / doc["weights"]
    ckpt_bytes = ckpt_file.stat().st_size
    report = {
        "out": str(Path(args.out)),
        "packed_file_bytes": sz["file_bytes"],
        "float32_checkpoint_bytes": ckpt_bytes,
        "ratio": round(ckpt_bytes / sz["file_bytes"], 2),
        "binary_weights": sz["binary_weights"],
        "binary_bytes": sz["packed_bytes"],
        "float_values": sz["float_values"],
        "float_bytes": sz["float_bytes"],
    }
    print(json.dumps(report))
    return 0


def cmd_strip(args) -> int:
    from .checkpoint import strip_checkpoint

    print(json.dumps(strip_checkpoint(args.checkpoint, args.out, args.dtype)))
    return 0


def _load_image(path, cfg, data):
    """The normalised (1, C, H, W) input of one image, and a note if it was converted."""
    from .runtime.image import eval_transform, prepare_image

    info = {}
    x = prepare_image(path, cfg["in_chans"], cfg["img_size"], data, info=info)[None]
    want_mode, side = ("L" if cfg["in_chans"] == 1 else "RGB"), cfg["img_size"]
    (w, h), mode = info["size"], info["mode"]
    resize, interpolation = eval_transform(data, side)
    note = None
    if (w, h) != (side, side) or mode != want_mode or resize != side:
        how = (
            f"shorter side resized to {resize} ({interpolation}) and centre-cropped"
            if (w, h) != (side, side) or resize != side
            else "converted"
        )
        note = f"{path}: {how} from {w}x{h} {mode} to {side}x{side} {want_mode}"
    return x, note


def _class_names(path, n: int):
    """One class name per line of a UTF-8 text file (an ImageNet model's 1000 names, say)."""
    from .files import open_regular
    from .runtime.format import safe_class_name

    try:
        with open_regular(path) as f:
            text = f.read(64 << 20).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--classes {path}: cannot read it ({getattr(e, 'strerror', None) or e}).") from None
    names = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    while names and not names[-1].strip():
        names.pop()
    if len(names) != n:
        raise ConfigError(f"--classes {path}: {len(names)} lines, but the model has {n} classes (one name per line).")
    bad = next((i for i, c in enumerate(names) if safe_class_name(c) != c), None)
    if bad is not None:
        raise ConfigError(f"--classes {path}: line {bad + 1} holds a control character.")
    return names


def cmd_predict(args) -> int:
    import numpy as np

    from . import runtime

    rt = runtime.load(args.export, threads=args.threads or 0)
    data = rt.data
    if not data.get("mean") or not data.get("std"):
        raise ConfigError(
            f"{args.export}: the export records no input normalisation (mean/std), so "
            "images cannot be prepared as in training; export with `bhvit export CKPT`, "
            "or pass data={'mean': [...], 'std': [...]} to export_model."
        )
    n = rt.cfg["num_classes"]
    classes = _class_names(args.classes, n) if args.classes else rt.classes or [str(i) for i in range(n)]
    for path in args.images:
        try:
            x, note = _load_image(path, rt.cfg, data)
        except (OSError, ValueError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise ConfigError(f"{path}: cannot read image ({why}).") from None
        if note:
            print(note, file=sys.stderr)
        logits = rt(x)[0].astype(np.float64)
        prob = np.exp(logits - logits.max())
        prob /= prob.sum()
        top = np.argsort(-prob)[: min(5, len(prob))]
        print(path)
        for i in top:
            print(f"  {prob[i]:7.4f}  {classes[i]}")
    return 0


def cmd_convert(args) -> int:
    from .release import convert_release

    res = convert_release(
        args.release_checkpoint,
        args.out,
        weight_bits=args.weight_bits,
        input_bits=args.input_bits,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(json.dumps(res))
    return 0


def _add_train_args(p: argparse.ArgumentParser, recipe: bool = False) -> None:
    add_train_arguments(p, recipe=recipe)  # every TrainConfig field (bhvit.config)
    if recipe:
        p.add_argument(
            "--teacher-epochs", type=int, default=None, help="epochs of the full-precision teacher (default: --epochs)"
        )
        p.add_argument(
            "--init-from-teacher",
            action="store_true",
            help="start the binary student from the teacher's weights instead of at random",
        )
        p.add_argument(
            "--act-epochs",
            type=int,
            default=0,
            metavar="N",
            help="two-step binarization: first train N epochs with binary activations and "
            "float weights (RUN/student_acts), then --epochs fully binary from there",
        )


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="bhvit", description="BHViT: binarized hybrid vision transformer.")
    p.add_argument("--version", action="version", version=f"bhvit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser(
        "info", help="parameters, BOPs, FLOPs, OPs and size of a named model, a run directory or a checkpoint"
    )
    info.add_argument(
        "name", help="model name (see `bhvit list`), or a run directory or checkpoint .json (its model's cost)"
    )
    info.add_argument("--img-size", type=int, default=None)
    info.add_argument(
        "--num-classes",
        type=positive_int,
        default=None,
        help="classes of the head (default: the model's own, 10 for the *_c32 and *_c28 models, else 1000)",
    )
    info.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set binary=false --set qd=false (repeatable)",
    )
    info.add_argument("--json", action="store_true", help="print a JSON object")
    info.add_argument(
        "--layers",
        action="store_true",
        help="also print a per-block summary (binary/float params, memory, BOPs, FLOPs)",
    )
    info.set_defaults(func=cmd_info)

    lst = sub.add_parser("list", help="list the named models")
    lst.set_defaults(func=cmd_list)

    tr = sub.add_parser("train", help="train one model (FP with --set binary=false, or binary)")
    _add_train_args(tr)
    tr.set_defaults(func=cmd_train)

    rc = sub.add_parser("recipe", help="FP teacher, then binary student distilled from it")
    _add_train_args(rc, recipe=True)
    rc.set_defaults(func=cmd_recipe)

    ev = sub.add_parser("eval", help="top-1, top-5 and loss of a checkpoint, or of an export through the runtime")
    ev.add_argument(
        "checkpoint",
        help="run directory (best.json), a checkpoint .json or .safetensors, a pretrained folder, "
        "or an export directory (scored by the bit-packed runtime)",
    )
    ev.add_argument(
        "--data",
        default=None,
        choices=["fashion-mnist", "cifar10", "imagefolder"],
        help="default: the dataset the checkpoint was trained on",
    )
    ev.add_argument("--data-dir", default=None)
    ev.add_argument("--split", default="test", choices=["train", "test"], help="default test")
    ev.add_argument(
        "--batch-size", type=positive_int, default=None, help="default: sized to the CPU's caches; 256 on a GPU"
    )
    ev.add_argument(
        "--subset",
        type=positive_int,
        default=None,
        help="a fixed random subset of N images, chosen with the run's seed (the same "
        "images as training's --test-subset N on the test split)",
    )
    ev.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    ev.add_argument("--threads", type=thread_count, default=None)
    ev.add_argument("--skip-bad", action="store_true")
    ev.add_argument(
        "--workers",
        type=int,
        default=0,
        help="image-decoding processes for a checkpoint that records its evaluation transform "
        "(e.g. from bhvit convert) on an ImageFolder (default 0: in this process)",
    )
    ev.add_argument("--cache-dir", default=None)
    ev.add_argument("--no-progress", action="store_true")
    ev.add_argument(
        "--save-logits",
        default=None,
        metavar="FILE.npz",
        help="also write the logits (float32, N x classes) and labels to an .npz file",
    )
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", help="export a checkpoint to the bit-packed runtime format")
    ex.add_argument("checkpoint", help="run directory (best.json), a checkpoint .json or .safetensors")
    ex.add_argument("out", help="output directory (model.safetensors + manifest.json)")
    ex.add_argument("--float16", action="store_true", help="store the float parts as float16")
    ex.set_defaults(func=cmd_export)

    st = sub.add_parser(
        "strip",
        help="weights-only copy of a checkpoint (no optimizer state), "
        "optionally in 16 bits, e.g. a teacher to take elsewhere",
    )
    st.add_argument("checkpoint", help="run directory (best.json), a checkpoint .json or .safetensors")
    st.add_argument("out", help="output directory (best.json + weights)")
    st.add_argument(
        "--dtype",
        choices=["float16", "bfloat16"],
        default=None,
        help="store floating-point weights in 16 bits (default: keep float32)",
    )
    st.set_defaults(func=cmd_strip)

    pr = sub.add_parser("predict", help="top-5 classes of images with an exported model")
    pr.add_argument("export", help="directory written by `bhvit export`")
    pr.add_argument("images", nargs="+")
    pr.add_argument("--threads", type=thread_count, default=None)
    pr.add_argument(
        "--classes",
        default=None,
        metavar="FILE",
        help="class names, one per line (default: the export's names, else the class numbers)",
    )
    pr.set_defaults(func=cmd_predict)

    cv = sub.add_parser(
        "convert",
        help="read a checkpoint of the authors' BHViT release (main_new.py's .pth) into a bhvit checkpoint",
    )
    cv.add_argument("release_checkpoint", help="the .pth file (main_new.py's checkpoint dict, or a bare state dict)")
    cv.add_argument("out", help="output directory (best.json + release.safetensors)")
    for flag in ("--weight-bits", "--input-bits"):
        cv.add_argument(
            flag,
            type=int,
            choices=[1, 32],
            default=None,
            help="as the release's option of that name; needed for a bare state dict (default: the checkpoint's args)",
        )
    cv.set_defaults(func=cmd_convert)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import BhvitError, TrainingDiverged

    # bhvit's own errors and the system's (a full disk, a missing file) are one line each;
    # anything else is a bug and keeps its traceback.
    try:
        rc = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return rc
    except BrokenPipeError:
        # the reader went away (`bhvit info NAME --layers | head -3`): stop quietly, with the
        # status of a process that SIGPIPE ended (128 + 13), as other command-line tools do
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the final flush must not fail again
        except (OSError, ValueError):  # a stdout without a file descriptor
            pass
        return 141
    except TrainingDiverged as e:
        print(f"bhvit: error: {e}", file=sys.stderr)
        return 3
    except (BhvitError, OSError) as e:
        print(f"bhvit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
