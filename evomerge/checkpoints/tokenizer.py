"""Load a model directory's tokenizer without ever running code from it.

Why not ``AutoTokenizer.from_pretrained`` as it stands: a tokenizer whose
``tokenizer_config.json`` (or the model's ``config.json``) names custom classes
(``auto_map``) makes transformers ask on a terminal whether to run that code, and
a ``y`` runs it. evomerge runs model-directory code only where the user set
``trust_remote_code`` for that command; anywhere else such a directory is a clear
error, raised before transformers is asked.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evomerge.errors import CheckpointError


def custom_code_file(model_dir: str | Path) -> Path | None:
    """The file of ``model_dir`` that asks for custom code (an ``auto_map``), if any."""
    for name in ("tokenizer_config.json", "config.json"):
        path = Path(model_dir) / name
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            return path
    return None


def load_tokenizer(model_dir: str | Path, *, trust_remote_code: bool = False, how_to_trust: str = "") -> Any:
    """``AutoTokenizer`` for ``model_dir``, never running its code unless ``trust_remote_code``.

    ``how_to_trust``: how the calling command sets it (named in the error)."""
    from transformers import AutoTokenizer

    custom = custom_code_file(model_dir)
    if custom is not None and not trust_remote_code:
        raise CheckpointError(
            f"{custom} needs custom code (auto_map); evomerge never runs code from a model directory unless you "
            f"allow it for this command{f' ({how_to_trust})' if how_to_trust else ''}. Read that code first.")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the tokenizer of {model_dir}: {exc}") from None
