"""What both engines share: running one tensor job, and reproducible random draws.

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

from evomerge.engine.plan import MergePlan, TensorJob
from evomerge.engine.recipe import Recipe
from evomerge.errors import MergeError
from evomerge.methods import MergeInputs, SparsifyAux
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
) -> torch.Tensor:
    """Resolve the job's parameters under ``recipe`` and run the method on float32 inputs.

    With ``out`` the result is written there (the live parameter); with ``fused``
    the method's one-pass kernel writes it directly (see :mod:`evomerge.methods.fused`).
    The result must be finite: checked here, or, when ``checks`` is given, the
    result's sum is appended to it for :func:`raise_if_not_finite` to check once for
    a whole candidate (no host sync per tensor on a GPU).
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


def random_aux(plan: MergePlan, job: TensorJob, seed: int, shape: torch.Size, device: torch.device) -> list[SparsifyAux] | None:
    """Uniform draws for each merged model of a job, or None when the method draws nothing."""
    if not plan.method.uses_uniforms:
        return None
    return [SparsifyAux(uniforms=uniforms(seed, job.out_name, i, shape).to(device)) for i in range(len(job.models))]


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
    compile (~20 s the first time on a CPU, seconds once torch's on-disk cache holds it).
    """
    ok = fused_kernels.fusable(plan.method)
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
