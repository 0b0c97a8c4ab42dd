"""Command line: ``bhvit info NAME``, ``bhvit list``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .complexity import complexity, format_complexity
from .model import create_model, list_models


def _overrides(items: List[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}.")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
        if isinstance(out[k], list):
            out[k] = tuple(out[k])
    return out


def cmd_info(args) -> int:
    overrides = _overrides(args.set)
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    model = create_model(args.name, num_classes=args.num_classes, **overrides)
    c = complexity(model)
    if args.json:
        print(json.dumps(c))
    else:
        print(format_complexity(args.name, c))
    return 0


def cmd_list(args) -> int:
    for name in list_models():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bhvit", description="BHViT: binarized hybrid vision transformer.")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameters, BOPs, FLOPs, OPs and size of a named model")
    info.add_argument("name", help="model name (see `bhvit list`)")
    info.add_argument("--img-size", type=int, default=None)
    info.add_argument("--num-classes", type=int, default=1000)
    info.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. --set binary=false --set qd=false (repeatable)")
    info.add_argument("--json", action="store_true", help="print a JSON object")
    info.set_defaults(func=cmd_info)

    lst = sub.add_parser("list", help="list the named models")
    lst.set_defaults(func=cmd_list)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"bhvit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
