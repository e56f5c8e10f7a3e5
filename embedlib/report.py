"""The report of one or more training runs: a static HTML page with PNG plots.

    python -m embedlib.report RUN [RUN ...] --output DIR      # prints `report: DIR/index.html`

Every figure overlays all the runs given, one color per run, with a legend:

    training     loss (each step, and a moving mean), loss per task kind (when a run trains two),
                 learning rate, samples/s
    scores       each step, the mean score of the trained queries with their positives and with their
                 own hard negatives (the paper's Fig. 2 view)
    negatives    at each dynamic-negatives check: samples judged, stale samples, replaced negatives, and
                 the quantiles of s / s0 with the stale threshold; in both, each adoption of a
                 negative-store version is a dotted vertical line, labelled with the version
    mining       per mining pass: its seconds (encode + search) at the export step it mined with; per
                 store version: the export step it was mined with, the step at which it was
                 published and the step at which the trainer adopted it; the age in steps of the
                 negatives in use (step minus the export step they were mined with) at every step
    evaluation   each figure of eval.jsonl over steps; with evaluation sets, a plot per category (a line
                 per set) and the category means with their average (the paper's Table 4 view)

A panel whose data no run has (no dynamic negatives, no evaluation, no mining) is left out. Runs are
read with embedlib.runlog, so a run that is still going is shown as far as it got; run the command
again to update the page. DIR/report.json holds the data behind each figure, read back from the drawn
figure itself: every line's x and y. Re-running over the same DIR replaces the files of the previous
report and removes the ones it no longer has.
"""
from __future__ import annotations

import argparse
import calendar
import html
import io
import json
import math
import os
import re
import sys
import time
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

from embedlib.atomic import atomic_write_bytes, atomic_write_json
from embedlib.evaluation import CATEGORIES, MAIN_METRIC, category_means
from embedlib.run_records import integer, number
from embedlib.runlog import RunLog, RunLogError, eval_figures, is_run_dir, latest_evals, read_run

REPORT_JSON = "report.json"
INDEX_HTML = "index.html"
SECTIONS = ("Training", "Dynamic negatives", "Mining", "Evaluation")
# Each data set of a run keeps the run's color and gets its own marker and dash pattern.
DATASET_STYLES = ("o-", "s--", "^:", "d-.")


class ReportError(ValueError):
    """Bad arguments or an unreadable run: one line for the user."""


@dataclass
class Line:
    key: str  # what the line is, stable across reports: "loss:RUN", "age:RUN:DATA SET", ...
    label: str  # legend entry; "" for none
    x: list[float]
    y: list[float]
    run: int  # index of the run, which picks its color
    style: str = "-"
    alpha: float = 1.0


@dataclass
class Axis:
    ylabel: str
    lines: list[Line]
    marks: list[Line] = field(default_factory=list)  # vertical lines at x[0], e.g. adoptions
    xlabel: str = "step"
    log_y: bool = False


@dataclass
class Plot:
    name: str  # the PNG's file stem
    section: str
    title: str
    caption: str
    axes: list[Axis]


# ---- what to draw -----------------------------------------------------------------------------------


def build_plots(runs: list[RunLog], labels: list[str]) -> list[Plot]:
    """Every plot some run has data for, in page order; lines without points, and axes and plots without
    lines, are left out."""
    plots = [*training_plots(runs, labels), scores_plot(runs, labels), negatives_plot(runs, labels),
             mining_plot(runs, labels), *evaluation_plots(runs, labels)]
    kept = []
    for plot in plots:
        if plot is None:
            continue
        for axis in plot.axes:
            axis.lines = [line for line in axis.lines if line.x]
        plot.axes = [axis for axis in plot.axes if axis.lines]
        if plot.axes:
            kept.append(plot)
    return kept


