"""Prepare once, merge many: the engine behind the search.

A search builds hundreds of candidates from the same inputs. :class:`PreparedMerge`
pays every candidate-independent cost once: it reads the base and the task
vectors (model - base) into memory, precomputes what the method's sparsifier can
reuse (sorted magnitudes, so a TIES threshold for any density is a lookup; the
uniform draws behind DARE/DELLA masks) and builds one live ``transformers``
model. :meth:`PreparedMerge.apply` then writes a candidate recipe's merged
tensors straight into that model's parameters: no new model, no disk.

Memory modes (``memory=``):

* ``device`` — inputs and precomputations resident on the merge device;
* ``host`` — resident in (pinned) host memory, streamed to the GPU per tensor;
* ``disk`` — nothing resident: tensors re-read from the checkpoints per candidate
  and precomputations redone (slow, but fits anything).

``auto`` picks the first that fits the memory available. Every mode runs the same
:func:`run_job`, so a recipe gives the same tensors in all of them and in
``evomerge-merge``.

A live model larger than one device (``device_map="auto"`` or an explicit map,
with ``max_memory``) is placed by accelerate (:mod:`evomerge.engine.placement`):
each tensor is merged on the device its module lives on and written there; layers
accelerate puts on the CPU are merged on the CPU and copied to the GPU per forward.

Lookup tables (sorted magnitudes, DARE's kept-L1 sums) stay in host memory in
every mode: a candidate reads one number from each, and a read from GPU memory
would stall the GPU's queue once per tensor and model.

**Several methods from one set of inputs** (``methods=``, the method-gene search):
the base and every model's task vector are resident once, with the union of what
the methods reuse (sorted magnitudes if a TIES / breadcrumbs method is among them,
uniform draws and DARE's tables if a DARE / DELLA one is, DELLA's ranks, L1 norms).
:meth:`PreparedMerge.apply` then takes a recipe of any prepared method over the
same models: each method gets exactly the aux it would get prepared alone, so a
task-vector method (the task-arithmetic family, model_stock, SLERP from the base)
gives the single-method engine's tensors bit for bit. A method that merges models
(linear, nuslerp without a base, SLERP between two sources) gets each model as
``base + task vector``, which differs from the stored model by float32 rounding
(one rounding of the subtraction, one of the addition: at most 1.5 float32 steps
of the larger of |base| and |model|), so its result differs from
``evomerge-merge``'s by about that much, as the SLERP path over task vectors already does.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import psutil
import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from evomerge.engine import placement
from evomerge.engine.live_names import live_targets, view
from evomerge.engine.jobs import (as_inputs, choose_fused, input_bytes, random_aux, raise_if_not_finite, resolve_device,
                                    run_job)
from evomerge.engine.plan import MergePlan, TensorJob
from evomerge.engine.recipe import Recipe
from evomerge.errors import MergeError
from evomerge.methods import MergeMethod, SparsifyAux, get_method
from evomerge.methods import fused as fused_kernels
from evomerge.methods.sparsify import l1_table, prepare_aux

MEMORY_MODES = ("auto", "device", "host", "disk")


@dataclass
class _Resident:
    """One job's inputs: base + deltas (methods with a base) or the models themselves."""

    base: torch.Tensor | None
    inputs: list[torch.Tensor]
    aux: list[SparsifyAux] | None = None  # candidate-independent: sorted |delta|, della ranks, L1 sums
    uniforms: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # seed -> per-model draws
    l1_below_u: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)  # seed -> DARE kept-L1 tables
    cosines: dict[tuple, float] = field(default_factory=dict)  # several methods: SLERP's angle per recipe structure


@dataclass
class ApplyTiming:
    seconds: float
    tensors: int


def _on_host(table: torch.Tensor | None) -> torch.Tensor | None:
    """A lookup table moved to host memory (see the module docstring for why)."""
    return None if table is None else table.cpu()


def build_live_model(config: dict, trust_remote_code: bool = False) -> PreTrainedModel:
    """An empty model skeleton (no weight allocated twice) whose parameters the engine fills."""
    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")})
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    model.eval()
    return model


