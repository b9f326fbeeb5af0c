"""Model checkpoints: lazy readers, LoRA adapters, compatibility checks and the writer."""
from __future__ import annotations

from pathlib import Path

from evomerge.checkpoints.lora import LoraCheckpoint, is_adapter_dir
from evomerge.checkpoints.reader import Checkpoint
from evomerge.checkpoints.writer import parse_dtype, write_model_dir  # noqa: F401


def open_checkpoint(path: str | Path, base: Checkpoint | None = None) -> Checkpoint:
    """Open a model directory, a PEFT LoRA adapter directory, or ``model+adapter``.

    An adapter stands wherever a model stands: it reads as its base with the
    scaled low-rank product added. Its base is the ``+`` prefix, else ``base``
    (the recipe's base_model), else the adapter's ``base_model_name_or_path`` when
    that is a local directory.
    """
    spec = str(path)
    if "+" in spec and not Path(spec).exists():
        model_part, adapter_part = spec.split("+", 1)
        return LoraCheckpoint(adapter_part, Checkpoint(model_part))
    p = Path(spec)
    if is_adapter_dir(p):
        return LoraCheckpoint(p, base)
    return Checkpoint(p)