def training_plots(runs: list[RunLog], labels: list[str]) -> list[Plot]:
    kinds = sorted({key.removeprefix("loss/") for run in runs for m in run.metrics for key in m
                    if key.startswith("loss/")})
    several_kinds = any(len({k for m in run.metrics for k in m if k.startswith("loss/")}) > 1 for run in runs)
    plots = [Plot("loss", "Training", "Loss", "The CBB loss of every step (faint) and its moving mean.",
                  [Axis("loss", _noisy_lines("loss", runs, labels))])]
    if several_kinds:  # with one task kind its loss is the loss above
        for kind in kinds:
            plots.append(Plot(f"loss_{_file_stem(kind)}", "Training", f"Loss: {kind}",
                              f"The unweighted {kind} term of the loss, each step and its moving mean.",
                              [Axis(f"loss/{kind}", _noisy_lines(f"loss/{kind}", runs, labels))]))
    lr = Axis("learning rate", [Line(f"lr:{label}", label, *_series(run.metrics, "lr"), i)
                                for i, (run, label) in enumerate(zip(runs, labels))])
    peaks = [max(line.y) for line in lr.lines if line.y]
    lr.log_y = len(peaks) > 1 and min(peaks) > 0 and max(peaks) > 30 * min(peaks)  # runs of very different rates
    plots.append(Plot("lr", "Training", "Learning rate", "The learning rate of each step.", [lr]))
    plots.append(Plot("samples_per_s", "Training", "Throughput",
                      "Training samples per second over all ranks (queries or sentence pairs), each step and its "
                      "moving mean.", [Axis("samples/s", _noisy_lines("samples_per_s", runs, labels))]))
    return plots


def scores_plot(runs: list[RunLog], labels: list[str]) -> Plot | None:
    """The paper's Fig. 2 view: how hard the negatives in use are, step by step."""
    axis = Axis("score", [])
    for i, (run, label) in enumerate(zip(runs, labels)):
        datasets = _datasets_with(run, "scores", "positive")
        for dataset in datasets:
            for which, style in (("positive", "-"), ("negative", "--")):
                x, y = _series(run.metrics, f"scores/{dataset}/{which}")
                axis.lines.append(Line(f"{which}:{label}:{dataset}", f"{label} · {dataset} · {which}", x, y, i,
                                       style))
        if datasets:
            axis.marks.extend(_marks(run, label, i))
    if not axis.lines:
        return None
    return Plot("scores", "Dynamic negatives", "Scores of positives and hard negatives",
                "The mean cosine of the queries trained at each step with their "
                "positive (solid) and with their own hard negatives (dashed): negatives that stop being hard "
                "drift down, away from the positive (the paper's Fig. 2). Dotted lines: a new negative-store "
                "version adopted (its number on top).", [axis])


def negatives_plot(runs: list[RunLog], labels: list[str]) -> Plot | None:
    axes = {name: Axis(ylabel, []) for name, ylabel in
            (("eligible", "samples judged"), ("stale", "stale samples"), ("replaced", "replaced negatives"),
             ("ratio", "s / s0"))}
    for i, (run, label) in enumerate(zip(runs, labels)):
        datasets = _datasets_with(run, "negatives", "stale")
        if not datasets:  # a run without checks has no lines here, so no marks either
            continue
        for j, dataset in enumerate(datasets):
            style = DATASET_STYLES[j % len(DATASET_STYLES)]
            for name in ("eligible", "stale", "replaced"):
                x, y = _series(run.metrics, f"negatives/{dataset}/{name}")
                axes[name].lines.append(Line(f"{name}:{label}:{dataset}", f"{label} · {dataset}", x, y, i, style))
            for q in ("q10", "q50", "q90"):
                x, y = _series(run.metrics, f"negatives/{dataset}/ratio_{q}")
                axes["ratio"].lines.append(Line(f"ratio_{q}:{label}:{dataset}",
                                                f"{label} · {dataset}" if q == "q50" else "", x, y, i, style,
                                                1.0 if q == "q50" else 0.35))
            check_steps, threshold = axes["stale"].lines[-1].x, 1.0 / _stale_ratio(run)
            axes["ratio"].lines.append(Line(f"stale_below:{label}:{dataset}", f"{label}: stale below {threshold:.3f}",
                                            check_steps, [threshold] * len(check_steps), i, ":", 0.7))
        marks = _marks(run, label, i)
        for axis in axes.values():
            axis.marks.extend(marks)
    if not any(axis.lines for axis in axes.values()):
        return None
    return Plot("negatives", "Dynamic negatives", "Dynamic negatives at each check",
                "At each check of the dynamic-negatives rule (negatives.check_interval): the samples it could "
                "judge (trained since their negatives were assigned), those whose negatives went stale and the "
                "negatives replaced; then s / s0, the live score of a sample's negatives over their score when "
                "assigned (the store's mining score), its median and (faint) 10th and 90th percentiles, with "
                "the line below which a sample is stale (1 / negatives.stale_ratio). Dotted vertical lines: a "
                "new negative-store version adopted by the trainer (its number on top).", list(axes.values()))


