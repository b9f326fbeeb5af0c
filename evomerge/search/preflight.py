"""Every configuration check that can fail, run before the study is opened or a candidate scored.

Why here and not where each value is used: a problem found by the first candidate is found after
the study exists, the baselines are queued and part of the budget is spent; a rerun with the fix
then meets a study whose fingerprint no longer matches, or finds its baselines already "done" as
failures. So the session calls :func:`check_before_study` after the models, tasks and genome are
known and before anything is written: the tasks' splits and items, the metrics each task reports,
the tokenizer against the base model's, the chat template, the sampler's options, the budget
against the baselines, and the models against each other. Every problem found is reported, each
as its own paragraph naming the task, key or file and the fix, in one ConfigError.
"""
from __future__ import annotations

from typing import Any

from evomerge.errors import ConfigError, EvomergeError
from evomerge.search.config import SamplerConfig
from evomerge.search.fitness import TaskSpec

_SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def check_before_study(evaluator: Any, tasks: TaskSpec, *, base: str | None, tokenizer_dir: str, genome: Any,
                       n_trials: int, sampler: SamplerConfig, seed: int, scorer: Any = None,
                       fresh_items: int | None = None, limit: float | None = None, estimator: str = "mean") -> None:
    """Raise one ConfigError listing every problem found; return quietly when there is none."""
    problems: list[str] = []
    plan = evaluator.splits
    try:
        plan.resolve(evaluator.task_manager)
    except ConfigError as exc:
        problems.append(str(exc))
    problems += check_metrics(tasks, plan.loaded_tasks())
    if base is not None and tokenizer_dir != base:
        problems += check_tokenizer(evaluator.tokenizer, tokenizer_dir, base)
    if tasks.apply_chat_template and not getattr(evaluator.tokenizer, "chat_template", None):
        problems.append(f"tasks.apply_chat_template is true, but the tokenizer in {tokenizer_dir} has no chat template "
                        f"(no chat_template in its tokenizer_config.json or chat_template.jinja). Set "
                        f"tasks.apply_chat_template=false, or point models.tokenizer at the instruct model's tokenizer.")
    problems += check_sampler_options(sampler, seed)
    problems += check_budget(n_trials, list(genome.baselines()))
    problems += check_models(genome)
    if scorer is not None and not problems:
        problems += check_items(scorer, fresh_items, limit, estimator)
    if problems:
        raise ConfigError("\n\n".join(problems) + "\n\nNothing was started: fix the above and run the same command again.")


def check_items(scorer: Any, fresh_items: int | None, limit: float | None, estimator: str) -> list[str]:
    """Fresh samples and estimators over per-item results need tasks whose items are scored and combined
    separately (mean-aggregated metrics), and fresh samples a search split larger than one sample."""
    fixes = {f"search.fresh_items = {fresh_items}": "search.fresh_items=null"} if fresh_items is not None else {}
    if estimator != "mean":
        fixes[f"search.estimator = {estimator}"] = "search.estimator=mean"
    if fixes and not scorer.can_split("search"):
        return [f"{' and '.join(fixes)} score search items in parts and combine them item by item, which needs tasks "
                f"whose metrics are means over items (accuracy, exact match); one of the tasks aggregates its items "
                f"otherwise. Set {' and '.join(fixes.values())}."]
    if fresh_items is None:
        return []
    sizes, counts = scorer.counts("search", None), scorer.counts("search", limit)
    if all(counts[t] >= sizes[t] for t in sizes):
        return [f"search.fresh_items = {fresh_items}: search.limit = {limit} takes every item of each task's search "
                f"split ({', '.join(f'{t}: {n}' for t, n in sizes.items())}), so every fresh sample would be the same "
                f"items. Set search.limit below the split's size (e.g. 0.5), or search.fresh_items=null."]
    return []


def reported_metrics(task: Any) -> list[str]:
    """The metric names a loaded lm-eval task reports, as the evaluator flattens them (``m``, or ``m,filter``
    when two filters report ``m``)."""
    filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
    names = list(task.aggregation())
    return [m if len(filters) == 1 else f"{m},{f}" for m in names for f in filters]


