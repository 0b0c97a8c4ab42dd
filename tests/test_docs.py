"""The commands the docs show use options that exist.

Every ``bhvit SUBCOMMAND ...`` and ``python benchmarks|experiments/NAME.py ...`` command in
README.md, docs/*.md (fenced code blocks and inline code) and the scripts' docstrings is
checked: each ``--option`` in it must be one that command's argument parser defines,
spelled out in full.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from benchmark_module import load_benchmark
from bhvit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

SCRIPT_DIRS = ("benchmarks", "experiments")
_CMD = re.compile(r"\b(?:bhvit (?P<sub>[a-z]+)|python (?P<bench>(?:benchmarks|experiments)/\w+\.py))\b")
_OPT = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _segments(text: str):
    """Command-line snippets: fenced code lines (continuations joined, comments dropped)
    and inline code spans outside fences."""
    in_fence = False
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif in_fence:
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i]
            yield i + 1, re.split(r"\s#", line, maxsplit=1)[0]
        else:
            for span in re.findall(r"`([^`]+)`", line):
                yield i + 1, span
        i += 1


def doc_commands(text: str):
    """``(line, command key, options)`` for each bhvit / script command in ``text``;
    the key is ``bhvit SUB`` or ``benchmarks/NAME.py`` (``experiments/NAME.py``)."""
    for lineno, seg in _segments(text):
        starts = list(_CMD.finditer(seg))
        for j, m in enumerate(starts):
            end = starts[j + 1].start() if j + 1 < len(starts) else len(seg)
            # A command ends at a shell separator.
            body = re.split(r"&&|\|\||;|\|", seg[m.end() : end], maxsplit=1)[0]
            key = f"bhvit {m['sub']}" if m["sub"] else m["bench"]
            yield lineno, key, _OPT.findall(body)


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def _benchmark_parser(rel: str) -> argparse.ArgumentParser:
    """The parser a script's ``main()`` builds (caught at ``parse_args``)."""
    mod = load_benchmark(Path(rel).stem, Path(rel).parent.name)

    def catch(self, *a, **k):
        raise _Parsed(self)

    orig = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = catch
    try:
        mod.main()
    except _Parsed as got:
        return got.parser
    finally:
        argparse.ArgumentParser.parse_args = orig
    raise AssertionError(f"{rel}: main() built no argument parser")


def _options(parser: argparse.ArgumentParser) -> set:
    return {s for a in parser._actions for s in a.option_strings}


def _known_options() -> dict:
    top = build_parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    known = {f"bhvit {name}": _options(p) for name, p in subs.choices.items()}
    for folder in SCRIPT_DIRS:
        for f in sorted((ROOT / folder).glob("*.py")):
            rel = f"{folder}/{f.name}"
            known[rel] = _options(_benchmark_parser(rel))
    return known


def test_doc_commands_parser_finds_commands_and_options():
    text = (
        "```bash\nbhvit train --model m --epochs 3 \\\n    --out r   # --not-this\n```\n"
        "Run `bhvit eval RUN --data-dir D` or `python benchmarks/train_speed.py --runs 5 && "
        "bhvit list`; and --prose-flag.\n"
        "```\npython experiments/ablation.py --seeds 0 --epochs 1\n```\n"
    )
    got = [(k, o) for _, k, o in doc_commands(text)]
    assert got == [
        ("bhvit train", ["--model", "--epochs", "--out"]),
        ("bhvit eval", ["--data-dir"]),
        ("benchmarks/train_speed.py", ["--runs"]),
        ("bhvit list", []),
        ("experiments/ablation.py", ["--seeds", "--epochs"]),
    ]


def _doc_texts():
    for doc in DOCS:
        yield doc.name, doc.read_text()
    for folder in SCRIPT_DIRS:
        for f in sorted((ROOT / folder).glob("*.py")):
            yield f"{folder}/{f.name}", "```\n" + (ast.get_docstring(ast.parse(f.read_text())) or "") + "\n```"


def test_documented_commands_use_existing_options():
    known = _known_options()
    bad, seen = [], 0
    for name, text in _doc_texts():
        for lineno, key, opts in doc_commands(text):
            if key not in known:
                bad.append(f"{name}:{lineno}: unknown command {key!r}")
                continue
            seen += 1
            bad += [f"{name}:{lineno}: {key} has no option {o}" for o in opts if o not in known[key]]
    assert not bad, "\n".join(bad)
    assert seen > 70  # the docs quote many commands; a broken extractor would find few


def test_unknown_option_is_reported():
    known = _known_options()
    assert "--epochs" in known["bhvit train"] and "--runs" in known["benchmarks/train_speed.py"]
    cmds = list(doc_commands("`bhvit train --epoch 3`"))
    assert [o for _, k, opts in cmds for o in opts if o not in known[k]] == ["--epoch"]


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])


def _readme_block(first_line: str) -> str:
    """The fenced block of README.md that holds ``first_line``, from that line to the fence."""
    text = (ROOT / "README.md").read_text()
    start = text.index(first_line)
    return text[start : text.index("```", start)]


def test_readme_runtime_snippet_runs_from_an_image_file(tmp_path, monkeypatch):
    """The README's runtime lines run as written in a folder with an export and an image."""
    import numpy as np
    import torch
    from PIL import Image

    import bhvit
    from bhvit.export import export_model

    torch.manual_seed(0)
    model = bhvit.create_model("bhvit_micro_c28").eval()
    export_model(model, tmp_path / "exported", data={"mean": [0.5], "std": [0.25]})
    Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)).save(tmp_path / "shirt.png")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(_readme_block("import bhvit.runtime"), scope)
    assert scope["logits"].shape == (1, 10) and scope["x"].shape == (1, 1, 28, 28)


def test_readme_smoke_run_writes_only_under_runs():
    """The first-look commands leave the clone clean: every path they write is in runs/
    (ignored by git)."""
    block = _readme_block("bhvit recipe --subset 2000")
    written = re.findall(r"--out (\S+)|bhvit export \S+ (\S+)|\.save\('([^']+)'\)", block)
    paths = [p for group in written for p in group if p]
    assert len(paths) == 3 and all(p.startswith("runs/") for p in paths), paths
    assert "runs/" in (ROOT / ".gitignore").read_text().split()


def test_training_guide_makes_an_imagefolder_from_cifar10s_python_version(tmp_path, monkeypatch):
    """docs/TRAINING.md's commands, run on a small CIFAR-10 python-version directory, give an
    ImageFolder that bhvit reads back pixel for pixel."""
    import subprocess
    import sys

    import torch

    from bhvit.data import load_dataset
    from synth import make_cifar_pickle

    text = (ROOT / "docs" / "TRAINING.md").read_text()
    start = text.index('  python -c "\n  from pathlib import Path')
    code = text[start : text.index('"\n', start + 20)].split('python -c "\n', 1)[1]
    code = "\n".join(line[2:] for line in code.splitlines())  # the list item's indentation
    make_cifar_pickle(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, "-c", code], check=True)
    for split in ("train", "test"):
        want = load_dataset("cifar10", split, "data/cifar-10-batches-py")
        got = load_dataset("imagefolder", split, "data/cifar10-png", channels=3, size=32, cache_dir=str(tmp_path / "c"))
        names = [want.classes[int(y)] for y in want.labels]
        assert got.classes == sorted(set(names)) and len(got) == len(want) == (100 if split == "train" else 20)
        assert sorted(names) == sorted(got.classes[int(y)] for y in got.labels)
        # images sorted by class, then file index, in both
        order = sorted(range(len(want)), key=lambda i: (names[i], i))
        assert torch.equal(got.images, want.images[order])
