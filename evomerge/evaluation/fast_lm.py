"""An lm-eval model class that scores a live transformers model with only the work the answers need.

lm-eval's HFLM runs every (context, choice) pair as its own sequence and takes a log-softmax over the
whole vocabulary at every position; ``model.generate`` keeps every row of a batch until the last one
stops. Here, for the same requests and the same answers:

* log-likelihood: requests are grouped by their (truncated) context, each context is run once, its KV
  cache is expanded to one row per choice and the choices go on from it; logits and log-softmax are
  computed only at the scored positions; contexts are sorted by length so batches pad little;
* generation: batched greedy decoding on the KV cache, a row leaving the batch as soon as it reaches
  EOS, one of its stop sequences or ``max_gen_toks``; batches as tall as the token budget of a
  scoring batch allows (see ``_gen_batches``).

Tokenisation, truncation, the empty-context prefix token, rolling windows, stop sequences and the
text returned follow HFLM's rules exactly (tests compare both item by item). Nothing that depends on
the weights is kept between calls: the merge engine rewrites them in place between candidates.
Token ids of each (context, continuation) pair and of each prompt are cached (the tokenizer never
changes under one wrapper). Registered with lm-eval as ``evomerge-fast`` (import this module first).
"""
from __future__ import annotations

import json
import logging
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from evomerge.errors import ConfigError
from evomerge.evaluation.fast_forward import forward_args, greedy_generate, score_groups

log = logging.getLogger(__name__)

# generation-config settings that would make ``model.generate``'s greedy answer differ from an argmax
_PROCESSORS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
               "min_new_tokens": None, "suppress_tokens": None, "begin_suppress_tokens": None,
               "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None,
               "encoder_repetition_penalty": 1.0, "exponential_decay_length_penalty": None}


