"""Supervised training on generated skills, shared by the tiny and the smol zoo.

Why answer-only loss: the model is always shown a prompt and asked for the answer
(exactly what lm-eval does), so only answer tokens carry signal; the prompt's
random digits would otherwise dominate the loss. Why a mix per batch: a specialist
keeps a small share of the other skills (replay) so that its task vector encodes
"get better at my skill" rather than "forget everything else" -- the property that
makes task-arithmetic and TIES merges of specialists keep both skills.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from evomerge.evaluation.data import SKILLS, train_items


@dataclass(frozen=True)
class TrainConfig:
    """One training run; part of the zoo's config hash, so every field is plain data."""

    mix: dict[str, float]          # skill -> share of each batch; "self:<skill>" = the model's own answers
    steps: int
    lr: float
    batch_size: int = 64
    warmup: float = 0.05           # fraction of steps with linear warm-up, then cosine to 0
    weight_decay: float = 0.0
    seed: int = 0
    bf16: bool = False             # autocast matmuls to bfloat16 (fp32 master weights)
    freeze: tuple[str, ...] = ()   # parameters whose name contains one of these stay at the base's values
    until: float | None = None     # stop early once greedy exact match on training probes of every skill
    check_every: int = 100         # in the mix reaches this (``steps`` is then the most it may take)

    def as_dict(self) -> dict:
        return asdict(self)


def _batch_plan(mix: dict[str, float], batch_size: int) -> list[str]:
    """Skill of each row of every batch: largest-remainder rounding of the shares."""
    total = sum(mix.values())
    raw = {s: batch_size * w / total for s, w in mix.items()}
    counts = {s: int(math.floor(v)) for s, v in raw.items()}
    for s in sorted(raw, key=lambda s: raw[s] - counts[s], reverse=True)[: batch_size - sum(counts.values())]:
        counts[s] += 1
    return [s for s in mix for _ in range(counts[s])]


@torch.no_grad()
def _own_answers(model, tokenizer, prompts: list[str], batch_size: int = 64, max_new_tokens: int = 8) -> list[str]:
    """The model's greedy answers, first line only: targets that teach "behave as before"."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], add_special_tokens=False, padding=True, return_tensors="pt")
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out.extend(t.split("\n")[0] for t in texts)
    finally:
        tokenizer.padding_side = side
    return out


def _probe(model, tokenizer, probes: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    """Greedy exact match per skill on training-distribution prompts (never search/test items)."""
    out = {s: sum(a == t for (_, t), a in zip(items, _own_answers(model, tokenizer, [p for p, _ in items])))
           / len(items) for s, items in probes.items()}
    model.train()
    return out


def _pool(model, tokenizer, skill: str, n: int, seed: int, exclude: set[str]) -> list[tuple[str, str]]:
    """Training pairs: true answers, or for "self:<skill>" the model's own current answers."""
    if not skill.startswith("self:"):
        return train_items(skill, n, seed, exclude)
    # distinct prompts are enough (the batch plan cycles through them): generation is the cost
    prompts = [p for p, _ in train_items(skill[5:], min(n, 4096), seed + 7, exclude)]
    return list(zip(prompts, _own_answers(model, tokenizer, prompts)))


def _encode(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per pair; the answer ends with a newline and EOS."""
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    answers = tokenizer([a + "\n" for _, a in pairs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [(p + a + [eos], len(p)) for p, a in zip(prompts, answers)]


def _collate(rows: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (seq, n_prompt) in enumerate(rows):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, n_prompt : len(seq)] = ids[i, n_prompt : len(seq)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over answer tokens, projecting only those to the vocabulary.

    Divided by the answer-token count it equals ``model(**batch, labels=...).loss``, but
    the LM head (49k x 576 for SmolLM2: a third of a short sequence's FLOPs) runs on
    answer positions only. Summed, so that length buckets of one batch add up to its mean.
    """
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state[:, :-1]
    target = batch["labels"][:, 1:]
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep], reduction="sum")


