"""Score an in-memory model on lm-eval tasks, many times, cheaply.

A merge search evaluates hundreds of candidates that differ only in their weights.
Everything that does not depend on the weights is therefore built once per process
and reused: the TaskManager (indexing all of lm-eval's built-in tasks is slow,
so it is skipped unless a built-in task is actually named), the task dict of each
split (datasets, filters, metrics), and the HFLM wrapper around the live model
(weights are changed in place by the merge engine, and lm-eval reads them at every
forward pass). ``lm_eval.evaluator.evaluate`` is called directly: ``simple_evaluate``
spends time on every call logging the environment and reseeds global RNGs.

The wrapper is ``backend="fast"`` (the default: :class:`evomerge.evaluation.fast_lm.FastLM`, each
context run once for all its choices, logits only where scored, KV-cached greedy decoding, the
same answers as HFLM) or ``backend="hflm"`` (lm-eval's own HFLM, the reference).

Split selection: ``split="test"`` evaluates each task exactly as its YAML says (for
evomerge's tasks that is the held-out ``test`` split; for a user's or a built-in
task, whatever split lm-eval would score). Any other split name, e.g. ``"search"``,
is passed to lm-eval as an override of the task config's ``test_split`` when that
split's task dict is built, so one YAML serves every split and the datasets are
not copied. A task whose data has no split of that name is a user error.
With ``splits=`` (a :class:`~evomerge.evaluation.splits.SplitPlan`) the logical splits
``search`` and ``test`` are the plan's items instead, whatever the task's splits are called.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import time
from collections import OrderedDict
from typing import Any, Iterator

from evomerge.errors import ConfigError

BACKENDS = ("fast", "hflm")  # Evaluator(backend=...): evomerge's FastLM, or lm-eval's HFLM
_REQUEST_SETS = 64  # request sets kept per task: every step of every look a search repeats, a few fresh samples

_NOISY = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in _NOISY)


def quiet_lm_eval() -> None:
    """lm-eval logs every task, request type and metric at INFO: keep warnings only."""
    for name in ("lm_eval", "lm-eval"):
        log = logging.getLogger(name)
        log.setLevel(logging.WARNING)
        if not any(isinstance(f, _DropNoise) for f in log.filters):
            log.addFilter(_DropNoise())
    for name in ("lm_eval.models.huggingface", "lm_eval.api.task", "lm_eval.evaluator"):
        logging.getLogger(name).addFilter(_DropNoise())


def _quiet_hflm_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        """HFLM without per-call progress bars: a search makes hundreds of calls."""

        def loglikelihood(self, requests, disable_tqdm: bool = True):  # type: ignore[override]
            return super().loglikelihood(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = True):  # type: ignore[override]
            return super().generate_until(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = True):  # type: ignore[override]
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        @property
        def max_length(self) -> int:  # type: ignore[override]
            # lm-eval asks once per request and HFLM re-derives it from the model config each time
            # (~10 us of config attribute lookups): a fixed property of the wrapper, worked out once.
            if "_evomerge_max_length" not in self.__dict__:
                self.__dict__["_evomerge_max_length"] = HFLM.max_length.fget(self)
            return self.__dict__["_evomerge_max_length"]

        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            # A search scores the same (prompt, choice) pairs with every candidate: tokenise each once
            # per process. The tokenizer never changes under a wrapper, so the cache cannot go stale.
            cache = self.__dict__.setdefault("_evomerge_pairs", {})
            hit = cache.get((context, continuation))
            if hit is None:
                ctx, cont = super()._encode_pair(context, continuation)
                hit = cache[(context, continuation)] = (tuple(ctx), tuple(cont))
            return list(hit[0]), list(hit[1])

    return QuietHFLM


@contextlib.contextmanager
def no_request_bars() -> Iterator[None]:
    """Silence the progress bar lm-eval draws while building each task's requests.

    ``Task.build_all_requests`` draws it unconditionally (no argument turns it off),
    once per task per call: hundreds of bars in a search. The module's ``tqdm`` name
    is swapped for a disabled one for the duration of the call only.
    """
    import lm_eval.api.task as task_mod

    original = task_mod.tqdm
    task_mod.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        task_mod.tqdm = original


def _flatten(task_result: dict[str, Any]) -> dict[str, float]:
    """``{"exact_match,final_answer": 0.5, ...}`` -> ``{"exact_match": 0.5}``.

    The filter suffix is dropped unless two filters report the same metric.
    """
    pairs = []
    for key, value in task_result.items():
        if key in ("alias", "sample_len") or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        pairs.append((metric, filt, float(value)))
    counts: dict[str, int] = {}
    for metric, _, _ in pairs:
        counts[metric] = counts.get(metric, 0) + 1
    return {(m if counts[m] == 1 else f"{m},{f}"): v for m, f, v in pairs}


class Evaluator:
    """Scores an in-memory transformers model on lm-eval tasks; build once per process."""

    def __init__(
        self,
        tokenizer,
        tasks: list[str],
        *,
        include_paths: list[str] | None = None,
        batch_size: int = 32,
        device: str = "cpu",
        max_gen_toks: int | None = None,
        backend: str = "fast",
        splits: Any = None,
        apply_chat_template: bool = False,
        fewshot_as_multiturn: bool = False,
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"Evaluator: backend {backend!r} is not one of {', '.join(BACKENDS)} (fast: evomerge's "
                              "FastLM, the default; hflm: lm-eval's HFLM, the reference it is tested against).")
        if not tasks:
            raise ConfigError("Evaluator: no tasks given; name at least one lm-eval task.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(
                f"Evaluator: batch_size must be a positive integer, got {batch_size!r} "
                "('auto' re-detects on every model wrapper and costs minutes on CPU)."
            )
        quiet_lm_eval()
        self.tokenizer = tokenizer
        self.tasks = list(tasks)
        self.include_paths = [str(p) for p in include_paths or []]
        self.batch_size = batch_size
        self.device = device
        self.max_gen_toks = max_gen_toks
        self.backend = backend
        self.splits = splits  # a SplitPlan: which items each logical split holds (None: split names as above)
        self.prompt_options = {"apply_chat_template": bool(apply_chat_template),
                               "fewshot_as_multiturn": bool(fewshot_as_multiturn)}
        self.task_manager = self._task_manager()
        self._task_dicts: dict[str, dict[str, Any]] = {}
        self._lm = None
        self._lm_model_id: int | None = None
        self.last_timing: dict[str, float] = {}

    def _task_manager(self):
        from lm_eval.tasks import TaskManager

        tm = TaskManager(include_path=self.include_paths or None, include_defaults=False)
        missing = [t for t in self.tasks if t not in tm.all_tasks]
        if missing:  # a built-in task is named: pay for the index once
            logging.getLogger(__name__).info("indexing lm-eval's built-in tasks for %s", missing)
            tm = TaskManager(include_path=self.include_paths or None, include_defaults=True)
            missing = [t for t in self.tasks if t not in tm.all_tasks]
        if missing:
            hints = []
            for t in missing:
                close = difflib.get_close_matches(t, tm.all_tasks, n=3)
                hints.append(f"{t!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            where = ", ".join(self.include_paths) or "no include path"
            raise ConfigError(
                f"unknown lm-eval task(s) {', '.join(hints)}: not among lm-eval's built-in tasks "
                f"nor in the task directories given ({where}). Check the name, or add the "
                "directory holding its YAML to include_paths."
            )
        return tm

    def task_dict(self, split: str) -> dict[str, Any]:
        """The lm-eval task dict for a split, built on first use and reused after."""
        if split not in self._task_dicts:
            self._task_dicts[split] = self._build_task_dict(split)
        return self._task_dicts[split]

    def _build_task_dict(self, split: str) -> dict[str, Any]:
        import datasets

        if self.splits is not None:
            self.splits.resolve(self.task_manager)
            spec: Any = self.splits.spec(split)
        elif split == "test":
            spec = self.tasks
        else:
            spec = {"group": f"_evomerge_split_{split}",
                    "task": [{"task": t, "test_split": split} for t in self.tasks]}
        was_enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            loaded = self.task_manager.load(spec)
        except KeyError as exc:
            raise ConfigError(
                f"a task in {self.tasks} has no split {split!r} in its data ({exc}). evomerge's "
                "own tasks have 'search' and 'test'; for other tasks give the data a split of "
                "that name, or evaluate with split='test' (the task's own evaluation split)."
            ) from None
        finally:
            if was_enabled:
                datasets.enable_progress_bars()
        tasks = loaded["tasks"]
        if self.splits is not None:
            self.splits.prepare(split, tasks)
        for task in tasks.values():
            _reuse_requests(task)
        if self.max_gen_toks is not None:
            for task in tasks.values():
                if task.OUTPUT_TYPE == "generate_until":
                    gk = dict(task.config.generation_kwargs or {})
                    gk["max_gen_toks"] = self.max_gen_toks
                    task.config.generation_kwargs = gk
        return {"tasks": tasks, "groups": {}, "group_map": {}}

    def lm(self, model):
        """The lm-eval model wrapping ``model``: made once, rebuilt only for a different model object."""
        if self._lm is None or self._lm_model_id != id(model):
            if self.backend == "fast":
                from evomerge.evaluation.fast_lm import FastLM

                self._lm = FastLM(model, self.tokenizer, batch_size=self.batch_size, device=self.device)
            else:
                self._lm = _quiet_hflm_class()(
                    pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size,
                    device=self.device,
                )
            self._lm_model_id = id(model)
        return self._lm

    def evaluate(
        self, model, split: str = "search", limit: int | float | None = None,
        samples: dict[str, list[int]] | None = None,
    ) -> dict[str, dict[str, float]]:
        """task name -> {metric name: value}. Weights may change in place between calls.

        ``samples``: item indices per task (lm-eval's ``samples``), instead of ``limit``; tasks
        not named are skipped.
        """
        from lm_eval.evaluator import evaluate

        t0 = time.perf_counter()
        task_dict = self.task_dict(split)
        if samples is not None:
            task_dict = {**task_dict, "tasks": {t: task_dict["tasks"][t] for t in samples}}
        lm = self.lm(model)
        model.eval()
        t1 = time.perf_counter()
        with no_request_bars():
            out = evaluate(lm=lm, task_dict=task_dict, limit=limit, samples=samples, bootstrap_iters=0,
                           log_samples=False, cache_requests=False, **self.prompt_options)
        t2 = time.perf_counter()
        self.last_timing = {"setup_s": t1 - t0, "evaluate_s": t2 - t1}
        return {name: _flatten(res) for name, res in out["results"].items()}

    def item_scores(self, model, split: str = "test", metric: str = "acc") -> dict[str, list[float]]:
        """task name -> ``metric`` of every item, in item order.

        Why: two merges scored on the same items are compared by their per-item differences (a paired
        test), whose noise is a fraction of two independent samples' when the models mostly agree.
        """
        per_item = self.per_item(model, split)
        return {t: [v for _, v in sorted(ms[metric].items())] for t, ms in per_item.items()}

    def per_item(self, model, split: str = "search",
                 samples: dict[str, list[int]] | None = None) -> dict[str, dict[str, dict[int, float]]]:
        """task name -> metric -> item index -> value, for every item of ``split`` (or ``samples``'s).

        Metric names as :meth:`evaluate` gives them (``m``, or ``m,filter`` when two filters report ``m``),
        so a task's mean over items of a per-item value is the value :meth:`evaluate` reports.
        """
        from lm_eval.evaluator import evaluate

        task_dict = self.task_dict(split)
        if samples is not None:
            task_dict = {**task_dict, "tasks": {t: task_dict["tasks"][t] for t in samples}}
        lm = self.lm(model)
        model.eval()
        with no_request_bars():
            out = evaluate(lm=lm, task_dict=task_dict, samples=samples, bootstrap_iters=0, log_samples=True,
                           cache_requests=False, **self.prompt_options)
        result: dict[str, dict[str, dict[int, float]]] = {}
        for t, rows in out["samples"].items():
            filters = {r.get("filter", "none") for r in rows}
            per: dict[str, dict[int, float]] = {}
            for r in rows:
                for m in r.get("metrics", []):
                    if isinstance(r.get(m), (int, float)):
                        name = m if len(filters) == 1 else f"{m},{r.get('filter', 'none')}"
                        per.setdefault(name, {})[int(r["doc_id"])] = float(r[m])
            result[t] = per
        return result


def _reuse_requests(task: Any) -> None:
    """Build a task's lm-eval requests once per (limit, samples) and hand the same ones back after.

    Why: ``lm_eval.evaluator.evaluate`` rebuilds every request (Jinja prompt, ``Instance`` objects)
    on every call, although a search asks for the same items with every candidate. Only the
    responses change, so a reused request has them cleared. The split's documents become a plain
    list for the same reason: lm-eval walks them again to score each call, and a ``datasets`` row
    costs an Arrow decode each time.
    """
    split = task.config.test_split
    if split is not None and split in (task.dataset or {}):
        task.dataset = {**task.dataset, split: list(task.dataset[split])}
    original = task.build_all_requests
    built: OrderedDict[Any, list[Any]] = OrderedDict()

    def build_all_requests(*, limit: int | None = None, samples: list[int] | None = None, **kwargs: Any) -> None:
        key = (limit, None if samples is None else tuple(samples), repr(sorted(kwargs.items())))
        if key not in built:
            original(limit=limit, samples=samples, **kwargs)
            built[key] = task._instances
            if len(built) > _REQUEST_SETS:  # fresh item samples (search.fresh_items) would otherwise pile up
                built.popitem(last=False)
        built.move_to_end(key)
        for inst in built[key]:
            inst.resps.clear()
            inst.filtered_resps.clear()
        task._instances = built[key]

    task.build_all_requests = build_all_requests
