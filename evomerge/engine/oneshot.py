"""The one-shot merge behind ``evomerge-merge``: recipe in, model directory out.

Tensors are read, merged and written one at a time, so peak memory is one
tensor from each model plus one output shard, whatever the model size.
"""
from __future__ import annotations

import itertools
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from evomerge.checkpoints.outdir import TOKENIZER_FILES, check_destination, side_files
from evomerge.checkpoints.writer import dtype_name, parse_dtype, parse_size, write_model_dir
from evomerge.engine.jobs import as_inputs, choose_fused, input_bytes, random_aux, resolve_device, run_job
from evomerge.engine.plan import MergePlan, TensorJob
from evomerge.engine.recipe import Recipe
from evomerge.engine.card import model_card
from evomerge.engine.tokenizer_out import load_tokenizer, save_output_tokenizer
from evomerge.errors import MergeError


def output_dtype(plan: MergePlan, override: str | None) -> torch.dtype:
    """--out-dtype, else the recipe's out_dtype / dtype, else the reference model's stored dtype."""
    r = plan.recipe
    chosen = parse_dtype(override, "--out-dtype") or parse_dtype(r.out_dtype, "out_dtype") or parse_dtype(r.dtype, "dtype")
    if chosen is not None:
        return chosen
    cfg = plan.reference.config
    return parse_dtype(cfg.get("dtype") or cfg.get("torch_dtype") or "float32", "config dtype") or torch.float32


def merged_tensors(plan: MergePlan, device: torch.device, dtype: torch.dtype, progress: bool = True,
                   fused: bool = False, workers: int = 2) -> Iterator[tuple[str, torch.Tensor]]:
    """Merged tensors in plan order, ``workers`` jobs in flight on a CPU.

    Why threads: torch releases the GIL, and the heaviest step of a TIES merge, ``torch.kthvalue``
    over each task vector, runs on one core; a second job in flight (reading its tensors, selecting
    its thresholds) keeps the other cores busy. Peak memory grows to ``workers`` jobs' tensors.
    """
    recipe = plan.recipe

    def merge(job: TensorJob) -> torch.Tensor:
        refs = ([job.base] if job.base else []) + list(job.models)
        tensors, cdt = as_inputs([plan.checkpoints[r].get(n) for r, n in refs], recipe, plan, device)
        tensors = plan.relaid(job, tensors, cdt)  # on the output vocabulary (mergekit)
        base, models = (tensors[0], tensors[1:]) if job.base else (None, tensors)
        aux = random_aux(plan, job, recipe.seed, models[0].shape, device)
        out = torch.empty(models[0].shape, dtype=dtype, device=device) if fused else None
        out = run_job(plan, job, recipe, base=base, models=models, aux=aux, out=out, fused=fused)
        return out.to(cdt).to(dtype).cpu()  # rounded to the compute dtype, then stored as out_dtype (mergekit)

    with tqdm(total=len(plan.jobs), desc="merging", unit="tensor", disable=not progress) as bar:
        yield from _in_order(plan.jobs, merge, workers if device.type == "cpu" else 1, bar)


def _in_order(jobs_list: list[TensorJob], merge: Callable[[TensorJob], torch.Tensor], workers: int,
              bar: tqdm) -> Iterator[tuple[str, torch.Tensor]]:
    if workers <= 1:
        for job in jobs_list:
            yield job.out_name, merge(job)
            bar.update()
        return
    jobs = iter(jobs_list)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for job in itertools.islice(jobs, workers):
            pending.append((job, pool.submit(merge, job)))
        while pending:
            job, future = pending.popleft()
            result = future.result()  # in order: the writer sees the plan's order
            nxt = next(jobs, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(merge, nxt)))
            yield job.out_name, result
            bar.update()