class PreparedMerge:
    """Inputs resident, live model built; :meth:`apply` merges a candidate in place."""

    def __init__(
        self,
        recipe: Recipe,
        *,
        methods: Sequence[str] | None = None,
        device: str = "auto",
        memory: str = "auto",
        model_dtype: torch.dtype = torch.float32,
        progress: bool = True,
        trust_remote_code: bool = False,
        fused: bool | str = "auto",
        device_map: str | dict | None = None,
        max_memory: dict | None = None,
    ) -> None:
        """``methods``: the merge methods :meth:`apply` accepts (the recipe's own is always one); more than one
        keeps base + task vectors resident for all of them (see the module docstring). ``recipe`` names the
        models and the base, and is merged first."""
        if memory not in MEMORY_MODES:
            raise MergeError(f"memory mode {memory!r} is unknown; use one of {', '.join(MEMORY_MODES)}.")
        self.plan = MergePlan(recipe, trust_remote_code=trust_remote_code)
        self.plan.refuse_vocab_remap("the search's prepared engine")
        self.recipe = recipe
        self.trust_remote_code = trust_remote_code
        self.methods = tuple(dict.fromkeys([recipe.merge_method, *(methods or ())]))
        self._multi = len(self.methods) > 1
        if self._multi:
            self._check_multi(recipe)
        # what preparation computes for: the recipe's method, or the union of what the methods reuse
        self._aux_method = _union(self.methods) if self._multi else self.plan.method
        self._plans: dict[tuple, MergePlan] = {recipe.structure_key(): self.plan}
        self._fused_request = fused
        self.device = resolve_device(device)
        self.model_dtype = model_dtype
        self.model = build_live_model(self.plan.out_config, trust_remote_code)
        self.device_map = (None if device_map is None else
                           placement.infer_device_map(self.model, device_map, max_memory, model_dtype))
        self._device = {job.out_name: self.device if self.device_map is None
                        else placement.device_of(job.out_name, self.device_map) for job in self.plan.jobs}
        self.memory = self._choose_memory(memory)
        self._needs_base = self.plan.method.needs_base or self._multi  # several methods: always task vectors
        self._resident: dict[str, _Resident] = {}
        self._jobs_by_name = {job.out_name: job for job in self.plan.jobs}
        self._compute: dict[str, torch.dtype] = {}  # each job's compute dtype (its result is rounded to it)
        if self.memory != "disk":
            for job in tqdm(self.plan.jobs, desc="preparing", unit="tensor", disable=not progress):
                self._resident[job.out_name] = self._prepare(job)
        # the kernel choice: one bool, or with several methods one per method (filled as their recipes come)
        self.fused: bool | dict[str, bool] = {} if self._multi else choose_fused(self.plan, self.device, fused,
                                                                                   input_bytes(self.plan))
        self._fill_model()
        self.apply(recipe)

    # ---- several methods -------------------------------------------------------------
    def _check_multi(self, recipe: Recipe) -> None:
        where = f"{recipe.source_file}: an engine prepared for {', '.join(self.methods)}"
        for name in self.methods:
            get_method(name)  # an unknown name fails here, naming the known ones
        if recipe.base_model is None or recipe.slices:
            raise MergeError(f"{where} keeps the base and the task vectors of a models: recipe resident; give it a "
                             f"recipe with a base_model and models: (no slices:).")
        named = recipe.compute_dtype or recipe.dtype
        if named is None:
            raise MergeError(f"{where} needs the recipe's compute dtype stated (dtype: float32).")
        half = str(named).removeprefix("torch.") in ("float16", "bfloat16")
        if half and len({get_method(m).float32_math for m in self.methods}) > 1:
            raise MergeError(f"{where}: under dtype {named} some of these methods compute in float32 and others in "
                             f"{named}, so one set of inputs cannot serve them; set 'evomerge: {{compute_dtype: "
                             f"float32}}'.")
        self._base_ref = recipe.base_model
        self._index = {ref: i for i, (ref, _) in enumerate(self.plan.jobs[0].models)}  # model -> resident input

    def _plan_for(self, recipe: Recipe) -> MergePlan:
        """The plan of a candidate recipe (one per structure: method, base, models), checked against what is
        resident."""
        key = recipe.structure_key()
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        prepared = (self.recipe.base_model, *self._index)
        wrong = (recipe.merge_method not in self.methods or recipe.slices is not None
                 or (recipe.compute_dtype or recipe.dtype) != (self.recipe.compute_dtype or self.recipe.dtype)
                 or (recipe.tokenizer_source, recipe.tokenizer) != (self.recipe.tokenizer_source, self.recipe.tokenizer)
                 or any(ref not in prepared for ref in recipe.all_model_refs()))
        if wrong:
            raise MergeError(
                f"{recipe.source_file}: this recipe merges other models, another dtype, vocabulary or method than the "
                f"prepared engine ({', '.join(self.methods)} over {list(prepared)}); prepare a new engine.")
        plan = MergePlan(recipe, trust_remote_code=self.trust_remote_code)
        job = plan.jobs[0]
        if plan.method.uses_uniforms and (job.base is None or job.base[0] != self._base_ref
                                          or [r for r, _ in job.models] != list(self._index)):
            raise MergeError(f"{recipe.source_file}: {plan.method.name!r} draws its masks per model position, so the "
                             f"engine serves it over the prepared models in their order {list(self._index)}; "
                             f"prepare a new engine.")
        if {j.out_name for j in plan.jobs} != {j.out_name for j in self.plan.jobs}:
            raise MergeError(f"{recipe.source_file}: this recipe's tensors are not the prepared engine's; "
                             f"prepare a new engine.")
        self._plans[key] = plan
        return plan

    def _fused_for(self, plan: MergePlan) -> bool:
        """Several methods: the kernel rule per method (``fused=True`` fuses the methods that have a kernel)."""
        assert isinstance(self.fused, dict)
        name = plan.method.name
        if name not in self.fused:
            want = self._fused_request
            if want is True and not fused_kernels.fusable(plan.method):
                want = False
            self.fused[name] = choose_fused(plan, self.device, want, input_bytes(plan))
        return self.fused[name]

    def _multi_inputs(self, plan: MergePlan, job: TensorJob, recipe: Recipe) -> tuple[dict, list[SparsifyAux] | None]:
        """A candidate job's inputs from the resident base and task vectors: the task vectors themselves when the
        recipe's base is the prepared one, else the models rebuilt as base + task vector (module docstring)."""
        name = job.out_name
        dev = self._device[name]
        res = self._prepare_on_the_fly(self._jobs_by_name[name]) if self.memory == "disk" else self._resident[name]
        base = res.base.to(dev, non_blocking=True)  # type: ignore[union-attr]

        def delta(ref: str) -> torch.Tensor:
            return res.inputs[self._index[ref]].to(dev, non_blocking=True)

        m = plan.method
        refs = [r for r, _ in job.models]
        own_base = None if job.base is None else job.base[0]
        aux: list[SparsifyAux] | None = None
        if own_base == self._base_ref:
            views: dict = {"base": base, "deltas": [delta(r) for r in refs]}
            if m.uses_sorted_abs or m.uses_uniforms or m.aux_extras:
                aux = self._aux_of(m, res, [self._index[r] for r in refs], job, recipe, dev)
            ends = lambda: (base, base + views["deltas"][0])  # noqa: E731 (as prepare_aux measures it)
        else:
            models = [base + delta(r) for r in refs]
            views = {"base": None if own_base is None else base + delta(own_base), "models": models}
            if "cosine" in m.aux_extras:
                aux = [SparsifyAux() for _ in refs]
            ends = lambda: (views["base"], models[0])  # noqa: E731
        if "cosine" in m.aux_extras:  # SLERP's angle: t-independent, measured once per recipe structure
            from evomerge.methods.slerp import cosine  # noqa: PLC0415

            key = recipe.structure_key()
            if key not in res.cosines:
                res.cosines[key] = cosine(*ends())
            aux[0].extra["cosine"] = res.cosines[key]  # type: ignore[index]
        return views, aux

    def _aux_of(self, m: MergeMethod, res: _Resident, indices: list[int], job: TensorJob, recipe: Recipe,
                dev: torch.device) -> list[SparsifyAux]:
        """Exactly the aux ``m`` gets from an engine prepared for it alone, taken from the union's."""
        aux = [SparsifyAux() for _ in indices]
        for a, i in zip(aux, indices):
            r = res.aux[i] if res.aux else None
            if r is None:
                continue
            if m.uses_sorted_abs:
                a.sorted_abs = r.sorted_abs
            a.extra = {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v
                       for k, v in r.extra.items() if k in m.aux_extras}
        if m.uses_uniforms:
            draws = self._uniforms(job, res, recipe)
            tables = res.l1_below_u.get(recipe.seed) or [None] * len(draws)
            for a, i in zip(aux, indices):
                a.uniforms = draws[i].to(dev, non_blocking=True)
                if "l1_below_u" in m.aux_extras and tables[i] is not None:
                    a.extra["l1_below_u"] = tables[i]
        return aux

    def resident_bytes(self) -> dict[str, int]:
        """Bytes held per kind: inputs (base and task vectors or models) and the precomputations."""
        out = {"inputs": 0, "sorted_abs": 0, "uniforms": 0, "extra": 0}

        def size(t: object) -> int:
            return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

        for res in self._resident.values():
            out["inputs"] += size(res.base) + sum(map(size, res.inputs))
            for a in res.aux or []:
                out["sorted_abs"] += size(a.sorted_abs)
                out["extra"] += sum(map(size, a.extra.values()))
            out["uniforms"] += sum(size(u) for draws in res.uniforms.values() for u in draws)
            out["extra"] += sum(size(t) for tables in res.l1_below_u.values() for t in tables)
        return out

    # ---- preparation ---------------------------------------------------------------
    def _bytes_needed(self) -> int:
        """Resident bytes: the inputs, plus sorted magnitudes, uniform draws and DELLA's ranks per merged model."""
        m = self._aux_method
        n = len(self.plan.jobs[0].models)
        extra = n * (int(m.uses_sorted_abs) + int(m.uses_uniforms) + int("della_rank" in m.aux_extras)) / (n + 1)
        return int(input_bytes(self.plan) * (1 + extra))

    def _choose_memory(self, memory: str) -> str:
        if memory != "auto":
            return memory
        need = self._bytes_needed()
        host_free = psutil.virtual_memory().available * 0.7
        if self.device_map is not None:  # the model alone needs several devices: its inputs do not fit one
            return "host" if need < host_free else "disk"
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if need < free * 0.7:
                return "device"
            return "host" if need < host_free else "disk"
        return "device" if need < host_free else "disk"

    def _load(self, job: TensorJob, device: torch.device) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The job's base and models, rounded to the compute dtype, as private copies in the math dtype."""
        refs = ([job.base] if job.base else []) + list(job.models)
        srcs = [self.plan.checkpoints[r].get(n) for r, n in refs]
        tensors, self._compute[job.out_name] = as_inputs(srcs, self.recipe, self.plan, device)
        # A tensor already in the right dtype comes back as a copy-on-write view of the mapped file; the engine
        # writes into its copy (task vectors are formed in place), and a private copy is much faster to write.
        tensors = [t.clone() if t.data_ptr() == s.data_ptr() else t for t, s in zip(tensors, srcs)]
        return (tensors[0], tensors[1:]) if job.base else (None, tensors)

    def _prepare(self, job: TensorJob) -> _Resident:
        where = self._device[job.out_name]
        dev = where if self.memory == "device" else torch.device("cpu")
        base, inputs = self._load(job, dev)
        if self._needs_base:
            assert base is not None
            inputs = [x.sub_(base) for x in inputs]  # task vectors, in place: no second copy
        res = _Resident(base=base, inputs=inputs)
        m = self._aux_method
        draws = random_aux(self.plan, job, self.recipe.seed, inputs[0].shape, dev, method=m) if m.uses_uniforms else None
        if m.uses_sorted_abs or m.uses_uniforms or m.aux_extras:
            res.aux = [prepare_aux(m, d, base=base, uniforms=None if draws is None else draws[i].uniforms,
                                   gpu=where.type == "cuda") for i, d in enumerate(inputs)]
            if draws is not None:
                res.uniforms[self.recipe.seed] = [a.uniforms for a in res.aux]  # type: ignore[misc]
                res.l1_below_u[self.recipe.seed] = [_on_host(a.extra.pop("l1_below_u", None)) for a in res.aux]
            for a in res.aux:
                a.uniforms = None  # kept per seed in res.uniforms (and its tables in res.l1_below_u)
                a.sorted_abs = _on_host(a.sorted_abs)
        if dev.type == "cpu" and where.type == "cuda":
            pin = lambda t: t.pin_memory()  # noqa: E731
            res.base = None if base is None else pin(res.base)
            res.inputs = [pin(x) for x in res.inputs]
        return res

    def _fill_model(self) -> None:
        """Give the skeleton's parameters their first values on their devices, then (with a device map)
        let accelerate dispatch it. Keeps a handle on each parameter's storage: with layers offloaded
        to the CPU, accelerate swaps the module's parameter for a meta one but reads that storage."""
        model = self.model
        self._targets = live_targets(model, [job.out_name for job in self.plan.jobs])  # checkpoint name -> live
        for job in self.plan.jobs:
            target = self._targets.get(job.out_name)
            if target is None:
                continue
            ref = job.base or job.models[0]
            value = self.plan.checkpoints[ref[0]].get(ref[1])
            dev = self._device[job.out_name]
            if target.expert is None:
                # a private copy: a checkpoint's tensor can be a view of its mapped file, which later reads
                # (memory: disk re-reads the inputs per candidate) would see the merged values in
                set_module_tensor_to_device(model, target.param, dev, value=value.to(dev, self.model_dtype, copy=True),
                                            dtype=self.model_dtype)
                continue
            fused = model.get_parameter(target.param)  # experts stacked in one parameter (transformers 5)
            if fused.device.type == "meta":
                set_module_tensor_to_device(model, target.param, dev,
                                            value=torch.empty(fused.shape, dtype=self.model_dtype, device=dev))
            view(model.get_parameter(target.param), target).copy_(value)
        model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if missing:
            unplaced = [j.out_name for j in self.plan.jobs if j.out_name not in self._targets]
            raise MergeError(
                f"the merged model has no value for parameter {missing[0]!r}: it is missing from "
                f"{self.plan.reference.path}" + (f", whose tensor {unplaced[0]!r} maps to no parameter of "
                f"{type(model).__name__} (a load-time conversion of transformers evomerge does not follow; "
                f"merge with evomerge-merge, which writes the checkpoint's layout)" if unplaced else
                ". The checkpoint does not match its config.json") + "."
            )
        for buf_name, buf in model.named_buffers():
            where = self.device if self.device_map is None else placement.device_of(buf_name, self.device_map)
            if buf.device != where:
                set_module_tensor_to_device(model, buf_name, where, value=buf)
        model.requires_grad_(False)
        self._params = {job.out_name: view(model.get_parameter(t.param), t) for job in self.plan.jobs
                        if (t := self._targets.get(job.out_name)) is not None}
        if self.device_map is not None:
            placement.dispatch(model, self.device_map)

    # ---- merging -------------------------------------------------------------------
    def _inputs(self, job: TensorJob, recipe: Recipe) -> tuple[torch.Tensor | None, list[torch.Tensor], list[SparsifyAux] | None]:
        dev = self._device[job.out_name]
        if self.memory == "disk":
            res = self._prepare_on_the_fly(job)
        else:
            res = self._resident[job.out_name]
        base = None if res.base is None else res.base.to(dev, non_blocking=True)
        inputs = [x.to(dev, non_blocking=True) for x in res.inputs]
        m = self.plan.method
        aux: list[SparsifyAux] | None = None
        if m.uses_sorted_abs or m.uses_uniforms or m.aux_extras:
            aux = [SparsifyAux() for _ in inputs]
            for a, r in zip(aux, res.aux or []):
                a.sorted_abs = r.sorted_abs  # a lookup table: read on the host
                a.extra = {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v
                           for k, v in r.extra.items()}
            if m.uses_uniforms:
                draws = self._uniforms(job, res, recipe)
                tables = res.l1_below_u.get(recipe.seed) or [None] * len(draws)
                for a, u, table in zip(aux, draws, tables):
                    a.uniforms = u.to(dev, non_blocking=True)
                    if table is not None:
                        a.extra["l1_below_u"] = table  # read on the host: it stays where it was built
        return base, inputs, aux

    def _prepare_on_the_fly(self, job: TensorJob) -> _Resident:
        base, inputs = self._load(job, self._device[job.out_name])
        if self._needs_base:
            inputs = [x.sub_(base) for x in inputs]
        return _Resident(base=base, inputs=inputs)

    def _uniforms(self, job: TensorJob, res: _Resident, recipe: Recipe) -> list[torch.Tensor]:
        """Common random numbers are cached per seed; fresh draws (random_mode: fresh) are not kept."""
        if recipe.seed in res.uniforms:
            return res.uniforms[recipe.seed]
        aux = random_aux(self.plan, job, recipe.seed, res.inputs[0].shape, res.inputs[0].device, method=self._aux_method)
        draws = [a.uniforms for a in aux]  # type: ignore[union-attr,misc]
        if recipe.random_mode == "common" and self.memory != "disk":
            res.uniforms = {recipe.seed: draws}  # keep one seed's draws, not every seed's
            if "l1_below_u" in self._aux_method.aux_extras:
                gpu = self._device[job.out_name].type == "cuda"
                res.l1_below_u = {recipe.seed: [_on_host(l1_table(d, u, gpu=gpu)) for d, u in zip(res.inputs, draws)]}
        return draws  # type: ignore[return-value]

    @torch.no_grad()
    def apply(self, recipe: Recipe) -> ApplyTiming:
        """Merge ``recipe`` into the live model in place: a recipe of the prepared structure, or with several
        methods any recipe of one of them over the prepared models and base."""
        if self._multi:
            plan = self._plan_for(recipe)
        elif recipe.structure_key() != self.recipe.structure_key():
            raise MergeError(
                f"{recipe.source_file}: this recipe merges different models or another method than the prepared "
                f"engine ({self.recipe.merge_method} over {self.recipe.all_model_refs()}); prepare a new engine."
            )
        else:
            plan = self.plan
        fused = self._fused_for(plan) if self._multi else self.fused
        start = time.perf_counter()
        checks: list[tuple[str, torch.Tensor]] = []
        for job in plan.jobs:
            param = self._params.get(job.out_name)
            if param is None:
                continue  # a tied tensor already written through its twin
            if self._multi:
                views, aux = self._multi_inputs(plan, job, recipe)
            else:
                base, inputs, aux = self._inputs(job, recipe)
                views = {"base": base, **({"deltas": inputs} if self._needs_base else {"models": inputs})}
            try:
                run_job(plan, job, recipe, aux=aux, out=param, fused=fused, checks=checks,
                        round_to=self._compute.get(job.out_name), **views)
            except MergeError:
                raise
            except Exception as exc:  # noqa: BLE001 - a compiler failure falls back to eager torch
                if not fused:
                    raise
                warnings.warn(f"fused merge kernel unavailable ({type(exc).__name__}: {exc}); using eager torch")
                fused = False
                if isinstance(self.fused, dict):
                    self.fused[plan.method.name] = False
                else:
                    self.fused = False
                run_job(plan, job, recipe, aux=aux, out=param, checks=checks,
                        round_to=self._compute.get(job.out_name), **views)
        raise_if_not_finite(checks, recipe)  # also waits for the device's queued kernels
        return ApplyTiming(seconds=time.perf_counter() - start, tensors=len(self._params))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The live merged tensors by output name (views, not copies)."""
        return {name: p.detach() for name, p in self._params.items()}


def _union(names: Sequence[str]) -> MergeMethod:
    """A stand-in method whose precomputation is the union of the methods' (SLERP's angle aside: it depends on
    the pair of tensors a recipe interpolates, so the engine measures it per recipe structure)."""
    ms = [get_method(n) for n in names]
    extras = tuple(dict.fromkeys(k for m in ms for k in m.aux_extras if k != "cosine"))
    return MergeMethod(name="+".join(names), merge=ms[0].merge, needs_base=True,
                       uses_sorted_abs=any(m.uses_sorted_abs for m in ms), uses_uniforms=any(m.uses_uniforms for m in ms),
                       aux_extras=extras)
