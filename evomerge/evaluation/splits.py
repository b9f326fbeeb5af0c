"""Which items of a task each logical split uses: ``search`` (optimised), ``select`` (chooses), ``test`` (held out).

Why: a merge search needs, per task, items it may optimise and disjoint items it only reports.
evomerge's generated tasks have ``search`` and ``test`` splits; lm-eval's tasks and users' tasks
have ``train`` / ``validation`` / ``test``. Per task, the search items come from a split the
user names (``search_split: train``) or from a seeded partition of one split (``partition:
{split: test, search: 0.3, seed: 0}``); the test items are the task's own evaluation split (or
``test_split``) less what a partition gave the search. Items are identified by a digest of their
document, so "disjoint" is checked on content: a search item equal to a test item is dropped
from the search, and a few-shot example equal to a test item is never shown.

The optional ``select`` split chooses the winner among the top candidates and the baselines at the
end of a search and is never optimised (the trials never see it), so the winner's score there is
not inflated by the search's fitting of its own sample. Its items come from a named split
(``select_split``), from a partition's share (``partition: {..., select: 0.2}``) or are carved out
of the search split's items (``select: 0.3``, by the same content-seeded ranking as a partition).
It is off by default (the end of the search then chooses on the search split), so studies from
before it existed keep their fingerprints. Select items are never few-shot examples either.

Few-shot examples are lm-eval's own (``num_fewshot``, drawn from the task's fewshot / training
split, or lm-eval's fallback), with two changes that the search needs: the examples of an item
are a pure function of (seed, item), so a candidate scored twice, or on a resumed run, sees the
same prompts (lm-eval's ``evaluate`` leaves the sampler unseeded); and an item is never its own
example. The plan is resolved once per process (:meth:`SplitPlan.resolve`); its :meth:`record`
is what ``splits.json`` in the run directory holds.
"""
from __future__ import annotations

import copy
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError

SEARCH, SELECT, TEST = "search", "select", "test"
LOGICAL = (SEARCH, SELECT, TEST)


@dataclass(frozen=True)
class Partition:
    """A seeded split of one of the task's splits into search and test items."""

    split: str | None       # None: the task's own evaluation split
    search: float           # a fraction (0 < x < 1) or a count (>= 1) of the split's items
    seed: int = 0
    select: float | None = None  # the select split's share (as ``search``), taken after the search's; None: none


@dataclass(frozen=True)
class TaskSplits:
    """Where one task's items come from (the per-task part of the tasks config)."""

    search_split: str = SEARCH
    test_split: str | None = None   # None: the task's own evaluation split (test_split, else validation_split)
    partition: Partition | None = None
    num_fewshot: int | None = None  # None: the task's own
    select_split: str | None = None  # the split whose items choose the winner (None: see ``select``)
    select: float | None = None      # a share (fraction or count) of the search items carved out to choose the winner
    overrides: dict[str, Any] = field(default_factory=dict)  # other lm-eval task config keys

    def is_default(self) -> bool:
        return self == TaskSplits()


