"""Lazy, tensor-by-tensor access to Hugging Face model directories.

Merging never needs every model in memory at once: a :class:`Checkpoint` knows
each tensor's name, shape and dtype from the file headers and reads a tensor only
when asked. Safetensors files are memory-mapped; ``pytorch_model*.bin`` files are
read with ``torch.load(weights_only=True, mmap=True)`` so no pickled code runs.
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from evomerge.checkpoints.experts import ExpertLayout
from evomerge.errors import CheckpointError

_SAFE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class Checkpoint:
    """A full model directory: ``config.json`` plus safetensors or ``.bin`` weights."""

    is_adapter = False

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(
                f"model directory {self.path} does not exist; point the recipe at a directory "
                f"holding config.json and model weights."
            )
        self._handles: dict[Path, Any] = {}
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        self._weight_map = self._find_weights()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    @cached_property
    def config(self) -> dict[str, Any]:
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{cfg} is missing; a model directory needs its config.json.")
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{cfg} is not valid JSON ({exc}); restore the file from the original model.") from None

    # ---- discovery -------------------------------------------------------
    def _find_weights(self) -> dict[str, Path]:
        """Map every tensor name to the file holding it."""
        for index_name in (SAFE_INDEX, BIN_INDEX):
            index = self.path / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as exc:
                    raise CheckpointError(f"{index} is not a valid shard index ({exc}).") from None
                files = {f: self.path / f for f in set(weight_map.values())}
                for f, p in files.items():
                    if not p.is_file():
                        raise CheckpointError(
                            f"shard {p} listed in {index} is missing; re-download or re-copy the model "
                            f"so that every shard named in the index is present."
                        )
                return {name: files[f] for name, f in weight_map.items()}
        single = self.path / "model.safetensors"
        if single.is_file():
            return {name: single for name in self._safetensors_keys(single)}
        bins = sorted(self.path.glob("pytorch_model*.bin"))
        if bins:
            return {name: b for b in bins for name in self._load_bin(b)}
        raise CheckpointError(
            f"no weights found in {self.path}: expected model.safetensors, {SAFE_INDEX} with its shards, "
            f"or pytorch_model*.bin."
        )

    def _safetensors_keys(self, file: Path) -> list[str]:
        return list(self._open_safe(file).keys())

    def _open_safe(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(
                    f"cannot read {file}: {exc}. The file is truncated or corrupt; re-download or re-copy it."
                ) from None
            self._handles[file] = handle
        return handle

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if file in self._bin_cache:
            return self._bin_cache[file]
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a corrupt/unsafe file
            raise CheckpointError(
                f"cannot read {file} with torch.load(weights_only=True): {exc}. evomerge never runs pickled "
                f"code; convert the checkpoint to safetensors or re-download it."
            ) from None
        self._bin_cache[file] = state
        return state

    # ---- access ------------------------------------------------------------
    @cached_property
    def _layout(self) -> ExpertLayout:
        """Names as merged: a mixture of experts' per-expert tensors stacked (see evomerge.checkpoints.experts)."""
        return ExpertLayout(list(self._weight_map), self.config.get("model_type"))

    def tensor_names(self) -> list[str]:
        return list(self._layout.names)

    def has(self, name: str) -> bool:
        return name in self._layout.plain or name in self._layout.stacked

    def _stored(self, name: str) -> str:
        stored = self._layout.plain.get(name)
        if stored is None or stored not in self._weight_map:
            raise CheckpointError(f"tensor {name!r} is not in {self.path}.")
        return stored

    def file_of(self, name: str) -> Path:
        parts = self._layout.stacked.get(name)
        return self._weight_map[next(iter(parts[0].values()))] if parts else self._weight_map[self._stored(name)]

    def shape(self, name: str) -> tuple[int, ...]:
        parts = self._layout.stacked.get(name)
        if parts:
            one = self._stored_shape(parts[0][0])
            return (len(parts[0]), one[0] * len(parts), *one[1:])
        return self._stored_shape(self._stored(name))

    def get(self, name: str) -> torch.Tensor:
        """The stored tensor (stored dtype, CPU); stacked experts as one tensor. Callers convert for math."""
        parts = self._layout.stacked.get(name)
        if parts:
            return torch.cat([torch.stack([self._stored_get(p[e]) for e in sorted(p)]) for p in parts], dim=1)
        return self._stored_get(self._stored(name))

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype, from the file's header where it has one (no tensor read)."""
        parts = self._layout.stacked.get(name)
        stored = next(iter(parts[0].values())) if parts else self._stored(name)
        file = self._weight_map[stored]
        if file.suffix == ".safetensors":
            found = _SAFE_DTYPES.get(self._open_safe(file).get_slice(stored).get_dtype())
            if found is not None:
                return found
        return self._stored_get(stored).dtype

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        file = self._weight_map[name]
        if file.suffix == ".safetensors":
            return tuple(self._open_safe(file).get_slice(name).get_shape())
        return tuple(self._load_bin(file)[name].shape)

    def _stored_get(self, name: str) -> torch.Tensor:
        file = self._weight_map[name]
        if file.suffix == ".safetensors":
            try:
                return self._open_safe(file).get_tensor(name)
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"cannot read tensor {name!r} from {file}: {exc}; the file is corrupt.") from None
        return self._load_bin(file)[name]

    @property
    def tokenizer_dir(self) -> Path:
        return self.path

