"""Check that models can be merged before any work is done.

Merging models of different architectures or vocabularies produces garbage
without failing, so every mismatch is reported up front as one error that names
both files, the first offending key or tensor, and the fix.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from evomerge.checkpoints.reader import Checkpoint
from evomerge.errors import CheckpointError

_ARCH_KEYS = ("model_type", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "head_dim")
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _fix_hint() -> str:
    return "merge only fine-tunes of one base model (same architecture and tokenizer)"


def check_compatible(reference: Checkpoint, others: Sequence[Checkpoint], *, same_depth: bool = True,
                     same_vocab: bool = True) -> None:
    """Architecture, special-token ids and vocabulary of every model equal the reference's.

    ``same_vocab=False`` (a recipe that builds an output vocabulary) leaves the vocabulary, its size and
    the special-token ids free: the tokenizer merge re-lays each model's rows on the output's."""
    ref_cfg = reference.config
    for other in others:
        if other is reference:
            continue
        cfg = other.config
        keys = _ARCH_KEYS + (("num_hidden_layers",) if same_depth else ())
        if not same_vocab:
            keys = tuple(k for k in keys if k != "vocab_size")
        for key in keys + (_TOKEN_KEYS if same_vocab else ()):
            if key in ref_cfg and key in cfg and ref_cfg[key] != cfg[key]:
                raise CheckpointError(
                    f"{other.path / 'config.json'} has {key}={cfg[key]!r} but {reference.path / 'config.json'} has "
                    f"{key}={ref_cfg[key]!r}; these models cannot be merged tensor by tensor: {_fix_hint()}."
                )
        if same_vocab:
            _check_vocab(reference, other)


def _vocab(ckpt: Checkpoint) -> tuple[Path, dict[str, Any]] | None:
    file = ckpt.tokenizer_dir / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        model = json.loads(file.read_text()).get("model", {})
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc}); restore the tokenizer files.") from None
    vocab = model.get("vocab")
    if isinstance(vocab, list):  # unigram tokenizers store [piece, score] pairs
        vocab = {piece[0]: i for i, piece in enumerate(vocab)}
    return (file, vocab) if isinstance(vocab, dict) else None


def _check_vocab(reference: Checkpoint, other: Checkpoint) -> None:
    a, b = _vocab(reference), _vocab(other)
    if a is None or b is None or a[1] == b[1]:
        return
    (file_a, va), (file_b, vb) = a, b
    for token, idx in va.items():
        if vb.get(token) != idx:
            raise CheckpointError(
                f"vocabularies differ: token {token!r} has id {idx} in {file_a} but "
                f"{vb.get(token)!r} in {file_b}; {_fix_hint()}, or give the recipe a tokenizer source "
                f"(tokenizer_source: union builds the merged vocabulary as mergekit does; evomerge-merge only)."
            )
    extra = next(iter(set(vb) - set(va)))
    raise CheckpointError(
        f"vocabularies differ: token {extra!r} is in {file_b} but not in {file_a}; {_fix_hint()}, or give the "
        f"recipe a tokenizer source (tokenizer_source: union; evomerge-merge only)."
    )


def check_tensor(name: str, ref: Checkpoint, ref_name: str, other: Checkpoint, other_name: str, *,
                 rows_free: bool = False) -> None:
    """The tensor exists in ``other`` with the reference's shape (but for its rows, with ``rows_free``:
    a vocabulary tensor the tokenizer merge re-lays)."""
    if not other.has(other_name):
        raise CheckpointError(
            f"tensor {other_name!r} is missing from {other.path} (it is in {ref.path}); "
            f"{_fix_hint()}, or restrict the merge with slices."
        )
    a, b = ref.shape(ref_name), other.shape(other_name)
    if (tuple(a)[1:] != tuple(b)[1:]) if rows_free else a != b:
        raise CheckpointError(
            f"tensor {other_name!r} has shape {list(b)} in {other.file_of(other_name)} but {list(a)} in "
            f"{ref.file_of(ref_name)} (output tensor {name!r}); {_fix_hint()}."
        )
