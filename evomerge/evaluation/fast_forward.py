"""Forward passes for the fast lm-eval model: shared-prefix scoring and batched greedy decoding.

Both work on token ids only (the lm-eval side, tokenisation and request order, is in
``fast_lm.py``) and read the live model's weights at every call: nothing here outlives a call.

Every row is laid out so that the model computes what it would on the unpadded sequence: rows are
*left*-padded, with explicit position ids counted from each row's first real token (as
``model.generate`` does), so every row's last token sits in the last column and ``logits_to_keep``
asks the model's own head (soft-capping, scaling and all) for the last columns only.

A context shared by several continuations is computed once, in one of two ways:

* packed (the default where the model allows it): one row holds the context followed by every
  continuation, and a custom 4D attention mask lets each continuation see the context and itself
  only, its positions restarting where the context ends: one forward pass per batch;
* cached: the context runs alone, its KV cache is expanded to one row per continuation and the
  continuations go on from it in a second pass. Used where a custom mask would not be honoured
  (flash or flex attention, sliding windows, models outside transformers' masking utilities) or
  would not fit in memory.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

MASK_BYTES = 64 << 20  # a packed batch's 4D mask larger than this goes the cached way instead


@dataclasses.dataclass(frozen=True)
class Fwd:
    """What a model's forward accepts, worked out once per model object."""

    keep: bool  # takes ``logits_to_keep``
    cache_name: str  # its KV-cache argument: ``cache`` from transformers 5.24, ``past_key_values`` before
    packed: bool  # honours a custom 4D attention mask as given
    window: int | None  # sliding-window length, if any layer has one


def forward_args(model: torch.nn.Module, pack: bool | None = None) -> Fwd:
    params = inspect.signature(model.forward).parameters
    cfg = model.config
    module = sys.modules.get(type(model).__module__)
    layer_types = set(getattr(cfg, "layer_types", None) or ())
    packable = (getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager")
                and hasattr(module, "create_causal_mask")  # transformers' masking utils pass a 4D mask through
                and layer_types <= {"full_attention", "sliding_attention"})
    if pack and not packable:
        raise ValueError(f"{type(model).__name__} does not take a custom 4D attention mask; use pack=None")
    window = getattr(cfg, "sliding_window", None)
    return Fwd(keep="logits_to_keep" in params, cache_name="cache" if "cache" in params else "past_key_values",
               packed=packable if pack is None else bool(pack), window=int(window) if window else None)


