"""FastLM gives lm-eval's HFLM's answers, item by item: real lm-eval, real models, float32.

Log-likelihoods within 1e-4 (the two compute the same sums over differently padded batches, so
float32 rounding may differ in the last bits), greedy flags and generated strings identical.
"""
from __future__ import annotations

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.evaluation import Evaluator
from evomerge.evaluation.evaluator import _quiet_hflm_class, no_request_bars
from evomerge.evaluation.fast_lm import FastLM
from tests.model_factory import make_family

TOL = 1e-4


def _hflm(model, tok, **kw):
    return _quiet_hflm_class()(pretrained=model, tokenizer=tok, batch_size=kw.pop("batch_size", 8), device="cpu", **kw)


def _same_ll(ref, got):
    assert len(ref) == len(got)
    for (lr, gr), (lg, gg) in zip(ref, got):
        assert lg == pytest.approx(lr, abs=TOL) and gg == gr


def _insts(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _samples(lm, ev, split, limit):
    from lm_eval.evaluator import evaluate

    with no_request_bars():
        out = evaluate(lm=lm, task_dict=ev.task_dict(split), limit=limit, bootstrap_iters=0, log_samples=True,
                       cache_requests=False)
    return {t: sorted(rows, key=lambda s: s["doc_id"]) for t, rows in out["samples"].items()}, out["results"]


def test_tiny_zoo_tasks_item_by_item(tiny_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_zoo.base)
    tasks = ["evomerge_add_ll", "evomerge_sub_ll", "evomerge_rev_ll", "evomerge_add", "evomerge_sub", "evomerge_rev"]
    ev = Evaluator(tok, tasks, include_paths=[str(tiny_zoo.task_dir)])
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo.specialists["add"], dtype=torch.float32)
    ref, ref_res = _samples(_hflm(model, tok, batch_size=32), ev, "search", 80)
    for pack in (None, False):  # packed rows under a 4D mask (the default here), and the KV-cache way
        got, got_res = _samples(FastLM(model, tok, batch_size=32, pack=pack), ev, "search", 80)
        n_ll = n_gen = n_greedy = 0
        for t in tasks:
            assert len(got[t]) == len(ref[t]) == 80
            for r, g in zip(ref[t], got[t]):
                assert r["doc_id"] == g["doc_id"]
                if t.endswith("_ll"):
                    _same_ll([x[0] for x in r["resps"]], [x[0] for x in g["resps"]])
                    n_ll += len(r["resps"])
                    n_greedy += sum(x[0][1] for x in r["resps"])
                else:
                    assert g["resps"] == r["resps"]  # the raw generated strings, before the answer filter
                    n_gen += 1
            assert {k: v for k, v in got_res[t].items() if "stderr" not in k} == \
                   {k: v for k, v in ref_res[t].items() if "stderr" not in k}
        assert n_ll == 3 * 80 * 4 and n_gen == 3 * 80 and n_greedy > 100  # the flags are tested both ways