def _marks(run: RunLog, label: str, index: int) -> list[Line]:
    return [Line(f"adoption:{label}:{versions}", "", [step, step], [0, 1], index, ":")
            for step, versions in _adoption_marks(run)]


def _stale_ratio(run: RunLog) -> float:
    negatives = run.config.get("negatives")
    ratio = negatives.get("stale_ratio") if isinstance(negatives, dict) else None
    ratio = number(ratio)
    return ratio if ratio and ratio > 0 else 1.15  # training/config.py's default


def mining_plot(runs: list[RunLog], labels: list[str]) -> Plot | None:
    if not any(run.refreshes for run in runs):
        return None
    seconds = Axis("mining seconds per pass", [])
    versions = Axis("negative-store version", [])
    age = Axis("age of negatives in use (steps)", [])
    for i, (run, label) in enumerate(zip(runs, labels)):
        passes = [r for r in run.refreshes if r.export_step is not None and r.version is not None]
        if not passes:
            continue
        seconds.lines.append(Line(f"mining_seconds:{label}", label, [r.export_step for r in passes],
                                  [r.seconds for r in passes], i, "o-"))
        versions.lines.append(Line(f"mined_from:{label}", f"{label}: mined with the export of step",
                                   [r.export_step for r in passes], [r.version for r in passes], i, "o"))
        published = [(step, r.version) for r in passes if (step := _step_at(run, r.time)) is not None]
        if published:
            versions.lines.append(Line(f"published:{label}", f"{label}: published", [s for s, _ in published],
                                       [v for _, v in published], i, "s", 0.6))
        adopted = [(step, v) for step, _, v in _adoptions(run)]
        if adopted:
            versions.lines.append(Line(f"adopted:{label}", f"{label}: adopted", [s for s, _ in adopted],
                                       [v for _, v in adopted], i, "^"))
        export_step_of = {r.version: r.export_step for r in passes}
        for j, dataset in enumerate(_store_datasets(run)):
            points = [(m["step"], m["step"] - export_step_of[v]) for m in run.metrics
                      if (v := (m.get("negatives_version") or {}).get(dataset)) in export_step_of]
            if points:
                age.lines.append(Line(f"age:{label}:{dataset}", f"{label} · {dataset}", [s for s, _ in points],
                                      [a for _, a in points], i, DATASET_STYLES[j % len(DATASET_STYLES)][1:] or "-"))
    return Plot("mining", "Mining", "Mining timeline",
                "Top: seconds of each mining pass (encode + search), at the export step it mined with. Middle: "
                "each negative-store version at the export step it was mined with, the step at which it was "
                "published (read from the step times) and the step at which the trainer adopted it. Bottom: how "
                "many steps old the model was that mined the negatives in use.", [seconds, versions, age])


