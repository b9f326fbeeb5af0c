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
from dataclasses import asdict, dataclass, field

import torch

from evomerge.evaluation.data import train_items


@dataclass(frozen=True)
class TrainConfig:
    """One training run; part of the zoo's config hash, so every field is plain data."""

    mix: dict[str, float]          # skill -> share of each batch
    steps: int
    lr: float
    batch_size: int = 64
    warmup: float = 0.05           # fraction of steps with linear warm-up, then cosine to 0
    weight_decay: float = 0.0
    seed: int = 0
    bf16: bool = False             # autocast matmuls to bfloat16 (fp32 master weights)
    freeze: tuple[str, ...] = ()   # parameters whose name contains one of these stay at the base's values
    lora: dict | None = None       # e.g. {"r": 8, "alpha": 16}: train a LoRA adapter, then merge it in
    extra: dict = field(default_factory=dict)

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
    """Mean cross-entropy over answer tokens, projecting only those to the vocabulary.

    Equal to ``model(**batch, labels=...).loss`` but the LM head (49k x 576 for
    SmolLM2: a third of a short sequence's FLOPs) runs on answer positions only.
    """
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state[:, :-1]
    target = batch["labels"][:, 1:]
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


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
    pools = {s: _encode(tokenizer, train_items(s, n, cfg.seed, exclude)) for s, n in per_skill.items() if n}
    cursor = {s: 0 for s in pools}

    if cfg.lora:
        return _train_lora(model, tokenizer, cfg, exclude=exclude, desc=desc, progress=progress)
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
    t0 = time.perf_counter()
    ema = None
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False, mininterval=0.5)
    for _ in bar:
        rows = []
        for s in plan:
            rows.append(pools[s][cursor[s]])
            cursor[s] += 1
        batch = _collate(rows, pad_id)
        with autocast:
            loss = _answer_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
    bar.close()
    for p in frozen:
        p.requires_grad_(True)
    model.eval()
    return {"loss": float(ema or 0.0), "seconds": time.perf_counter() - t0}


def _train_lora(model, tokenizer, cfg: TrainConfig, *, exclude: set[str], desc: str, progress: bool) -> dict[str, float]:
    """Train a LoRA adapter on ``model`` and merge it back in: the model ends as plain weights
    whose difference from the start is low-rank in every adapted matrix."""
    from dataclasses import replace

    from peft import LoraConfig, get_peft_model

    targets = cfg.lora.get("targets", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, LoraConfig(r=cfg.lora["r"], lora_alpha=cfg.lora.get("alpha", 2 * cfg.lora["r"]),
                                                  target_modules=targets, lora_dropout=0.0, bias="none"))
    stats = train(peft_model, tokenizer, replace(cfg, lora=None), exclude=exclude, desc=desc, progress=progress)
    merged = peft_model.merge_and_unload()
    assert merged is model
    return stats
