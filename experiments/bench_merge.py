"""Merge-engine benchmark: one-shot evomerge-merge vs mergekit, and the prepared engine per candidate.

Everything runs in one process tree on one machine, so the ratios hold on a noisy
box. The inputs are a SmolLM2-135M-shaped Llama (hidden 576, 30 layers, tied
embeddings) and three "fine-tunes" = base + sparse random task vectors, stored in
float32. Merge cost does not depend on what the weights mean, so synthetic
fine-tunes measure the same thing as real ones.

    python experiments/bench_merge.py --mergekit-python /tmp/mkvenv/bin/python
    python experiments/bench_merge.py --device cuda --shape smol-1.7b --dtype bfloat16 --name bench_merge_gpu_1.7b

writes results/<name>.json, results/<name>.md and results/<name>.png (name: bench_merge); a hand-written
notes section below the ``<!-- notes ... -->`` marker in the .md survives a rerun. "Bytes touched" by a
candidate: every input it reads (base, task vectors or models, and DARE/DELLA's stored draws) and its output.
mergekit is a reference, never a dependency: install it in its own venv
(``python -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOL_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
                  rms_norm_eps=1e-5, rope_theta=100000.0)

SHAPES = {
    "smol-135m": SMOL_SHAPE,
    "smol-1.7b": dict(SMOL_SHAPE, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                      num_attention_heads=32, num_key_value_heads=32, rope_theta=130000.0),
}

RECIPES = {
    "ties": ("ties", {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.6, 0.4]}),
    "dare_ties": ("dare_ties", {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.6, 0.4]}),
    "breadcrumbs": ("breadcrumbs", {"weight": [0.5, 0.3, 0.2], "density": [0.8, 0.8, 0.8]}),
    "task_arithmetic": ("task_arithmetic", {"weight": [0.5, 0.3, 0.2]}),
    "linear": ("linear", {"weight": [0.5, 0.3, 0.2]}),
    "slerp": ("slerp", {}),
}


def build_family(root: Path, shape: dict, dtype: torch.dtype) -> tuple[Path, list[Path]]:
    """Base + three fine-tunes of a SmolLM2 shape, cached on disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.model_factory import make_tokenizer  # a tokenizer so outputs load

    base_dir, fts = root / "base", [root / f"ft{i}" for i in range(3)]
    if all((d / "config.json").is_file() for d in [base_dir, *fts]):
        return base_dir, fts
    torch.manual_seed(0)
    tok = make_tokenizer(base_dir)
    cfg = LlamaConfig(**shape)
    base = LlamaForCausalLM(cfg).to(dtype)
    base.save_pretrained(base_dir)
    state = base.state_dict()
    for i, d in enumerate(fts):
        dev = "cuda" if torch.cuda.is_available() else "cpu"  # noise for 1.7B params is slow on CPU
        gen = torch.Generator(device=dev).manual_seed(i + 1)
        ft = {k: v + (torch.randn(v.shape, generator=gen, device=dev) * 0.01
                      * (torch.rand(v.shape, generator=gen, device=dev) < 0.6)).to(dtype).cpu()
              for k, v in state.items() if k != "lm_head.weight"}
        base.load_state_dict({**state, **ft}, strict=False)
        base.save_pretrained(d)
        tok.save_pretrained(d)
        base.load_state_dict(state)
    return base_dir, fts


def recipe_yaml(name: str, base: Path, fts: list[Path], dtype: str = "float32") -> str:
    method, params = RECIPES[name]
    if method == "slerp":
        return (f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {fts[0]}\n"
                f"parameters:\n  t: 0.4\ndtype: {dtype}\n")
    lines = [f"merge_method: {method}"]
    if method != "linear":
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for i, ft in enumerate(fts):
        p = ", ".join(f"{k}: {v[i]}" for k, v in params.items())
        lines += [f"  - model: {ft}", f"    parameters: {{{p}}}"]
    lines.append(f"dtype: {dtype}")
    return "\n".join(lines) + "\n"


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def bench_oneshot(work: Path, base: Path, fts: list[Path], mergekit_python: str | None, device: str, dtype: str,
                  reps: int) -> dict:
    """Whole-process merges, evomerge and mergekit in turn ``reps`` times (medians): on a shared
    machine one run each can land on a slow and a fast minute."""
    out: dict = {}
    for name in ("ties", "dare_ties", "linear"):
        recipe = work / f"{name}.yaml"
        recipe.write_text(recipe_yaml(name, base, fts, dtype))
        runs: dict[str, list[float]] = {"evomerge": [], "mergekit": []}
        for _ in range(reps):
            runs["evomerge"].append(timed([sys.executable, "-m", "evomerge.engine.cli", str(recipe),
                                           str(work / f"evo_{name}"), "--device", device, "--no-progress"]))
            if mergekit_python:
                mk = Path(mergekit_python).parent / "mergekit-yaml"
                runs["mergekit"].append(timed([str(mk), str(recipe), str(work / f"mk_{name}"), "--copy-tokenizer"]))
            for d in work.glob(f"*_{name}"):
                shutil.rmtree(d, ignore_errors=True)
        row = {tool: statistics.median(ts) for tool, ts in runs.items() if ts}
        row["all_s"] = runs
        out[name] = row
        print(f"one-shot {name}: {row}", flush=True)
    return out


