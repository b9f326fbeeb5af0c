"""The tiny zoo: a character-level Llama base and three specialists (about 1.5 min on 2 CPU cores).

Why it exists: tests, CI and the quick default search need real transformers
models whose merges behave like real merges, without a download or a GPU.

Why three training stages: real specialists are small fine-tunes of a capable
base, so their task vectors are small and live in one basin, which is what makes
merging them work. A tiny model trained from scratch on a skill instead learns
it with a large update that clobbers everything else. So the zoo first trains a
*competent* model on every skill (``PRETRAIN``, until greedy answers on training
probes are 90 % right: carrying is learnt in a sudden phase change whose step
varies between runs, so a fixed step count gave anything from 40 % to 99 %), then
lets it partly forget the hard parts (carries, borrows, reversal) by fine-tuning
on easy material only (``FORGET``: carry-free sums, copying); that model is the
zoo's base. Each specialist then recalls one skill with a short, low-learning-rate
fine-tune, and replays the base's own answers on the other skills (``self:<skill>``,
a cheap stand-in for a KL penalty) with embeddings and norms frozen, so its task
vector moves only what its skill needs. Measured (results/zoo.md): each specialist
clearly beats the base on its own skill, none is best at both add and sub, and a
plain task-arithmetic merge of the add and sub specialists beats either on the
math mix -- merging is worth doing, and the search has something to find.

Everything is deterministic from ``SEED``: data come from fixed seeds and training
from ``torch.manual_seed`` (bit-identical for a given machine and thread count).

Why the base ships with the package (``assets/tiny_base.safetensors``, 4 MB): the
two base stages took about 6.5 of the build's 8 minutes on 2 cores, and every fresh
machine (CI included) would pay them to arrive at the same weights. Real zoos work
the same way: the pretrained base is downloaded, the fine-tunes are local. The
shipped file is exactly what ``PRETRAIN`` + ``FORGET`` produce from ``SEED`` on 2
threads; ``evomerge-zoo build tiny --from-scratch`` trains them instead, and its
base is the file to ship after any change to those stages (its hash is part of
the zoo's config hash, so a new file rebuilds every cached tiny zoo).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from evomerge.evaluation.data import ItemCounts
from evomerge.zoo.train import TrainConfig, build_info, train, train_specialists

SEED = 0
SKILLS = ["add", "sub", "rev"]
EVAL_ITEMS = ItemCounts()  # 300 search items (100 of them select: conf/models/tiny.yaml) and 500 test per skill
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
PRETRAIN = TrainConfig(mix={"add": 0.35, "sub": 0.3, "rev": 0.2, "digit_facts": 0.15}, steps=4000, lr=3e-3,
                       seed=SEED, until=0.9, check_every=100)
FORGET = TrainConfig(mix={"add_easy": 0.35, "sub_easy": 0.35, "copy": 0.3}, steps=500, lr=2e-3, seed=SEED + 2)
SHIPPED_BASE = Path(__file__).with_name("assets") / "tiny_base.safetensors"  # PRETRAIN + FORGET's result


@functools.cache
def _shipped_sha256() -> str | None:
    return hashlib.sha256(SHIPPED_BASE.read_bytes()).hexdigest() if SHIPPED_BASE.is_file() else None


def _specialist(skill: str, own: float = 0.8) -> TrainConfig:
    others = [s for s in SKILLS if s != skill]
    mix = {skill: own, **{f"self:{s}": (1.0 - own) / len(others) for s in others}}
    return TrainConfig(mix=mix, steps=200, lr=2e-4, seed=SEED + 1, freeze=("embed_tokens", "norm"))


SPECIALISTS = {skill: _specialist(skill) for skill in SKILLS}


def spec() -> dict:
    """Everything that decides the zoo's weights: hashed into the manifest."""
    return {
        "seed": SEED,
        "skills": SKILLS,
        "eval_items": EVAL_ITEMS.as_dict(),
        "model": MODEL,
        "max_length": MAX_LENGTH,
        "pretrain": PRETRAIN.as_dict(),
        "forget": FORGET.as_dict(),
        "specialists": {k: v.as_dict() for k, v in SPECIALISTS.items()},
        "tokenizer": "char-v1",
        "shipped_base": _shipped_sha256(),
    }


def check_requirements() -> None:
    """The tiny zoo needs only the core dependencies."""


def build(out: Path, *, progress: bool = True, from_scratch: bool = False) -> dict:
    """Train the specialists (and, ``from_scratch`` or without the shipped base, the base) into ``out``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from evomerge.evaluation.data import held_out_prompts
    from evomerge.zoo.tokenizer import char_tokenizer

    tokenizer = char_tokenizer(MAX_LENGTH)
    exclude = held_out_prompts(SKILLS, SEED, EVAL_ITEMS)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    config = LlamaConfig(vocab_size=len(tokenizer), **ids, **MODEL)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(do_sample=False, **ids)
    if from_scratch or not SHIPPED_BASE.is_file():
        stats = {"pretrain": train(model, tokenizer, PRETRAIN, exclude=exclude, desc="tiny pretrain", progress=progress),
                 "base": train(model, tokenizer, FORGET, exclude=exclude, desc="tiny base (forget)", progress=progress)}
    else:
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(load_file(str(SHIPPED_BASE)), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embeddings
            from evomerge.errors import ZooError

            raise ZooError(f"{SHIPPED_BASE} does not fit the tiny model (missing {missing}, unexpected {unexpected}): "
                           f"the package is damaged or mixed across versions; reinstall evomerge, or build with "
                           f"`evomerge-zoo build tiny --from-scratch`.")
        model.tie_weights()
        stats = {"base": {"shipped": SHIPPED_BASE.name, "sha256": _shipped_sha256()}}
    stats |= train_specialists(model, tokenizer, SPECIALISTS, out, exclude=exclude, zoo="tiny", progress=progress)
    return {**build_info(SEED, SKILLS, SPECIALISTS, stats), "parameters": sum(p.numel() for p in model.parameters())}
