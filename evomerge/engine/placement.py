"""Where each tensor of the live model lives when the model is larger than one device.

accelerate already solves placement: ``infer_auto_device_map`` fills the devices in
order under a memory budget without splitting a decoder layer, and ``dispatch_model``
adds the hooks that carry activations from one device to the next (and, for layers
placed on the CPU behind a GPU, copy their weights to the GPU for each forward).
evomerge only adds what a merge needs on top: the device of each merged tensor, so
the engine can merge it where it will be used and write it in place.
"""
from __future__ import annotations

from typing import Any

import torch
from accelerate import dispatch_model, infer_auto_device_map

from evomerge.errors import MergeError

DeviceMap = dict[str, "int | str"]


def infer_device_map(model: torch.nn.Module, device_map: str | DeviceMap, max_memory: dict[Any, Any] | None,
                     dtype: torch.dtype) -> DeviceMap:
    """The module -> device map for ``model`` (a skeleton on the meta device).

    ``device_map`` is ``"auto"`` (accelerate fills the GPUs in order, then the CPU, under
    ``max_memory``, e.g. ``{0: "20GiB", "cpu": "64GiB"}``) or an explicit map as in
    ``from_pretrained(device_map=...)``.
    """
    if isinstance(device_map, str):
        if device_map != "auto":
            raise MergeError(f"device_map {device_map!r} is not understood; use null, 'auto', or a mapping of "
                             f"module names to devices (as transformers' from_pretrained takes).")
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        device_map = dict(infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                                dtype=dtype))
    placed = {str(k): v for k, v in dict(device_map).items()}
    name = next((k for k, v in placed.items() if v == "disk"), None)
    if name is not None:
        raise MergeError(f"device_map places {name!r} on 'disk': the live model must fit in device and host memory "
                         f"together (the merge inputs can still stay on disk: memory=disk). Raise max_memory's "
                         f"'cpu' budget or use a machine with more memory.")
    return placed


def device_of(name: str, device_map: DeviceMap) -> torch.device:
    """The device of tensor ``name``: that of the longest module prefix the map names."""
    best = None
    for module in device_map:
        if module == "" or name == module or name.startswith(module + "."):
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise MergeError(f"device_map names no module holding tensor {name!r}; add its module (or '') to the map.")
    where = device_map[best]
    return torch.device(f"cuda:{where}" if isinstance(where, int) else where)


def dispatch(model: torch.nn.Module, device_map: DeviceMap) -> torch.nn.Module:
    """accelerate's hooks over a model whose tensors already sit on their mapped devices."""
    return dispatch_model(model, device_map=device_map)
