"""``vmem inspect FILE``: its arguments and the command (the reading is :mod:`vmem.analysis.inspect`).

Named ``inspect_cmd`` so that it never stands in for the standard library's :mod:`inspect`
(as it would with ``vmem/cli`` on ``sys.path``)."""
from __future__ import annotations

import json
import os

from vmem.analysis.inspect import inspect_stream, print_inspection, write_pagemap
from vmem.errors import ConfigError

__all__ = ["add_inspect_arguments", "cmd_inspect"]


def add_inspect_arguments(p) -> None:
    """Arguments of ``vmem inspect``."""
    p.add_argument("file", metavar="FILE", help="an xl save file, a stream xl migrate wrote, or a vmem stream")
    p.add_argument("--json", metavar="FILE", help="write the inspection as JSON to FILE")
    p.add_argument("--pagemap", metavar="DIR", help="draw the page map (pagemap.png, pagemap.html, pagemap.npz) into DIR")


def cmd_inspect(args) -> int:
    """``vmem inspect``: print a stream's records and rounds; optionally its JSON and page map."""
    if not os.path.isfile(args.file):
        raise ConfigError("FILE", f"{args.file} is not a file")
    r = inspect_stream(args.file)
    print_inspection(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in r.items() if not k.startswith("_")}, f, indent=2)
            f.write("\n")
        print(f"inspection written to {args.json}")
    if args.pagemap:
        for path in write_pagemap(r, args.pagemap):
            print(f"wrote {path}")
    return 0
