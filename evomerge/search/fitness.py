"""Fitness: task metrics from lm-eval folded into the numbers Optuna optimises.

The ``tasks`` config group names lm-eval tasks and, per task, metric weights:
``fitness`` is their weighted mean, so a score stays on the metrics' own scale
(an accuracy-weighted fitness of 0.6 means 60 %). With a multi-objective sampler
each task is its own objective (``objectives: per_task``) and ``fitness`` still
ranks the Pareto front members for ``best/``.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from evomerge.errors import ConfigError
from evomerge.evaluation.splits import Partition, SplitPlan, TaskSplits
from evomerge.search.estimators import LookEstimator
from evomerge.search.record import ReferenceScores

OBJECTIVE_MODES = ("auto", "fitness", "per_task")
BINARY_METRICS = {"acc", "acc_norm", "exact_match"}  # per-item 0/1 scores: their mean is a proportion


@dataclass
class TaskSpec:
    name: str
    tasks: dict[str, dict[str, float]]  # task -> metric -> weight
    objectives: str = "auto"
    group: str | None = None            # a named task group of the models' zoo (used when ``tasks`` is empty)
    metric: str | None = None           # the metric of the group's tasks
    splits: dict[str, TaskSplits] = field(default_factory=dict)  # task -> where its search / test items come from
    default_splits: TaskSplits = field(default_factory=TaskSplits)  # for tasks without their own (a zoo group's)
    apply_chat_template: bool = False   # lm-eval's: prompts through the tokenizer's chat template (instruct models)
    fewshot_as_multiturn: bool = False  # with apply_chat_template: each example its own user/assistant turn

    def expand(self, zoo_groups: dict[str, list[str]]) -> "TaskSpec":
        """The explicit task list: ``tasks`` as given, or the zoo's ``group``."""
        if self.tasks:
            return self
        if not zoo_groups:
            raise ConfigError(f"tasks.group = {self.group!r} names a zoo task group, but the models group has no zoo; "
                              f"list the tasks explicitly (`tasks.tasks: {{my_task: {{acc: 1.0}}}}`).")
        if self.group not in zoo_groups:
            raise ConfigError(f"tasks.group = {self.group!r} is not a task group of this zoo; it has "
                              f"{', '.join(zoo_groups)}.")
        weights = {self.metric: 1.0} if self.metric else {}
        names = zoo_groups[self.group]
        return replace(self, tasks={t: dict(weights) for t in names}, splits={t: self.default_splits for t in names})

    def split_plan(self, shot_seed: int = 0) -> SplitPlan:
        return SplitPlan({t: self.splits.get(t, self.default_splits) for t in self.tasks}, shot_seed=shot_seed)

    def options_key(self) -> dict[str, Any]:
        """What besides the metric weights gives a score its meaning (empty when every option is the default,
        so studies and cached scores from before these options existed keep their keys)."""
        out: dict[str, Any] = {}
        splits = {t: _key_of(s) for t, s in self.splits.items() if not s.is_default()}
        if splits:
            out["splits"] = splits
        if self.apply_chat_template:
            out["chat"] = [self.apply_chat_template, self.fewshot_as_multiturn]
        return out


def _key_of(s: TaskSplits) -> dict[str, Any]:
    """A task's split options as a key, unset select options left out (keys from before they existed hold)."""
    out = {k: v for k, v in asdict(s).items() if not (k in ("select_split", "select") and v is None)}
    if out.get("partition") and out["partition"].get("select") is None:
        out["partition"] = {k: v for k, v in out["partition"].items() if k != "select"}
    return out


@dataclass
class Score:
    values: list[float]       # what Optuna is told (one per objective)
    fitness: float            # the weighted mean of every task's metrics
    metrics: dict[str, dict[str, float]]
    seconds: float


