"""From a recipe to a list of tensor jobs, validated before any tensor is read.

A :class:`MergePlan` opens every checkpoint, checks they can be merged, and lists
one :class:`TensorJob` per output tensor: which source tensors feed it, and the
position ``t`` that gradient parameters interpolate at. Both engines (one-shot
and prepared) execute the same plan and resolve parameters with the same
:meth:`MergePlan.resolve`, which is what makes their results identical.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.checkpoints import Checkpoint, open_checkpoint
from evomerge.checkpoints.validate import check_compatible, check_tensor
from evomerge.engine.recipe import Recipe, Slice, Source, evaluate_setting
from evomerge.engine.tokenizer_out import TokenizerMerge, build_tokenizer_merge, vocab_rows
from evomerge.errors import CheckpointError, MergeError, RecipeError
from evomerge.methods import MergeMethod, ParamDef, get_method

LAYER_RE = re.compile(r"^(?P<prefix>.*?\.(?:layers|h|blocks|layer))\.(?P<idx>\d+)\.(?P<suffix>.+)$")
_PRE_MARKERS = ("embed", "wte", "wpe")
_POST_MARKERS = ("lm_head", "embed_out")  # output heads (GPT-NeoX's is named embed_out)
_VOCAB_MARKERS = ("embed_tokens", "wte", "embed_in", "word_embeddings", "lm_head", "embed_out")  # one row per token


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its sources and where it sits for gradient interpolation.

    ``t`` follows mergekit 0.1.5: ``i / (n - 1)`` for layer ``i`` of an ``n``-layer slice (1 for a
    one-layer slice), 0 for the tensors before and after the layers (embeddings, final norm, head).
    """

    out_name: str
    t: float
    slice_index: int
    base: tuple[str, str] | None  # (model ref, source tensor name)
    models: tuple[tuple[str, str], ...]  # the merged (non-base) inputs, recipe order


def job_inputs(job: TensorJob) -> list[str]:
    """The models feeding a job, in the order its tensors are read: base first."""
    return ([job.base[0]] if job.base else []) + [r for r, _ in job.models]


def layer_index(name: str) -> int | None:
    m = LAYER_RE.match(name)
    return int(m.group("idx")) if m else None


def edge_tensors(names: list[str]) -> tuple[list[str], list[str]]:
    """The non-layer tensors planned before the layers (embeddings) and after them (final norm, head),
    as mergekit 0.1.5's architecture files list them for the architectures it knows."""
    non_layer = [n for n in names if layer_index(n) is None]
    pre = [n for n in non_layer if any(k in n for k in _PRE_MARKERS) and not any(k in n for k in _POST_MARKERS)]
    return pre, [n for n in non_layer if n not in pre]


def num_layers(ckpt: Checkpoint) -> int:
    idx = [i for i in map(layer_index, ckpt.tensor_names()) if i is not None]
    if idx:
        return max(idx) + 1
    return int(ckpt.config.get("num_hidden_layers", 0))


