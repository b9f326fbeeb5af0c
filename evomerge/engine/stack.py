"""Layer stacking in memory: one live model re-wired per candidate from resident layers.

A passthrough recipe with ``slices:`` (a "frankenmerge") only chooses which source
layer sits at which depth, with optional ``scale`` factors on some tensors. Its
candidates therefore need no merge kernel: every source model is loaded once, and
:meth:`StackEngine.apply` points the live model's ``model.layers`` at the chosen
resident decoder layers.

What is shared and what is not, and why:

* **weights** are shared: a slot's decoder layer is a shallow copy of the resident
  layer whose parameters are the resident's own tensors (no copy of any weight);
* **module objects** are per slot: the KV cache (``DynamicCache``) stores keys and
  values under ``self_attn.layer_idx``, so a layer used at two depths needs two
  attention objects with two indices, or the second use would read and extend the
  first one's cache. The copies are a handful of Python objects;
* **scaled tensors** get their own tensor: a slot whose recipe scales, say,
  ``o_proj`` by 0.9 holds ``(stored float32 value * 0.9)`` cast to the model's dtype,
  computed from the checkpoint exactly as ``evomerge-merge`` computes it (float32
  multiply, then the cast). So the scored model and the exported one have the same
  weights bit for bit, which a scaling wrapper around the module would not give.

Embeddings come from the first slice's model and the final norm (and an untied LM
head) from the last slice's, with those slices' scales, as in mergekit and
:class:`~evomerge.engine.plan.MergePlan` (the stack reads both from the plan); a tied
head is the embeddings, as loading the exported model ties it.
``config.num_hidden_layers`` (and ``layer_types`` where the config has one) follow
the stack, so a cache built from the config has one entry per output layer, and
rotary positions, computed once per forward from the cache length, stay correct.
"""
from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from evomerge.checkpoints import Checkpoint, open_checkpoint
from evomerge.engine.jobs import resolve_device
from evomerge.engine.plan import LAYER_RE, MergePlan, layer_index
from evomerge.engine.prepared import ApplyTiming, build_live_model
from evomerge.engine.recipe import Recipe
from evomerge.errors import MergeError

ATTN, SUFFIX_SEP = "self_attn", "."


@dataclass(frozen=True)
class StackLayer:
    """One output layer: which resident layer it is, and the tensors the recipe scales (suffix -> scale)."""

    model: str
    layer: int
    scales: tuple[tuple[str, str, float], ...]  # (suffix in the layer, source tensor name, scale)


@dataclass(frozen=True)
class EdgeTensor:
    """A tensor outside the layers (embeddings, final norm, LM head): its output name, source and scale."""

    name: str
    model: str
    source_name: str
    scale: float