SPLIT_KEYS = ("search_split", "test_split", "partition", "num_fewshot", "select_split", "select")
OPTION_KEYS = (*SPLIT_KEYS, "overrides", "filter")  # a task entry's keys that are not metric weights
_MANAGED = {"task": "the entry's name", "test_split": "test_split", "num_fewshot": "num_fewshot"}


def parse_tasks(cfg: dict[str, Any] | None) -> TaskSpec:
    """The tasks group, typed and checked once: every later reader gets a TaskSpec."""
    cfg = cfg or {}
    mode = cfg.get("objectives", "auto")
    if mode not in OBJECTIVE_MODES:
        raise ConfigError(f"tasks.objectives = {mode!r}: use auto, fitness (one objective) or per_task (one per task).")
    chat = {k: _flag(cfg.get(k, False), f"tasks.{k}") for k in ("apply_chat_template", "fewshot_as_multiturn")}
    default = _splits(cfg, "tasks", TaskSplits())
    if not cfg.get("tasks"):
        if not cfg.get("group"):
            raise ConfigError("tasks.tasks is empty and tasks.group is null: name the lm-eval tasks with metric weights, "
                              "on the command line (`'tasks.tasks={my_task: {acc: 1.0}}'`) or in a tasks file "
                              "(conf/tasks/gsm8k_local.yaml is one), or name a zoo task group (see conf/tasks/math.yaml).")
        return TaskSpec(name=str(cfg.get("name") or cfg["group"]), tasks={}, objectives=mode, group=str(cfg["group"]),
                        metric=cfg.get("metric"), default_splits=default, **chat)
    tasks: dict[str, dict[str, float]] = {}
    splits: dict[str, TaskSplits] = {}
    raw = cfg["tasks"]
    if isinstance(raw, list):  # a bare list: each task's first metric, weight 1
        raw = {t: {} for t in raw}
    if not isinstance(raw, dict):
        raise ConfigError("tasks.tasks must map task names to {metric: weight} (or be a list of task names).")
    for task, entry in raw.items():
        entry = entry or {}
        key = f"tasks.tasks.{task}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{key} must map metric names to numeric weights, e.g. {{acc: 1.0}}, beside any of the "
                              f"task's own split options ({', '.join(OPTION_KEYS)}).")
        options = {k: entry[k] for k in OPTION_KEYS if k in entry}  # the rest of the entry: metric weights
        metrics = {k: v for k, v in entry.items() if k not in OPTION_KEYS}
        filt = entry.get("filter")  # whose metrics count when the task has several filters (a key cannot hold a comma on
        if filt is not None:        # Hydra's command line, so `exact_match,strict-match` is `{exact_match: 1, filter: strict-match}`)
            if not isinstance(filt, str) or not filt:
                raise ConfigError(f"{key}.filter = {filt!r}: the name of one of the task's filters (its filter_list).")
            metrics = {(m if "," in m else f"{m},{filt}"): w for m, w in metrics.items()}
        splits[str(task)] = _splits(options, key, default, overrides=options.get("overrides")) if options else default
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in metrics.values()):
            raise ConfigError(f"{key} must map metric names to numeric weights, e.g. {{acc: 1.0}}; its other keys can "
                              f"only be the task's split options ({', '.join(OPTION_KEYS)}).")
        tasks[str(task)] = {str(m): float(w) for m, w in metrics.items()}
    return TaskSpec(name=str(cfg.get("name") or "tasks"), tasks=tasks, objectives=mode, splits=splits,
                    default_splits=default, **chat)


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} = {value!r}: true or false.")
    return value


