"""``report.md`` and its plots: what a person reads after a search.

Plots are PNGs next to the report (matplotlib, Agg backend: no display needed).
A plot that cannot be drawn (too few trials for importances, say) is skipped
with a line saying why, never an error: the report must not lose the search.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from evomerge.export.run import RUN_FILES, run_files  # noqa: E402
from evomerge.search.record import baseline_of, search_fitness as _fitness  # noqa: E402


def plot_history(study: optuna.Study, path: Path) -> Path:
    """Fitness per trial (pruned: their first look), best so far, baselines as labelled lines."""
    trials = study.get_trials(deepcopy=False)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    done = [(t.number, _fitness(t)) for t in trials if t.state == TrialState.COMPLETE and not baseline_of(t)]
    pruned = [(t.number, _fitness(t)) for t in trials if t.state == TrialState.PRUNED and _fitness(t) is not None]
    if done:
        ax.scatter(*zip(*done), s=18, label="candidate", color="tab:blue")
    if pruned:
        ax.scatter(*zip(*pruned), s=18, marker="x", label="pruned (first look, on the whole look's scale)", color="tab:gray")
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    colors = plt.cm.tab10.colors  # type: ignore[attr-defined]
    base = [(baseline_of(t), t.number, _fitness(t)) for t in trials if t.state == TrialState.COMPLETE and baseline_of(t)]
    for i, (name, num, fit) in enumerate(base):
        c = colors[(i + 2) % len(colors)]
        ax.axhline(fit, color=c, linestyle="--", linewidth=1)
        ax.scatter([num], [fit], color=c, marker="D", s=30, label=f"baseline {name}")
    best, line = None, []
    for t in sorted(trials, key=lambda t: t.number):
        f = _fitness(t) if t.state == TrialState.COMPLETE else None
        if f is not None and (best is None or f > best):
            best = f
        if best is not None:
            line.append((t.number, best))
    if line:
        ax.step(*zip(*line), where="post", color="tab:red", label="best so far")
    if failed:
        lo = ax.get_ylim()[0]
        ax.scatter(failed, [lo] * len(failed), marker="v", color="black", label="failed")
    ax.set_xlabel("trial")
    ax.set_ylabel("search fitness")
    ax.set_title(f"Optimisation history: {study.study_name}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(table: dict[str, list[float]], path: Path, title: str) -> Path:
    """The winner's per-layer genes: one panel per parameter, one row per model, one column per layer."""
    groups: dict[str, list[str]] = {}
    for row in table:
        gene = row.split(".")[1] if row.count(".") >= 1 and len(row.split(".")) > 1 else row
        groups.setdefault(gene if "." in row else row, []).append(row)
    n = max(len(v) for v in table.values())
    heights = [len(rows) for rows in groups.values()]
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(5.0, 0.35 * n + 3), 0.45 * sum(heights) + 1.2 * len(groups)),
                             squeeze=False, gridspec_kw={"height_ratios": heights})
    for ax, (gene, rows) in zip(axes[:, 0], groups.items()):
        data = [table[r] for r in rows]
        im = ax.imshow(data, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(rows)), [r.replace(f".{gene}", "") for r in rows], fontsize=8)
        ax.set_xticks(range(n), [str(i) for i in range(n)], fontsize=7)
        ax.set_title(gene, fontsize=9)
        lo, hi = min(map(min, data)), max(map(max, data))
        if n * len(rows) <= 200:
            for i, r in enumerate(rows):
                for j, v in enumerate(table[r]):
                    dark = hi == lo or (v - lo) / (hi - lo) < 0.6  # viridis: light text on its dark end
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if dark else "black")
        fig.colorbar(im, ax=ax)
    axes[-1, 0].set_xlabel("layer")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layer_sequence(seq: list[dict[str, Any]], path: Path) -> Path:
    """A data-flow winner's stack: the source layer (y) at each output depth (x), one colour per source,
    the marker's area its scale (labelled where it is not 1)."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.4 * len(seq) + 2), 3.4))
    ax.plot([r["out"] for r in seq], [r["layer"] for r in seq], color="0.75", lw=0.8, zorder=0)
    for i, source in enumerate(dict.fromkeys(r["source"] for r in seq)):
        pts = [r for r in seq if r["source"] == source]
        ax.scatter([r["out"] for r in pts], [r["layer"] for r in pts], s=[60 * r["scale"] for r in pts],
                   color=f"C{i}", label=source)
    for r in seq if len(seq) <= 60 else []:
        if r["scale"] != 1.0:
            ax.annotate(f"{r['scale']:.2f}", (r["out"], r["layer"]), textcoords="offset points", xytext=(0, 7),
                        ha="center", fontsize=6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("output layer")
    ax.set_ylabel("source layer")
    ax.set_title("Winner: layer sequence (marker area: scale of o_proj / down_proj)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_importances(study: optuna.Study, path: Path, top: int = 20) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = None if len(study.directions) == 1 else (lambda t: _nan(_fitness(t)))
        imp = optuna.importance.get_param_importances(study, target=target)
    items = list(imp.items())[:top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(items) + 1.5))
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.set_xlabel("importance (share of fitness variation)")
    ax.set_title("Parameter importances")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pareto(study: optuna.Study, names: list[str], path: Path) -> Path:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = {t.number for t in study.best_trials}
    i, j = 0, 1
    fig, ax = plt.subplots(figsize=(6, 5))
    others = [t for t in trials if t.number not in front]
    ax.scatter([t.values[i] for t in others], [t.values[j] for t in others], s=15, color="tab:gray", label="trial")
    fr = sorted((t for t in trials if t.number in front), key=lambda t: t.values[i])
    ax.plot([t.values[i] for t in fr], [t.values[j] for t in fr], "o-", color="tab:red", label="Pareto front")
    for t in fr:
        ax.annotate(str(t.number), (t.values[i], t.values[j]), fontsize=7)
    for t in trials:
        if baseline_of(t):
            ax.scatter([t.values[i]], [t.values[j]], marker="D", s=30, label=f"baseline {baseline_of(t)}")
    ax.set_xlabel(names[i])
    ax.set_ylabel(names[j])
    ax.set_title("Pareto front (first two objectives)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(run_dir: Path, study: optuna.Study, summary: dict[str, Any], winner_table: dict[str, list[float]] | None,
                 objective_names: list[str]) -> Path:
    """``report.md`` with the scores table and the plots."""
    lines = [f"# Merge search `{study.study_name}`", ""]
    lines += [f"- method: **{summary.get('method')}** over {', '.join(summary.get('sources', []))}",
              f"- trials: {summary['trials'].get('finished', 0)} finished of a budget of {summary['n_trials']} ("
              + ", ".join(f"{k} {v}" for k, v in summary["trials"].items() if k != "finished") + ")",
              f"- storage: `{summary.get('storage')}` (open it with `optuna-dashboard {summary.get('storage')}`)", ""]
    best = summary.get("best") or {}
    rule = summary.get("winner_rule") or "the best candidate on the search split"
    roles = summary.get("split_roles") or {"search": "optimised", "test": "reported only"}
    select = "select" in roles
    lines += ["## Scores", "", f"Winner: {rule}.", "",
              "Splits: " + "; ".join(f"{k}: {v}" for k, v in roles.items()) + ".", "",
              "| candidate | search | search (all items) |" + (" select (chose) |" if select else "") + " test (held out) |",
              "|---|---|---|---|" + ("---|" if select else "")]
    rows = [best] + list((summary.get("baselines") or {}).values()) + list(summary.get("top") or [])
    seen: set[Any] = set()
    for r in rows:
        if not r or r.get("trial") in seen:
            continue
        seen.add(r.get("trial"))
        label = r.get("label", "")
        if r is best:
            label = f"**winner: {label}**"
        sel = f" {_f(r.get('select_fitness'))} |" if select else ""
        lines.append(f"| {label} | {_f(r.get('search_fitness'))} | {_f(r.get('search_full_fitness'))} |{sel} "
                     f"{_f(r.get('test_fitness'))} |")
    lines.append("")
    held = summary.get("held_out")
    if held:
        se = "unknown" if held["se"] is None else f"{held['se']:.4f}" + (", paired over the same items" if held["paired"] else "")
        lines += [f"Held out: the winner ({held['winner']}) against the best other hand-set recipe on test "
                  f"({held['baseline']}): {held['difference']:+.4f} (standard error {se}). Reported only: "
                  f"that baseline is picked by its test score, in hindsight, and nothing here chose by it.", ""]
    plots: list[tuple[str, Any]] = [("history.png", lambda p: plot_history(study, p))]
    seq = summary.get("layer_sequence")
    if seq:  # a data-flow search: the winner's stack as a table and a plot
        lines += ["## Layer sequence", "", f"The winner has {len(seq)} layers.", "",
                  "| output layer | source | source layer | scale |", "|---|---|---|---|"]
        lines += [f"| {r['out']} | {r['source']} | {r['layer']} | {r['scale']:g} |" for r in seq]
        lines.append("")
        plots.append(("layers.png", lambda p: plot_layer_sequence(seq, p)))
    if winner_table:
        plots.append(("winner_genes.png", lambda p: plot_heatmap(winner_table, p, "Winner: per-layer genes")))
    plots.append(("importances.png", lambda p: plot_importances(study, p)))
    if len(study.directions) > 1 and len(objective_names) >= 2:
        plots.append(("pareto.png", lambda p: plot_pareto(study, objective_names, p)))
    lines += ["## Plots", ""]
    for name, draw in plots:
        try:
            draw(run_dir / name)
            lines += [f"![{name[:-4]}]({name})", ""]
        except Exception as exc:  # noqa: BLE001 - a missing plot must not lose the report
            lines += [f"_{name[:-4]}: not drawn ({type(exc).__name__}: {exc})_", ""]
            plt.close("all")
    t = summary.get("timings") or {}
    if t:
        lines += ["## Time (this run of the command)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in t.items() if isinstance(v, (int, float))]
        pc = t.get("per_candidate") or {}
        if pc:
            lines += ["", f"Per candidate (median of {pc['candidates']}): merge {pc['merge_s']:.3f} s, "
                          f"evaluation {pc['eval_s']:.3f} s, bookkeeping {pc['overhead_s']:.3f} s."]
        lines.append("")
    lines += ["## Files", "", *(f"- `{name}`: {RUN_FILES[name]}" for name in run_files(run_dir) if name != "report.md"),
              "- export any other trial: `evomerge-export RUN_DIR --trial N`", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _f(v: Any) -> str:
    return "" if v is None else f"{float(v):.4f}"


def _nan(v: float | None) -> float:
    return float("nan") if v is None else v