def evaluation_plots(runs: list[RunLog], labels: list[str]) -> list[Plot]:
    """Older runs' eval.jsonl (one record per evaluation, no "set"): a plot per figure, a line per run.
    Runs with evaluation sets: a plot per category (an axis per figure, a line per run and set), and, where a
    run has several sets, the category means with their average (the paper's Table 4 view)."""
    legacy = [[e for e in run.evals if "set" not in e] for run in runs]
    names = list(dict.fromkeys(name for evals in legacy for record in evals for name, _ in eval_figures(record)))
    plots = [Plot(f"eval_{_file_stem(name)}", "Evaluation", name,
                  f"{name} of the exports evaluated during training (eval.jsonl).",
                  [Axis(name, [Line(f"eval/{name}:{label}", label, *_series(evals, f"eval/{name}"), i, "o-")
                               for i, (evals, label) in enumerate(zip(legacy, labels))])])
             for name in names]
    set_rows = [[e for e in run.evals if isinstance(e.get("set"), str)] for run in runs]
    found = {str(e.get("category")) for rows in set_rows for e in rows}
    categories = [c for c in CATEGORIES if c in found] + sorted(found - set(CATEGORIES))
    for category in categories:
        rows_of = [[e for e in rows if e.get("category") == category] for rows in set_rows]
        figures = list(dict.fromkeys(name for rows in rows_of for e in rows for name, _ in eval_figures(e)))
        axes = []
        for name in figures:
            axis = Axis(name, [])
            for i, (rows, label) in enumerate(zip(rows_of, labels)):
                for j, name_of_set in enumerate(dict.fromkeys(e["set"] for e in rows)):
                    x, y = _series([e for e in rows if e["set"] == name_of_set], f"eval/{name}")
                    axis.lines.append(Line(f"eval/{name_of_set}/{name}:{label}", f"{label} · {name_of_set}", x, y,
                                           i, DATASET_STYLES[j % len(DATASET_STYLES)]))
            axes.append(axis)
        main = MAIN_METRIC.get(category)
        plots.append(Plot(f"eval_{_file_stem(category)}", "Evaluation", f"Evaluation: {category}",
                          f"Each {category} set's figures at the exports evaluated during training (eval.jsonl), "
                          f"a line per run and set" + (f"; its main score is {main}." if main else "."), axes))
    if any(len({e["set"] for e in rows}) > 1 for rows in set_rows):  # of one set, its main score above
        means = Axis("category mean of the main scores", [])
        average = Axis("average of the category means", [])
        for i, (run, label) in enumerate(zip(runs, labels)):
            steps = category_means_by_step(run)
            for j, category in enumerate(categories):
                points = [(s, m["categories"][category]) for s, m in steps.items() if category in m["categories"]]
                means.lines.append(Line(f"eval_mean/{category}:{label}", f"{label} · {category}",
                                        [s for s, _ in points], [v for _, v in points], i,
                                        DATASET_STYLES[j % len(DATASET_STYLES)]))
            average.lines.append(Line(f"eval_average:{label}", label, list(steps),
                                      [m["average"] for m in steps.values()], i, "o-"))
        plots.append(Plot("eval_average", "Evaluation", "Evaluation: category means and their average",
                          "Top: the mean main score of each category's sets (nDCG@10, Spearman, cosine AP, "
                          "accuracy) at each evaluation. Bottom: the mean of the category means, as the paper's "
                          "Table 4 averages. An evaluation counts once every set of the run has its row.",
                          [means, average]))
    return plots


def category_means_by_step(run: RunLog) -> dict[int, dict]:
    """{step: {"categories": {category: mean main score}, "average": mean of those}} at each step at which
    every evaluation set of the run has a finite main score (embedlib.evaluation.category_means)."""
    rows = [e for e in run.evals if isinstance(e.get("set"), str)]
    sets = set(e["set"] for e in rows)
    by_step: dict[int, list[dict]] = {}
    for e in rows:
        by_step.setdefault(e["step"], []).append(e)
    out = {}
    for step, at in by_step.items():
        if {e["set"] for e in at} == sets and all(_number(e.get("main_score")) and math.isfinite(e["main_score"])
                                                  for e in at):
            out[step] = category_means([{"category": str(e.get("category")), "main_score": e["main_score"]}
                                        for e in at])
    return out


def _noisy_lines(key: str, runs: list[RunLog], labels: list[str]) -> list[Line]:
    """Each run's series, faint, and its trailing moving mean over about 1/20 of the run, which carries
    the legend entry (the raw series alone when the run is too short to smooth)."""
    lines = []
    for i, (run, label) in enumerate(zip(runs, labels)):
        x, y = _series(run.metrics, key)
        window = len(y) // 20
        if window < 2:
            lines.append(Line(f"{key}:{label}", label, x, y, i))
            continue
        lines.append(Line(f"{key}:{label}", "", x, y, i, "-", 0.3))
        sums = [0.0]
        for value in y:
            sums.append(sums[-1] + value)
        mean = [(sums[k + 1] - sums[max(0, k + 1 - window)]) / min(k + 1, window) for k in range(len(y))]
        lines.append(Line(f"{key}_mean:{label}", f"{label} (mean of {window} steps)", x, mean, i))
    return lines


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records holding a finite number under `key`."""
    points = [(r["step"], float(r[key])) for r in records if _number(r.get(key)) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _datasets_with(run: RunLog, prefix: str, figure: str) -> list[str]:
    """Data sets with a key <prefix>/<data set>/<figure> in metrics.jsonl, in order of appearance: those
    with dynamic-negatives checks ("negatives", "stale"), those with scores ("scores", "positive")."""
    pattern = re.compile(rf"{re.escape(prefix)}/(.+)/{re.escape(figure)}")
    found = []
    for m in run.metrics:
        for key in m:
            match = pattern.fullmatch(key)
            if match and match.group(1) not in found:
                found.append(match.group(1))
    return found


def _store_datasets(run: RunLog) -> list[str]:
    """Data sets that read the negative store (the keys of negatives_version)."""
    found = []
    for m in run.metrics:
        for name in m.get("negatives_version") or {}:
            if name not in found:
                found.append(name)
    return found


def _adoptions(run: RunLog) -> list[tuple[int, str, int]]:
    """(step, data set, version) each time a data set's version in use changed, its first one included."""
    found, current = [], {}
    for m in run.metrics:
        for dataset, version in (m.get("negatives_version") or {}).items():
            if version is not None and version != current.get(dataset):
                found.append((m["step"], dataset, version))
            current[dataset] = version
    return found


