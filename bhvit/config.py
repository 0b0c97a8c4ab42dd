"""The training configuration: one dataclass, whose fields also define the command line.

Each field of :class:`TrainConfig` carries its option in its metadata (flag, help,
argparse settings and how the parsed value maps back), so ``bhvit train`` and ``bhvit
recipe`` options, their help and the resume check (``resume_check``: settings a resumed
run must share with the run it continues) come from this one place. No torch import:
``bhvit predict`` builds the same parser without loading PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

from .errors import ConfigError

__all__ = [
    "TrainConfig",
    "RESUME_KEYS",
    "add_train_arguments",
    "train_config_from_args",
    "parse_overrides",
    "positive_int",
    "thread_count",
    "test_subset_arg",
]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def thread_count(text: str) -> int:
    """argparse type of --threads: an integer from 1 to the runtime's MAX_THREADS (4096)."""
    from .runtime.kernels import MAX_THREADS

    v = positive_int(text)
    if v > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_THREADS}, got {v}")
    return v


def test_subset_arg(text: str) -> int:
    """argparse type of --test-subset: 'all' (0) or a positive integer."""
    return 0 if text.strip().lower() == "all" else positive_int(text)


_WORDS = {"true": True, "false": False, "none": None, "null": None}


def _override_value(v: str):
    """One ``--set`` value: a true/false/none word, else JSON, else the string itself."""
    if v.strip().lower() in _WORDS:
        return _WORDS[v.strip().lower()]
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def parse_overrides(items: List[str]) -> dict:
    """``--set KEY=VALUE`` items as a dict: true/false/none words, JSON values (lists as
    tuples), comma-separated values as tuples (``windows=7,7,5,7`` is ``windows=[7,7,5,7]``;
    ``shift_sizes=2,`` a one-element list), anything else as the string."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}.")
        k, v = item.split("=", 1)
        if k == "num_classes":
            raise ConfigError(
                "--set num_classes is not allowed: use --num-classes with `info`; "
                "training takes the class count from the dataset."
            )
        value = _override_value(v)
        if isinstance(value, str) and "," in v and not v.lstrip().startswith(("[", "{", '"')):
            parts = v.split(",")
            if parts[-1].strip() == "":  # "2," : a one-element list
                parts.pop()
            value = [_override_value(part.strip()) for part in parts]
        out[k] = tuple(value) if isinstance(value, list) else value
    return out


def _opt(
    value,
    help: str,
    *,
    flag: Optional[str] = None,
    negate: bool = False,
    recipe: bool = True,
    resume_check: bool = False,
    convert=None,
    factory=None,
    **argparse_kw,
):
    """A TrainConfig field with its command-line option.

    ``flag``: the option (default ``--field-name``); ``negate``: a ``--no-...`` switch that
    sets the field to False; ``recipe``: ``bhvit recipe`` has it too; ``convert``: parsed
    value -> field value; ``argparse_kw``: for ``add_argument`` (default: ``type`` from the
    field's default ``value`` when it is a number or string, ``default`` that value)."""
    meta = {
        "cli": dict(help=help, flag=flag, negate=negate, recipe=recipe, convert=convert, kw=argparse_kw),
        "resume_check": resume_check,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=value, metadata=meta)


_RESUME = {"yes": True, "auto": "auto"}


@dataclass
class TrainConfig:
    model: str = _opt("bhvit_micro_c28", "model name (default bhvit_micro_c28)", resume_check=True)
    data: str = _opt(
        "fashion-mnist",
        "dataset (default fashion-mnist)",
        resume_check=True,
        choices=["fashion-mnist", "cifar10", "imagefolder"],
    )
    data_dir: Optional[str] = _opt(
        None, "dataset directory (default for fashion-mnist: /usr/share/datasets/fashion-mnist)"
    )
    out: str = _opt("runs/bhvit", "run directory (checkpoints, metrics.jsonl, curves.png)", required=True)
    epochs: int = _opt(10, "epochs (of the binary student, with recipe; default 10)", type=positive_int)
    batch_size: int = _opt(128, "batch size per process (default 128)", resume_check=True, type=positive_int)
    lr: Optional[float] = _opt(None, "default 5e-4 * global batch / 512", resume_check=True, type=float)
    weight_decay: float = _opt(0.0, "AdamW weight decay (default 0)", resume_check=True)
    warmup_epochs: float = _opt(
        0.0, "linear learning-rate warm-up, in epochs (fractions allowed; default 0)", resume_check=True
    )
    min_lr: float = _opt(0.0, "end of the cosine schedule (default 0)", resume_check=True)
    kd_lambda: float = _opt(0.8, "KD weight lambda, with a teacher (default 0.8)", resume_check=True)
    re_beta: float = _opt(0.1, "weight beta of the regularization loss L_re (default 0.1)", resume_check=True)
    re_last_frac: float = _opt(0.1, "L_re is on in this last fraction of the epochs (default 0.1)", resume_check=True)
    teacher: Optional[str] = _opt(
        None,
        "teacher for KD, a bhvit checkpoint: a run directory (its best.json, else last.json), "
        "a checkpoint .json, or its weights .safetensors (with the .json beside it)",
        recipe=False,
        resume_check=True,
        metavar="CKPT",
    )
    teacher_module: Optional[str] = _opt(
        None,
        "a teacher built by your code: PACKAGE.MODULE:FACTORY, called "
        "without arguments, returning a module that maps the student's "
        "normalised images to logits (e.g. a timm DeiT; a tensor, an object with "
        ".logits as Hugging Face models return, or a tuple whose first element is "
        "the logits); looked for in the working directory first, as `python -m` "
        "does; with --teacher-weights",
        recipe=False,
        resume_check=True,
        metavar="MODULE:FACTORY",
    )
    teacher_weights: Optional[str] = _opt(
        None,
        "the --teacher-module's state dict as a .safetensors file (no pickle), loaded strictly",
        recipe=False,
        resume_check=True,
        metavar="FILE",
    )
    # checkpoint whose matching tensors initialise the model
    init_from: Optional[str] = _opt(
        None,
        "start from this checkpoint's weights (every tensor whose name and "
        "shape match, e.g. a full-precision twin's); ignored when --resume "
        "continues a run",
        recipe=False,
        metavar="CKPT",
    )
    # True: continue the run in out (it must exist); "auto": continue it if present
    resume: Union[bool, str] = _opt(
        False,
        "continue the run in --out, which must hold one; --resume auto: continue it if there is one, else start it",
        nargs="?",
        const="yes",
        default=None,
        choices=["yes", "auto"],
        metavar="auto",
        convert=lambda v: _RESUME.get(v, False),
    )
    subset: Optional[int] = _opt(
        None, "train on a fixed random subset of N images", resume_check=True, type=positive_int
    )
    # None: as many as subset (all if no subset); 0: all
    test_subset: Optional[int] = _opt(
        None,
        "evaluate each epoch on a fixed random subset of N test images, "
        "or 'all' (default: as many as --subset, all of them without "
        "--subset)",
        resume_check=True,
        type=test_subset_arg,
        metavar="N|all",
    )
    seed: int = _opt(
        0, "seed of the initialisation, subsets, batch order and augmentation (default 0)", resume_check=True
    )
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N (default auto: cuda if available)")
    amp: bool = _opt(False, "mixed precision (fp16 on CUDA, bf16 on CPU)", resume_check=True)
    # CUDA: deterministic kernels, so a resumed run repeats exactly
    deterministic: bool = _opt(
        False,
        "CUDA: deterministic kernels and no TF32, so that a resumed run repeats "
        "an uninterrupted one (slower; CPU runs are deterministic anyway)",
    )
    threads: Optional[int] = _opt(None, "torch CPU threads", type=thread_count)
    overrides: Dict = _opt(
        None,
        "model config override, e.g. --set qd=false (repeatable)",
        flag="--set",
        resume_check=True,
        factory=dict,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        convert=parse_overrides,
    )
    skip_bad: bool = _opt(False, "skip (and count) unreadable images")
    data_in_memory: str = _opt(
        "auto",
        "decode an ImageFolder once into RAM (yes) or per sample in --workers "
        "processes (no); auto: in RAM when its decoded images take at most "
        "4 GiB and --augment is pad-crop (default auto)",
        choices=["auto", "yes", "no"],
    )
    workers: int = _opt(
        0, "DataLoader processes that decode a streamed dataset (default 0: the training process decodes)", type=int
    )
    augment: str = _opt(
        "pad-crop",
        "training augmentation: pad-crop (random crop with zero padding, flip) or "
        "rrc (RandomResizedCrop and flip, the ImageNet recipe; streamed data; "
        "evaluation then centre-crops at 0.875) (default pad-crop)",
        resume_check=True,
        choices=["pad-crop", "rrc"],
    )
    max_steps: Optional[int] = _opt(
        None,
        "stop after this many optimizer steps in all (a smoke run); the last, partial epoch is evaluated and saved",
        type=positive_int,
    )
    cache_dir: Optional[str] = _opt(None, "decoded-image cache (default $BHVIT_CACHE, else ~/.cache/bhvit)")
    crop_pad: Optional[int] = _opt(None, "random-crop padding (default img_size//8)", resume_check=True, type=int)
    flip: bool = _opt(True, "no random horizontal flips", negate=True, resume_check=True)
    eval_batch_size: int = _opt(256, "batch size of the per-epoch test-set evaluation (default 256)", type=positive_int)
    progress: bool = _opt(True, "no progress bar (epoch summaries stay)", negate=True)
    # count binary-weight sign flips after every optimizer step
    step_flips: bool = _opt(
        True,
        "do not count binary-weight sign flips after every optimizer step "
        "(step_flip_frac in metrics.jsonl; the per-epoch net flips stay)",
        negate=True,
    )
    # torch.compile backend ("inductor") for the training forward/backward and the teacher;
    # shapes are kept fixed, so the last partial batch of an epoch is dropped.
    compile: Optional[str] = _opt(
        None,
        "torch.compile the training step (backend default inductor). Compiling "
        "takes minutes at the start; the last partial batch of each epoch is "
        "dropped",
        nargs="?",
        const="inductor",
        metavar="BACKEND",
    )
    # CUDA: capture the whole step (forward, backward, optimizer) as one CUDA graph and
    # replay it (bhvit.cudagraph); single process, no amp/compile; the last partial batch
    # of an epoch is dropped.
    cuda_graph: bool = _opt(
        False,
        "CUDA: record the whole training step (forward, backward, optimizer) once as "
        "a CUDA graph and replay it, which removes the per-operator launch cost; "
        "one process, not with --amp or --compile; the last partial batch of each "
        "epoch is dropped",
    )


# The settings a resumed run must share with the run it continues (epochs may grow).
RESUME_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resume_check"))

# Options that read differently in `bhvit recipe` (it runs several stages).
_RECIPE_HELP = {
    "resume": "skip the finished stages in --out and continue the unfinished one (a stage not started yet starts)",
}


def _flag(f: dataclasses.Field) -> str:
    cli = f.metadata["cli"]
    if cli["flag"]:
        return cli["flag"]
    return ("--no-" if cli["negate"] else "--") + f.name.replace("_", "-")


def add_train_arguments(p: argparse.ArgumentParser, recipe: bool = False) -> None:
    """The options of ``bhvit train`` (``recipe``: of ``bhvit recipe``), from TrainConfig's fields."""
    for f in dataclasses.fields(TrainConfig):
        cli = f.metadata.get("cli")
        if cli is None or (recipe and not cli["recipe"]):
            continue
        help = _RECIPE_HELP.get(f.name, cli["help"]) if recipe else cli["help"]
        kw = dict(cli["kw"])
        if cli["negate"] or (isinstance(f.default, bool) and "nargs" not in kw):
            kw.setdefault("action", "store_true")
        else:
            kw.setdefault("default", f.default)
            plain = not any(k in kw for k in ("type", "action", "choices", "const"))
            if plain and type(f.default) in (int, float, str):
                kw["type"] = type(f.default)
        if kw.get("required"):
            kw.pop("default", None)
        p.add_argument(_flag(f), dest=f.name, help=help, **kw)


def train_config_from_args(args: argparse.Namespace, **changes) -> TrainConfig:
    """A TrainConfig from parsed ``bhvit train``/``recipe`` options (fields that the parser
    does not have keep their defaults), then ``changes``."""
    values = {}
    for f in dataclasses.fields(TrainConfig):
        cli = f.metadata.get("cli")
        if cli is None or not hasattr(args, f.name):
            continue
        v = getattr(args, f.name)
        if cli["negate"]:
            v = not v
        elif cli["convert"] is not None:
            v = cli["convert"](v)
        values[f.name] = v
    values.update(changes)
    return TrainConfig(**values)
