"""Which smol specialists would compose? Variants of the zoo's recipe, for issue #7.

The first smol zoo's full fine-tunes did not compose (results/zoo.md, "smol: do the specialists'
task vectors compose?"). This trains variants of the math specialists from the zoo's base, on the same
data and schedule as the zoo (evomerge/zoo/smol.py), and scores every specialist, the triple and each
pair by task arithmetic (weight 1) the way merge_check.py does. (The results in results/zoo.md were
measured on the first zoo's base, the raw SmolLM2-135M-Instruct; today's base already has the format
stage, so ``--format-steps`` now adds a second one.)

* ``--rank R``: LoRA adapters of rank R on every linear layer, merged into full weights (0: full fine-tunes);
* ``--replay F``: the share of each specialist's batches that replays the base's own answers on the
  other skills (the zoo's 0.2);
* ``--format-steps N``: first fine-tune the base for N steps on all four skills at once (it learns the
  answer format), and use *that* as the base the specialists start from and are merged onto;
* ``--forget-steps M``: then fine-tune it for M steps on easy material only (carry-free sums,
  borrow-free differences, copying), as the tiny zoo makes its base: the specialists then *recall* a
  skill the model once had, and the table gains a ``competent`` row (the model before forgetting).

    python experiments/zoo/smol_variants.py --rank 16 --lr 5e-4        # ~14 min on 1 core
    python experiments/zoo/smol_variants.py --rank 0 --format-steps 100

Writes the specialists under ``--out`` and prints a markdown table (nothing in the zoo changes).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from evomerge.evaluation import Evaluator  # noqa: E402
from evomerge.evaluation.data import held_out_prompts  # noqa: E402
from evomerge.zoo import load_zoo, smol  # noqa: E402
from evomerge.zoo.train import train  # noqa: E402

MATH = ["add", "sub", "mul"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (0: full fine-tunes)")
    ap.add_argument("--format-steps", type=int, default=0, help="shared all-skills stage first (0: none)")
    ap.add_argument("--forget-steps", type=int, default=0, help="then easy material only (0: none)")
    ap.add_argument("--forget-lr", type=float, default=5e-5)
    ap.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--steps", type=int, default=None, help="default: the zoo's")
    ap.add_argument("--replay", type=float, default=0.2, help="share of each batch replaying the base's own answers "
                                                              "on the other skills (the zoo's: 0.2)")
    ap.add_argument("--weights", type=float, nargs="+", default=[1.0], help="task-arithmetic weights to merge at")
    ap.add_argument("--out", type=Path, default=Path("/tmp/smol_variants"))
    ap.add_argument("--limit", type=int, default=None, help="test items per task (default: all 500)")
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    zoo = load_zoo("smol", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    model = AutoModelForCausalLM.from_pretrained(zoo.base, dtype=torch.float32)
    exclude = held_out_prompts(smol.SKILLS, smol.SEED, smol.EVAL_ITEMS)
    if args.format_steps:
        mix = {s: 1.0 / len(smol.SKILLS) for s in smol.SKILLS}
        fmt = dataclasses.replace(smol.SPECIALISTS["add"], mix=mix, steps=args.format_steps, seed=smol.SEED + 7)
        train(model, tokenizer, fmt, exclude=exclude, desc="format stage", progress=True)
    competent = {k: v.clone() for k, v in model.state_dict().items()} if args.forget_steps else None
    if args.forget_steps:
        easy = {"add_easy": 0.35, "sub_easy": 0.35, "copy": 0.3}
        forget = dataclasses.replace(smol.SPECIALISTS["add"], mix=easy, steps=args.forget_steps, lr=args.forget_lr,
                                     seed=smol.SEED + 2)
        train(model, tokenizer, forget, exclude=exclude, desc="forget stage", progress=True)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = None if not args.rank else LoraConfig(r=args.rank, lora_alpha=args.alpha or 2 * args.rank, lora_dropout=0.0, target_modules=TARGETS)
    specs: dict[str, dict[str, torch.Tensor]] = {}
    for skill in MATH:
        model.load_state_dict(base)
        cfg = smol.specialist(skill, args.steps or smol.SPECIALISTS[skill].steps, args.lr, replay=args.replay)
        if args.rank:
            wrapped = get_peft_model(model, lora)
            stats = train(wrapped, tokenizer, cfg, exclude=exclude, desc=f"lora {skill}", progress=True)
            model = wrapped.merge_and_unload()
        else:
            stats = train(model, tokenizer, cfg, exclude=exclude, desc=f"full {skill}", progress=True)
        specs[skill] = {k: v.clone() for k, v in model.state_dict().items()}
        model.save_pretrained(args.out / skill)
        print(f"{skill}: loss {stats['loss']:.4f} in {stats['seconds']:.0f} s", flush=True)

    tasks = [f"evomerge_{s}_ll" for s in MATH]
    ev = Evaluator(tokenizer, tasks, include_paths=[str(zoo.task_dir)], batch_size=32)
    model = model.to(torch.bfloat16)
    merges = {"+".join(MATH): MATH, **{f"{a}+{b}": [a, b] for i, a in enumerate(MATH) for b in MATH[i + 1:]}}
    candidates = {"base": ([], 1.0), **{s: ([s], 1.0) for s in MATH}}
    if competent is not None:
        specs["competent"] = competent
        candidates = {"competent": (["competent"], 1.0), **candidates}
    for w in args.weights:  # task arithmetic: base + w x each member's task vector
        candidates |= {name if w == 1 else f"{name}, w={w:g}": (members, w) for name, members in merges.items()}
    kind = f"LoRA r={args.rank}, alpha={args.alpha or 2 * args.rank}" if args.rank else "full fine-tunes"
    kind += f", replay {args.replay:g}"
    lines = [f"{kind}, lr={args.lr}, steps={cfg.steps}, format stage {args.format_steps} steps, "
             f"forget stage {args.forget_steps} steps at lr {args.forget_lr:g}; "
             f"test split, 4-way log-likelihood accuracy, bfloat16; task arithmetic (weight 1 unless named).", "",
             "| model | " + " | ".join(MATH) + " | math mean |", "|---|" + "---:|" * (len(MATH) + 1)]
    for name, (members, w) in candidates.items():
        with torch.no_grad():
            model.load_state_dict({k: base[k] + w * sum(specs[s][k] - base[k] for s in members) for k in base})
        res = ev.evaluate(model, "test", limit=args.limit)
        row = [res[t]["acc"] for t in tasks]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + f" | {sum(row) / len(row):.3f} |")
        print(lines[-1], flush=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