def check_metrics(tasks: TaskSpec, loaded: dict[str, Any]) -> list[str]:
    """Every weighted metric is one the task reports (by name, or name and filter)."""
    problems = []
    for name, weights in tasks.tasks.items():
        if name not in loaded:  # its loading error is reported already
            continue
        task = loaded[name]
        reported = reported_metrics(task)
        filters = [f.name for f in getattr(task, "_filters", [])]
        accepted = set(task.aggregation()) | {f"{m},{f}" for m in task.aggregation() for f in filters}
        for metric in weights:
            if metric not in accepted:
                problems.append(
                    f"tasks.tasks.{name}: the task does not report the metric {metric!r}; it reports "
                    f"{', '.join(reported) or 'none'}. Weight one of those (e.g. `tasks.tasks.{name}: "
                    f"{{{reported[0] if reported else 'acc'}: 1.0}}`), or add the metric to the task's metric_list.")
    return problems


def check_tokenizer(tokenizer: Any, tokenizer_dir: str, base: str) -> list[str]:
    """The evaluation tokenizer (models.tokenizer) encodes as the base model's: same vocabulary and special ids."""
    from transformers import AutoTokenizer

    try:
        ref = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - a base without a usable tokenizer: nothing to compare
        return [f"models.tokenizer = {tokenizer_dir!r} cannot be checked: the base model {base} has no tokenizer that "
                f"loads ({type(exc).__name__}: {exc}). Give the base its tokenizer files, or set models.tokenizer=null."]
    fix = (f"models.tokenizer must encode text as the base model's tokenizer does (the models were trained on those "
           f"ids); set models.tokenizer=null to use the base's ({base}), or point it at a copy of the base's tokenizer.")
    for key in _SPECIAL:
        a, b = getattr(ref, key, None), getattr(tokenizer, key, None)
        if a is not None and b is not None and a != b:
            return [f"models.tokenizer = {tokenizer_dir!r} has {key} = {b} where the base model's tokenizer ({base}) "
                    f"has {a}; {fix}"]
    va, vb = ref.get_vocab(), tokenizer.get_vocab()
    if va != vb:
        token = next((t for t, i in sorted(va.items(), key=lambda x: x[1]) if vb.get(t) != i), None)
        if token is not None:
            what = f"token {token!r} has id {va[token]} in the base's vocabulary and {vb.get(token)!r} in this one"
        else:
            token = next(t for t in vb if t not in va)
            what = f"token {token!r} (id {vb[token]}) is not in the base's vocabulary"
        return [f"models.tokenizer = {tokenizer_dir!r}: {what} ({len(vb)} vs {len(va)} tokens); {fix}"]
    return []


def check_sampler_options(sampler: SamplerConfig, seed: int) -> list[str]:
    from evomerge.search.samplers import make_sampler

    try:
        make_sampler(sampler, seed, None)
    except ConfigError as exc:
        return [str(exc)]
    except ValueError as exc:  # Optuna's own check of an option's value
        return [f"sampler.options for {sampler.name!r}: {exc}. Fix the value (`sampler.options.KEY=...`)."]
    return []


def check_budget(n_trials: int, baselines: list[str]) -> list[str]:
    if n_trials < len(baselines):
        return [f"search.n_trials = {n_trials} is smaller than the {len(baselines)} baselines that run first "
                f"({', '.join(baselines)}), so the search would stop before every baseline is scored and the winner "
                f"could not be compared with them. Set search.n_trials to at least {len(baselines)} (baselines only) "
                f"or more (searched candidates after them)."]
    return []


def check_models(genome: Any) -> list[str]:
    """The models merge (architecture, tensors, vocabularies): the merge plan of the textbook recipe opens them all."""
    from evomerge.engine.plan import MergePlan

    baselines = genome.baselines()
    try:
        MergePlan(genome.recipe(baselines.get("textbook") or next(iter(baselines.values()))))
    except EvomergeError as exc:
        return [str(exc)]
    return []
