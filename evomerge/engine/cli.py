"""``evomerge-merge RECIPE.yaml OUT_DIR``: a one-shot merge, mergekit-yaml style."""
from __future__ import annotations

import argparse
import time

from evomerge.engine.oneshot import merge_to_dir
from evomerge.engine.recipe import load_recipe
from evomerge.errors import user_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evomerge-merge",
        description="Merge models with a mergekit-format recipe and write a Hugging Face model directory.",
    )
    p.add_argument("recipe", help="recipe YAML in mergekit's format (merge_method, base_model, models/slices, parameters)")
    p.add_argument("out_dir", help="output model directory, new or empty, or an earlier evomerge output (built beside it "
                                   "and swapped in whole: a failed merge leaves what was there)")
    p.add_argument("--force", action="store_true",
                   help="write into an OUT_DIR that holds other files: only the files a merge writes are replaced, "
                        "the others stay (an input model is never overwritten)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto = GPU when present)")
    p.add_argument("--out-dtype", default=None, help="float32 | float16 | bfloat16 (default: recipe dtype, else the base's)")
    p.add_argument("--shard-size", default="2GB", help="largest safetensors shard, e.g. 500MB, 5GB (default 2GB)")
    p.add_argument("--seed", type=int, default=None, help="seed of DARE/DELLA masks (default: the recipe's evomerge.seed, else 0)")
    p.add_argument("--compute-dtype", default=None, choices=["float32"],
                   help="compute in float32 whatever the recipe's dtype says (more exact than mergekit, and then not "
                        "mergekit's result; default: the recipe's dtype, as mergekit computes)")
    p.add_argument("--fused", action="store_true",
                   help="one compiled pass per tensor (task-arithmetic family). Off by default: a single merge does not "
                        "repay the compile (results/bench_merge.md)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models whose config needs custom code")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with user_errors("evomerge-merge"):
        recipe = load_recipe(args.recipe)
        if args.seed is not None:
            recipe.seed = args.seed
        if args.compute_dtype is not None:
            recipe.compute_dtype = args.compute_dtype
        start = time.perf_counter()
        out = merge_to_dir(
            recipe, args.out_dir, device=args.device, out_dtype=args.out_dtype, shard_size=args.shard_size,
            progress=not args.no_progress, trust_remote_code=args.trust_remote_code,
            fused=args.fused, force=args.force,
        )
        print(f"wrote {out} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
