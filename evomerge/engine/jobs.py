"""What both engines share: running one tensor job, its compute dtype, and reproducible random draws.

Compute dtype (mergekit 0.1.5's rule, :func:`compute_dtype`): the recipe's ``dtype``, else the
promoted stored dtype of the job's inputs; ``evomerge.compute_dtype`` overrides both. Inputs are
rounded to it and the method's arithmetic runs in it, except for the methods mergekit computes in
float32 whatever its inputs (:attr:`MergeMethod.float32_math`), which get float32 copies of the
rounded inputs; the result is rounded to the compute dtype, then stored as ``out_dtype``.

DARE and DELLA masks come from uniform draws that depend only on
``(seed, tensor name, model index)``, drawn on the CPU with a dedicated
generator. That makes a mask independent of the device, of the order tensors
are processed in, and of the engine: the prepared engine (common random numbers
drawn once) and a one-shot ``evomerge-merge`` of the same recipe and seed give
the same tensors.
"""
from __future__ import annotations

import hashlib

import torch

from evomerge.checkpoints.writer import parse_dtype
from evomerge.engine.plan import MergePlan, TensorJob
from evomerge.engine.recipe import Recipe
from evomerge.errors import MergeError
from evomerge.methods import MergeInputs, MergeMethod, SparsifyAux
from evomerge.methods import fused as fused_kernels