def _splits(cfg: dict[str, Any], key: str, default: TaskSplits, overrides: Any = None) -> TaskSplits:
    """Split options at ``key`` (the group's defaults, or one task's), on top of ``default``."""
    given = {k: cfg[k] for k in SPLIT_KEYS if cfg.get(k) is not None}
    if "partition" in given and "search_split" in given and given["search_split"] != default.search_split:
        raise ConfigError(f"{key}: search_split and partition both say where the search items come from; keep one.")
    for k in ("search_split", "test_split", "select_split"):
        if k in given and (not isinstance(given[k], str) or not given[k]):
            raise ConfigError(f"{key}.{k} = {given[k]!r}: the name of one of the task's splits, e.g. train.")
    partition = default.partition if "search_split" not in given else None
    if "partition" in given:
        partition = _partition(given["partition"], f"{key}.partition")
    shots = given.get("num_fewshot", default.num_fewshot)
    if shots is not None and (not isinstance(shots, int) or isinstance(shots, bool) or shots < 0):
        raise ConfigError(f"{key}.num_fewshot = {shots!r}: a whole number >= 0 (null: the task's own).")
    select = given.get("select", default.select if "select_split" not in given else None)
    if select is not None and (isinstance(select, bool) or not isinstance(select, (int, float)) or select <= 0
                               or (select > 1 and select != int(select))):
        raise ConfigError(f"{key}.select = {select!r}: the share of the search split's items held out to choose the "
                          f"winner, a fraction in (0, 1) or a whole count >= 1 (null: no select split).")
    if overrides is None:
        overrides = dict(default.overrides)
    if not isinstance(overrides, dict):
        raise ConfigError(f"{key}.overrides must map lm-eval task config keys to values, e.g. {{dataset_path: json}}.")
    for k, use in _MANAGED.items():
        if k in overrides:
            raise ConfigError(f"{key}.overrides.{k}: set by evomerge ({use}); remove it from overrides.")
    return TaskSplits(search_split=given.get("search_split", default.search_split),
                      test_split=given.get("test_split", default.test_split), partition=partition,
                      num_fewshot=shots, overrides=dict(overrides),
                      select_split=given.get("select_split", default.select_split if "select" not in given else None),
                      select=None if select is None else float(select))


def _partition(value: Any, key: str) -> Partition:
    if not isinstance(value, dict) or set(value) - {"split", "search", "seed", "select"} or "search" not in value:
        raise ConfigError(f"{key} = {value!r}: a mapping {{split: SPLIT (null: the task's own test split), search: "
                          f"FRACTION or COUNT, select: FRACTION or COUNT (optional), seed: N}}, e.g. "
                          f"{{split: test, search: 0.3, select: 0.2, seed: 0}}.")
    search, seed, split, select = value["search"], value.get("seed", 0), value.get("split"), value.get("select")
    for name, x in (("search", search), ("select", select)):
        if x is None and name == "select":
            continue
        if isinstance(x, bool) or not isinstance(x, (int, float)) or x <= 0 or (x > 1 and x != int(x)):
            raise ConfigError(f"{key}.{name} = {x!r}: the {name} split's share of the split's items, a fraction in "
                              f"(0, 1) or a whole count >= 1.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{key}.seed = {seed!r}: a whole number.")
    if split is not None and (not isinstance(split, str) or not split):
        raise ConfigError(f"{key}.split = {split!r}: the name of one of the task's splits (null: its own test split).")
    return Partition(split=split, search=float(search), seed=seed, select=None if select is None else float(select))


def objective_names(spec: TaskSpec, multi_objective_sampler: bool) -> list[str]:
    mode = spec.objectives
    if mode == "auto":
        mode = "per_task" if multi_objective_sampler and len(spec.tasks) > 1 else "fitness"
    return list(spec.tasks) if mode == "per_task" else ["fitness"]


def _metric(results: dict[str, float], metric: str, task: str) -> float:
    """lm-eval names metrics ``acc,none``; a config says ``acc``: accept either spelling."""
    if metric in results:
        return float(results[metric])
    name = metric.split(",")[0]  # `acc` for `acc,none`; `exact_match,strict-match` when that is the only filter
    for key, value in results.items():
        if key.split(",")[0] == name and isinstance(value, (int, float)) and ("," not in metric or "," not in key):
            return float(value)
    raise ConfigError(f"tasks.tasks.{task}: task {task!r} reports no metric {metric!r}; it reports "
                      f"{', '.join(k for k in results if not k.endswith('_stderr') and 'stderr' not in k)}.")


