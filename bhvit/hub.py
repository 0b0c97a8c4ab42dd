"""Models as Hugging Face and timm users keep them: ``save_pretrained`` / ``from_pretrained``.

A pretrained folder has the layout of ``huggingface_hub.PyTorchModelHubMixin``::

    config.json         the model config, the preprocessing, provenance; a bhvit checkpoint JSON
    model.safetensors   the state dict (safetensors metadata ``{"format": "pt"}``)
    README.md           a model card with the Hub's YAML metadata

``config.json`` is a complete bhvit checkpoint document (``format``, ``weights``,
``weights_sha256``, ``model_config``, ``data``), so every bhvit command that takes a
checkpoint takes the folder, and loading checks the weights' SHA-256 as it does for a run.
Its ``pretrained_cfg`` entry (timm's preprocessing keys) is written for other tools; bhvit
reads ``data``. Local folders never touch the network; a Hub id (``owner/name``) is fetched
with ``huggingface_hub`` when it is installed (``pip install "bhvit[hub]"``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from .errors import ConfigError

__all__ = ["save_pretrained", "from_pretrained", "push_to_hub", "model_card", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
# what a Hub download fetches: nothing but the three files
_FILES = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]


def _document(model: torch.nn.Module) -> Dict[str, Any]:
    """The config.json of ``model`` (weights entries added by the caller)."""
    from . import __version__
    from .checkpoint import FORMAT, FORMAT_VERSION

    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "pretrained_cfg"):
        raise ConfigError(f"save_pretrained needs a BHViT, got {type(model).__name__}.")
    doc: Dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "library_name": "bhvit",
        "bhvit_version": __version__,
        "architecture": getattr(model, "name", None),
        "model_config": cfg.to_dict(),
        "data": model.data,
        "pretrained_cfg": model.pretrained_cfg,
    }
    doc.update(getattr(model, "provenance", None) or {})
    return doc


def save_pretrained(
    model: torch.nn.Module,
    save_directory: Union[str, Path],
    license: Optional[str] = None,
    card: bool = True,
) -> Path:
    """Write ``model`` to ``save_directory`` (created if needed): config.json, model.safetensors
    and, unless ``card=False``, a README.md model card. ``license`` goes into the card's
    metadata (an SPDX-like id such as ``"mit"``; default: ``"other"``, i.e. not stated).
    Returns the folder. A folder holding other files is written into; the three files are
    replaced atomically, weights before config.json."""
    from .checkpoint import atomic_save_safetensors, atomic_write_json, atomic_write_text

    out = Path(save_directory)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory.")
    doc = _document(model)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    doc["weights"] = WEIGHTS_NAME
    doc["weights_sha256"] = atomic_save_safetensors(state, out / WEIGHTS_NAME, {"format": "pt"})
    atomic_write_json(doc, out / CONFIG_NAME)
    if card:
        atomic_write_text(model_card(model, doc, license), out / CARD_NAME)
    return out


def _is_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~"))


def _local_folder(source: Union[str, Path], revision, cache_dir, token) -> Path:
    p = Path(source).expanduser()
    if p.exists():
        return p
    s = str(source)
    if not _is_hub_id(s):
        raise ConfigError(f"{s}: no such file or folder (and not a Hugging Face Hub id of the form owner/name).")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(
            f"{s}: no such local folder. To load it from the Hugging Face Hub, install huggingface_hub "
            '(pip install "bhvit[hub]").'
        ) from None
    return Path(
        snapshot_download(repo_id=s, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=_FILES)
    )


def from_pretrained(
    source: Union[str, Path],
    map_location: str = "cpu",
    revision: Optional[str] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    token: Optional[str] = None,
) -> torch.nn.Module:
    """A BHViT from a pretrained folder (``save_pretrained``'s), a training run directory, a
    checkpoint JSON or a ``bhvit convert`` output; or from a Hugging Face Hub id
    (``owner/name``, needs ``huggingface_hub``; ``revision``, ``cache_dir`` and ``token`` are
    passed to its ``snapshot_download``). The model is in eval mode."""
    from .checkpoint import load_model

    model, _ = load_model(_local_folder(source, revision, cache_dir, token), map_location=map_location)
    return model


def push_to_hub(
    model: torch.nn.Module,
    repo_id: str,
    private: bool = False,
    token: Optional[str] = None,
    license: Optional[str] = None,
    commit_message: str = "Upload bhvit model",
) -> str:
    """Save ``model`` as a pretrained folder and upload it to the Hugging Face Hub repository
    ``repo_id`` (created if missing). Needs ``huggingface_hub``; returns the commit's URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ConfigError('push_to_hub needs huggingface_hub (pip install "bhvit[hub]").') from None
    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, license=license)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


# --- the model card -----------------------------------------------------------------
def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML scalar


def _count(n: float) -> str:
    return f"{n / 1e9:.3f} G" if n >= 1e8 else f"{n / 1e6:.2f} M"


