"""Write a merged model as an ordinary Hugging Face model directory.

Everything is written into a staging folder beside the destination and put in
place only when complete (:mod:`evomerge.checkpoints.outdir` says how, and what
an existing destination gets), so a crash or Ctrl-C never leaves a half model
where a user (or ``from_pretrained``) would find it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors.torch import save_file

from evomerge.checkpoints.outdir import TOKENIZER_FILES, check_destination, copy_files, file_mode, publish, side_files, staging_dir
from evomerge.errors import CheckpointError


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(name: str | None, where: str = "dtype") -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise CheckpointError(f"{where}: unknown dtype {name!r}; use one of float32, float16, bfloat16.") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '5e9' or an int, in bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(float(s))


def _shards(tensors: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor.contiguous()
        size += nbytes
    if shard:
        yield shard


def write_model_dir(
    out_dir: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    config: dict[str, Any],
    tokenizer_source: Path | None,
    recipe_yaml: str,
    model_card: str,
    max_shard_bytes: int = 2 * 10**9,
    force: bool = False,
) -> Path:
    """Stream ``tensors`` into sharded safetensors plus config, tokenizer, card and recipe.

    ``tensors`` is consumed lazily (one merged tensor at a time), so a one-shot
    merge holds at most one shard in memory. Callers check the destination with
    :func:`~evomerge.checkpoints.outdir.check_destination` before they spend any work;
    it is checked again here, where the files are written.
    """
    out = check_destination(out_dir, force=force)
    tmp = staging_dir(out)
    try:
        files: list[tuple[str, list[str]]] = []
        total = 0
        for i, shard in enumerate(_shards(tensors, max_shard_bytes)):
            fname = f"shard-{i:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            os.chmod(tmp / fname, file_mode())
            files.append((fname, list(shard)))
            total += sum(t.numel() * t.element_size() for t in shard.values())
        _name_shards(tmp, files, total)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer_source is not None:
            copy_files(side_files(tokenizer_source, TOKENIZER_FILES), tmp)
        (tmp / "mergekit_config.yml").write_text(recipe_yaml)
        (tmp / "README.md").write_text(model_card)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _name_shards(tmp: Path, files: list[tuple[str, list[str]]], total: int) -> None:
    if len(files) == 1:
        (tmp / files[0][0]).rename(tmp / "model.safetensors")
        return
    weight_map = {}
    for i, (fname, names) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        (tmp / fname).rename(tmp / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