@register_model("evomerge-fast")
class FastLM(TemplateLM):
    """lm-eval's ``LM`` interface over an in-memory causal LM (or a model directory)."""

    _DEFAULT_MAX_LENGTH = 2048  # HFLM's, for configs and tokenizers that state none

    def __init__(
        self, pretrained: Any, tokenizer: Any = None, *, batch_size: int | str = 32, device: str | None = None,
        max_length: int | None = None, add_bos_token: bool | None = None, prefix_token_id: int | None = None,
        max_gen_toks: int = 256, dtype: str = "auto", trust_remote_code: bool = False, pack: bool | None = None,
        **_ignored: Any,
    ) -> None:
        """``pack``: a shared context and its continuations in one row under a custom attention mask
        (True), or the continuations run from the context's KV cache (False); None: packed where the
        model honours such a mask (see fast_forward.py)."""
        super().__init__()
        if isinstance(pretrained, str):  # the lm-eval CLI's `--model evomerge-fast --model_args pretrained=DIR`
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=dtype, trust_remote_code=trust_remote_code)
            if device:
                model.to(device)
            if tokenizer is None or isinstance(tokenizer, str):
                tokenizer = AutoTokenizer.from_pretrained(tokenizer or pretrained, trust_remote_code=trust_remote_code)
        else:
            model = pretrained
        if tokenizer is None:
            raise ConfigError("FastLM: give the tokenizer with an in-memory model (tokenizer=...).")
        try:
            batch_size = int(batch_size)
        except ValueError:
            batch_size = 0
        if batch_size < 1:
            raise ConfigError(f"FastLM: batch_size must be a whole number >= 1, got {batch_size!r}.")
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._device = torch.device(device) if device else model.get_input_embeddings().weight.device
        self._max_length = int(max_length) if max_length else resolve_max_length(
            model.config, tokenizer, default=self._DEFAULT_MAX_LENGTH)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._max_gen_toks = int(max_gen_toks)
        ids = (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id)
        self._pad_id = next((i for i in ids if i is not None), 0)  # any id: padded positions are masked
        self._fwd = forward_args(model, pack)
        self._bos_str = tokenizer.decode(self.prefix_token_id) if self.prefix_token_id is not None else None
        eot = self.eot_token_id
        self._eos_str = tokenizer.decode(eot, skip_special_tokens=False) if eot is not None else None
        self._evomerge_pairs: dict[tuple[str, str], tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self._prompts: dict[str, tuple[int, ...]] = {}
        # (tokens through the model, scored positions) per sequence, when a benchmark sets a list here
        self.work: list[tuple[int, int]] | None = None

    # ---- what lm-eval and TemplateLM ask of a model ------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """HFLM's: the tokenizer's template; a template that refuses a system turn gets the turns without it."""
        import jinja2

        kwargs = {"tokenize": False, "add_generation_prompt": add_generation_prompt,
                  "continue_final_message": not add_generation_prompt}
        try:
            return self.tokenizer.apply_chat_template(chat_history, **kwargs)
        except jinja2.exceptions.TemplateError:
            log.warning("FastLM: the chat template failed; retrying without the system turn")
            return self.tokenizer.apply_chat_template([m for m in chat_history if m["role"] != "system"], **kwargs)

    def _special(self, add_special_tokens: bool | None) -> dict[str, bool]:
        if add_special_tokens is not None:
            return {"add_special_tokens": add_special_tokens}
        return {} if self.add_bos_token is None else {"add_special_tokens": self.add_bos_token}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """HFLM's encoding: the tokenizer's special tokens unless the string already starts with BOS."""
        special = self._special(add_special_tokens)
        if add_special_tokens is None and has_bos_prefix(string, self._bos_str):
            special["add_special_tokens"] = False
        enc = self.tokenizer.encode(string, **special)
        return enc[-left_truncate_len:] if left_truncate_len else enc

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        hit = self._evomerge_pairs.get((context, continuation))
        if hit is None:
            ctx, cont = super()._encode_pair(context, continuation)
            hit = self._evomerge_pairs[(context, continuation)] = (tuple(ctx), tuple(cont))
        return list(hit[0]), list(hit[1])

    def _prompt(self, context: str) -> tuple[int, ...]:
        """A generation prompt's ids as HFLM's batch encoding makes them (before truncation)."""
        hit = self._prompts.get(context)
        if hit is None:
            special = self._special(None)
            if has_bos_prefix(context, getattr(self.tokenizer, "bos_token", None)):
                special = {"add_special_tokens": False}
            hit = self._prompts[context] = tuple(self.tokenizer(context, **special)["input_ids"])
        return hit

    # ---- log-likelihood ----------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = True, **kwargs: Any) -> list[tuple[float, bool]]:
        """Score ``(cache_key, context_ids, continuation_ids)`` triples: each distinct context once."""
        limit = self.max_length
        groups: dict[tuple[int, ...], list[int]] = {}
        truncated = 0
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError(f"FastLM: request {i} has an empty context or continuation after tokenisation.")
            if len(cont) > limit:
                raise ValueError(f"FastLM: a continuation of {len(cont)} tokens is longer than max_length {limit}.")
            whole = (list(ctx) + list(cont))[-(limit + 1):]  # HFLM's left truncation
            truncated += len(ctx) + len(cont) > limit + 1
            groups.setdefault(tuple(whole[:len(whole) - len(cont)]), []).append(i)
        if truncated:
            log.warning("FastLM: %d request(s) longer than max_length %d were truncated from the left",
                        truncated, limit)
        # by the tokens a context and its continuations put through the model, longest first (as HFLM:
        # memory errors come early), so that a batch pads little
        work = {p: len(p) + sum(len(requests[i][2]) - 1 for i in idx) for p, idx in groups.items()}
        order = sorted(groups, key=lambda p: (-work[p], -len(p), p))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        with torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                chunk = order[b:b + self.batch_size]
                flat = score_groups(self.model, chunk, [[requests[i][2] for i in groups[p]] for p in chunk],
                                    pad_id=self._pad_id, device=self._device, fwd=self._fwd)
                if self.work is not None:
                    self.work.extend((work[p], work[p] - len(p) + 1) for p in chunk)
                for i, answer in zip((i for p in chunk for i in groups[p]), flat):
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = True) -> list[float]:
        """HFLM's disjoint rolling windows of ``max_length`` tokens, each scored as a request."""
        windows: list[tuple[None, list[int], list[int]]] = []
        counts = []
        for (string,) in (req.args for req in requests):
            pairs = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows.extend((None, ctx, cont) for ctx, cont in pairs)
            counts.append(len(pairs))
        scores = self._loglikelihood_tokens(windows) if windows else []
        out, k = [], 0
        for req, n in zip(requests, counts):
            total = sum(s for s, _ in scores[k:k + n])
            k += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    # ---- generation --------------------------------------------------------------------------------
    def _eos_ids(self) -> set[int]:
        """The ids ``model.generate`` stops a row at (the generation config's), after checking that its
        greedy answer is a plain argmax (no logits processor configured)."""
        gc = getattr(self.model, "generation_config", None)
        if gc is None:
            return set()
        odd = {k: getattr(gc, k) for k, v in _PROCESSORS.items() if getattr(gc, k, v) not in (v, None)}
        if odd:
            raise ConfigError(
                f"FastLM: the model's generation config sets {odd}, which change greedy decoding; the fast "
                "evaluator decodes by plain argmax. Clear them in generation_config.json or use evaluator=hflm.")
        eos = gc.eos_token_id
        return set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))

    def _gen_batches(self, order: list[int], prompts: dict[int, list[int]], max_gen: int) -> list[list[int]]:
        """Generation batches over ``order`` (longest prompt first): as many rows as fit in the tokens of
        a scoring batch of full-length rows (``batch_size x max_length``, the most HFLM ever holds).

        A decoding step puts one token per row through the model, so its matmuls are as tall as the
        batch has rows; with ``batch_size`` rows they are too short to run at the rate a teacher-forced
        pass of the same tokens gets. Short prompts (the usual case) thus decode in one tall batch;
        full-length prompts still go ``batch_size`` at a time, as HFLM's would.
        """
        budget = self.batch_size * self.max_length
        batches: list[list[int]] = []
        b = 0
        while b < len(order):
            rows = max(1, budget // (len(prompts[order[b]]) + max_gen))
            batches.append(order[b:b + rows])
            b += rows
        return batches

    def generate_until(self, requests, disable_tqdm: bool = True) -> list[str]:
        args = [req.args for req in requests]
        by_kwargs: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            by_kwargs.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        eos_ids = self._eos_ids() if args else set()
        out: list[str | None] = [None] * len(args)
        for idxs in by_kwargs.values():
            kwargs = normalize_gen_kwargs(args[idxs[0]][1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self._eos_str)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if kwargs.get("do_sample"):
                raise ConfigError(f"FastLM decodes greedily; a task asks for sampling ({args[idxs[0]][1]}). "
                                  "Use evaluator=hflm for sampled generation.")
            if "max_length" in kwargs:
                raise ConfigError("FastLM: a task's generation_kwargs set max_length; use max_gen_toks.")
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ConfigError(f"FastLM: max_gen_toks {max_gen} must be less than max_length {self.max_length}.")
            stops = [s for s in until if s]

            def stopped(tokens: list[int], stops: list[str] = stops) -> bool:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                return any(s in text for s in stops)

            prompts = {i: list(self._prompt(args[i][0]))[-max_ctx:] for i in idxs}
            order = sorted(idxs, key=lambda i: (-len(prompts[i]), args[i][0]))
            with torch.inference_mode():
                for chunk in self._gen_batches(order, prompts, max_gen):
                    gens = greedy_generate(self.model, [prompts[i] for i in chunk], max_new=max_gen, eos_ids=eos_ids,
                                           stopped=stopped, pad_id=self._pad_id, device=self._device,
                                           fwd=self._fwd)
                    if self.work is not None:
                        self.work.extend((len(prompts[i]) + len(g) - 1, len(g)) for i, g in zip(chunk, gens) if g)
                    for i, toks in zip(chunk, gens):
                        text = postprocess_generated_text(self.tokenizer.decode(toks, skip_special_tokens=True),
                                                          until, None)
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", args[i], text)
        return out  # type: ignore[return-value]
