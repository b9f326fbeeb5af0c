"""The tiny zoo: a character-level Llama base and three specialists, built in ~1-2 min.

Why it exists: tests, CI and the quick default search need real transformers
models whose merges behave like real merges, without a download or a GPU. The
recipe below was tuned (see results/zoo.md) so that

* the base knows the format and a little of every skill (a light mixed corpus);
* each specialist, fine-tuned from the base with a modest step count and learning
  rate on its own skill (plus a small replay share of the others), clearly beats
  the base on that skill and stays near the base elsewhere;
* no single model is best on the math mix (add + sub), and a task-arithmetic merge
  of the add and sub specialists beats each of them on it -- merging is worth doing.

Everything is deterministic from ``SEED``: data come from fixed seeds and training
from ``torch.manual_seed`` (bit-identical for a given machine and thread count).
"""
from __future__ import annotations

from pathlib import Path

from evomerge.zoo.train import TrainConfig, train

SEED = 0
SKILLS = ["add", "sub", "rev"]
MODEL = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)
MAX_LENGTH = 64
BASE = TrainConfig(mix={"add": 1, "sub": 1, "rev": 1}, steps=1000, lr=3e-3, seed=SEED)


def _specialist(skill: str, steps: int, lr: float) -> TrainConfig:
    replay = {s: 0.1 for s in SKILLS if s != skill}
    return TrainConfig(mix={skill: 1.0 - sum(replay.values()), **replay}, steps=steps, lr=lr, seed=SEED + 1)


SPECIALISTS = {
    "add": _specialist("add", 400, 1e-3),
    "sub": _specialist("sub", 400, 1e-3),
    "rev": _specialist("rev", 400, 1e-3),
}


def spec() -> dict:
    """Everything that decides the zoo's weights: hashed into the manifest."""
    return {
        "seed": SEED,
        "skills": SKILLS,
        "model": MODEL,
        "max_length": MAX_LENGTH,
        "base": BASE.as_dict(),
        "specialists": {k: v.as_dict() for k, v in SPECIALISTS.items()},
        "tokenizer": "char-v1",
    }


def check_requirements() -> None:
    """The tiny zoo needs only the core dependencies."""


def _save(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build(out: Path, *, progress: bool = True) -> dict:
    """Train the base and the specialists into ``out/{base,<specialist>}``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from evomerge.evaluation.data import held_out_prompts
    from evomerge.zoo.tokenizer import char_tokenizer

    tokenizer = char_tokenizer(MAX_LENGTH)
    exclude = held_out_prompts(SKILLS, SEED)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    config = LlamaConfig(vocab_size=len(tokenizer), **ids, **MODEL)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(do_sample=False, **ids)
    stats = {"base": train(model, tokenizer, BASE, exclude=exclude, desc="tiny base", progress=progress)}
    _save(model, tokenizer, out / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, cfg in SPECIALISTS.items():
        model.load_state_dict(base_state)
        stats[name] = train(model, tokenizer, cfg, exclude=exclude, desc=f"tiny {name}", progress=progress)
        _save(model, tokenizer, out / name)
    return {
        "seed": SEED,
        "skills": SKILLS,
        "specialists": list(SPECIALISTS),
        "specialist_skills": {name: max(cfg.mix, key=cfg.mix.get) for name, cfg in SPECIALISTS.items()},
        "train": {k: {"loss": round(v["loss"], 4), "seconds": round(v["seconds"], 1)} for k, v in stats.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
    }