def model_card(model: torch.nn.Module, doc: Dict[str, Any], license: Optional[str] = None) -> str:
    """A README.md for the pretrained folder: Hub metadata, architecture and cost, data and
    preprocessing, accuracy where the checkpoint records it, provenance, and how to use it."""
    from .costs import complexity

    cfg, pc = model.cfg, model.pretrained_cfg
    name = doc.get("architecture") or "bhvit"
    source = doc.get("source") or {}
    released = str(source.get("kind", "")).startswith("BHViT release")  # bhvit convert's record
    license = license or "other"  # not stated
    data = doc.get("data") or {}
    c = complexity(model)
    kind = {(True, True): "binary", (False, False): "full-precision"}.get(
        (cfg.quant.weights, cfg.quant.acts), f"binary weights {cfg.quant.weights}, binary activations {cfg.quant.acts}"
    )
    meta = ["---", "library_name: bhvit", f"license: {_yaml_str(license)}", "pipeline_tag: image-classification"]
    meta += ["tags:", "- bhvit", "- binary-neural-network", "- image-classification"]
    if data.get("name"):
        meta += ["datasets:", f"- {_yaml_str(data['name'])}"]
    meta.append("---")
    lines = meta + ["", f"# {name} ({kind})", ""]
    lines += [
        "BHViT (Gao et al., *BHViT: Binarized Hybrid Vision Transformer*, CVPR 2025) in "
        "[bhvit](https://pypi.org/project/bhvit/), a PyTorch implementation with a bit-packed "
        "XNOR/popcount runtime.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {name}: depths {list(cfg.depths)}, dims {list(cfg.dims)}, {kind} |",
        f"| input | {pc['input_size'][0]} x {pc['input_size'][1]} x {pc['input_size'][2]} |",
        f"| classes | {cfg.num_classes} |",
        f"| parameters | {c['params'] / 1e6:.2f} M ({c['binary_params'] / 1e6:.2f} M binary) |",
        f"| BOPs / FLOPs / OPs | {_count(c['bops'])} / {_count(c['flops'])} / {_count(c['ops'])} |",
        f"| size with 1-bit weights | {c['size_bytes'] / 1e6:.2f} MB (float32: {c['fp32_size_bytes'] / 1e6:.2f} MB) |",
        "",
        "## Data and preprocessing",
        "",
    ]
    if data.get("name"):
        n = f" ({len(data['classes'])} classes)" if data.get("classes") else ""
        lines.append(f"Trained on `{data['name']}`{n}.")
    else:
        lines.append("The training data is not recorded.")
    if pc.get("mean") is not None:
        lines += [
            "",
            f"Evaluation input: the shorter side resized to {round(pc['input_size'][1] / pc['crop_pct'])} "
            f"({pc['interpolation']}), the centre {pc['input_size'][1]} x {pc['input_size'][2]} crop, "
            f"pixels in [0, 1] normalised with mean {list(pc['mean'])} and std {list(pc['std'])}.",
        ]
    lines += ["", "## Accuracy", ""]
    metrics = doc.get("metrics") or {}
    tc = doc.get("train_config") or {}
    if isinstance(metrics.get("test_top1"), (int, float)):
        subset = tc.get("test_subset")
        lines.append(
            f"Top-1 {metrics['test_top1']:.2f} %"
            + (f", top-5 {metrics['test_top5']:.2f} %" if isinstance(metrics.get("test_top5"), (int, float)) else "")
            + (f" on {subset} images of the test split" if subset else " on the test split")
            + f" of `{data.get('name', 'its data')}`, measured by `bhvit train` after epoch {metrics.get('epoch')}."
        )
    elif released:
        lines.append(
            "Converted from the authors' published checkpoint; its accuracy is the one the authors "
            "published for it (not measured by bhvit)."
        )
    else:
        lines.append("Not recorded.")
    lines += ["", "## How it was made", ""]
    if released:
        lines.append(
            f"`bhvit convert` of the authors' release checkpoint `{source.get('file', '?')}` "
            f"(SHA-256 `{source.get('sha256', '?')}`); the release's code is under the MIT license."
        )
    elif tc:
        lines.append(
            f"`bhvit train`: model `{tc.get('model')}`, data `{tc.get('data')}`, {tc.get('epochs')} epochs, "
            f"lr {tc.get('lr')}, batch {tc.get('batch_size')}"
            + (f", distilled from `{tc['teacher']}`" if tc.get("teacher") else "")
            + (f", epoch {doc['epoch'] + 1}" if isinstance(doc.get("epoch"), int) else "")
            + "."
        )
    else:
        lines.append("Not recorded.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import bhvit",
        'model = bhvit.from_pretrained("THIS_FOLDER_OR_HUB_ID")   # eval mode',
        "print(model.pretrained_cfg)                              # input size, mean/std, interpolation, crop",
        "```",
        "",
        "```bash",
        "bhvit export THIS_FOLDER exported/      # the bit-packed runtime (Python and C)",
        "bhvit predict exported/ image.jpg",
        "```",
        "",
    ]
    return "\n".join(lines)