def _adoption_marks(run: RunLog) -> list[tuple[int, str]]:
    """One mark per step with adoptions: (step, "v3" or "v3,v4" when data sets adopted together)."""
    by_step: dict[int, list[int]] = {}
    for step, _, version in _adoptions(run):
        by_step.setdefault(step, [])
        if version not in by_step[step]:
            by_step[step].append(version)
    return [(step, ",".join(f"v{v}" for v in versions)) for step, versions in by_step.items()]


def _step_at(run: RunLog, timestamp) -> int | None:
    """Steps finished at a refresh's time (UTC, seconds): the step at which it was published; None when
    the run logged no step times."""
    times = [m["time"] for m in run.metrics if _number(m.get("time"))]
    if not isinstance(timestamp, str) or len(times) != len(run.metrics):
        return None
    try:
        moment = calendar.timegm(time.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return None
    done = bisect_right(times, moment)
    return run.metrics[done - 1]["step"] if done else 0


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "metric"


def plottable(run: RunLog) -> tuple[RunLog, int]:
    """The run with what cannot be plotted left out, and how many values that was: steps and numbers a float
    does not hold (a 400-digit integer), NaN and infinities, negatives_version that is not a mapping of data
    set to version."""
    skipped = 0

    def clean(record: dict) -> dict | None:
        nonlocal skipped
        if integer(record.get("step")) is None:
            skipped += 1
            return None
        kept = {}
        for key, value in record.items():
            if key == "negatives_version" and not isinstance(value, dict):
                skipped += value is not None
                continue  # readers take a missing mapping as {}
            if key == "negatives_version":
                value = {name: v for name, v in value.items() if v is None or integer(v) is not None}
                skipped += len(record[key]) - len(value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and number(value) is None:
                skipped += 1
                continue
            kept[key] = value
        return kept

    metrics = [m for m in map(clean, run.metrics) if m is not None]
    evals = [e for e in map(clean, run.evals) if e is not None]
    return RunLog(run.path, run.run, run.config, metrics, evals, run.refreshes), skipped


# ---- drawing ----------------------------------------------------------------------------------------


def draw(plot: Plot):
    """The plot as a matplotlib Figure (no pyplot: no global state, no display needed). Every label is plain
    text: a run or task named `$x$` is not parsed as math."""
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False}):
        return _figure(plot)


def _figure(plot: Plot):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 0.6 + 2.6 * len(plot.axes)), dpi=100, layout="constrained")
    axes = figure.subplots(len(plot.axes), 1, sharex=True, squeeze=False)[:, 0]
    for ax, spec in zip(axes, plot.axes):
        for line in spec.lines:
            (artist,) = ax.plot(line.x, line.y, line.style, color=f"C{line.run % 10}", alpha=line.alpha,
                                label=line.label or "_nolegend_", markersize=4, linewidth=1.4)
            artist.set_gid(line.key)
        for mark in spec.marks:
            artist = ax.axvline(mark.x[0], color=f"C{mark.run % 10}", linestyle=":", linewidth=1.2, alpha=0.8)
            artist.set_gid(mark.key)
            if ax is axes[0]:
                ax.annotate(mark.key.rsplit(":", 1)[-1], xy=(mark.x[0], 1.0), xycoords=("data", "axes fraction"),
                            xytext=(2, -10), textcoords="offset points", fontsize=7, color=f"C{mark.run % 10}")
        ax.set_ylabel(spec.ylabel)
        if spec.log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if any(line.label for line in spec.lines):
            ax.legend(fontsize="small", loc="best")
    axes[-1].set_xlabel(plot.axes[-1].xlabel)
    figure.suptitle(plot.title)
    return figure