def doc_digest(doc: Any) -> str:
    """A document's identity: its fields, canonically serialised (16 hex digits of sha256)."""
    blob = json.dumps(doc, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class _Resolved:
    source: str                 # the task's split the items come from
    ids: list[int]              # positions in that split's (processed) documents
    digests: list[str]
    docs: list[Any]


class SplitPlan:
    """Per task, the documents of each logical split and the few-shot pool; resolved once, then applied."""

    def __init__(self, tasks: dict[str, TaskSplits], shot_seed: int = 0) -> None:
        self.tasks = dict(tasks)
        self.shot_seed = int(shot_seed)
        self._splits: dict[str, dict[str, _Resolved]] | None = None
        self._pools: dict[str, list[Any] | None] = {}
        self._base: dict[str, Any] = {}       # the task as lm-eval builds it (for metric checks)
        self._notes: dict[str, dict[str, Any]] = {}
        self._overrides: dict[str, dict[str, Any]] = {}

    # ---- resolution ------------------------------------------------------------------
    @property
    def resolved(self) -> bool:
        return self._splits is not None

    def loaded_tasks(self) -> dict[str, Any]:
        """Each task that loaded, as lm-eval builds it (after :meth:`resolve`, even one that raised)."""
        return dict(self._base)

    def resolve(self, task_manager: Any) -> None:
        """Load each task once, check its splits and compute every logical split's items.

        Raises one ConfigError holding a paragraph per problem found (every task is checked).
        """
        if self._splits is not None:
            return
        problems: list[str] = []
        out: dict[str, dict[str, _Resolved]] = {}
        for name, opts in self.tasks.items():
            self._overrides[name] = _overrides(task_manager, name, opts)
            try:
                task = _load(task_manager, {"task": name, **self._overrides[name]})
            except ConfigError as exc:
                problems.append(str(exc))
                continue
            self._base[name] = task  # kept even when its splits are wrong: its metrics are checked too
            try:
                out[name] = self._resolve_task(name, opts, task)
            except ConfigError as exc:
                problems.append(str(exc))
        with_select = sorted(t for t, by in out.items() if SELECT in by)
        if with_select and len(with_select) < len(out):
            problems.append(f"tasks {', '.join(with_select)} have select items and "
                            f"{', '.join(sorted(set(out) - set(with_select)))} none: the winner is chosen on every "
                            f"task's select items or on none, so give every task select items (tasks.select: 0.3 "
                            f"sets a default for all) or none.")
        if problems:
            raise ConfigError("\n\n".join(problems))
        self._splits = out

    def _resolve_task(self, name: str, opts: TaskSplits, task: Any) -> dict[str, _Resolved]:
        cfg = task.config
        available = list(task.dataset or {})
        own = cfg.test_split or cfg.validation_split
        where = f"task {name!r}"

        def need(split: str | None, key: str) -> str:
            if split is None:
                raise ConfigError(f"{where} has no evaluation split (neither test_split nor validation_split is set); "
                                  f"name one with `tasks.tasks.{name}.test_split: SPLIT` (its data has {_names(available)}).")
            if split not in available:
                hint = (" evomerge's own tasks have a 'search' split; for this task name the split the search may "
                        f"optimise, e.g. `tasks.search_split={_guess(available, own)}` (every task) or "
                        f"`{name}: {{METRIC: 1.0, search_split: {_guess(available, own)}}}` in tasks.tasks (this task), "
                        f"or hold out part of one split: `partition: {{split: {own or 'test'}, search: 0.3, seed: 0}}`."
                        if key == "search_split" else f" Set {key} (in tasks.tasks.{name}, or tasks.{key}) to one of them.")
                raise ConfigError(f"{where} has no split {split!r} (its data has {_names(available)}), so its "
                                  f"{key} cannot be used.{hint}")
            return split

        if opts.partition is not None:
            p = opts.partition
            source = need(p.split or own, "partition.split")
            if opts.test_split is not None and opts.test_split != source:
                raise ConfigError(f"{where}: partition.split {source!r} and test_split {opts.test_split!r} disagree; a "
                                  f"partition's test items are the rest of its split, so drop test_split.")
            docs = _docs(task, source)
            search_ids, select_ids, test_ids = _partition([doc_digest(d) for d in docs], p, where)
            splits = {SEARCH: _pick(source, docs, search_ids), TEST: _pick(source, docs, test_ids)}
            if p.select is not None:
                splits[SELECT] = _pick(source, docs, select_ids)
            note = {"split": source, "search": p.search, "seed": p.seed, **({"select": p.select} if p.select else {})}
            self._notes[name] = {"how": "partition", "partition": note}
        else:
            test_src = need(opts.test_split or own, "test_split")
            search_src = need(opts.search_split, "search_split")
            if search_src == test_src:
                raise ConfigError(f"{where}: search_split and test_split are both {test_src!r}, so the search would be "
                                  f"scored on its held-out items. Name another split for the search, or split this one "
                                  f"with `tasks.tasks.{name}.partition: {{split: {test_src}, search: 0.3, seed: 0}}`.")
            test_docs = _docs(task, test_src)
            test = _pick(test_src, test_docs, range(len(test_docs)))
            held = set(test.digests)
            search_docs = _docs(task, search_src)
            keep = [i for i, d in enumerate(search_docs) if doc_digest(d) not in held]
            if not keep:
                raise ConfigError(f"{where}: every item of split {search_src!r} is also in its test split "
                                  f"{test_src!r}; name a split with other items for the search.")
            splits = {SEARCH: _pick(search_src, search_docs, keep), TEST: test}
            self._notes[name] = {"how": "split", "dropped_from_search": len(search_docs) - len(keep)}
        if opts.select_split is not None or opts.select is not None:
            self._select(name, opts, splits, task, lambda split: need(split, "select_split"))
        if not splits[TEST].ids:
            raise ConfigError(f"{where}: its test split {splits[TEST].source!r} has no items left; give it some.")
        if not splits[SEARCH].ids:
            raise ConfigError(f"{where}: its search split {splits[SEARCH].source!r} has no items left; give it some.")
        held = set(splits[TEST].digests) | set(splits[SELECT].digests if SELECT in splits else ())
        self._pools[name] = self._shot_pool(name, task, held)
        return splits

    def _select(self, name: str, opts: TaskSplits, splits: dict[str, _Resolved], task: Any, need: Any) -> None:
        """Add the task's select items to ``splits``: a named split less the test items, or a carved share of
        the search items; either way the search keeps none of them."""
        where = f"task {name!r}"
        if opts.partition is not None and opts.partition.select is not None:
            raise ConfigError(f"{where}: partition.select and select / select_split both say where the select items "
                              f"come from; keep one.")
        if opts.select_split is not None and opts.select is not None:
            raise ConfigError(f"{where}: select_split ({opts.select_split!r}) and select ({opts.select!r}) both say "
                              f"where the select items come from; keep one.")
        search = splits[SEARCH]
        if opts.select_split is not None:
            src = need(opts.select_split)
            if src in (search.source, splits[TEST].source):
                raise ConfigError(f"{where}: select_split {src!r} is also its "
                                  f"{'search' if src == search.source else 'test'} split; name a third split, or carve "
                                  f"the select items out of the search items with `select: 0.3` (a share of them).")
            held = set(splits[TEST].digests)
            docs = _docs(task, src)
            sel = _pick(src, docs, [i for i, d in enumerate(docs) if doc_digest(d) not in held])
        else:
            _, sel_ids, _ = _partition(search.digests, Partition(None, float(opts.select), seed=0, select=None), where,
                                       keep_rest=True)
            sel = _Resolved(search.source, [search.ids[i] for i in sel_ids], [search.digests[i] for i in sel_ids],
                            [search.docs[i] for i in sel_ids])
        if not sel.ids:
            raise ConfigError(f"{where}: its select split {sel.source!r} has no items outside the test items.")
        chosen = set(sel.digests)
        keep = [i for i, d in enumerate(search.digests) if d not in chosen]
        splits[SEARCH] = _Resolved(search.source, [search.ids[i] for i in keep], [search.digests[i] for i in keep],
                                   [search.docs[i] for i in keep])
        self._notes[name]["select"] = {"split": sel.source, **({"share": opts.select} if opts.select is not None else {}),
                                       "dropped_from_search": len(search.ids) - len(keep)}
        splits[SELECT] = sel

    def _shot_pool(self, name: str, task: Any, held: set[str]) -> list[Any] | None:
        """lm-eval's few-shot pool for the task, less every test item."""
        shots = task.config.num_fewshot or 0
        sampler = getattr(task, "sampler", None)
        if shots <= 0 or sampler is None:
            self._notes[name]["shots"] = {"num_fewshot": shots}
            return None
        pool = list(sampler.fewshot_docs())
        kept = [d for d in pool if doc_digest(d) not in held]
        if len(kept) <= shots:  # an item is never its own example, so one more than the shots is needed
            raise ConfigError(
                f"task {name!r}: num_fewshot = {shots} needs more than {shots} examples outside the test items, and its "
                f"few-shot pool ({task.config.fewshot_split or 'lm-eval fallback: training, else validation, else test split'}) "
                f"has {len(kept)} after the test items are removed. Give the task a fewshot_split (or training_split) "
                f"of other items, use a partition (its search items then serve as examples), or lower num_fewshot.")
        self._notes[name]["shots"] = {"num_fewshot": shots, "pool": len(kept), "test_items_removed": len(pool) - len(kept),
                                      "from": task.config.fewshot_split or task.config.training_split
                                      or task.config.validation_split or task.config.test_split}
        return kept

    # ---- application -----------------------------------------------------------------
    def spec(self, split: str) -> dict[str, Any]:
        """The TaskManager.load spec of a logical split: each task with its source split and overrides."""
        self._need(split)
        assert self._splits is not None
        return {"group": f"_evomerge_split_{split}",
                "task": [{"task": t, **self._overrides[t], "test_split": self._splits[t][split].source} for t in self.tasks]}

    def prepare(self, split: str, tasks: dict[str, Any]) -> None:
        """Give each freshly loaded task object its split's documents and the guarded few-shot pool."""
        self._need(split)
        assert self._splits is not None
        for name in self.tasks:
            task = tasks[name]
            docs = list(self._splits[name][split].docs)
            task.test_docs = lambda docs=docs: docs  # what eval_docs reads: the split's items, already processed
            pool = self._pools.get(name)
            if pool is not None:
                _seeded_shots(task, pool, self.shot_seed)

    def _need(self, split: str) -> None:
        if split not in LOGICAL:
            raise ConfigError(f"split {split!r}: the tasks config defines the logical splits {', '.join(LOGICAL)} only.")
        if self._splits is None:
            raise RuntimeError("SplitPlan.resolve(task_manager) must run first")
        if not self.has(split):
            raise ConfigError(f"split {split!r}: the tasks config gives no task select items (set `tasks.select: 0.3`, "
                              f"a select_split, or a partition's select share).")

    def has(self, split: str) -> bool:
        """Whether the tasks define this logical split (``select`` is optional; every task has it or none does)."""
        if self._splits is None:
            raise RuntimeError("SplitPlan.resolve(task_manager) must run first")
        return all(split in by for by in self._splits.values())

    def counts(self) -> dict[str, dict[str, int]]:
        assert self._splits is not None
        return {t: {s: len(r.ids) for s, r in by.items()} for t, by in self._splits.items()}

    def record(self) -> dict[str, Any]:
        """What splits.json holds: per task and logical split, the source split, item positions and digests."""
        assert self._splits is not None
        tasks = {}
        for name, by in self._splits.items():
            entry: dict[str, Any] = dict(self._notes.get(name, {}))
            for split, r in by.items():
                entry[split] = {"split": r.source, "n": len(r.ids), "ids": r.ids, "sha256_16": r.digests}
            tasks[name] = entry
        return {"version": 1, "shot_seed": self.shot_seed, "tasks": tasks}

    def digest(self) -> str:
        """One digest of every task's items per split (it changes when any item, or its split, does), and of the
        few-shot seed where a task draws examples: zero-shot prompts do not depend on it, so runs of other
        seeds share their cached scores (search/score_cache.py)."""
        record = self.record()
        if all(pool is None for pool in self._pools.values()):
            del record["shot_seed"]
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


# ---- helpers -------------------------------------------------------------------------------
def _names(xs: list[str]) -> str:
    return ", ".join(map(repr, xs)) or "no splits"


def _guess(available: list[str], own: str | None) -> str:
    for s in ("train", "validation", "dev"):
        if s in available and s != own:
            return s
    return next((s for s in available if s != own), "train")


def _load(task_manager: Any, entry: dict[str, Any]) -> Any:
    """One task object, as lm-eval builds it; lm-eval's data errors become one paragraph naming the task."""
    import datasets

    name = entry["task"]
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        loaded = task_manager.load({"group": "_evomerge_inspect", "task": [entry]})
    except Exception as exc:  # noqa: BLE001 - datasets / lm-eval raise many kinds; all mean "cannot load"
        raise ConfigError(
            f"task {name!r} could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"A built-in task needs its dataset on this machine (in the Hugging Face datasets cache, or pointed at local "
            f"files with `tasks.tasks.{name}.overrides: {{dataset_path: json, dataset_kwargs: {{data_files: ...}}}}`); "
            f"a task of your own needs its data where its YAML says."
        ) from None
    finally:
        if was:
            datasets.enable_progress_bars()
    return loaded["tasks"][name]


def _overrides(task_manager: Any, name: str, opts: TaskSplits) -> dict[str, Any]:
    """The task's config overrides: the user's, num_fewshot, and data files relative to the task's YAML made absolute."""
    out = copy.deepcopy(dict(opts.overrides))
    if opts.num_fewshot is not None:
        out["num_fewshot"] = int(opts.num_fewshot)
    entry = getattr(task_manager, "task_index", {}).get(name)
    yaml_path = getattr(entry, "yaml_path", None)
    cfg = getattr(entry, "cfg", None) or {}
    kwargs = out.get("dataset_kwargs", cfg.get("dataset_kwargs"))
    if yaml_path and isinstance(kwargs, dict) and kwargs.get("data_files"):
        fixed = _absolute_files(kwargs["data_files"], Path(yaml_path).resolve().parent)
        if fixed != kwargs["data_files"]:
            out["dataset_kwargs"] = {**kwargs, "data_files": fixed}
    return out


def _absolute_files(files: Any, folder: Path) -> Any:
    """A data_files value with each relative path that exists beside the YAML (and not in the cwd) made absolute."""
    if isinstance(files, dict):
        return {k: _absolute_files(v, folder) for k, v in files.items()}
    if isinstance(files, list):
        return [_absolute_files(v, folder) for v in files]
    if isinstance(files, str) and not Path(files).is_absolute() and "://" not in files:
        if not Path(files).exists() and (folder / files).exists():
            return str(folder / files)
    return files


def _docs(task: Any, split: str) -> list[Any]:
    """A split's documents as the task scores them (after its process_docs)."""
    data = task.dataset[split]
    process = task.config.process_docs
    return list(process(data) if process is not None else data)


def _pick(source: str, docs: list[Any], ids: Any) -> _Resolved:
    ids = list(ids)
    return _Resolved(source, ids, [doc_digest(docs[i]) for i in ids], [docs[i] for i in ids])


def _partition(digests: list[str], p: Partition, where: str, *,
               keep_rest: bool = False) -> tuple[list[int], list[int], list[int]]:
    """Search, select and test positions: items ranked by a seeded digest, the first ones to the search,
    the next ``p.select`` (if any) to select, the rest to test.

    An item's side depends on its content and the seed only (not on the file's order), and equal
    documents share a side, so the sets never hold the same item. ``keep_rest``: carving select items
    out of a search split (``p.search`` is then the select share and the rest stays with the search).
    """
    unique = sorted(set(digests), key=lambda d: hashlib.sha256(f"{p.seed}/{d}".encode()).hexdigest())
    n = len(unique)

    def share(x: float) -> int:
        return round(x * n) if x < 1 else int(x)

    if keep_rest:  # the select items first, the search keeps the rest
        want = share(p.search)
        if not 0 < want < n:
            raise ConfigError(f"{where}: select = {p.search!r} carves {want} of the search split's {n} distinct items "
                              f"out for select; both need at least one (a fraction in (0, 1), or a count below {n}).")
        chosen = set(unique[:want])
        return ([i for i, d in enumerate(digests) if d not in chosen], [i for i, d in enumerate(digests) if d in chosen], [])
    want = share(p.search)
    extra = share(p.select) if p.select is not None else 0
    if not 0 < want < n and p.select is None:
        raise ConfigError(f"{where}: partition.search = {p.search!r} gives {want} of the split's {n} distinct items to "
                          f"the search; both sides need at least one (a fraction in (0, 1), or a count below {n}).")
    if p.select is not None and not (0 < want < n and 0 < extra < n - want):
        raise ConfigError(f"{where}: partition.search = {p.search!r} and select = {p.select!r} give {want} and {extra} "
                          f"of the split's {n} distinct items to the search and select; search, select and test each "
                          f"need at least one (fractions in (0, 1) summing below 1, or counts summing below {n}).")
    side = {d: 0 if k < want else 1 if k < want + extra else 2 for k, d in enumerate(unique)}
    return tuple([i for i, d in enumerate(digests) if side[d] == s] for s in range(3))  # type: ignore[return-value]


def _seeded_shots(task: Any, pool: list[Any], seed: int) -> None:
    """Examples from ``pool`` only, never the item itself, drawn by a generator seeded per item."""
    sampler = task.sampler
    sampler.fewshot_indices = None  # the pool is final (lm-eval's indices, if any, were applied to it already)
    sampler.replace_df(list(pool))
    current: dict[str, Any] = {}
    sample = sampler.sample
    context = task.fewshot_context

    def sample_excluding(n: int, eval_doc: Any = None, df: Any = None, **kwargs: Any) -> Any:
        return sample(n, eval_doc=current.get("doc", eval_doc), **kwargs)

    def fewshot_context(doc: Any, *args: Any, **kwargs: Any) -> Any:
        current["doc"] = doc
        sampler.rnd = random.Random(f"{seed}/{doc_digest(doc)}")
        return context(doc, *args, **kwargs)

    sampler.sample = sample_excluding
    task.fewshot_context = fewshot_context
