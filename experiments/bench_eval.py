"""Scoring a split: lm-eval's HFLM, evomerge's FastLM and a bare forward pass over the same tokens.

Usage: python experiments/bench_eval.py [--shapes tiny,smol,smolzoo] [--kinds ll,gen] [--dtypes float32,bfloat16]
       [--limit 64] [--reps 3] [--batch-size 32] [--threads N] [--device cpu] [--out results/bench_eval]

For each model shape, task kind and dtype, in one process and alternating rep by rep, it times
``Evaluator.evaluate`` on the tasks' ``search`` split with ``backend="hflm"`` and ``backend="fast"``,
and bare forward passes over the tokens FastLM put through the model: per distinct context, the
context and every continuation's tokens (log-likelihood); per generated row, the prompt and the
generated tokens (generation, as one teacher-forced pass). "dense": all those tokens end to end in
rows as long as the longest sequence, full batches (no padding, no KV cache, no Python between
tokens: the machine's limit for that many tokens, and the rate the ratios are against); "per
sequence": one row per sequence, batched only with rows of exactly its length (no padding either,
but more, smaller batches). Logits and log-softmax at as many positions as FastLM scores. Token
rates are that work over each one's seconds.

Shapes: ``tiny`` is the tiny zoo's ``add`` specialist; ``smol`` is a randomly initialised model of
SmolLM2-135M's architecture (Llama, hidden 576, 30 layers, 9 heads, 3 KV heads, MLP 1536, vocab
49152, tied embeddings), fed the tiny zoo's character-level token ids for the same prompts (the
smol zoo's BPE tokenizer also splits these prompts into single characters and digits). A random
model never emits the newline that ends an answer, so its generations run to ``max_gen_toks``.
``smolzoo`` is the smol zoo's real ``add`` specialist (SmolLM2-135M-Instruct fine-tuned) with its own
tokenizer and the smol zoo's tasks (the zoo is built on first use): its answers stop at the newline
after 2-4 tokens, as a search's candidates do.
Tasks: ``ll`` = evomerge_add_ll + evomerge_sub_ll (4-way multiple choice), ``gen`` = evomerge_add +
evomerge_sub (greedy, stop at newline, 8 tokens at most).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the app does (see evomerge/run/app.py)

import torch

TASKS = {"ll": ["evomerge_add_ll", "evomerge_sub_ll"], "gen": ["evomerge_add", "evomerge_sub"]}


def smol_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def bare_batches(work: list[tuple[int, int]], batch_size: int, vocab: int,
                 dense: bool) -> list[tuple[torch.Tensor, int]]:
    """(input ids, scored positions per row) batches holding exactly the work's tokens, no padding.

    ``dense``: all the tokens end to end, cut into rows as long as the longest sequence, ``batch_size``
    rows a batch (the rate the machine gives this many tokens); otherwise one row per sequence,
    batched only with rows of exactly its length. Token ids are random: compute does not depend on them.
    """
    g = torch.Generator().manual_seed(0)
    if dense:
        width = max(n for n, _ in work)
        total, scored = sum(n for n, _ in work), sum(k for _, k in work)
        n_full, rest = divmod(total, width)
        keep = -(-scored // (n_full + (rest > 0)))  # the scored positions spread evenly over the rows
        out = [(torch.randint(4, vocab, (min(batch_size, n_full - b), width), generator=g), min(keep, width))
               for b in range(0, n_full, batch_size)]
        if rest:
            out.append((torch.randint(4, vocab, (1, rest), generator=g), min(keep, rest)))
        return out
    by_len: dict[int, list[int]] = {}
    for n, k in work:
        by_len.setdefault(n, []).append(k)
    return [(torch.randint(4, vocab, (len(ks[b:b + batch_size]), n), generator=g), max(ks[b:b + batch_size]))
            for n, ks in sorted(by_len.items()) for b in range(0, len(ks), batch_size)]


def bare_forward(model, batches: list[tuple[torch.Tensor, int]], device: torch.device) -> float:
    """Seconds for one forward pass over the batches, logits and log-softmax at the scored positions only."""
    batches = [(ids.to(device), k) for ids, k in batches]
    t = time.perf_counter()
    with torch.inference_mode():
        for ids, k in batches:
            torch.log_softmax(model(input_ids=ids, logits_to_keep=k).logits, dim=-1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def timed(fn, device: torch.device) -> float:
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="tiny,smol")
    ap.add_argument("--kinds", default="ll,gen")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--limit", type=int, default=64, help="items per task (search split)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluation import Evaluator
    from evomerge.zoo import load_zoo

    device = torch.device(args.device)
    rows = []
    for shape in args.shapes.split(","):
        zoo = load_zoo("smol" if shape == "smolzoo" else "tiny", progress=False)  # smolzoo: built on first use
        tok = AutoTokenizer.from_pretrained(zoo.base)
        base = smol_model() if shape == "smol" else \
            AutoModelForCausalLM.from_pretrained(zoo.specialists["add"], dtype=torch.float32)
        for dtype_name in args.dtypes.split(","):
            model = base.to(device=device, dtype=getattr(torch, dtype_name)).eval()
            for kind in args.kinds.split(","):
                evs = {b: Evaluator(tok, TASKS[kind], include_paths=[str(zoo.task_dir)], batch_size=args.batch_size,
                                    device=str(device), backend=b) for b in ("hflm", "fast")}
                fast_lm = evs["fast"].lm(model)
                fast_lm.work = []
                scores = {b: ev.evaluate(model, "search", limit=args.limit) for b, ev in evs.items()}  # warm-up
                work, fast_lm.work = fast_lm.work, None
                bare = {name: bare_batches(work, args.batch_size, len(tok), dense=(name == "bare"))
                        for name in ("bare", "bare_seq")}
                secs: dict[str, list[float]] = {"hflm": [], "fast": [], "bare": [], "bare_seq": []}
                for _ in range(args.reps):
                    for b, ev in evs.items():
                        secs[b].append(timed(lambda ev=ev, model=model: ev.evaluate(model, "search", limit=args.limit),
                                             device))
                    for name, batches in bare.items():
                        secs[name].append(bare_forward(model, batches, device))
                med = {k: statistics.median(v) for k, v in secs.items()}
                tokens = sum(n for n, _ in work)
                row = {"shape": shape, "kind": kind, "dtype": dtype_name, "items": args.limit * len(TASKS[kind]),
                       "work_tokens": tokens, "sequences": len(work), "seconds": med, "all_seconds": secs,
                       "tokens_per_s": {k: tokens / v for k, v in med.items()},
                       "fast_over_bare": med["bare"] / med["fast"], "hflm_over_bare": med["bare"] / med["hflm"],
                       "fast_speedup_vs_hflm": med["hflm"] / med["fast"], "scores": scores}
                rows.append(row)
                print(_line(row), flush=True)
    header = ("| shape | tasks | dtype | items | work tokens | HFLM s | fast s | bare s (dense) | bare s (per sequence) | "
              "HFLM tok/s | fast tok/s | bare tok/s | fast / bare rate | HFLM / bare rate | fast vs HFLM |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    table = header + "\n" + "\n".join(_line(r) for r in rows)
    meta = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, batch size "
            f"{args.batch_size}, {args.reps} reps (medians), {args.limit} search items per task")
    print(meta)
    print(table)
    same = all(r["scores"]["hflm"] == r["scores"]["fast"] for r in rows)
    print("HFLM and FastLM scores equal in every row:", same)
    if args.out:
        Path(args.out + ".md").write_text(f"{meta}\n\n{table}\n\nHFLM and FastLM scores equal in every row: {same}\n")
        Path(args.out + ".json").write_text(json.dumps({"meta": meta, "argv": sys.argv, "rows": rows}, indent=1,
                                                       default=float))


def _line(r: dict) -> str:
    s, t = r["seconds"], r["tokens_per_s"]
    return (f"| {r['shape']} | {r['kind']} | {r['dtype']} | {r['items']} | {r['work_tokens']} | {s['hflm']:.3f} | "
            f"{s['fast']:.3f} | {s['bare']:.3f} | {s['bare_seq']:.3f} | {t['hflm']:.0f} | {t['fast']:.0f} | {t['bare']:.0f} | "
            f"{r['fast_over_bare']:.2f} | {r['hflm_over_bare']:.2f} | {r['fast_speedup_vs_hflm']:.2f}x |")


if __name__ == "__main__":
    main()