def drawn_data(figure) -> dict:
    """What the figure draws, read back from its artists: each axis's lines and marks by key."""
    axes = []
    for ax in figure.axes:
        lines, marks = [], []
        for artist in ax.get_lines():
            key = artist.get_gid()
            if key is None:
                continue
            x = [float(v) for v in artist.get_xdata()]
            if key.startswith("adoption:"):
                marks.append({"key": key, "x": x[0]})
            else:
                label = artist.get_label()
                lines.append({"key": key, "label": "" if label.startswith("_") else label, "x": x,
                              "y": [float(v) for v in artist.get_ydata()]})
        axes.append({"ylabel": ax.get_ylabel(), "lines": lines, "marks": marks})
    width, height = (round(v * figure.dpi) for v in figure.get_size_inches())
    return {"width": width, "height": height, "axes": axes}


# ---- the page ---------------------------------------------------------------------------------------


def run_labels(paths: list[Path]) -> list[str]:
    """Each run's directory name; more of the path where names repeat (runs/a/run, runs/b/run)."""
    resolved = [p.resolve() for p in paths]
    for depth in range(1, max(len(p.parts) for p in resolved) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label} ({i + 1})" for i, label in enumerate(labels)]  # the same directory given twice


def run_summary(run: RunLog, label: str) -> dict:
    recipe, overrides = run.recipe_and_overrides()
    last = run.metrics[-1] if run.metrics else {}
    latest = latest_evals(run.evals)
    latest_eval = latest[-1] if latest else None
    if latest and "set" in latest[0]:  # evaluation sets: each set's main score and the category means
        means = category_means_by_step(run).get(latest[0]["step"], {})
        latest_eval = {"step": latest[0]["step"], "main_scores": {e["set"]: e.get("main_score") for e in latest},
                       **means}
    return {
        "label": label, "path": str(run.path.resolve()), "status": run.status, "step": run.last_step,
        "max_steps": run.max_steps, "loss": last.get("loss"), "recipe": recipe, "overrides": overrides,
        "negatives_version": last.get("negatives_version"), "mining_passes": len(run.refreshes),
        "latest_eval": latest_eval,
    }