def _cache_of(out: Any) -> Any:
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp_(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def _call(model, fwd: Fwd, cache: Any = None, keep: int = 0, **kwargs: Any):
    """``model(**kwargs)`` with the KV cache under its name; ``keep``: logits of the last columns only."""
    if cache is not None:
        kwargs[fwd.cache_name] = cache
    if keep and fwd.keep:
        kwargs["logits_to_keep"] = keep
    out = model(**kwargs)
    return out, _cache_of(out)


def score_groups(
    model, prefixes: Sequence[Sequence[int]], conts: Sequence[Sequence[Sequence[int]]], *,
    pad_id: int, device: torch.device, fwd: Fwd,
) -> list[tuple[float, bool]]:
    """Log-likelihood and greedy flag of every continuation of every prefix, flattened in order.

    ``prefixes[g]`` is computed once for all of ``conts[g]``: each continuation's first token is
    scored from the prefix's last logits, the others from the continuation's own positions.
    Log-softmax is taken at scored positions only, in the logits' dtype, as lm-eval's HFLM does.
    """
    width = max(len(p) + sum(len(c) - 1 for c in cs) for p, cs in zip(prefixes, conts))
    mask_bytes = len(prefixes) * width * width * model.get_input_embeddings().weight.element_size()
    if fwd.packed and (fwd.window is None or width <= fwd.window) and mask_bytes <= MASK_BYTES:
        return _score_packed(model, prefixes, conts, pad_id=pad_id, device=device, fwd=fwd)
    return _score_cached(model, prefixes, conts, pad_id=pad_id, device=device, fwd=fwd)


def _totals(logits: torch.Tensor, targets: list[int], req: list[int], col: list[int],
            n_req: int) -> list[tuple[float, bool]]:
    """Per request: the sum of its tokens' log-probabilities and whether each was the argmax.

    ``logits[i]`` predicts ``targets[i]``, the ``col[i]``-th token of request ``req[i]``. Sums run in
    the logits' dtype over a zero-padded row per request (adding 0.0 is exact).
    """
    device = logits.device
    lp = torch.log_softmax(logits, dim=-1)
    tgt = torch.tensor(targets, dtype=torch.long, device=device)
    r, c = torch.tensor(req, dtype=torch.long, device=device), torch.tensor(col, dtype=torch.long, device=device)
    width = max(col) + 1
    tok_lp = torch.zeros((n_req, width), dtype=lp.dtype, device=device)
    tok_ok = torch.ones((n_req, width), dtype=torch.bool, device=device)
    tok_lp[r, c] = lp.gather(1, tgt[:, None])[:, 0]
    tok_ok[r, c] = lp.argmax(dim=-1) == tgt
    return list(zip(tok_lp.sum(dim=-1).tolist(), tok_ok.all(dim=-1).tolist()))


def _score_packed(model, prefixes, conts, *, pad_id: int, device: torch.device, fwd: Fwd) -> list[tuple[float, bool]]:
    """One row per prefix: the prefix, then every continuation but its last token, in one pass.

    Segment ids say what each column is (-1 padding, 0 the prefix, j + 1 continuation j); a query
    sees the earlier columns of the prefix and of its own segment, and a padding column only itself
    (no query row is left empty). Positions restart after the prefix for each continuation.
    """
    rows = []
    for p, cs in zip(prefixes, conts):
        toks, seg, pos = list(p), [0] * len(p), list(range(len(p)))
        for j, c in enumerate(cs):
            toks += c[:-1]
            seg += [j + 1] * (len(c) - 1)
            pos += range(len(p), len(p) + len(c) - 1)
        rows.append((toks, seg, pos))
    width = max(len(t) for t, _, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    seg_t = torch.full((len(rows), width), -1, dtype=torch.long)
    pos_t = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (toks, seg, pos) in enumerate(rows):
        ids[b, width - len(toks):] = torch.tensor(toks)
        seg_t[b, width - len(toks):] = torch.tensor(seg)
        pos_t[b, width - len(toks):] = torch.tensor(pos)
    cols = torch.arange(width)
    sq, sk = seg_t[:, :, None], seg_t[:, None, :]
    allowed = (cols[None, :] <= cols[:, None])[None] & (sk >= 0) & ((sk == 0) | (sk == sq))
    allowed |= torch.eye(width, dtype=torch.bool)[None]
    dtype = model.get_input_embeddings().weight.dtype  # the additive mask is in the model's dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    keep = max(len(t) - len(p) + 1 for (t, _, _), p in zip(rows, prefixes))  # the prefix's last column onwards
    out, _ = _call(model, fwd, keep=keep, input_ids=ids.to(device), attention_mask=mask[:, None].to(device),
                   position_ids=pos_t.to(device), use_cache=False)
    logits = out.logits[:, -keep:]  # column k is row position width - keep + k
    sel_b, sel_k, targets, req, col = [], [], [], [], []
    n = 0
    for b, (p, cs) in enumerate(zip(prefixes, conts)):
        last = keep - 1 - (len(rows[b][0]) - len(p))  # the prefix's last token, in kept columns
        start = last + 1
        for c in cs:
            for k, t in enumerate(c):
                sel_b.append(b)
                sel_k.append(last if k == 0 else start + k - 1)
                targets.append(t)
                req.append(n)
                col.append(k)
            start += len(c) - 1
            n += 1
    return _totals(logits[sel_b, sel_k], targets, req, col, n)


def _score_cached(model, prefixes, conts, *, pad_id: int, device: torch.device, fwd: Fwd) -> list[tuple[float, bool]]:
    """The prefixes alone (with their KV cache), then the continuations from the cache, one row each."""
    ids, mask, pos = _left_pad(prefixes, pad_id, device)
    reqs = [(g, c) for g, cs in enumerate(conts) for c in cs]
    tails = [i for i, (_, c) in enumerate(reqs) if len(c) > 1]
    out, cache = _call(model, fwd, keep=1, input_ids=ids, attention_mask=mask, position_ids=pos,
                       use_cache=bool(tails))
    parts = [out.logits[[g for g, _ in reqs], -1]]  # each request's first token, from its prefix's last column
    targets, req, col = [c[0] for _, c in reqs], list(range(len(reqs))), [0] * len(reqs)
    if tails:
        rows = torch.tensor([reqs[i][0] for i in tails], dtype=torch.long, device=device)
        cache.batch_select_indices(rows)
        t_width = max(len(reqs[i][1]) for i in tails) - 1
        c_ids = torch.full((len(tails), t_width), pad_id, dtype=torch.long)
        c_mask = torch.zeros((len(tails), t_width), dtype=torch.long)
        for k, i in enumerate(tails):
            c = reqs[i][1]
            c_ids[k, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
            c_mask[k, :len(c) - 1] = 1
        c_pos = pos[rows, -1:] + 1 + torch.arange(t_width, device=device)
        out2, _ = _call(model, fwd, cache, input_ids=c_ids.to(device), position_ids=c_pos, use_cache=True,
                        attention_mask=torch.cat([mask[rows], c_mask.to(device)], dim=1))
        sel_k = [k for k, i in enumerate(tails) for _ in range(len(reqs[i][1]) - 1)]
        sel_j = [j for i in tails for j in range(len(reqs[i][1]) - 1)]
        parts.append(out2.logits[sel_k, sel_j])
        targets += [t for i in tails for t in reqs[i][1][1:]]
        req += [tails[k] for k in sel_k]
        col += [j + 1 for j in sel_j]
    return _totals(torch.cat(parts), targets, req, col, len(reqs))


def greedy_generate(
    model, prompts: Sequence[Sequence[int]], *, max_new: int, eos_ids: set[int],
    stopped: Callable[[list[int]], bool], pad_id: int, device: torch.device, fwd: Fwd,
) -> list[list[int]]:
    """Greedy continuations of a batch of prompts, each ending at EOS, ``stopped`` or ``max_new``.

    A row leaves the batch (and its KV cache rows are dropped) as soon as it is finished, so the
    remaining rows' steps cost only what they need; ``stopped(tokens)`` is asked after every token.
    """
    ids, mask, pos = _left_pad(prompts, pad_id, device)
    out, cache = _call(model, fwd, keep=1, input_ids=ids, attention_mask=mask, position_ids=pos,
                       use_cache=max_new > 1)
    last = out.logits[:, -1, :]
    generated: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    next_pos = pos[:, -1:] + 1
    for step in range(max_new):
        tokens = last.argmax(dim=-1).tolist()
        keep = []
        for k, (row, tok) in enumerate(zip(active, tokens)):
            generated[row].append(tok)
            if tok not in eos_ids and step + 1 < max_new and not stopped(generated[row]):
                keep.append(k)
        if not keep:
            break
        nxt = torch.tensor([tokens[k] for k in keep], dtype=torch.long, device=device)[:, None]
        if len(keep) < len(active):
            idx = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(idx)
            mask, next_pos = mask[idx], next_pos[idx]
            active = [active[k] for k in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        out, cache = _call(model, fwd, cache, input_ids=nxt, attention_mask=mask, position_ids=next_pos,
                           use_cache=True)
        last = out.logits[:, -1, :]
        next_pos = next_pos + 1
    return generated