def stable_seed(seed: int, tensor_name: str, model_index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{tensor_name}/{model_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def uniforms(seed: int, tensor_name: str, model_index: int, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """U[0, 1) draws for one model's task vector of one tensor (CPU, float32)."""
    gen = torch.Generator(device="cpu").manual_seed(stable_seed(seed, tensor_name, model_index))
    return torch.rand(tuple(shape), generator=gen, dtype=torch.float32)


def run_job(
    plan: MergePlan,
    job: TensorJob,
    recipe: Recipe,
    *,
    base: torch.Tensor | None,
    models: list[torch.Tensor] | None = None,
    deltas: list[torch.Tensor] | None = None,
    aux: list[SparsifyAux] | None = None,
    out: torch.Tensor | None = None,
    fused: bool = False,
    checks: list[tuple[str, torch.Tensor]] | None = None,
    round_to: torch.dtype | None = None,
) -> torch.Tensor:
    """Resolve the job's parameters under ``recipe`` and run the method on float32 inputs.

    With ``out`` the result is written there (the live parameter); with ``fused``
    the method's one-pass kernel writes it directly (see :mod:`evomerge.methods.fused`).
    The result must be finite: checked here, or, when ``checks`` is given, the
    result's sum is appended to it for :func:`raise_if_not_finite` to check once for
    a whole candidate (no host sync per tensor on a GPU). ``round_to``: the compute dtype, which a
    result computed in float32 (:func:`math_dtype`) is rounded to before it is written to ``out``.
    """
    model_params, params = plan.resolve(job, recipe)
    inputs = MergeInputs(
        base=base, models=models, deltas=deltas, model_params=model_params, params=params,
        tensor_name=job.out_name, aux=aux,
    )
    if fused and out is not None:
        total = fused_kernels.merge_into(plan.method, inputs, out)
    else:
        result = plan.method.merge(inputs)
        if round_to is not None and out is not None:
            result = result.to(round_to)
        out = result if out is None else out.copy_(result)
        total = out.sum()
    if checks is None:
        raise_if_not_finite([(job.out_name, total)], recipe)
    else:
        checks.append((job.out_name, total))
    return out


def raise_if_not_finite(checks: list[tuple[str, torch.Tensor]], recipe: Recipe) -> None:
    """One clear error naming the first tensor whose merged values sum to NaN or infinity."""
    if not checks:
        return
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, t in checks:  # one stack and one wait per device (a placed model spans several)
        by_device.setdefault(t.device, []).append(t.float())
    if all(bool(torch.isfinite(torch.stack(ts)).all()) for ts in by_device.values()):
        return
    name = next(n for n, t in checks if not torch.isfinite(t))
    raise MergeError(
        f"{recipe.source_file}: merging tensor {name!r} produced NaN or infinite values; "
        f"check the weights (a weight sum near zero with normalize: true divides by ~0)."
    )


def random_aux(plan: MergePlan, job: TensorJob, seed: int, shape: torch.Size, device: torch.device, *,
               method: MergeMethod | None = None) -> list[SparsifyAux] | None:
    """Uniform draws for each merged model of a job, or None when the method (``method``, else the plan's)
    draws nothing."""
    if not (method or plan.method).uses_uniforms:
        return None
    return [SparsifyAux(uniforms=uniforms(seed, job.out_name, i, shape).to(device)) for i in range(len(job.models))]


def compute_dtype(recipe: Recipe, stored: list[torch.dtype]) -> torch.dtype:
    """The dtype a job's inputs are rounded to (see the module docstring)."""
    named = recipe.compute_dtype or recipe.dtype
    if named is not None:
        return parse_dtype(named, f"{recipe.source_file}: dtype")  # type: ignore[return-value]
    out = stored[0]
    for d in stored[1:]:
        out = torch.promote_types(out, d)
    return out


def math_dtype(plan: MergePlan, dtype: torch.dtype) -> torch.dtype:
    """The dtype the method's arithmetic runs in, given the compute dtype."""
    return torch.float32 if plan.method.float32_math and dtype in (torch.float16, torch.bfloat16) else dtype


def as_inputs(tensors: list[torch.Tensor], recipe: Recipe, plan: MergePlan,
              device: torch.device) -> tuple[list[torch.Tensor], torch.dtype]:
    """The job's stored tensors rounded to the compute dtype, in the method's math dtype; and the compute dtype."""
    cdt = compute_dtype(recipe, [t.dtype for t in tensors])
    mdt = math_dtype(plan, cdt)
    return [t.to(device=device, dtype=cdt).to(mdt) for t in tensors], cdt


def float32_math(plan: MergePlan) -> bool:
    """Whether every job's arithmetic runs in float32 (what the compiled kernels compute in)."""
    named = plan.recipe.compute_dtype or plan.recipe.dtype
    if named is not None:
        return math_dtype(plan, parse_dtype(named)) == torch.float32  # type: ignore[arg-type]
    for job in plan.jobs:
        refs = ([job.base] if job.base else []) + list(job.models)
        stored = [_stored_dtype(plan.checkpoints[r], n) for r, n in refs]
        if math_dtype(plan, compute_dtype(plan.recipe, stored)) != torch.float32:
            return False
    return True


def _stored_dtype(ckpt: object, name: str) -> torch.dtype:
    """From the file header where the checkpoint reads one (a LoRA adapter's tensors are computed)."""
    try:
        return ckpt.dtype(name)  # type: ignore[attr-defined]
    except AttributeError:
        return ckpt.get(name).dtype  # type: ignore[attr-defined]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu or auto.")
    return dev


FUSE_ABOVE_BYTES = 1_000_000_000


def choose_fused(plan: MergePlan, device: torch.device, fused: bool | str, input_bytes: int) -> bool:
    """Whether to run the method's one-pass compiled kernel.

    ``auto``: where the method has one and the inputs are large enough (or on a GPU) to repay the
    compile (slow the first time on a CPU, fast once torch's on-disk cache holds it).
    """
    ok = fused_kernels.fusable(plan.method) and float32_math(plan)
    if fused and not float32_math(plan):
        if fused == "auto":
            return False
        raise MergeError(f"{plan.recipe.source_file}: the fused kernels compute in float32 and this recipe's compute "
                         f"dtype is {plan.recipe.compute_dtype or plan.recipe.dtype or 'the stored one'}; drop --fused, "
                         f"or set 'evomerge: {{compute_dtype: float32}}' to compute in float32.")
    if fused == "auto":
        return ok and (device.type == "cuda" or input_bytes > FUSE_ABOVE_BYTES)
    if fused and not ok:
        raise MergeError(f"merge_method {plan.method.name!r} has no fused kernel; use fused: false.")
    return bool(fused)


def input_bytes(plan: MergePlan) -> int:
    """Bytes of float32 inputs (base and every merged model) the plan reads."""
    total = 0
    for job in plan.jobs:
        ref, name = job.base or job.models[0]
        numel = int(torch.Size(plan.checkpoints[ref].shape(name)).numel())
        total += numel * 4 * (len(job.models) + (job.base is not None))
    return total