def merge_to_dir(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    device: str = "auto",
    out_dtype: str | None = None,
    shard_size: str | int = "2GB",
    progress: bool = True,
    trust_remote_code: bool = False,
    fused: bool | str = False,
    force: bool = False,
    card: str | None = None,
    live: Any = None,
) -> Path:
    """Merge ``recipe`` into a model directory at ``out_dir``.

    ``fused`` defaults to eager torch: the compiled one-pass kernel pays off over the many candidates
    of a search (the prepared engine), not in one merge, where compiling or loading it costs more
    than the passes it saves. ``out_dir`` is checked before any work (it may not be an input, and holds
    nothing evomerge did not write unless ``force``); ``card`` replaces the default model card.
    ``live``: a prepared engine (engine/prepared.py) that can merge ``recipe``: its merged tensors are
    written where they are the ones this merge would write (:func:`live_tensors`), instead of reading
    every model from disk again; the rest of the directory (config, tokenizer, card) is the same.
    """
    plan = MergePlan(recipe, trust_remote_code=trust_remote_code)
    check_destination(out_dir, inputs=_inputs(plan), force=force)
    plan.check()
    dev = resolve_device(device)
    dtype = output_dtype(plan, out_dtype)
    use_fused = choose_fused(plan, dev, fused, input_bytes(plan))
    config = dict(plan.out_config)
    config["dtype"] = dtype_name(dtype)
    config.pop("torch_dtype", None)
    with tempfile.TemporaryDirectory(prefix="evomerge-tokenizer-") as rebuilt:
        tok_dir = _tokenizer_files(plan, Path(rebuilt), trust_remote_code)
        side_files(tok_dir, TOKENIZER_FILES)  # a symlink out of the folder is refused before the merge
        tensors = live_tensors(live, plan, dtype) if live is not None else None
        return write_model_dir(
            out_dir,
            merged_tensors(plan, dev, dtype, progress, use_fused) if tensors is None else tensors,
            config=config,
            tokenizer_source=tok_dir,
            recipe_yaml=recipe.to_yaml(),
            model_card=card if card is not None else model_card(recipe),
            max_shard_bytes=parse_size(shard_size),
            force=force,
        )


def live_tensors(engine: Any, plan: MergePlan, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]] | None:
    """A prepared engine's merged tensors of ``plan.recipe`` in plan order, or None where they would not be
    the tensors :func:`merged_tensors` writes.

    They are (up to what the engine guarantees against the one-shot merge, see engine/prepared.py) when
    its live model holds ``dtype``: the engine rounds a result to the job's compute dtype and stores it
    in the live model's, as the one-shot merge rounds it and stores it as the output's; and when every
    tensor of the plan has a live parameter of its own (one a live model ties to another, as ``lm_head``
    to the embeddings, holds only one of the two). Then the recipe is applied once more: one candidate's
    merge, on tensors already resident. A recipe the engine cannot apply (another structure) gives None.
    """
    if getattr(engine, "model_dtype", None) != dtype or not hasattr(engine, "state_dict"):
        return None
    state = engine.state_dict()
    names = [job.out_name for job in plan.jobs]
    if any(n not in state for n in names) or len({state[n].data_ptr() for n in names}) < len(names):
        return None
    try:
        engine.apply(plan.recipe)
    except MergeError:  # not a recipe of this engine; the merge from disk says what is wrong, if anything
        return None
    return ((n, state[n].detach().to("cpu").contiguous()) for n in names)


def _tokenizer_files(plan: MergePlan, scratch: Path, trust_remote_code: bool) -> Path:
    """The folder whose tokenizer files the output gets, as mergekit 0.1.5 chooses them: the built output
    tokenizer where the recipe has a tokenizer source, the donor's (base, else first model) tokenizer
    re-saved with the chat template where it has only ``chat_template``, else the donor's files."""
    recipe = plan.recipe
    if plan.tokenizer is None and recipe.chat_template is None:
        return plan.reference.tokenizer_dir
    donor = plan.checkpoints[recipe.base_model or recipe.all_model_refs()[0]]
    tokenizer = (plan.tokenizer.tokenizer if plan.tokenizer is not None
                 else load_tokenizer(donor.tokenizer_dir, trust_remote_code))
    templates = []
    if recipe.chat_template == "auto":
        templates = [load_tokenizer(plan.checkpoints[r].tokenizer_dir, trust_remote_code).chat_template
                     for r in recipe.all_model_refs()]
    save_output_tokenizer(tokenizer, scratch, recipe.chat_template, templates)
    return scratch


def _inputs(plan: MergePlan) -> list[Path]:
    """Every directory and file the merge reads: its model folders (a LoRA's base too) and the recipe."""
    paths = [Path(plan.recipe.source_file)] if Path(plan.recipe.source_file).is_file() else []
    for ckpt in plan.checkpoints.values():
        paths.append(ckpt.path)
        base = getattr(ckpt, "base", None)
        if base is not None:
            paths.append(base.path)
    return paths