def render_page(summaries: list[dict], plots: list[Plot], skipped: int = 0) -> str:
    esc = html.escape
    rows = []
    for s in summaries:
        steps = f"{s['step']}" + (f" of {s['max_steps']}" if s["max_steps"] else "")
        loss = f"{s['loss']:.4f}" if _number(s["loss"]) else "–"
        versions = ", ".join(f"{name} v{v}" if v is not None else f"{name}: none yet"
                             for name, v in (s["negatives_version"] or {}).items()) or "–"
        evaluation = "–"
        if s["latest_eval"] and "main_scores" in s["latest_eval"]:
            figures = ", ".join(f"{name} {value:.4f}" for name, value in s["latest_eval"]["main_scores"].items()
                                if _number(value))
            if _number(s["latest_eval"].get("average")):
                figures += f"; average of the category means {s['latest_eval']['average']:.4f}"
        elif s["latest_eval"]:
            figures = ", ".join(f"{name} {value:.4f}" for name, value in eval_figures(s["latest_eval"]))
        if s["latest_eval"]:
            evaluation = f"step {s['latest_eval']['step']}: {figures}"
        recipe = esc(s["recipe"] or "–") + "".join(f"<br><code>{esc(o)}</code>" for o in s["overrides"])
        rows.append(f"<tr><td><b>{esc(s['label'])}</b><br><small>{esc(s['path'])}</small></td>"
                    f"<td>{esc(s['status'])}</td><td>{esc(steps)}</td><td>{loss}</td><td>{esc(versions)}</td>"
                    f"<td>{s['mining_passes']}</td><td>{esc(evaluation)}</td><td>{recipe}</td></tr>")
    body = [f"<h1>Training report</h1><p>{esc(', '.join(s['label'] for s in summaries))}; written "
            f"{esc(time.strftime('%Y-%m-%d %H:%M:%S %Z'))} by <code>python -m embedlib.report</code>. "
            "Run it again to update a run that is still going.</p>",
            "<table><tr><th>run</th><th>status</th><th>steps</th><th>last loss</th><th>negatives in use</th>"
            "<th>mining passes</th><th>latest evaluation</th><th>recipe and overrides</th></tr>",
            *rows, "</table>"]
    if skipped:
        body.append(f"<p>{skipped} logged value{'s' if skipped > 1 else ''} could not be plotted (not a finite "
                    "number a float holds, or a negatives_version that is not a mapping) and "
                    f"{'were' if skipped > 1 else 'was'} left out.</p>")
    for section in SECTIONS:
        members = [p for p in plots if p.section == section]
        if not members:
            continue
        body.append(f"<h2>{esc(section)}</h2>")
        for p in members:
            body.append(f'<figure id="{esc(p.name)}"><img src="{esc(p.name)}.png" alt="{esc(p.title)}">'
                        f"<figcaption>{esc(p.caption)}</figcaption></figure>")
    if not plots:
        body.append("<p>No step, mining pass or evaluation logged yet.</p>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;font-size:90%}"
             "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}"
             "figure{margin:1.5em 0}img{max-width:100%;height:auto}figcaption{color:#444;font-size:90%}")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Training report: '
            f"{esc(', '.join(s['label'] for s in summaries))}</title><style>{style}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# ---- writing ----------------------------------------------------------------------------------------


def check_runs(paths: list[Path]) -> None:
    for path in paths:
        if not path.exists():
            raise ReportError(f"{path}: no such directory")
        if not path.is_dir():
            raise ReportError(f"{path}: not a directory")
        if not is_run_dir(path):
            raise ReportError(f"{path}: not a run directory (no run.json, metrics.jsonl or mining/refreshes.jsonl)")


def write_report(run_dirs: list[str | os.PathLike], output: str | os.PathLike) -> Path:
    """Write the report of `run_dirs` into `output`; returns the page's path. Raises ReportError."""
    paths, output = [Path(p) for p in run_dirs], Path(output)
    if not paths:
        raise ReportError("give at least one run directory")
    check_runs(paths)
    if output.exists() and not output.is_dir():
        raise ReportError(f"--output {output}: exists and is not a directory")
    try:
        runs, skipped = zip(*(plottable(read_run(p)) for p in paths))
    except RunLogError as e:
        raise ReportError(str(e)) from None
    runs, skipped = list(runs), sum(skipped)
    labels = run_labels(paths)
    plots = build_plots(runs, labels)

    output.mkdir(parents=True, exist_ok=True)
    previous = _previous_files(output)
    figures = []
    for plot in plots:  # the images first, the page that links them last
        figure = draw(plot)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        atomic_write_bytes(output / f"{plot.name}.png", buffer.getvalue())
        figures.append({"name": plot.name, "file": f"{plot.name}.png", "section": plot.section, "title": plot.title,
                        **drawn_data(figure)})
    summaries = [run_summary(run, label) for run, label in zip(runs, labels)]
    atomic_write_json(output / REPORT_JSON, {"runs": summaries, "figures": figures, "skipped_values": skipped})
    page = output / INDEX_HTML
    atomic_write_bytes(page, render_page(summaries, plots, skipped).encode("utf-8"))
    for name in previous - {f["file"] for f in figures}:  # figures the runs no longer have
        (output / name).unlink(missing_ok=True)
    return page


def _previous_files(output: Path) -> set[str]:
    """The figures a report written earlier into `output` listed (only those are ever removed)."""
    try:
        figures = json.loads((output / REPORT_JSON).read_text(encoding="utf-8"))["figures"]
        return {f["file"] for f in figures if re.fullmatch(r"[A-Za-z0-9_]+\.png", f.get("file", ""))}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other error of the command
        raise ReportError(message)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m embedlib.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories, overlaid in every figure")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR",
                        help="directory for index.html, the PNG figures and report.json")
    try:
        args = parser.parse_args(argv)
        page = write_report(args.runs, args.output)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"report: {page.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