def _length_buckets(rows: list[tuple[list[int], int]], width: int = 8) -> list[list[tuple[list[int], int]]]:
    """Rows grouped by length (0-8, 9-16, ... tokens): a mixed batch of 6-token digit facts
    and 20-token reversals would otherwise be half padding."""
    buckets: dict[int, list[tuple[list[int], int]]] = {}
    for row in rows:
        buckets.setdefault((len(row[0]) - 1) // width, []).append(row)
    return [buckets[k] for k in sorted(buckets)]


def train(
    model,
    tokenizer,
    cfg: TrainConfig,
    *,
    exclude: set[str],
    desc: str = "train",
    progress: bool = True,
) -> dict[str, float]:
    """Train ``model`` in place; never on a prompt in ``exclude`` (the search/test items)."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    plan = _batch_plan(cfg.mix, cfg.batch_size)
    per_skill = {s: plan.count(s) * cfg.steps for s in cfg.mix}
    pools = {s: _encode(tokenizer, _pool(model, tokenizer, s, n, cfg.seed, exclude))
             for s, n in per_skill.items() if n}
    cursor = {s: 0 for s in pools}
    frozen = [p for n, p in model.named_parameters() if p.requires_grad and any(f in n for f in cfg.freeze)]
    for p in frozen:
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    warm = max(1, int(cfg.steps * cfg.warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, cfg.steps) / cfg.steps))
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext())
    model.train()
    # Why "until": a tiny model learns carrying as a sudden phase change whose step varies from run to
    # run (and with the machine's float rounding); training until the skills are learnt makes the
    # zoo's quality, not its step count, the thing that is reproducible.
    probes = ({s: train_items(s, 128, cfg.seed + 99, exclude) for s in cfg.mix if s in SKILLS}
              if cfg.until is not None else {})
    probed: dict[str, float] = {}
    t0 = time.perf_counter()
    ema = None
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False, mininterval=0.5)
    step = 0
    for step in bar:
        rows = []
        for s in plan:
            rows.append(pools[s][cursor[s] % len(pools[s])])
            cursor[s] += 1
        # the batch's mean answer-token loss, computed bucket by bucket (same gradient, less padding)
        n_tokens = sum(len(ids) - n_prompt for ids, n_prompt in rows)
        total = 0.0
        for bucket in _length_buckets(rows):
            with autocast:
                part = _answer_loss(model, _collate(bucket, pad_id)) / n_tokens
            part.backward()
            total += part.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = total if ema is None else 0.95 * ema + 0.05 * total
        bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
        if probes and (step + 1) % cfg.check_every == 0:
            probed = _probe(model, tokenizer, probes)
            bar.set_postfix(loss=f"{ema:.3f}", **{s: f"{a:.2f}" for s, a in probed.items()}, refresh=False)
            if min(probed.values()) >= cfg.until:
                break
    bar.close()
    for p in frozen:
        p.requires_grad_(True)
    model.eval()
    return {"loss": float(ema or 0.0), "seconds": time.perf_counter() - t0, "steps": step + 1,
            **({"probe": probed} if probed else {})}


def train_specialists(
    model, tokenizer, specialists: dict[str, TrainConfig], out: Path, *, exclude: set[str], zoo: str, progress: bool
) -> dict[str, dict]:
    """Save ``model`` as ``out/base``, then fine-tune it afresh into each ``out/<specialist>``."""
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    stats = {}
    for name, cfg in specialists.items():
        model.load_state_dict(base_state)
        stats[name] = train(model, tokenizer, cfg, exclude=exclude, desc=f"{zoo} {name}", progress=progress)
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    return stats


def build_info(seed: int, skills: list[str], specialists: dict[str, TrainConfig], stats: dict[str, dict]) -> dict:
    """What a zoo's ``build`` reports for its manifest: specialists are named after their skill."""
    return {
        "seed": seed,
        "skills": skills,
        "specialists": list(specialists),
        "specialist_skills": {name: name for name in specialists},
        "train": {k: {**v, **{f: round(v[f], n) for f, n in (("loss", 4), ("seconds", 1)) if f in v}}
                  for k, v in stats.items()},
    }