class MergePlan:
    """A validated recipe: checkpoints opened, jobs listed, output config derived."""

    def __init__(self, recipe: Recipe, *, trust_remote_code: bool = False) -> None:
        self.recipe = recipe
        self.trust_remote_code = trust_remote_code
        self.method: MergeMethod = get_method(recipe.merge_method)
        where = recipe.source_file
        if self.method.needs_base and recipe.base_model is None:
            raise RecipeError(
                f"{where}: merge_method {self.method.name!r} needs a base_model (the model the others were "
                f"fine-tuned from); add 'base_model: PATH'."
            )
        self.checkpoints = self._open(recipe)
        self.slices = self._normalized_slices(recipe)
        self.vocab_tensors = self._vocab_tensors()
        self.jobs = self._jobs()
        self.reference = self.checkpoints[self._reference_ref()]
        self.tokenizer: TokenizerMerge | None = None
        if recipe.tokenizer_source is not None:
            self.tokenizer = build_tokenizer_merge(
                recipe.tokenizer_source, recipe.all_model_refs(), self.checkpoints, recipe.base_model,
                recipe.token_sources(), recipe.pad_to_multiple_of, where, trust_remote_code)
            for job in self.jobs:
                if job.out_name in self.vocab_tensors:
                    self.tokenizer.plan_for(job_inputs(job))  # a bad tokens: entry fails before any work
        self.out_config = self._out_config()

    # ---- opening and validation -------------------------------------------------
    def _open(self, recipe: Recipe) -> dict[str, Checkpoint]:
        ckpts: dict[str, Checkpoint] = {}
        base = None
        if recipe.base_model is not None:
            base = ckpts[recipe.base_model] = open_checkpoint(recipe.base_model)
        for ref in recipe.all_model_refs():
            if ref not in ckpts:
                ckpts[ref] = open_checkpoint(ref, base=base)
        reference = ckpts[recipe.all_model_refs()[0]]
        check_compatible(reference, list(ckpts.values()), same_depth=recipe.slices is None,
                         same_vocab=recipe.tokenizer_source is None)
        return ckpts

    def _vocab_tensors(self) -> frozenset[str]:
        """The embedding and head tensors (one row per token) a tokenizer merge re-lays."""
        if self.recipe.tokenizer_source is None:
            return frozenset()
        ckpt = self.checkpoints[self.slices[0].sources[0].model]
        rows = vocab_rows(ckpt.config)
        pre, post = edge_tensors(ckpt.tensor_names())
        return frozenset(n for n in pre + post if any(k in n for k in _VOCAB_MARKERS)
                         and (rows is None or tuple(ckpt.shape(n))[:1] == (rows,)))

    def _reference_ref(self) -> str:
        return self.recipe.base_model or self.slices[0].sources[0].model

    def _normalized_slices(self, recipe: Recipe) -> list[Slice]:
        if recipe.slices:
            for i, sl in enumerate(recipe.slices):
                for src in sl.sources:
                    n = num_layers(self.checkpoints[src.model])
                    if src.layer_range[1] > n:  # type: ignore[index]
                        raise RecipeError(
                            f"{recipe.source_file}: slices[{i}] asks layers {list(src.layer_range)} of "
                            f"{src.model}, which has {n} layers; fix layer_range."
                        )
            return recipe.slices
        ref = recipe.base_model or recipe.models[0].model
        n = num_layers(self.checkpoints[ref])
        sources = [Source(m.model, m.parameters, (0, n)) for m in recipe.models]
        if recipe.base_model is not None and all(s.model != recipe.base_model for s in sources):
            sources.insert(0, Source(recipe.base_model, {}, (0, n)))
        return [Slice(sources, {})]

    def _merged_sources(self, sl: Slice) -> tuple[Source | None, list[Source]]:
        base_ref = self.recipe.base_model
        base = next((s for s in sl.sources if s.model == base_ref), None)
        if self.method.needs_base:
            if base is None:
                raise RecipeError(f"{self.recipe.source_file}: a slice has no source from base_model {base_ref}.")
            others = [s for s in sl.sources if s.model != base_ref]
        else:
            listed = {m.model for m in self.recipe.models} if not self.recipe.slices else None
            others = [s for s in sl.sources
                      if listed is None or s.model in listed or (self.method.base_is_input and s is base)]
        m = self.method
        if len(others) < m.min_models or (m.max_models is not None and len(others) > m.max_models):
            want = f"{m.min_models}" if m.max_models == m.min_models else f"at least {m.min_models}"
            if m.max_models is not None and m.max_models != m.min_models:
                want = f"{m.min_models} to {m.max_models}"
            raise RecipeError(
                f"{self.recipe.source_file}: merge_method {m.name!r} takes {want} model(s) besides the base, "
                f"got {len(others)}."
            )
        return base, others

    def _jobs(self) -> list[TensorJob]:
        jobs: list[TensorJob] = []
        first, last = self.slices[0], self.slices[-1]
        ref_ckpt = self.checkpoints[first.sources[0].model]
        pre, post = edge_tensors(ref_ckpt.tensor_names())
        for name in pre:
            jobs.append(self._job(name, 0.0, 0, first, lambda src, n=name: n))
        out_layer = 0
        for si, sl in enumerate(self.slices):
            start = sl.sources[0].layer_range[0]  # type: ignore[index]
            length = sl.sources[0].layer_range[1] - start  # type: ignore[index]
            lead_ckpt = self.checkpoints[sl.sources[0].model]
            for idx in range(length):
                t = idx / (length - 1) if length > 1 else 1.0
                for name in lead_ckpt.tensor_names():
                    m = LAYER_RE.match(name)
                    if not m or int(m.group("idx")) != start + idx:
                        continue
                    prefix, suffix = m.group("prefix"), m.group("suffix")
                    out_name = f"{prefix}.{out_layer + idx}.{suffix}"
                    jobs.append(self._job(
                        out_name, t, si, sl,
                        lambda src, i=idx, p=prefix, s=suffix: f"{p}.{src.layer_range[0] + i}.{s}",
                    ))
            out_layer += length
        self.n_out_layers = out_layer
        # mergekit 0.1.5 (MergePlanner.plan_module) plans the post-layer tensors with the last slice's
        # sources and parameters, paired with as many inputs as the first slice has, and reads their
        # parameters at t = 0 like the embeddings: a gradient's first element, not its last.
        last_index = len(self.slices) - 1
        tail = Slice(last.sources[:len(first.sources)], last.parameters)
        for name in post:
            jobs.append(self._job(name, 0.0, last_index, tail, lambda src, n=name: n))
        return jobs

    def _job(self, out_name: str, t: float, si: int, sl: Slice, src_name: Any) -> TensorJob:
        base, others = self._merged_sources(sl)
        ref_src = base or others[0]
        ref_ckpt, ref_name = self.checkpoints[ref_src.model], src_name(ref_src)
        for s in ([base] if base else []) + others:
            check_tensor(out_name, ref_ckpt, ref_name, self.checkpoints[s.model], src_name(s),
                         rows_free=out_name in self.vocab_tensors)
        return TensorJob(
            out_name=out_name,
            t=t,
            slice_index=si,
            base=None if base is None else (base.model, src_name(base)),
            models=tuple((s.model, src_name(s)) for s in others),
        )

    def _out_config(self) -> dict[str, Any]:
        cfg = copy.deepcopy(self.reference.config)
        if self.tokenizer is not None:  # mergekit writes the output vocabulary's size (padded)
            cfg["vocab_size"] = self.tokenizer.size
        for key in ("num_hidden_layers", "n_layer", "num_layers"):  # GPT-2 names its depth n_layer
            if key in cfg:
                cfg[key] = self.n_out_layers
        if isinstance(cfg.get("layer_types"), list) and self.recipe.slices:
            # transformers 5 configs list each layer's kind (sliding / full attention): the output's
            # layers are its slices' layers, each of the kind it had in its (first) source model
            types: list[Any] = []
            for sl in self.slices:
                src = sl.sources[0]
                theirs = self.checkpoints[src.model].config.get("layer_types") or cfg["layer_types"]
                types += theirs[src.layer_range[0]:src.layer_range[1]]  # type: ignore[index]
            cfg["layer_types"] = types
        if cfg.get("auto_map") and not self.trust_remote_code:
            raise CheckpointError(
                f"{self.reference.path / 'config.json'} needs custom code (auto_map); evomerge never runs code "
                f"from a model directory unless you allow it for this command (evomerge-merge --trust-remote-code; "
                f"evomerge trust_remote_code=true). Read that code first."
            )
        return cfg

    def relaid(self, job: TensorJob, tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        """A job's input tensors (base first), re-laid on the output vocabulary where the recipe builds one.

        The new rows (means) are computed in ``dtype``, the compute dtype, as mergekit computes them on the
        rounded inputs, even where the method then runs in float32; the tensors keep their own dtype."""
        if self.tokenizer is None or job.out_name not in self.vocab_tensors:
            return tensors
        relaid = self.tokenizer.relay(job_inputs(job), [t.to(dtype) for t in tensors])
        return [r.to(t.dtype) for r, t in zip(relaid, tensors)]

    def refuse_vocab_remap(self, engine: str) -> None:
        """For an engine that does not re-lay vocabularies: stop, before any work, on a recipe that needs it."""
        tm = self.tokenizer
        if tm is None:
            return
        changed = [j.out_name for j in self.jobs
                   if j.out_name in self.vocab_tensors and not tm.plan_for(job_inputs(j)).identity]
        if changed:
            r = self.recipe
            key = "the tokenizer: block" if r.tokenizer is not None else f"tokenizer_source: {r.tokenizer_source}"
            raise RecipeError(
                f"{r.source_file}: {key} gives the merged model another vocabulary than its inputs have ({changed[0]} "
                f"is re-laid on {tm.size} rows); {engine} does not re-lay embeddings. Merge this recipe with "
                f"evomerge-merge, or search over models that share one vocabulary (and drop the key).")

    # ---- parameters ----------------------------------------------------------------
    def _lookup(self, p: ParamDef, job: TensorJob, model_ref: str | None, recipe: Recipe,
                tensor_name: str | None = None) -> Any:
        """mergekit's precedence: slice source > slice > models entry > global parameters.

        Filters match ``tensor_name``: for a per-model parameter, mergekit's name of that model's input
        tensor (in a slice it can sit at another layer than the output), else the output tensor's name.
        """
        levels: list[dict[str, Any]] = []
        slices = recipe.slices
        if slices:
            sl = slices[job.slice_index]
            if model_ref is not None:
                levels += [s.parameters for s in sl.sources if s.model == model_ref]
            levels.append(sl.parameters)
        elif model_ref is not None:
            levels += [m.parameters for m in recipe.models if m.model == model_ref]
        levels.append(recipe.parameters)
        for params in levels:
            if p.name in params:
                value = evaluate_setting(params[p.name], tensor_name or job.out_name, job.t, p.coerce)
                if value is not None:
                    return value
        return None

    def check(self, recipe: Recipe | None = None) -> None:
        """Resolve every job's parameters now, so a bad value fails before any tensor is read."""
        for job in self.jobs:
            self.resolve(job, recipe)

    def resolve(self, job: TensorJob, recipe: Recipe | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per-model and global parameter values for one job, defaulted and range-checked."""
        recipe = recipe or self.recipe
        where = f"{recipe.source_file}: tensor {job.out_name}"
        model_params = []
        for ref, src_name in job.models:
            values = {}
            for p in self.method.model_params:
                v = self._lookup(p, job, ref, recipe, src_name)
                if v is None:
                    if p.required:
                        raise MergeError(
                            f"{where}: model {ref} has no {p.name!r}; set it under that model's parameters "
                            f"or in the global parameters."
                        )
                    v = p.default
                values[p.name] = p.check(v, f"{where}, model {ref}")
            model_params.append(values)
        params = {}
        for p in self.method.global_params:
            v = self._lookup(p, job, None, recipe)
            if v is None and p.required:
                raise MergeError(f"{where}: merge_method {self.method.name!r} needs parameter {p.name!r}; add it under parameters.")
            params[p.name] = p.default if v is None else p.check(v, where)
        return model_params, params