def task_score(results: dict[str, float], weights: dict[str, float], task: str) -> float:
    if not weights:  # first non-stderr metric, weight 1
        key = next((k for k, v in results.items() if "stderr" not in k and isinstance(v, (int, float))), None)
        if key is None:
            raise ConfigError(f"task {task!r} reported no numeric metric.")
        return float(results[key])
    total = sum(abs(w) for w in weights.values()) or 1.0
    return sum(w * _metric(results, m, task) for m, w in weights.items()) / total


class Scorer:
    """One lm-eval evaluator, built once per process, turned into fitness values.

    Multi-fidelity without paying twice: a :class:`Look` is scored in steps (the
    first quarter of its items, then the rest; or more steps for successive
    halving), each step scoring only items not yet scored, and the steps are
    combined by item count. That is exact for mean-aggregated metrics (accuracy,
    exact match: every evomerge task); a task with any other aggregation is
    re-scored in full at each step instead, which is correct, only slower.
    """

    def __init__(self, evaluator: Any, spec: TaskSpec, objectives: list[str]) -> None:
        self.evaluator = evaluator
        self.spec = spec
        self.objectives = objectives
        self._sizes: dict[str, dict[str, int]] = {}
        self._incremental: bool | None = None

    def _finish(self, metrics: dict[str, dict[str, float]], seconds: float) -> Score:
        per_task = {t: task_score(metrics[t], w, t) for t, w in self.spec.tasks.items()}
        fitness = sum(per_task.values()) / len(per_task)
        values = [fitness] if self.objectives == ["fitness"] else [per_task[t] for t in self.objectives]
        return Score(values=values, fitness=fitness, metrics=metrics, seconds=seconds)

    def score(self, model: Any, split: str, limit: float | None) -> Score:
        start = time.perf_counter()
        raw = self.evaluator.evaluate(model, split=split, limit=_limit(limit))
        metrics = {t: {k: float(v) for k, v in raw[t].items() if isinstance(v, (int, float))} for t in self.spec.tasks}
        return self._finish(metrics, time.perf_counter() - start)

    def score_per_item(self, model: Any, split: str) -> tuple[Score, dict[str, list[float]]]:
        """Every item of ``split``: the Score, and each item's task score (its metrics weighted as the task's
        are) per task in item order, for paired comparisons. Only for mean-aggregated metrics
        (:meth:`can_split`), where the mean of the per-item values is the task's metric."""
        start = time.perf_counter()
        per_item = self.evaluator.per_item(model, split)
        metrics, items = {}, {}
        for t, weights in self.spec.tasks.items():
            by_metric = per_item[t]
            ids = sorted(next(iter(by_metric.values())))
            metrics[t] = {m: sum(v.values()) / len(v) for m, v in by_metric.items()}
            items[t] = [task_score({m: v[i] for m, v in by_metric.items()}, weights, t) for i in ids]
        return self._finish(metrics, time.perf_counter() - start), items

    def fitness_se(self, metrics: dict[str, dict[str, float]], split: str, limit: float | None) -> float | None:
        """Standard error of a fitness measured on ``limit`` items, when every metric is a per-item 0/1 score.

        Each task's score is treated as a proportion p over n items (variance p(1-p)/n) and the fitness as
        the mean over tasks. None when a metric is not a proportion (then no noise margin is applied).
        """
        try:
            n = self.counts(split, limit)
        except Exception:  # noqa: BLE001 - an evaluator without task objects
            return None
        var = 0.0
        for t, weights in self.spec.tasks.items():
            names = list(weights) or list(metrics.get(t, {}))[:1]
            if not names or any(m.split(",")[0] not in BINARY_METRICS for m in names) or not n.get(t):
                return None
            p = min(1.0, max(0.0, task_score(metrics[t], weights, t)))
            var += p * (1 - p) / n[t]
        return math.sqrt(var) / len(self.spec.tasks)

    # ---- looks in steps ---------------------------------------------------------------
    def can_split(self, split: str) -> bool:
        """Whether item ranges can be scored separately (mean-aggregated metrics, lm-eval task objects at hand)."""
        if self._incremental is None:
            try:
                from lm_eval.api.metrics import mean

                tasks = self.evaluator.task_dict(split)["tasks"]
                self._incremental = all(all(fn is mean for fn in tasks[t].aggregation().values()) for t in self.spec.tasks)
            except Exception:  # noqa: BLE001 - any other evaluator: score in full
                self._incremental = False
        return bool(self._incremental)

    def _size(self, split: str) -> dict[str, int]:
        if split not in self._sizes:
            tasks = self.evaluator.task_dict(split)["tasks"]
            self._sizes[split] = {t: len(tasks[t].eval_docs) for t in self.spec.tasks}
        return self._sizes[split]

    def counts(self, split: str, limit: float | None) -> dict[str, int]:
        """Items per task that ``limit`` means (lm-eval's rule: a fraction is rounded up)."""
        return {t: _count(limit, n) for t, n in self._size(split).items()}

    def score_items(self, model: Any, split: str, items: dict[str, list[int]]) -> tuple[dict[str, dict[str, float]], float]:
        """Metrics over the given item indices of each task."""
        start = time.perf_counter()
        samples = {t: list(r) for t, r in items.items() if len(r)}
        raw = self.evaluator.evaluate(model, split=split, samples=samples) if samples else {}
        metrics = {t: {k: float(v) for k, v in raw.get(t, {}).items()  # names as flattened: `m,filter` kept when two filters report m
                       if isinstance(v, (int, float)) and "stderr" not in k and k not in ("sample_len", "alias")}
                   for t in samples}
        return metrics, time.perf_counter() - start

    def look(self, split: str, limit: float | None, sample: int | None = None, seed: int = 0,
             estimator: LookEstimator | None = None) -> "Look":
        """A trial's look at ``split``: ``limit`` items per task, not yet scored (:meth:`extend` scores them).

        ``sample``: None, the first items of each task (the same for every trial); else the number of a fresh
        sample, drawn from the whole split by ``seed`` and ``sample`` (every trial of one sample number, on
        any worker, scores the same items). A fresh sample is in random order, so each step's items are a
        random part of it, where the first items of a task need not be an average sample.

        ``estimator`` (``search.estimator``: paired, irt): every score of the look is put on the whole split's
        scale by what the baselines' results say about the items (search/estimators.py).
        """
        n, size = self.counts(split, limit), self._size(split)
        if sample is None:
            items = {t: list(range(n[t])) for t in n}
        else:
            items = {t: random.Random(f"evomerge-items:{seed}:{sample}:{t}").sample(range(size[t]), n[t]) for t in n}
        return Look(items=items, done={t: 0 for t in n}, metrics={t: {} for t in n}, estimator=estimator)

    def extend(self, model: Any, split: str, look: "Look", upto: float | None = None) -> Score:
        """Score ``look``'s items up to ``upto`` (a fraction of its items or a count; None: all of them) and the
        look so far as one Score; items already scored are not scored again. Combining step means by item
        count is exact for mean-aggregated metrics, the only kind :meth:`can_split` admits."""
        goal = {t: len(ix) if upto is None else max(1, min(len(ix), _count(upto, len(ix)))) for t, ix in look.items.items()}
        new = {t: look.items[t][look.done[t]:goal[t]] for t in goal if goal[t] > look.done[t]}
        if look.estimator is not None and look.estimator.per_item:
            metrics, seconds = self._score_each(model, split, new, look) if new else ({}, 0.0)
        else:
            metrics, seconds = self.score_items(model, split, new) if new else ({}, 0.0)
        for t in new:
            a, b, old = look.done[t], len(new[t]), look.metrics[t]
            look.metrics[t] = {m: (old.get(m, 0.0) * a + v * b) / (a + b) for m, v in metrics.get(t, {}).items()}
            look.done[t] = goal[t]
        return self._finish(look.estimate(), seconds)

    def _score_each(self, model: Any, split: str, items: dict[str, list[int]],
                    look: "Look") -> tuple[dict[str, dict[str, float]], float]:
        """:meth:`score_items` item by item: each item's metrics appended to ``look.values``, their means returned."""
        start = time.perf_counter()
        per_item = self.evaluator.per_item(model, split, samples=items)
        metrics: dict[str, dict[str, float]] = {}
        for t, ix in items.items():
            kept = look.values.setdefault(t, {})
            metrics[t] = {}
            for m, v in per_item.get(t, {}).items():
                kept.setdefault(m, []).extend(v[i] for i in ix)
                metrics[t][m] = sum(v[i] for i in ix) / len(ix)
        return metrics, time.perf_counter() - start

    def reference(self, model: Any, split: str, label: str) -> ReferenceScores:
        """``model``'s metrics on every item of ``split``: a baseline's results for ``search.estimator``."""
        per_item = self.evaluator.per_item(model, split)
        size = self._size(split)
        return ReferenceScores(label=label, items={t: {m: [v[i] for i in range(size[t])] for m, v in per_item[t].items()}
                                                   for t in self.spec.tasks})


