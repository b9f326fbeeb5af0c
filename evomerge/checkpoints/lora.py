"""PEFT LoRA adapters read as full models.

Most fine-tunes ship as LoRA adapters. Their task vector is the scaled low-rank
product ``scale * B @ A`` (``scale = lora_alpha / r``, or ``/ sqrt(r)`` with
rsLoRA), so an adapter can stand wherever a model stands: it reads as its base
plus that product. Only the (small) adapter factors stay in memory.
"""
from __future__ import annotations

import json
import math
import re
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from evomerge.checkpoints.reader import Checkpoint
from evomerge.errors import CheckpointError

_PEFT_PREFIX = "base_model.model."


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


class LoraCheckpoint(Checkpoint):
    """A LoRA adapter over a base checkpoint; tensors read as base + delta."""

    is_adapter = True

    def __init__(self, path: str | Path, base: Checkpoint | None) -> None:  # noqa: D107
        self.path = Path(path)
        cfg_file = self.path / "adapter_config.json"
        try:
            self.adapter_config: dict[str, Any] = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {cfg_file}: {exc}.") from None
        if self.adapter_config.get("peft_type", "LORA").upper() != "LORA":
            raise CheckpointError(
                f"{cfg_file} is a {self.adapter_config.get('peft_type')} adapter; evomerge reads LoRA adapters only."
            )
        if base is None:
            hint = self.adapter_config.get("base_model_name_or_path")
            if hint and Path(hint).is_dir():
                base = Checkpoint(hint)
            else:
                raise CheckpointError(
                    f"LoRA adapter {self.path} needs its base model: set base_model in the recipe, write the model "
                    f"as 'BASE_DIR+{self.path}', or make base_model_name_or_path in {cfg_file} a local directory "
                    f"(it says {hint!r})."
                )
        self.base = base
        self._factors, self._replaced = self._read_adapter()

    def __repr__(self) -> str:
        return f"LoraCheckpoint({str(self.path)!r}, base={self.base!r})"

    @cached_property
    def config(self) -> dict[str, Any]:
        return self.base.config

    def _read_adapter(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], dict[str, torch.Tensor]]:
        files = [self.path / "adapter_model.safetensors", self.path / "adapter_model.bin"]
        file = next((f for f in files if f.is_file()), None)
        if file is None:
            raise CheckpointError(f"LoRA adapter {self.path} has no adapter_model.safetensors (or .bin).")
        try:
            if file.suffix == ".safetensors":
                state = load_file(str(file))
            else:
                state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"cannot read {file}: {exc}; the adapter file is corrupt.") from None
        cfg = self.adapter_config
        r_default, alpha_default = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", cfg.get("r", 8)))
        rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        a_factors: dict[str, torch.Tensor] = {}
        b_factors: dict[str, torch.Tensor] = {}
        replaced: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            m = re.match(r"(.*)\.lora_([AB])(?:\.default)?\.weight$", name)
            if m:
                (a_factors if m.group(2) == "A" else b_factors)[m.group(1)] = value
            elif "lora_" not in name:
                replaced[name.replace(".modules_to_save.default", "")] = value
        factors = {}
        for module, a in a_factors.items():
            if module not in b_factors:
                raise CheckpointError(f"{file}: lora_A for {module!r} has no matching lora_B; the adapter is corrupt.")
            rank = _pattern_value(rank_pattern, module, r_default)
            alpha = float(_pattern_value(alpha_pattern, module, alpha_default))
            scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
            factors[f"{module}.weight"] = (a, b_factors[module], scale)
        for name in [*factors, *replaced]:
            if not self.base.has(name):
                raise CheckpointError(
                    f"LoRA adapter {self.path} targets tensor {name!r}, which base model {self.base.path} does not "
                    f"have; the adapter was trained on a different base. Point the recipe at the adapter's own base."
                )
        return factors, replaced

    def tensor_names(self) -> list[str]:
        return self.base.tensor_names()

    def has(self, name: str) -> bool:
        return self.base.has(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def file_of(self, name: str) -> Path:
        return self.base.file_of(name)

    def delta(self, name: str) -> torch.Tensor | None:
        """The adapter's task vector for ``name`` (float32), or None where it changes nothing."""
        if name in self._replaced:
            return self._replaced[name].float() - self.base.get(name).float()
        if name not in self._factors:
            return None
        a, b, scale = self._factors[name]
        delta = (b.float() @ a.float()) * scale
        if self.adapter_config.get("fan_in_fan_out"):
            delta = delta.T
        return delta

    def get(self, name: str) -> torch.Tensor:
        base = self.base.get(name)
        delta = self.delta(name)
        return base if delta is None else (base.float() + delta).to(base.dtype)

    @property
    def tokenizer_dir(self) -> Path:
        return self.base.path


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in pattern.items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default
