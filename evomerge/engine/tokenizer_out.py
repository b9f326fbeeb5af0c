"""The edge of the tokenizer merge: read the models' tokenizers, build and write the output one.

The rules live in :mod:`evomerge.engine.vocab` (pure); this module loads tokenizers with transformers,
builds the output tokenizer as mergekit 0.1.5 does (the base's, with the union's tokens added through
``add_tokens``, or the named model's; then the ``tokenizer.tokens`` keys it lacks), and keeps what the
merge needs per tensor: each model's vocabulary and its permutation onto the output.

Where mergekit 0.1.5 orders by a Python set of models (the union's tokens from models other than the
base, ``chat_template: auto`` between equally common templates), evomerge takes the recipe's order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from evomerge.engine.chat_templates import resolve_chat_template
from evomerge.engine.vocab import (ModelVocab, RowPlan, TokenSource, padded_size, permutation, relay, row_plan,
                                  union_additions)
from evomerge.errors import CheckpointError


class _Model(Protocol):
    @property
    def tokenizer_dir(self) -> Path: ...

    @property
    def config(self) -> dict: ...


def load_tokenizer(folder: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any loading failure is the same user error
        raise CheckpointError(f"the tokenizer in {folder} does not load ({type(exc).__name__}: {exc}); a recipe with "
                              f"tokenizer_source or a tokenizer: block reads every model's tokenizer. Restore its "
                              f"tokenizer files.") from None


def vocab_rows(config: Mapping) -> int | None:
    rows = config.get("vocab_size")
    if rows is None and isinstance(config.get("text_config"), dict):
        rows = config["text_config"].get("vocab_size")
    return None if rows is None else int(rows)


def model_vocab(tokenizer: PreTrainedTokenizerBase, rows: int | None) -> ModelVocab:
    tokens = tokenizer.get_vocab()
    added = {int(i): info.content for i, info in tokenizer.added_tokens_decoder.items()}
    return ModelVocab(tokens, added, len(tokens) if rows is None else rows)


@dataclass
class TokenizerMerge:
    """The output tokenizer and what re-lays each tensor on it."""

    tokenizer: PreTrainedTokenizerBase
    vocabs: dict[str, ModelVocab]
    perms: dict[str, tuple[int, ...]]
    tokens: Mapping[str, TokenSource]
    base: str | None
    pad_to_multiple_of: int | None
    where: str
    _plans: dict[tuple[str, ...], RowPlan] = field(default_factory=dict)

    @property
    def out_vocab(self) -> dict[str, int]:
        return self.tokenizer.get_vocab()

    def plan_for(self, inputs: Sequence[str]) -> RowPlan:
        key = tuple(inputs)
        if key not in self._plans:
            self._plans[key] = row_plan(self.out_vocab, key, self.perms, self.base, self.tokens, self.vocabs,
                                        self.pad_to_multiple_of, self.where)
        return self._plans[key]

    @property
    def size(self) -> int:
        return padded_size(len(self.tokenizer.get_vocab()), self.pad_to_multiple_of)

    def relay(self, inputs: Sequence[str], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return relay(self.plan_for(inputs), tensors)


def build_tokenizer_merge(source: str, refs: Sequence[str], models: Mapping[str, _Model], base: str | None,
                          tokens: Mapping[str, TokenSource], pad_to_multiple_of: int | None, where: str,
                          trust_remote_code: bool = False) -> TokenizerMerge:
    """``source`` is ``union``, ``base`` or a model path; ``refs`` every model of the recipe, base first."""
    donor = base or refs[0]
    loaded = {r: load_tokenizer(models[r].tokenizer_dir, trust_remote_code) for r in refs}
    vocabs = {r: model_vocab(tok, vocab_rows(models[r].config)) for r, tok in loaded.items()}
    beyond = [t for t, i in vocabs[donor].tokens.items() if i >= vocabs[donor].rows]
    if beyond:
        raise CheckpointError(
            f"{where}: the tokenizer of {donor} has {len(beyond)} token(s) beyond its {vocabs[donor].rows} embedding "
            f"rows (e.g. {beyond[0]!r}); mergekit 0.1.5 strips them from BPE tokenizers, evomerge does not. Remove "
            f"them from its tokenizer, or make a model whose tokenizer fits its embeddings the base.")
    if source == "base":
        out = load_tokenizer(models[donor].tokenizer_dir, trust_remote_code)
    elif source == "union":
        out = load_tokenizer(models[donor].tokenizer_dir, trust_remote_code)
        others = [r for r in refs if r != donor]
        plain, added = union_additions(vocabs[donor], [vocabs[r] for r in others])
        for tok in plain:
            out.add_tokens(tok)
        order = [donor, *others]
        for mi, tid in added:
            out.add_tokens(loaded[order[mi]].added_tokens_decoder[tid])
    else:
        folder = models[source].tokenizer_dir if source in models else Path(source)
        out = load_tokenizer(folder, trust_remote_code)
    for tok in tokens:
        if tok not in out.get_vocab():
            out.add_tokens(tok)
    out_vocab = out.get_vocab()
    perms = {r: permutation(out_vocab, v) for r, v in vocabs.items()}
    return TokenizerMerge(out, vocabs, perms, tokens, base, pad_to_multiple_of, where)


def save_output_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path, chat_template: str | None,
                          model_templates: Sequence[str | dict | None]) -> None:
    """Write the output tokenizer (save_pretrained, as mergekit does), with the recipe's chat template."""
    if chat_template:
        template = resolve_chat_template(chat_template, model_templates)
        if template is not None:
            tokenizer.chat_template = template
    tokenizer.save_pretrained(str(folder))