def stack_of(plan: MergePlan, recipe: Recipe) -> tuple[list[StackLayer], list[EdgeTensor]]:
    """The output layers and the edge tensors of a validated passthrough plan, scales resolved as it resolves them.

    A scalar ``scale`` on the last slice's source also scales the final norm and head, and one on the first
    slice's the embeddings (mergekit resolves the edges' parameters from those slices); the stack builds that too.
    """
    layers: dict[int, dict] = {}
    edges: list[EdgeTensor] = []
    for job in plan.jobs:
        (ref, src_name), = job.models
        (scale_params,), _ = plan.resolve(job, recipe)
        scale = float(scale_params["scale"])
        out = layer_index(job.out_name)
        if out is None:
            edges.append(EdgeTensor(job.out_name, ref, src_name, scale))
            continue
        src = layer_index(src_name)
        entry = layers.setdefault(out, {"model": ref, "layer": src, "scales": []})
        if (entry["model"], entry["layer"]) != (ref, src):
            raise MergeError(f"{recipe.source_file}: output layer {out} mixes source layers; not a passthrough stack.")
        if scale != 1.0:
            entry["scales"].append((LAYER_RE.match(src_name).group("suffix"), src_name, scale))  # type: ignore[union-attr]
    return [StackLayer(e["model"], e["layer"], tuple(e["scales"])) for _, e in sorted(layers.items())], edges


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing every child module, parameter and buffer of ``module``."""
    twin = copy.copy(module)
    twin._modules = OrderedDict(module._modules)        # noqa: SLF001 - torch keeps these private
    twin._parameters = OrderedDict(module._parameters)  # noqa: SLF001
    twin._buffers = OrderedDict(module._buffers)        # noqa: SLF001
    return twin


class StackEngine:
    """Every source model resident; :meth:`apply` re-wires one live model to a passthrough recipe's stack.

    Duck-types :class:`~evomerge.engine.prepared.PreparedMerge` for the search loop: ``apply(recipe)``
    returns its timing, ``model`` is the one live model object (lm-eval wraps it once per process),
    and ``fused`` is False (no merge kernel runs; the export's passthrough is eager torch).
    """

    fused = False

    def __init__(self, models: Sequence[str], *, device: str = "auto", model_dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False) -> None:
        if not models:
            raise MergeError("a layer stack needs at least one source model.")
        self.device = resolve_device(device)
        self.model_dtype = model_dtype
        self.trust_remote_code = trust_remote_code
        self.residents: dict[str, PreTrainedModel] = {}
        for ref in dict.fromkeys(models):
            m = AutoModelForCausalLM.from_pretrained(ref, dtype=model_dtype, trust_remote_code=trust_remote_code)
            self.residents[ref] = m.to(self.device).eval().requires_grad_(False)
        first = self.residents[next(iter(self.residents))]
        for ref, m in self.residents.items():
            _check_stackable(ref, m)
        self.model = build_live_model(first.config.to_dict(), trust_remote_code)
        self.model.config._attn_implementation = first.config._attn_implementation  # noqa: SLF001
        self.model.model.rotary_emb = first.model.rotary_emb  # same config everywhere: one set of frequencies
        self.layers: list[StackLayer] = []
        self._checkpoints: dict[str, Checkpoint] = {}

    @torch.no_grad()
    def apply(self, recipe: Recipe) -> ApplyTiming:
        """Point the live model at the stack ``recipe`` describes (a passthrough recipe with ``slices:``)."""
        start = time.perf_counter()
        if recipe.merge_method != "passthrough" or not recipe.slices:
            raise MergeError(f"{recipe.source_file}: the in-memory stack takes a passthrough recipe with slices:, "
                             f"not {recipe.merge_method!r}{'' if recipe.slices else ' with models:'}.")
        unknown = [r for r in recipe.all_model_refs() if r not in self.residents]
        if unknown:
            raise MergeError(f"{recipe.source_file}: model {unknown[0]} is not resident in this stack engine "
                             f"(it holds {', '.join(self.residents)}); list it when building the engine.")
        plan = MergePlan(recipe, trust_remote_code=self.trust_remote_code)
        stack, edges = stack_of(plan, recipe)
        if not stack:
            raise MergeError(f"{recipe.source_file}: the stack has no layers.")
        own = 0
        new_layers = []
        for i, entry in enumerate(stack):
            layer, n = self._slot(plan, i, entry)
            new_layers.append(layer)
            own += n
        live = self.model
        live.model.layers = nn.ModuleList(new_layers)
        for edge in edges:
            own += self._edge(plan, edge)
        if getattr(live.config, "tie_word_embeddings", False) and not any(e.name.startswith("lm_head.") for e in edges):
            head = _shallow(self.residents[edges[0].model].lm_head)  # tied: the head is the embeddings, as on load
            head._parameters["weight"] = live.get_input_embeddings().weight  # noqa: SLF001
            live.lm_head = head
        meta = next((n for n, p in live.named_parameters() if p.device.type == "meta"), None)
        if meta is not None:
            raise MergeError(f"{recipe.source_file}: the stack gives no value to {meta}; its checkpoints lack it.")
        live.config.num_hidden_layers = len(stack)
        types = [getattr(self.residents[e.model].config, "layer_types", None) for e in stack]
        if all(t is not None for t in types):
            live.config.layer_types = [t[e.layer] for t, e in zip(types, stack)]  # type: ignore[index]
        self.layers = stack
        return ApplyTiming(seconds=time.perf_counter() - start, tensors=own)

    def _edge(self, plan: MergePlan, edge: EdgeTensor) -> int:
        """Point the live model's embeddings / norm / head module at the source's (own copy when scaled)."""
        *path, pname = edge.name.split(SUFFIX_SEP)
        module = self.residents[edge.model].get_submodule(SUFFIX_SEP.join(path))
        if edge.scale != 1.0:
            module = _shallow(module)
            self._scaled(module, pname, plan, edge.model, edge.source_name, edge.scale)
        parent = self.model.get_submodule(SUFFIX_SEP.join(path[:-1]))
        parent._modules[path[-1]] = module  # noqa: SLF001
        return int(edge.scale != 1.0)

    def _scaled(self, module: nn.Module, pname: str, plan: MergePlan, ref: str, src_name: str, scale: float) -> None:
        """``module.<pname>`` becomes its own tensor: the stored value times ``scale`` (passthrough's float32
        multiply), cast to the live dtype, as evomerge-merge writes it and loading casts it.

        A float32 resident holds the stored value exactly (a float32 checkpoint's, or a bfloat16/float16 one
        widened), so it is the multiply's input; a narrower resident is the stored value rounded, so the checkpoint is read
        (the engine's own handle: a plan's fresh memory map pays its page faults again on every candidate)."""
        old = module._parameters[pname]  # noqa: SLF001
        if old.dtype == torch.float32:
            value = old * scale
        else:
            if ref not in self._checkpoints:
                self._checkpoints[ref] = open_checkpoint(ref)
            value = self._checkpoints[ref].get(src_name).to(device=old.device, dtype=torch.float32) * scale
        module._parameters[pname] = nn.Parameter(value.to(dtype=old.dtype, device=old.device),  # noqa: SLF001
                                                 requires_grad=False)

    def _slot(self, plan: MergePlan, index: int, entry: StackLayer) -> tuple[nn.Module, int]:
        """The decoder layer of output position ``index``: the resident one, own attention object, own scaled tensors."""
        resident = self.residents[entry.model].model.layers[entry.layer]
        layer = _shallow(resident)
        copied: dict[str, nn.Module] = {"": layer}
        attn = _shallow(resident.self_attn)
        attn.layer_idx = index
        layer._modules[ATTN] = attn  # noqa: SLF001
        copied[ATTN] = attn
        for suffix, src_name, scale in entry.scales:
            *path, pname = suffix.split(SUFFIX_SEP)
            parent = layer
            for depth in range(len(path)):
                key = SUFFIX_SEP.join(path[: depth + 1])
                if key not in copied:
                    copied[key] = _shallow(parent._modules[path[depth]])  # noqa: SLF001
                    parent._modules[path[depth]] = copied[key]  # noqa: SLF001
                parent = copied[key]
            self._scaled(parent, pname, plan, entry.model, src_name, scale)
        return layer, len(entry.scales)


def _check_stackable(ref: str, model: PreTrainedModel) -> None:
    """The re-wiring reaches into ``model.model.layers[i].self_attn.layer_idx``: say so when a model lacks it."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    ok = (isinstance(layers, nn.ModuleList) and len(layers) > 0 and hasattr(model, "lm_head")
          and all(hasattr(getattr(l, ATTN, None), "layer_idx") for l in layers)
          and hasattr(inner, "embed_tokens") and hasattr(inner, "norm"))
    if not ok or getattr(model.config, "is_heterogeneous", False):
        raise MergeError(
            f"{ref}: {type(model).__name__} is not a decoder stack evomerge can re-wire in memory (it needs "
            f"model.layers[i].self_attn.layer_idx, model.embed_tokens, model.norm and lm_head, as Llama, Mistral "
            f"and Qwen2 have, and no per-layer config). Build the stack with evomerge-merge instead."
        )