@pytest.mark.parametrize("pack", [None, False], ids=["packed", "cached"])
@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_other_architectures_truncation_rolling_and_stops(tmp_path, arch, pack):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, _ = make_family(tmp_path, arch, n_models=1, layers=2, seed=3)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    kw = {"max_length": 24}  # contexts below are longer: both must cut them from the left alike
    hf, fast = _hflm(model, tok, **kw), FastLM(model, tok, batch_size=8, pack=pack, **kw)
    assert fast._fwd.packed is (pack is None)  # both architectures take a custom 4D mask: packed by default
    long_ctx = "12+34=46 abc rev cba 7*8=56 " * 2
    ll = [("47+35=", "82"), ("47+35=", "8"), ("47+35=", "812"), ("", "12+3"), ("a b ", "c d"), ("x", "y"),
          (long_ctx, "99"), (long_ctx, "9"), (long_ctx, "1234567890abcdefghij"), ("q", "w" * 24),
          ("47+35=", "82")]  # a repeated request
    gen_args = [(c, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}) for c in ("47+35=", "ab", long_ctx)]
    gen_args += [(c, {"until": ["=", "cb"], "max_gen_toks": 10}) for c in ("1+1", "abc", "z")]
    gen_args += [("5*5", {"until": "+", "max_gen_toks": 3, "temperature": 0.0})]
    ref_ll = hf.loglikelihood(_insts("loglikelihood", ll))
    _same_ll(ref_ll, fast.loglikelihood(_insts("loglikelihood", ll)))
    ref_gen = hf.generate_until(_insts("generate_until", gen_args))
    assert fast.generate_until(_insts("generate_until", gen_args)) == ref_gen
    # generation batches hold a scoring batch's tokens (batch_size x max_length): here all seven rows in one;
    # with batch_size 1 the rows go one or two at a time, the answers unchanged
    prompts = {0: [5] * 18, 1: [5] * 10, 2: [5] * 2}
    assert fast._gen_batches([0, 1, 2], prompts, 6) == [[0, 1, 2]]
    one = FastLM(model, tok, batch_size=1, pack=pack, **kw)
    assert one._gen_batches([0, 1, 2], prompts, 6) == [[0], [1], [2]]
    assert one._gen_batches([1, 2], {1: [5] * 6, 2: [5] * 2}, 6) == [[1, 2]]
    assert one.generate_until(_insts("generate_until", gen_args)) == ref_gen
    # stop sequences taken from those answers, shared by one batch: rows stop at different steps
    stops = sorted({next((g[k:k + 2] for k in range(2, len(g) - 1) if g.find(g[k:k + 2]) == k), "+-")
                    for g in ref_gen})  # two characters each answer has first after its start
    gen_stop = [(c, {"until": stops, "max_gen_toks": 10}) for c, _ in gen_args]
    ref_stop = hf.generate_until(_insts("generate_until", gen_stop))
    assert fast.generate_until(_insts("generate_until", gen_stop)) == ref_stop
    assert ref_stop != ref_gen
    # a continuation that is the model's own greedy output must be flagged greedy by both
    greedy = [(c, g) for (c, _), g in zip(gen_args, ref_gen) if g and c != long_ctx]  # (untruncated prompts)
    assert greedy
    ref_g = hf.loglikelihood(_insts("loglikelihood", greedy))
    assert all(flag for _, flag in ref_g)
    _same_ll(ref_g, fast.loglikelihood(_insts("loglikelihood", greedy)))
    rolling = [(long_ctx * 2,), ("short text",)]
    ref_roll = hf.loglikelihood_rolling(_insts("loglikelihood_rolling", rolling))
    assert fast.loglikelihood_rolling(_insts("loglikelihood_rolling", rolling)) == pytest.approx(ref_roll, abs=TOL)


def test_follows_weights_changed_in_place(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, (ft,) = make_family(tmp_path, "llama", n_models=1, layers=2, seed=1)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    fast = FastLM(model, tok, batch_size=4)
    reqs = [("47+35=", "82"), ("47+35=", "83"), ("1+1=", "2")]
    gen = [("47+35=", {"until": ["\n"], "max_gen_toks": 5})]
    before = fast.loglikelihood(_insts("loglikelihood", reqs)), fast.generate_until(_insts("generate_until", gen))
    other = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval()
    with torch.no_grad():
        for p, q in zip(model.parameters(), other.parameters()):
            p.copy_(q)
    after = fast.loglikelihood(_insts("loglikelihood", reqs)), fast.generate_until(_insts("generate_until", gen))
    fresh = FastLM(other, tok, batch_size=4)
    assert after[0] == fresh.loglikelihood(_insts("loglikelihood", reqs)) and after[0] != before[0]
    assert after[1] == fresh.generate_until(_insts("generate_until", gen))


def test_registered_and_refuses_what_it_does_not_do(tmp_path):
    from lm_eval.api.registry import get_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert get_model("evomerge-fast") is FastLM
    base, _ = make_family(tmp_path, "llama", n_models=1, layers=1)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    fast = FastLM(str(base), batch_size=2)  # the lm-eval CLI's way: a model directory
    assert fast.loglikelihood(_insts("loglikelihood", [("1+1=", "2")])) == \
        FastLM(model, tok).loglikelihood(_insts("loglikelihood", [("1+1=", "2")]))
    with pytest.raises(ConfigError, match="greedily"):
        fast.generate_until(_insts("generate_until", [("1", {"do_sample": True, "temperature": 0.7})]))
    with pytest.raises(ConfigError, match="batch_size"):
        FastLM(model, tok, batch_size="auto")
    model.generation_config.repetition_penalty = 1.3
    with pytest.raises(ConfigError, match="repetition_penalty"):
        FastLM(model, tok).generate_until(_insts("generate_until", [("1", {"until": ["\n"]})]))


def test_evaluator_backends_agree_and_fast_is_default(tiny_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_zoo.base)
    tasks = ["evomerge_add_ll", "evomerge_sub"]
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo.specialists["sub"], dtype=torch.float32)
    fast = Evaluator(tok, tasks, include_paths=[str(tiny_zoo.task_dir)])
    hflm = Evaluator(tok, tasks, include_paths=[str(tiny_zoo.task_dir)], backend="hflm")
    assert isinstance(fast.lm(model), FastLM) and not isinstance(hflm.lm(model), FastLM)
    assert fast.evaluate(model, "search", limit=60) == hflm.evaluate(model, "search", limit=60)
    with pytest.raises(ConfigError, match="backend 'vllm'"):
        Evaluator(tok, tasks, include_paths=[str(tiny_zoo.task_dir)], backend="vllm")
