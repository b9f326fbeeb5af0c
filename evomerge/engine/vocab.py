"""Vocabularies in, permutation tables out: mergekit 0.1.5's tokenizer merge as pure functions.

A recipe with ``tokenizer_source`` (``union``, ``base`` or a model) or a ``tokenizer:`` block gives the
merged model an output vocabulary, and every input model's embedding and LM-head rows are re-laid on
it before the merge method sees them. This module holds the rules, with no file and no tokenizer
object: which tokens a union adds (:func:`union_additions`), where each output token sits in each
model (:func:`permutation`), which rows a model that lacks a token gets instead (:func:`row_plan`),
and the re-laid tensors themselves (:func:`relay`). Reading tokenizers and writing the output one is
:mod:`evomerge.engine.tokenizer_out`'s job.

mergekit's defaults for a token some of a tensor's input models lack (no ``tokens:`` entry for it):
present in exactly one model, that model's row; in none, zeros; in several and in the base model
(when the base is an input of the tensor), the base's row; else the mean of the rows of the models
that have it. A ``tokens:`` entry sets the source instead (a model's row of the same token, a model's
row of another token or id, or zeros), and with ``force: true`` replaces even the rows of models that
have the token. ``pad_to_multiple_of`` rounds the row count up; each model's padding rows are the mean
of its re-laid rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from evomerge.errors import MergeError, RecipeError

ABSENT = -1


@dataclass(frozen=True)
class ModelVocab:
    """One model's tokenizer as the rules see it: token -> id, its added tokens' ids, its embedding rows."""

    tokens: Mapping[str, int]
    added: Mapping[int, str]  # id -> content of the tokenizer's added tokens (special or not)
    rows: int  # the config's vocab_size: ids at or above it have no embedding row


@dataclass(frozen=True)
class TokenSource:
    """A ``tokenizer.tokens`` entry: where a token's embedding comes from.

    ``kind`` is ``model`` (that model's row of the same token), ``model_token`` (that model's row of
    ``token`` or ``token_id``), ``zero`` or ``None`` (no source given)."""

    kind: str | None
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass(frozen=True)
class Default:
    """A row some model lacks (or that ``force`` replaces): ``average`` of (input, row) pairs, a ``copy``
    of one (input, row), or ``zero``."""

    kind: str
    picks: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class RowPlan:
    """How one tensor's inputs are re-laid: ``rows[i][out_id]`` is input ``i``'s row for that output id, or
    ``ABSENT`` where ``defaults[out_id]`` gives it; ``size`` counts the output rows with padding."""

    rows: tuple[tuple[int, ...], ...]
    defaults: Mapping[int, Default]
    vocab_len: int
    size: int

    @property
    def identity(self) -> bool:
        return (not self.defaults and self.size == self.vocab_len
                and all(r == tuple(range(self.vocab_len)) for r in self.rows))


def padded_size(vocab_len: int, multiple: int | None) -> int:
    if multiple and vocab_len % multiple:
        return (vocab_len // multiple + 1) * multiple
    return vocab_len


def union_additions(base: ModelVocab, others: Sequence[ModelVocab]) -> tuple[list[str], list[tuple[int, int]]]:
    """What ``tokenizer_source: union`` adds to the base tokenizer, in the order mergekit adds them.

    Returns the plain tokens missing from the base's vocabulary (first seen first, ``base`` then
    ``others`` in order) and the added tokens to add, as (model index, token id) with index 0 the base,
    one per content (the first model's settings win). Ids at or above a model's ``rows`` are ignored."""
    plain: dict[str, None] = {}
    added: dict[str, tuple[int, int]] = {}
    for mi, vocab in enumerate([base, *others]):
        contents = set(vocab.added.values())
        for tok, idx in vocab.tokens.items():
            if idx < vocab.rows and tok not in contents:
                plain.setdefault(tok)
        for idx, content in vocab.added.items():
            if idx < vocab.rows:
                added.setdefault(content, (mi, idx))
    new_plain = [t for t in plain if t not in added and t not in base.tokens]
    return new_plain, list(added.values())


def permutation(out_vocab: Mapping[str, int], model: ModelVocab) -> tuple[int, ...]:
    """Each output id's row in ``model`` (``ABSENT`` where it lacks the token, or the token's id has no row:
    mergekit 0.1.5 stops with a KeyError there; evomerge treats the token as absent)."""
    perm = [ABSENT] * len(out_vocab)
    for tok, new in out_vocab.items():
        old = model.tokens.get(tok)
        if old is not None and old < model.rows:
            perm[new] = old
    return tuple(perm)


def row_plan(out_vocab: Mapping[str, int], inputs: Sequence[str], perms: Mapping[str, Sequence[int]],
             base: str | None, tokens: Mapping[str, TokenSource], vocabs: Mapping[str, ModelVocab],
             pad_to_multiple_of: int | None, where: str) -> RowPlan:
    """The re-laying of one tensor whose inputs are the models ``inputs`` (in the job's order)."""
    table = [perms[m] for m in inputs]
    defaults: dict[int, Default] = {}
    for tok, tid in out_vocab.items():
        have = [i for i, p in enumerate(table) if p[tid] != ABSENT]
        cfg = tokens.get(tok)
        if cfg is not None:
            if cfg.force or len(have) < len(inputs):
                defaults[tid] = _configured(cfg, tok, tid, inputs, table, vocabs, where)
            continue
        if len(have) == len(inputs):
            continue
        if len(have) == 1:
            defaults[tid] = Default("copy", ((have[0], table[have[0]][tid]),))
        elif not have:
            defaults[tid] = Default("zero")
        elif base is not None and base in inputs and table[inputs.index(base)][tid] != ABSENT:
            b = inputs.index(base)
            defaults[tid] = Default("copy", ((b, table[b][tid]),))
        else:
            defaults[tid] = Default("average", tuple((i, table[i][tid]) for i in have))
    forced = {tid for tok, tid in out_vocab.items() if tokens.get(tok) is not None and tokens[tok].force}
    rows = tuple(tuple(ABSENT if tid in forced else r for tid, r in enumerate(p)) for p in table)
    return RowPlan(rows, defaults, len(out_vocab), padded_size(len(out_vocab), pad_to_multiple_of))


def _configured(cfg: TokenSource, tok: str, tid: int, inputs: Sequence[str], table: Sequence[Sequence[int]],
                vocabs: Mapping[str, ModelVocab], where: str) -> Default:
    if cfg.kind == "zero":
        return Default("zero")
    if cfg.kind is None or cfg.model is None:
        raise MergeError(f"{where}: tokenizer.tokens[{tok!r}] has no source, and a row for it must be built; "
                         f"give it a source (a model, {{kind: model_token, model: ..., token: ...}} or {{kind: zero}}).")
    if cfg.model not in inputs:
        raise MergeError(f"{where}: tokenizer.tokens[{tok!r}] takes its embedding from {cfg.model}, which is not an "
                         f"input of this tensor; name one of {list(inputs)}.")
    i = list(inputs).index(cfg.model)
    if cfg.kind == "model":
        if table[i][tid] == ABSENT:
            raise MergeError(f"{where}: tokenizer.tokens[{tok!r}] takes its embedding from {cfg.model}, whose tokenizer "
                             f"lacks {tok!r}; name a model that has it, or a token of that model (kind: model_token).")
        return Default("copy", ((i, table[i][tid]),))
    vocab = vocabs[cfg.model]
    row = cfg.token_id if cfg.token is None else vocab.tokens.get(cfg.token, ABSENT)
    if row is None or not 0 <= row < vocab.rows:
        what = f"token {cfg.token!r}" if cfg.token is not None else f"token_id {cfg.token_id}"
        raise MergeError(f"{where}: tokenizer.tokens[{tok!r}].source names {what} of {cfg.model}, which has no such "
                         f"row (its vocabulary has {vocab.rows} rows); fix the token or id.")
    return Default("copy", ((i, row),))


def relay(plan: RowPlan, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each input re-laid on the output vocabulary (rows first), in the inputs' promoted dtype."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    shape = tensors[0].shape[1:]
    device = tensors[0].device
    fills: dict[int, torch.Tensor] = {}
    for tid, d in plan.defaults.items():
        if d.kind == "zero":
            fills[tid] = torch.zeros(shape, dtype=dtype, device=device)
        elif d.kind == "copy":
            i, row = d.picks[0]
            fills[tid] = tensors[i][row].to(dtype)
        else:  # summed into zeros in input order, then divided: the operations whose rounding mergekit's has
            acc = torch.zeros(shape, dtype=dtype, device=device)
            for i, row in d.picks:
                acc = acc + tensors[i][row]
            acc /= len(d.picks)
            fills[tid] = acc
    out = []
    for i, t in enumerate(tensors):
        new = torch.zeros((plan.size, *shape), dtype=dtype, device=device)
        src = torch.tensor(plan.rows[i], dtype=torch.long)
        have = (src != ABSENT).nonzero().flatten()
        new[have.to(device)] = t[src[have].to(device)].to(dtype)
        for tid, value in fills.items():
            if plan.rows[i][tid] == ABSENT:  # a model that has the token keeps its row (unless forced: ABSENT)
                new[tid] = value
        if plan.size > plan.vocab_len:
            new[plan.vocab_len:] = torch.mean(new[:plan.vocab_len], dim=0)
        out.append(new)
    return out


def parse_tokens(raw: Any, where: str) -> dict[str, TokenSource]:
    """``tokenizer.tokens`` as mergekit's pydantic config reads it: token -> {source, force}, a source being
    a model path, ``{kind: model_token, model, token | token_id}`` or ``{kind: zero}``."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: tokenizer.tokens must map tokens to {{source: ..., force: ...}}, got {raw!r}.")
    out = {}
    for tok, entry in raw.items():
        at = f"{where}: tokenizer.tokens[{tok!r}]"
        entry = {} if entry is None else entry
        if not isinstance(entry, dict) or set(entry) - {"source", "force"}:
            raise RecipeError(f"{at} must be a mapping of source and force, got {entry!r}.")
        force = entry.get("force", False)
        if not isinstance(force, bool):
            raise RecipeError(f"{at}.force must be true or false, got {force!r}.")
        out[str(tok)] = _token_source(entry.get("source"), force, at)
    return out


def _token_source(src: Any, force: bool, at: str) -> TokenSource:
    if src is None:
        return TokenSource(None, force=force)
    if isinstance(src, str):
        return TokenSource("model", model=src, force=force)
    kind = src.get("kind") if isinstance(src, dict) else None
    if kind == "zero" and set(src) == {"kind"}:
        return TokenSource("zero", force=force)
    if kind == "model_token" and set(src) <= {"kind", "model", "token", "token_id"} and isinstance(src.get("model"), str):
        token, token_id = src.get("token"), src.get("token_id")
        if (token is None) == (token_id is None):
            raise RecipeError(f"{at}.source: give exactly one of token and token_id.")
        if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int)):
            raise RecipeError(f"{at}.source.token_id must be an integer, got {token_id!r}.")
        return TokenSource("model_token", model=src["model"], token=None if token is None else str(token),
                           token_id=token_id, force=force)
    raise RecipeError(f"{at}.source must be a model path, {{kind: model_token, model: PATH, token: TOKEN}} "
                      f"(or token_id: N) or {{kind: zero}}, got {src!r}.")
