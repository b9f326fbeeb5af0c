"""``evomerge-zoo``: build the model zoos, print where they live, tabulate them.

    evomerge-zoo build tiny [--force] [--from-scratch]
    evomerge-zoo path tiny
    evomerge-zoo table tiny [--split test] [--out results/zoo.md] [--limit N]
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from evomerge.errors import user_errors
from evomerge.zoo.build import ZOO_NAMES, ZooError, build_zoo, load_zoo, zoo_dir

PROG = "evomerge-zoo"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Build and inspect evomerge's model zoos.")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache root (default: $EVOMERGE_CACHE or ~/.cache/evomerge)")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a zoo (instant when cached)")
    b.add_argument("zoo", choices=ZOO_NAMES)
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("--from-scratch", action="store_true",
                   help="tiny: also train the base (about 6.5 extra minutes) instead of using the shipped one")
    pa = sub.add_parser("path", help="print a zoo's directory")
    pa.add_argument("zoo", choices=ZOO_NAMES)
    t = sub.add_parser("table", help="score every zoo model on every zoo task")
    t.add_argument("zoo", choices=ZOO_NAMES)
    t.add_argument("--split", default="test", help="task split to score (default: test)")
    t.add_argument("--limit", type=float, default=None, help="items per task (below 1: a fraction)")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--bf16", action="store_true", help="score in bfloat16 (faster on CPUs with bf16 instructions)")
    t.add_argument("--out", type=Path, default=None,
                   help="markdown file to write the table into (its '<zoo>' section is replaced)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _write_section(path: Path, zoo: str, text: str) -> None:
    """Replace the block between this zoo's markers in ``path`` (or append it)."""
    start, end = f"<!-- zoo-table:{zoo}:start -->", f"<!-- zoo-table:{zoo}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        new = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, old, flags=re.S)
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def _table(args: argparse.Namespace) -> None:
    import torch

    from evomerge.zoo.table import zoo_table

    zoo = load_zoo(args.zoo, cache_dir=args.cache_dir, progress=not args.quiet)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    if args.batch_size < 1:
        raise ZooError(f"--batch-size must be a positive integer, got {args.batch_size}.")
    table = zoo_table(zoo, split=args.split, limit=limit, batch_size=args.batch_size,
                      dtype=torch.bfloat16 if args.bf16 else None, progress=not args.quiet)
    cmd = f"evomerge-zoo table {args.zoo} --split {args.split}" + (" --bf16" if args.bf16 else "") + (
        f" --limit {args.limit:g}" if args.limit is not None else "") + (f" --out {args.out}" if args.out else "")
    items = "/".join(map(str, sorted(set(table.n_items.values()))))
    if limit is not None:
        items = f"the first {limit} of {items}"
    text = "\n".join([
        f"Split `{args.split}`, {items} items per task; em = exact match of the final "
        f"answer (generate_until), ll acc = 4-way multiple choice by log-likelihood. Bold: best in column.",
        f"Zoo built in {zoo.manifest.get('build_seconds', '?')} s (torch threads: {zoo.manifest.get('threads', '?')}); "
        f"table computed in {table.seconds:.0f} s on {time.strftime('%Y-%m-%d')}. Regenerate: `{cmd}`",
        "",
        table.markdown(),
    ])
    print(text)
    if args.out:
        _write_section(args.out, args.zoo, text)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with user_errors(PROG):
        if args.command == "build":
            zoo = build_zoo(args.zoo, cache_dir=args.cache_dir, force=args.force or args.from_scratch,
                            progress=not args.quiet, from_scratch=args.from_scratch)
            print(f"{zoo.name} zoo at {zoo.root} ({'cached' if zoo.from_cache else 'built'}; "
                  f"build time {zoo.manifest.get('build_seconds', '?')} s)")
            for name, path in zoo.models().items():
                print(f"  {name:8s} {path}")
            print(f"  tasks    {zoo.task_dir}")
        elif args.command == "path":
            print(zoo_dir(args.zoo, args.cache_dir))
        elif args.command == "table":
            _table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
