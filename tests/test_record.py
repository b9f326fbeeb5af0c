"""The study record (evomerge/search/record.py): every stored key, written and read back typed.

The stored format is a file format: studies written by earlier versions must keep loading, so these
tests spell the keys as raw literals, the way an old study holds them, and check that the writers
still write exactly that, and the readers still read it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

import evomerge
from evomerge.search import record
from evomerge.search.record import ExportClaim, FinalScores, StudyManifest, TrialRecord

LAYOUT = {"n_layers": 4, "pre": ["model.embed_tokens.weight"], "post": ["model.norm.weight", "lm_head.weight"],
          "layer_names": ["self_attn.q_proj.weight"]}
SEARCH = {"name": "ties_t", "method": "ties", "sources": ["m0", "m1"], "n_trials": 8, "limit": 20}
DIST = {"x": FloatDistribution(0.0, 1.0)}


def _sqlite(tmp_path: Path, name: str = "s") -> tuple[optuna.Study, str]:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    return optuna.create_study(study_name=name, storage=url, direction="maximize"), url


def _reload(url: str, name: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)  # a fresh process's view: nothing cached


def test_the_typed_readers_round_trip_through_a_sqlite_study(tmp_path):
    study, url = _sqlite(tmp_path)
    manifest = StudyManifest(fingerprint="abc/123", search=SEARCH, sources={"m0": "/m/0", "m1": "/m/1"}, base="/m/base",
                             seed=3, layout=LAYOUT, tasks={"task_a": {"acc": 1.0}}, objectives=["fitness"], limit=20)
    record.set_manifest(study, manifest)
    record.set_objectives(study, ["fitness"])
    study.enqueue_trial({"x": 0.5}, user_attrs=record.enqueue_attrs(baseline="textbook", seed=7))
    base = study.ask(DIST)
    record.write_look(base, 0.12345, 1.5, {"task_a": {"acc": 0.5}}, fitness=0.5)
    base.set_user_attr(record.WORKER, "0@host:1")
    study.tell(base, 0.5)
    pruned = study.ask(DIST)
    pruned.report(0.9, step=0)
    pruned.report(0.7, step=1)
    record.write_look(pruned, 0.1, 0.2, {"task_a": {"acc": 0.9}}, fitness=0.7, first_fitness=0.9)
    study.tell(pruned, state=TrialState.PRUNED)
    dead = study.ask(DIST)
    dead.set_user_attr(record.FAIL_REASON, "the process died while this trial ran")
    study.enqueue_trial(dict(dead.params), user_attrs=record.retry_attrs(study.trials[dead.number]))
    study.tell(dead, state=TrialState.FAIL)
    scores = FinalScores(test=0.61, test_metrics={"task_a": {"acc": 0.61}}, test_values=[0.61],
                         search_full=0.55, search_full_metrics={"task_a": {"acc": 0.55}})
    record.set_final_scores(study, base.number, scores)
    record.set_winner(study, base.number)
    claim = ExportClaim(worker="0@host:1", host="host", pid=1, dir="/shared", since="2026-01-01T00:00:00", beat=1.5)
    record.set_claim(study, claim)

    again = _reload(url)
    assert record.manifest_of(again) == manifest
    assert record.objectives_of(again) == ["fitness"]
    assert record.final_scores(again) == {base.number: scores}
    assert record.winner_of(again) == base.number
    assert record.claim_of(again) == claim
    t_base, t_pruned, t_dead, t_retry = again.get_trials()
    assert TrialRecord.of(t_base) == TrialRecord(
        number=0, state=TrialState.COMPLETE, baseline="textbook", seed=7, retry_of=None, worker="0@host:1", fitness=0.5,
        first_look=None, metrics={"task_a": {"acc": 0.5}}, merge_s=0.1235, eval_s=1.5, fail_reason=None)
    assert record.search_fitness(t_pruned) == 0.7 and record.first_look(t_pruned) == 0.9
    assert record.baseline_of(t_pruned) is None and record.seed_of(t_pruned) is None and record.seed_of(t_pruned, 4) == 4
    assert record.fail_reason_of(t_dead) == "the process died while this trial ran" and record.search_fitness(t_dead) is None
    assert t_retry.state == TrialState.WAITING and record.retry_of(t_retry) == t_dead.number
    assert record.enqueued_params(t_retry) == t_dead.params and record.enqueued_params(t_pruned) is None


def test_the_writers_write_the_format_earlier_versions_wrote(tmp_path):
    """The keys and shapes, as literals: changing one breaks every existing study."""
    study, url = _sqlite(tmp_path)
    manifest = StudyManifest(fingerprint="f", search=SEARCH, sources={"m0": "/m/0"}, base=None, seed=0, layout=LAYOUT,
                             tasks={"t": {"acc": 1.0}}, objectives=["fitness"], limit=None)
    record.set_manifest(study, manifest)
    record.set_objectives(study, ["fitness"])
    record.set_final_scores(study, 0, FinalScores(test=0.5, test_metrics={"t": {"acc": 0.5}}, test_values=[0.5]))
    record.set_final_scores(study, 1, FinalScores(test=0.4, test_metrics={}, test_values=[0.4], search_full=0.3,
                                                  search_full_metrics={}, select=0.2, select_metrics={}))
    record.set_winner(study, 1)
    record.set_claim(study, ExportClaim(worker="w", host="h", pid=2, dir="/d", since="s", beat=1.0))
    study.enqueue_trial({"x": 0.1}, user_attrs=record.enqueue_attrs(baseline="alone:m0"))
    t = study.ask(DIST)
    record.write_look(t, 0.5, 0.25, {"t": {"acc": 0.5}}, fitness=0.5)
    study.tell(t, 0.5)
    study.enqueue_trial({"x": 0.1}, user_attrs=record.retry_attrs(study.trials[0]))

    again = _reload(url)
    ua = again.user_attrs
    assert ua["evomerge"] == {"fingerprint": "f", "search": SEARCH, "sources": {"m0": "/m/0"}, "base": None, "seed": 0,
                              "layout": LAYOUT, "tasks": {"t": {"acc": 1.0}}, "objectives": ["fitness"], "limit": None}
    assert ua["objectives"] == ["fitness"] and ua["winner"] == 1
    assert ua["final:0"] == {"test": 0.5, "test_metrics": {"t": {"acc": 0.5}}, "test_values": [0.5]}
    assert ua["final:1"] == {"search_full": 0.3, "search_full_metrics": {}, "select": 0.2, "select_metrics": {},
                             "test": 0.4, "test_metrics": {}, "test_values": [0.4]}
    system = again._storage.get_study_system_attrs(again._study_id)  # noqa: SLF001
    assert system["evomerge:final"] == {"worker": "w", "host": "h", "pid": 2, "dir": "/d", "since": "s", "beat": 1.0,
                                        "done": False}
    trials = again.get_trials()
    assert trials[0].user_attrs == {"baseline": "alone:m0", "fitness": 0.5, "merge_s": 0.5, "eval_s": 0.25,
                                    "metrics": {"t": {"acc": 0.5}}}
    assert trials[1].user_attrs == {"baseline": "alone:m0", "retry_of": 0}


def test_a_study_written_with_raw_keys_by_an_earlier_version_still_reads(tmp_path):
    """An old study: a manifest without fingerprint, tasks or objectives; a pruned trial with only its first look
    (``first_fitness``, its Optuna value); final scores without test values; a finished export claim."""
    study, url = _sqlite(tmp_path)
    study.set_user_attr("evomerge", {"search": SEARCH, "sources": {"m0": "/m/0"}, "base": "/b", "seed": 0, "limit": 20,
                                     "layout": LAYOUT})
    study.set_user_attr("final:1", {"search_full": 0.69, "test": 0.66, "test_metrics": {"task_a": {"acc": 0.7}}})
    study.set_user_attr("winner", 1)
    study._storage.set_study_system_attr(study._study_id, "evomerge:final", {  # noqa: SLF001
        "worker": "a", "host": "h", "pid": 9, "dir": "/d", "since": "s", "beat": 2.0, "done": True,
        "took_over_from": "b", "finished": "f"})
    study.add_trial(create_trial(value=0.4, params={"x": 0.2}, distributions=DIST, intermediate_values={0: 0.4},
                                 user_attrs={"first_fitness": 0.4, "seed": 5, "metrics": {"task_a": {"acc": 0.4}}},
                                 state=TrialState.PRUNED))
    study.add_trial(create_trial(value=0.6, params={"x": 0.3}, distributions=DIST,
                                 user_attrs={"baseline": "textbook", "fitness": 0.6, "worker": "1@n:2", "retry_of": 0,
                                             "merge_s": 0.1, "eval_s": 0.2}))

    again = _reload(url)
    m = record.manifest_of(again)
    assert m is not None and m.fingerprint is None and m.tasks is None and m.objectives is None
    assert (m.search, m.sources, m.base, m.seed, m.limit, m.layout) == (SEARCH, {"m0": "/m/0"}, "/b", 0, 20, LAYOUT)
    assert record.final_scores(again) == {1: FinalScores(test=0.66, test_metrics={"task_a": {"acc": 0.7}},
                                                         test_values=[], search_full=0.69)}
    assert record.winner_of(again) == 1
    assert record.claim_of(again) == ExportClaim(worker="a", host="h", pid=9, dir="/d", since="s", beat=2.0, done=True,
                                                 took_over_from="b", finished="f")
    old_pruned, base = again.get_trials()
    assert record.search_fitness(old_pruned) == 0.4 and record.seed_of(old_pruned) == 5
    assert TrialRecord.of(base) == TrialRecord(
        number=1, state=TrialState.COMPLETE, baseline="textbook", seed=None, retry_of=0, worker="1@n:2", fitness=0.6,
        first_look=None, metrics={}, merge_s=0.1, eval_s=0.2, fail_reason=None)
    assert record.objectives_of(again) is None


def test_a_study_evomerge_did_not_write_reads_as_empty(tmp_path):
    study, url = _sqlite(tmp_path)
    again = _reload(url)
    assert (record.manifest_of(again), record.winner_of(again), record.claim_of(again)) == (None, None, None)
    assert record.final_scores(again) == {}


def test_search_fitness_is_the_one_reading_of_a_trials_fitness():
    def trial(state=TrialState.COMPLETE, values=None, **attrs):
        return create_trial(state=state, values=values, params={}, distributions={}, user_attrs=attrs,
                            intermediate_values={0: 0.9} if state == TrialState.PRUNED else None)

    assert record.search_fitness(trial(values=[0.2], fitness=0.3)) == 0.3  # the attribute wins over the value
    assert record.search_fitness(trial(TrialState.PRUNED, [0.7], fitness=0.7, first_fitness=0.9)) == 0.7
    assert record.search_fitness(trial(TrialState.PRUNED, [0.9], first_fitness=0.9)) == 0.9  # pruned, older
    assert record.search_fitness(trial(values=[0.2])) == 0.2            # single objective: the value is the fitness
    assert record.search_fitness(trial(values=[0.2, 0.8])) is None      # another tool's multi-objective trial
    assert record.search_fitness(trial(values=[0.2, 0.8], fitness=0.5)) == 0.5
    assert record.search_fitness(trial(TrialState.FAIL)) is None
    assert record.ranking_fitness(trial(TrialState.FAIL)) == float("-inf")


class _Scorer:
    def __init__(self):
        self.calls: list[str] = []

    def score(self, model, split, limit):
        from evomerge.search.fitness import Score

        self.calls.append(split)
        f = {"search": 0.5, "select": 0.4, "test": 0.3}[split] + model
        return Score(values=[f], fitness=f, metrics={"t": {"acc": f}}, seconds=0.0)

    def fitness_se(self, metrics, split, limit):
        return 0.01

    def can_split(self, split):  # no per-item scores: the stored format without chosen_items
        return False


class _Engine:
    model = 0.0

    def apply(self, recipe):
        self.model = recipe


class _Genome:
    seed = 0

    def recipe(self, params, seed):
        return params["x"] / 10


def test_the_final_step_writes_its_scores_in_the_stored_format_and_reuses_them(tmp_path):
    from evomerge.search.winner import rescore

    study, url = _sqlite(tmp_path)
    study.add_trial(create_trial(value=0.1, params={"x": 0.1}, distributions=DIST,
                                 user_attrs={"baseline": "textbook", "fitness": 0.1}))
    for x in (0.2, 0.9, 0.5):
        study.add_trial(create_trial(value=x, params={"x": x}, distributions=DIST, user_attrs={"fitness": x}))
    scorer, engine = _Scorer(), _Engine()
    final = rescore(study, _Genome(), lambda: engine, scorer, top_k=2, rescore_search=True, search_limit=20,
                    progress=False, margin_se=1.0, select_split=True)
    assert [c.number for c in final.candidates] == [2, 3] and [c.label for c in final.baselines] == ["textbook"]
    assert final.winner is not None and final.winner.number == 2 and record.winner_of(study) == 2
    stored = _reload(url).user_attrs
    assert stored["final:2"] == {"search_full": 0.59, "search_full_metrics": {"t": {"acc": 0.59}}, "select": 0.49,
                                 "select_metrics": {"t": {"acc": 0.49}}, "test": pytest.approx(0.39),
                                 "test_metrics": {"t": {"acc": pytest.approx(0.39)}}, "test_values": [pytest.approx(0.39)]}
    assert sorted(k for k in stored if k.startswith("final:")) == ["final:0", "final:2", "final:3"]
    assert final.winner.test == pytest.approx(0.39) and final.winner.chosen_on == "select"
    n = len(scorer.calls)
    again = rescore(_reload(url), _Genome(), lambda: pytest.fail("nothing left to score"), scorer, top_k=2,
                    rescore_search=True, search_limit=20, progress=False, select_split=True)
    assert len(scorer.calls) == n and again.winner.as_dict() == final.winner.as_dict()


# ---- nothing else spells a key --------------------------------------------------------------------------
# a call's name -> the position of its key argument
_WRITES = {"set_user_attr": 0, "set_system_attr": 0, "set_trial_user_attr": 1, "set_trial_system_attr": 1,
           "set_study_user_attr": 1, "set_study_system_attr": 1, "study_system_attr": 1}
_MAPS = {"user_attrs", "system_attrs"}


def _key_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """String literals used as a stored key: an attribute write's key, or a lookup in user/system attrs."""
    def attr_map(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr in _MAPS

    def literal(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and isinstance(node.value, str) or isinstance(node, ast.JoinedStr)

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            at = _WRITES.get(name)
            if at is not None and len(node.args) > at and literal(node.args[at]):
                found.append((node.lineno, name))
            if name in ("get", "pop") and isinstance(node.func, ast.Attribute) and attr_map(node.func.value) \
                    and node.args and literal(node.args[0]):
                found.append((node.lineno, "user/system attrs lookup"))
        elif isinstance(node, ast.Subscript) and attr_map(node.value) and literal(node.slice):
            found.append((node.lineno, "user/system attrs subscript"))
        elif isinstance(node, ast.Compare) and any(attr_map(c) for c in node.comparators) and literal(node.left):
            found.append((node.lineno, "`in` user/system attrs"))
    return found


def test_no_module_but_the_record_spells_a_stored_key():
    root = Path(evomerge.__file__).resolve().parent
    wrong = [f"{p.relative_to(root.parent)}:{line} ({how})" for p in sorted(root.rglob("*.py"))
             if p.name != "record.py" or p.parent.name != "search"
             for line, how in _key_literals(ast.parse(p.read_text()))]
    assert wrong == []


def test_the_key_check_sees_the_ways_a_key_is_spelled():
    src = ('t.set_user_attr("fitness", 1)\nx = t.user_attrs.get("baseline")\ny = t.user_attrs["seed"]\n'
           'z = "worker" in t.user_attrs\ns.set_user_attr(f"final:{n}", r)\nstorage.set_trial_system_attr(i, "k", 1)\n')
    assert [line for line, _ in _key_literals(ast.parse(src))] == [1, 2, 3, 4, 5, 6]