class CopyFloor:
    """A plain copy of the same bytes: the physical floor for a candidate on this device.

    Timed right before each candidate (``seconds()``), so that a candidate and its floor share the
    moment's memory bandwidth: on a shared machine that bandwidth drifts by 2x within minutes."""

    def __init__(self, nbytes_read: int, nbytes_written: int, device: str) -> None:
        self.device = device
        self.src = torch.empty(nbytes_written // 4, dtype=torch.float32, device=device).uniform_()
        self.dst = torch.empty_like(self.src)
        self.ratio = (nbytes_read + nbytes_written) / (2 * nbytes_written)  # a copy touches 2 bytes per byte written
        self.seconds()  # first touch of dst's pages

    def seconds(self) -> float:
        if self.device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.dst.copy_(self.src)
        if self.device != "cpu":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * self.ratio


def host_syncs(engine, recipe) -> dict:
    """How often one candidate makes the host wait for the GPU, and where (torch's sync debug mode):
    each wait drains the GPU's queue, so a per-tensor wait makes a candidate launch-latency bound."""
    import collections
    import warnings

    sites: collections.Counter = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.apply(recipe)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            sites[f"{Path(w.filename).name}:{w.lineno}"] += 1
    return {"count": sum(sites.values()), "sites": dict(sites.most_common(5))}


def top_ops(engine, recipe, device: str, k: int = 5) -> list[tuple[str, float]]:
    """Where one candidate's time goes: the ``k`` operators with the most self time (ms) under
    ``torch.profiler``, on the device's clock on a GPU, else the host's."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device != "cpu" else [])
    with profile(activities=acts) as prof:
        engine.apply(recipe)
        if device != "cpu":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device != "cpu" else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)[:k]
    return [(e.key[:60], getattr(e, attr) / 1e3) for e in rows]


def bench_prepared(base: Path, fts: list[Path], reps: int, device: str, methods: list[str],
                   profile: bool = False) -> dict:
    from evomerge.engine.prepared import PreparedMerge
    from evomerge.engine.recipe import Recipe
    import yaml

    out: dict = {}
    for name in methods:
        recipe = Recipe.from_dict(yaml.safe_load(recipe_yaml(name, base, fts)))
        start = time.perf_counter()
        engine = PreparedMerge(recipe, device=device, memory="device", progress=False)
        prep = time.perf_counter() - start
        m = engine.plan.method
        n_in = len(engine.plan.jobs[0].models) + (1 if m.needs_base else 0)
        n_in += len(engine.plan.jobs[0].models) if m.uses_uniforms else 0  # DARE/DELLA also read their draws
        numel = sum(p.numel() for p in engine.state_dict().values())
        read, written = numel * 4 * n_in, numel * 4
        copy = CopyFloor(read, written, device)
        floors, times = [], []
        for _ in range(reps):  # floor and candidate in turn: each pair sees the same bandwidth
            floors.append(copy.seconds())
            times.append(engine.apply(recipe).seconds)
        del copy
        syncs = host_syncs(engine, recipe) if device != "cpu" else None
        ops = top_ops(engine, recipe, device) if profile else None
        med = statistics.median(times)
        out[name] = {"prepare_s": prep, "candidate_s": med, "all_s": times, "bytes": read + written,
                     "GBps": (read + written) / med / 1e9, "copy_floor_s": statistics.median(floors),
                     "all_floor_s": floors,
                     "fraction_of_copy_bw": statistics.median(f / t for f, t in zip(floors, times)),
                     "tensors": len(engine.state_dict()), **({"host_syncs": syncs} if syncs else {}),
                     **({"top_ops_ms": ops} if ops else {})}
        print(f"prepared {name}: {out[name]['candidate_s']:.3f}s/candidate "
              f"({out[name]['GBps']:.1f} GB/s, {out[name]['fraction_of_copy_bw']:.0%} of copy)"
              + (f", host syncs {syncs}" if syncs else ""), flush=True)
        del engine
        if device != "cpu":
            torch.cuda.empty_cache()
    return out


def write_results(res: dict, out_dir: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(res, indent=2))
    prep, one = res["prepared"], res["oneshot"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(prep)
    ax.bar(names, [prep[n]["candidate_s"] for n in names], label="prepared engine, per candidate")
    ax.bar(names, [prep[n]["copy_floor_s"] for n in names], alpha=0.6, label="plain copy of the same bytes")
    ax.set_ylabel("seconds")
    ax.tick_params(axis="x", labelrotation=20)
    ax.set_title(f"Time per candidate, {res['shape']} shape, 3 fine-tunes ({res['machine']['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=120)
    lines = ["# Merge engine benchmark", "", f"Machine: {res['machine']}", "",
             f"Command: `{res['command']}`", "", "## One-shot merge, whole process (seconds; median of runs made in turn)", "",
             "| recipe | evomerge-merge | mergekit-yaml | speed-up |", "|---|---|---|---|"]
    for n, row in one.items():
        mk = row.get("mergekit")
        lines.append(f"| {n} | {row['evomerge']:.1f} | {mk:.1f} | {mk / row['evomerge']:.1f}x |" if mk else
                     f"| {n} | {row['evomerge']:.1f} | n/a | |")
    lines += ["", "## Prepared engine, per candidate (median; the copy floor is timed before each candidate)", "",
              "| method | s / candidate | vs mergekit one-shot | GB/s touched | copy floor (s) | fraction of copy bandwidth "
              "| host syncs / candidate |",
              "|---|---|---|---|---|---|---|"]
    for n, row in prep.items():
        mk = one.get(n, {}).get("mergekit")
        vs = f"{mk / row['candidate_s']:.0f}x faster" if mk else ""
        lines.append(f"| {n} | {row['candidate_s']:.3f} | {vs} | {row['GBps']:.1f} | {row['copy_floor_s']:.3f} | "
                     f"{row['fraction_of_copy_bw']:.0%} | {row.get('host_syncs', {}).get('count', '')} |")
    profiled = {n: row["top_ops_ms"] for n, row in prep.items() if "top_ops_ms" in row}
    if profiled:
        lines += ["", "## Where one candidate's time goes (torch.profiler, self time of the top operators, ms)", "",
                  "| method | operators |", "|---|---|"]
        lines += [f"| {n} | " + "; ".join(f"`{op}` {ms:.1f}" for op, ms in ops) + " |" for n, ops in profiled.items()]
    lines += ["", f"![time per candidate]({name}.png)", ""]
    from experiments.study import write_keeping_notes  # noqa: PLC0415 (ROOT is on sys.path by now)

    write_keeping_notes(out_dir / f"{name}.md", "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/evomerge-bench")
    ap.add_argument("--mergekit-python", default=None, help="python of a venv with mergekit installed")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--skip-oneshot", action="store_true")
    ap.add_argument("--oneshot-reps", type=int, default=3, help="whole-process merges per tool and recipe")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--shape", default="smol-135m", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="storage dtype of the inputs")
    ap.add_argument("--methods", default="ties,dare_ties,breadcrumbs,task_arithmetic,slerp,linear")
    ap.add_argument("--profile", action="store_true", help="also profile one candidate per method (top operators)")
    ap.add_argument("--name", default="bench_merge", help="results/<name>.{json,md,png}")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    work = Path(args.work)
    dtype = getattr(torch, args.dtype)
    suffix = "" if (args.shape, args.dtype) == ("smol-135m", "float32") else f"-{args.shape}-{args.dtype}"
    base, fts = build_family(work / f"family{suffix}", SHAPES[args.shape], dtype)
    device = "cpu" if args.device == "cpu" else "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    res = {
        "command": " ".join(["python", *sys.argv]),
        "shape": f"{args.shape} ({args.dtype})",
        "machine": {"device": name, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch": torch.__version__,
                    "load_average_at_start": os.getloadavg()[0]},
        "oneshot": {} if args.skip_oneshot else bench_oneshot(work, base, fts, args.mergekit_python, device, args.dtype,
                                                                  args.oneshot_reps),
        "prepared": bench_prepared(base, fts, args.reps, device, args.methods.split(","), args.profile),
    }
    write_results(res, Path(args.out), args.name)


if __name__ == "__main__":
    main()
