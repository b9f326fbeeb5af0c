"""Forward passes for the fast lm-eval model: shared-prefix scoring and batched greedy decoding.

Both work on token ids only (the lm-eval side, tokenisation and request order, is in
``fast_lm.py``) and read the live model's weights at every call: nothing here outlives a call.

Layout conventions, chosen so that every supported causal LM computes the same thing as on an
unpadded sequence: a batch of prompts is *left*-padded, with an attention mask and position ids
counted from each row's first real token (as ``model.generate`` does), so every row's last real
token sits in the last column and ``logits_to_keep=1`` asks the model's own head (soft-capping,
scaling and all) for exactly the logits needed. Continuations go on after the prompt through the
KV cache, right-padded.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch


def forward_args(model: torch.nn.Module) -> tuple[bool, str]:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' head-slicing argument), and
    the name of its KV-cache argument (``cache`` from transformers 5.24, ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "logits_to_keep" in params, ("cache" if "cache" in params else "past_key_values")


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


def _call(model, fwd: tuple[bool, str], cache: Any = None, last_only: bool = False, **kwargs: Any):
    """``model(**kwargs)`` with the KV cache under its name; ``last_only``: logits of the last column only."""
    if cache is not None:
        kwargs[fwd[1]] = cache
    if last_only and fwd[0]:
        kwargs["logits_to_keep"] = 1
    out = model(**kwargs)
    return out, _cache_of(out)


def score_prefix_groups(
    model, prefixes: Sequence[Sequence[int]], conts: Sequence[Sequence[Sequence[int]]], *,
    pad_id: int, device: torch.device, fwd: tuple[bool, str],
) -> list[tuple[float, bool]]:
    """Log-likelihood and greedy flag of every continuation of every prefix, flattened in order.

    ``prefixes[g]`` is run once; each of ``conts[g]`` is scored after it: its first token from the
    prefix's last logits, the rest from one more forward pass over the continuations (all but their
    last token) on the prefix's KV cache, expanded to one row per continuation. Log-softmax is taken
    only at scored positions, in the logits' dtype, as lm-eval's HFLM does.
    """
    ids, mask, pos = _left_pad(prefixes, pad_id, device)
    reqs = [(g, c) for g, cs in enumerate(conts) for c in cs]
    tails = [i for i, (_, c) in enumerate(reqs) if len(c) > 1]
    out, cache = _call(model, fwd, last_only=True, input_ids=ids, attention_mask=mask, position_ids=pos,
                       use_cache=bool(tails))
    first_lp = torch.log_softmax(out.logits[:, -1, :], dim=-1)  # [prefixes, vocab]
    width = max(len(c) for _, c in reqs)
    # one row per request, one column per continuation token; padding adds 0.0 / True (exact no-ops)
    tok_lp = torch.zeros((len(reqs), width), dtype=first_lp.dtype, device=device)
    tok_ok = torch.ones((len(reqs), width), dtype=torch.bool, device=device)
    g_idx = torch.tensor([g for g, _ in reqs], dtype=torch.long, device=device)
    c0 = torch.tensor([c[0] for _, c in reqs], dtype=torch.long, device=device)
    tok_lp[:, 0] = first_lp[g_idx, c0]
    tok_ok[:, 0] = first_lp.argmax(dim=-1)[g_idx] == c0
    if tails:
        rows = g_idx[tails]
        cache.batch_select_indices(rows)
        t_width = width - 1
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
        sel_req = torch.tensor([tails[k] for k in sel_k], dtype=torch.long, device=device)
        col = torch.tensor(sel_j, dtype=torch.long, device=device) + 1
        targets = torch.tensor([t for i in tails for t in reqs[i][1][1:]], dtype=torch.long, device=device)
        lp = torch.log_softmax(out2.logits[sel_k, sel_j], dim=-1)  # [scored tail positions, vocab]
        tok_lp[sel_req, col] = lp.gather(1, targets[:, None])[:, 0]
        tok_ok[sel_req, col] = lp.argmax(dim=-1) == targets
    return list(zip(tok_lp.sum(dim=-1).tolist(), tok_ok.all(dim=-1).tolist()))


def greedy_generate(
    model, prompts: Sequence[Sequence[int]], *, max_new: int, eos_ids: set[int],
    stopped: Callable[[list[int]], bool], pad_id: int, device: torch.device, fwd: tuple[bool, str],
) -> list[list[int]]:
    """Greedy continuations of a batch of prompts, each ending at EOS, ``stopped`` or ``max_new``.

    A row leaves the batch (and its KV cache rows are dropped) as soon as it is finished, so the
    remaining rows' steps cost only what they need; ``stopped(tokens)`` is asked after every token.
    """
    ids, mask, pos = _left_pad(prompts, pad_id, device)
    out, cache = _call(model, fwd, last_only=True, input_ids=ids, attention_mask=mask, position_ids=pos,
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