@dataclass
class Look:
    """Which items of a split a trial scores, how many of them it has scored, and their metrics so far."""

    items: dict[str, list[int]]               # task -> item indices, in the order they are scored
    done: dict[str, int]                      # task -> items scored (a prefix of ``items``)
    metrics: dict[str, dict[str, float]]      # task -> metric -> mean over the scored items
    estimator: LookEstimator | None = None    # None: the mean of the scored items is the estimate
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # task -> metric -> each scored
                                              # item's value, in scoring order (a per-item estimator's only)

    def estimate(self) -> dict[str, dict[str, float]]:
        """The look's metrics; with an estimator, each one's estimate over every item of the split."""
        if self.estimator is None:
            return {t: dict(m) for t, m in self.metrics.items()}
        return {t: {m: self.estimator.estimate(t, m, self.items[t][: self.done[t]], v, self.values.get(t, {}).get(m))
                    for m, v in ms.items()}
                for t, ms in self.metrics.items()}

    @property
    def scored(self) -> int:
        """Items scored so far, over all tasks: the look's cost."""
        return sum(self.done.values())


def paired_se(a: dict[str, list[float]], b: dict[str, list[float]]) -> float | None:
    """Standard error of fitness(a) - fitness(b) from the two models' per-item task scores on the same items
    (fitness: the mean over tasks of each task's mean); None when the items do not line up.

    Why paired: two merges of the same models agree on most items, so the noise of their difference is the
    noise of the items they disagree on, a fraction of two independent samples' (the unpaired margin kept
    textbook TIES over recipes 0.03 better on test).
    """
    if set(a) != set(b) or not a or any(len(a[t]) != len(b[t]) or len(a[t]) < 2 for t in a):
        return None
    var = 0.0
    for t in a:
        d = [x - y for x, y in zip(a[t], b[t])]
        mean = sum(d) / len(d)
        var += sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)
    return math.sqrt(var) / len(a)


def _count(limit: float | None, n: int) -> int:
    if limit is None:
        return n
    if limit < 1:
        return min(n, int(math.ceil(n * limit)))
    return min(n, int(limit))


def _limit(limit: float | None) -> int | float | None:
    if limit is None:
        return None
    return int(limit) if limit >= 1 else float(limit)
