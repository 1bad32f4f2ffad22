"""``ddm report ROOT``: one self-contained HTML page of a run (every image embedded).

It reads only what the stages already wrote under the run root (JSON, CSV and PNG files; no torch,
no checkpoints), so it works on a running run, a finished one, a local root or ``s3://``, and a
missing part is a line that says what is missing rather than an error. Sections, in order: the run
(stages with their wall times, the headline figures), the clusters (their sample rows and class
make-up), training (every job's loss curve on one plot, the router's accuracy against t), samples
per evaluated model, the distillation table and its grids, and ``ddm compare``'s table when present.

The page is written atomically to ``ROOT/report.html`` (or ``--out``).
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

from ddm.core import storage

REPORT_FILE = "report.html"
STAGES = ("curate", "partition", "experts", "router", "eval", "distill")

# The figures a table shows, in order, with how each is printed; a key a file lacks is left blank.
EVAL_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("fd", "FD", "{:.2f}"),
    ("kid_mean", "KID", "{:.4f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("class_accuracy", "class accuracy", "{:.3f}"),
    ("denoiser_calls_per_sample", "expert calls / sample", "{:g}"),
    ("seconds_per_image", "ms / sample", "ms"),
    ("num_samples", "samples", "{:d}"),
)
DISTILL_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("model", "model", "{}"),
    ("steps", "steps", "{:d}"),
    ("fd", "FD", "{:.2f}"),
    ("kid", "KID", "{:.4f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("class_accuracy", "class accuracy", "{:.3f}"),
    ("expert_calls_per_sample", "expert calls / sample", "{:g}"),
    ("seconds_per_sample", "ms / sample", "ms"),
)

_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d232a; background: #f5f6f8; }
header { background: #1d2a3a; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; opacity: .8; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 32px 48px; }
section { background: #fff; border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.08); margin: 18px 0; padding: 14px 22px; }
h2 { font-size: 17px; margin: 6px 0 12px; }
h3 { font-size: 14px; margin: 14px 0 6px; color: #44505c; }
table { border-collapse: collapse; margin: 6px 0 10px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e3e6ea; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f2f5; font-weight: 600; }
.state-done, .state-SUCCEEDED { color: #17813b; } .state-failed, .state-FAILED { color: #b3261e; }
.state-running, .state-RUNNING { color: #9a6700; }
.grids { display: flex; flex-wrap: wrap; gap: 18px; }
figure { margin: 0; } figcaption { font-size: 12px; color: #5b6670; margin-top: 4px; }
img { image-rendering: pixelated; border: 1px solid #dde1e5; max-width: 100%; }
img.plot { image-rendering: auto; }
.missing { color: #6b7680; font-style: italic; }
.bar { display: inline-block; height: 10px; background: #4b7bd0; vertical-align: middle; }
"""


# ---------------------------------------------------------------------------------------------------
# reading the run root: every reader returns None for what is not there (yet)
def _json(url: str) -> Any | None:
    try:
        return storage.read_json(url) if storage.exists(url) else None
    except (ValueError, OSError):
        return None


def _bytes(url: str) -> bytes | None:
    try:
        return storage.read_bytes(url) if storage.exists(url) else None
    except OSError:
        return None


def _children(url: str) -> list[str]:
    """Names of the folders directly under ``url``, sorted (none when it does not exist)."""
    return [name for name in storage.listdir(url) if "." not in name]  # files all have a suffix


def _metric_rows(url: str) -> list[dict[str, float]]:
    from ddm.core.metrics_log import read_rows

    try:
        return read_rows(url) if storage.exists(url) else []
    except (ValueError, OSError, KeyError):
        return []


# ---------------------------------------------------------------------------------------------------
# pieces of HTML
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(png: bytes, alt: str, cls: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    klass = f' class="{cls}"' if cls else ""
    return f'<img{klass} alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _figure(png: bytes | None, caption: str, cls: str = "") -> str:
    if png is None:
        return f'<p class="missing">{_e(caption)}: not written yet</p>'
    return f"<figure>{_img(png, caption, cls)}<figcaption>{_e(caption)}</figcaption></figure>"


def _fmt(value: Any, how: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    try:
        if how == "ms":
            return f"{1000 * float(value):.2f}"
        if how == "{:d}":
            return str(int(value))
        return how.format(value)
    except (TypeError, ValueError):
        return _e(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _missing(text: str) -> str:
    return f'<p class="missing">{_e(text)}</p>'


# ---------------------------------------------------------------------------------------------------
# plots (matplotlib's Agg canvas, no pyplot state), returned as PNG bytes
def _plot(draw: Any, *, xlabel: str, ylabel: str, title: str, log_y: bool = False) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    draw(ax)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def loss_plot(curves: dict[str, list[dict[str, float]]]) -> bytes | None:
    """Every job's loss against step on one log-scale plot (the router's cross-entropy included)."""
    curves = {name: rows for name, rows in curves.items() if rows}
    if not curves:
        return None
    positive = all(r["loss"] > 0 and math.isfinite(r["loss"]) for rows in curves.values() for r in rows)

    def draw(ax: Any) -> None:
        for name, rows in curves.items():
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2, label=name)

    return _plot(draw, xlabel="step", ylabel="training loss", title="loss curves", log_y=positive)


def accuracy_plot(report: dict[str, Any]) -> bytes | None:
    """The router's accuracy against t (with and without the label), beside the two baselines a
    router must beat: the largest partition, and the best guess from the class label alone."""
    try:
        ts = [float(t) for t in report["t_mid"]]
        curves = {
            key: [float(a) for a in report[key]] for key in ("conditional", "unconditional") if key in report
        }
    except (KeyError, TypeError, ValueError):
        return None
    if not ts or not curves:
        return None

    def draw(ax: Any) -> None:
        for key, acc in curves.items():
            ax.plot(ts, acc, marker="o", lw=1.4, label=f"router, {key}")
        for key, label, style in (
            ("prior_accuracy", "largest partition", "--"),
            ("class_prior_accuracy", "from the label alone", ":"),
        ):
            if isinstance(report.get(key), (int, float)):
                ax.axhline(float(report[key]), ls=style, color="grey", label=label)
        ax.set_ylim(0, 1.02)

    return _plot(draw, xlabel="t (0 = data, 1 = noise)", ylabel="accuracy", title="router accuracy against t")


# ---------------------------------------------------------------------------------------------------
# sections
def _stages_section(manifest: dict[str, Any] | None) -> str:
    if manifest is None:
        return f"<section><h2>Stages</h2>{_missing('no manifest.json: the run has not started')}</section>"
    stages = manifest.get("stages", {})
    rows, total = [], 0.0
    for name in STAGES:
        st = stages.get(name, {})
        state = st.get("state", "pending")
        seconds = st.get("seconds")
        if isinstance(seconds, (int, float)):
            total += seconds
        note = st.get("skipped") or st.get("error") or ""
        rows.append((_e(name), f'<span class="state-{_e(state)}">{_e(state)}</span>',
                     _fmt(seconds, "{:.0f}"), _e(str(note)[:200])))  # fmt: skip
    rows.append(("<b>total</b>", "", f"<b>{total:.0f}</b>", ""))
    jobs = manifest.get("jobs", {})
    job_rows = [
        (_e(name), f'<span class="state-{_e(j.get("state"))}">{_e(j.get("state"))}</span>', _e(j.get("island", "")),
         str(len(j.get("attempts", [])) or ""))
        for name, j in sorted(jobs.items())
    ]  # fmt: skip
    parts = ["<section><h2>Stages</h2>", _table(("stage", "state", "seconds", "note"), rows)]
    if job_rows:
        parts += ["<h3>Jobs</h3>", _table(("job", "state", "island", "attempts"), job_rows)]
    return "".join(parts) + "</section>"


def _headline_section(root: str, models: list[str]) -> str:
    rows = []
    for name in models:
        m = _json(storage.join(root, "eval", name, "metrics.json"))
        if m is None:
            continue
        rows.append([_e(name)] + [_fmt(m.get(key), how) for key, _, how in EVAL_COLUMNS])
    if not rows:
        return f"<section><h2>Headline figures</h2>{_missing('no evaluation yet (the eval stage writes eval/NAME/metrics.json)')}</section>"
    header = ["model"] + [label for _, label, _ in EVAL_COLUMNS]
    return f"<section><h2>Headline figures</h2>{_table(header, rows)}</section>"


def _clusters_section(root: str) -> str:
    report = _json(storage.join(root, "clusters", "report.json"))
    grid = _bytes(storage.join(root, "clusters", "samples.png"))
    if report is None and grid is None:
        return f"<section><h2>Clusters</h2>{_missing('not partitioned yet')}</section>"
    parts = ["<section><h2>Clusters</h2>"]
    if grid is not None:
        parts.append(_figure(grid, "a random row of images from each cluster (one row per expert)"))
    sizes = (report or {}).get("sizes") or []
    counts = (report or {}).get("class_counts") or []
    names = [str(n) for n in (report or {}).get("class_names") or []]
    if sizes:
        biggest = max(sizes) or 1
        rows = []
        for k, size in enumerate(sizes):
            per_class = counts[k] if k < len(counts) else []
            top = sorted(((c, i) for i, c in enumerate(per_class) if c), reverse=True)[:4]
            makeup = ", ".join(
                f"{_e(names[i] if i < len(names) else i)} {100 * c / max(1, size):.0f}%" for c, i in top
            )
            bar = f'<span class="bar" style="width:{int(160 * size / biggest)}px"></span>'
            rows.append((f"expert-{k}", str(size), bar, makeup))
        parts.append("<h3>Sizes and class make-up (largest classes)</h3>")
        parts.append(_table(("cluster", "images", "", "classes"), rows))
    return "".join(parts) + "</section>"


def _training_section(root: str, experts: list[str]) -> str:
    curves = {name: _metric_rows(storage.join(root, "experts", name, "metrics.csv")) for name in experts}
    curves["router"] = _metric_rows(storage.join(root, "router", "metrics.csv"))
    curves["student"] = _metric_rows(storage.join(root, "distill", "metrics.csv"))
    parts = ['<section><h2>Training</h2><div class="grids">']
    parts.append(
        _figure(loss_plot(curves), "loss against step, every job (the router's is a cross-entropy)", "plot")
    )
    acc = _json(storage.join(root, "router", "accuracy_vs_t.json"))
    acc_png = accuracy_plot(acc) if acc is not None else None
    if acc_png is not None:
        parts.append(
            _figure(acc_png, "router accuracy against t: high near the data, falling towards noise", "plot")
        )
    else:
        parts.append(_missing("router accuracy against t: not written (no router, or not trained yet)"))
    rows = []
    for name, points in curves.items():
        if points:
            last = points[-1]
            rows.append((_e(name), str(last["step"]), f"{last['loss']:.4f}", _fmt(last.get("images_per_s"), "{:.0f}"),
                         _fmt(last.get("elapsed_s"), "{:.0f}")))  # fmt: skip
    parts.append("</div>")
    if rows:
        parts.append(_table(("job", "step", "last loss", "images / s", "seconds"), rows))
    return "".join(parts) + "</section>"


def _samples_section(root: str, models: list[str]) -> str:
    figures = [_figure(_bytes(storage.join(root, "eval", m, "samples.png")), m) for m in models]
    if not figures:
        return f"<section><h2>Samples</h2>{_missing('no evaluated model yet')}</section>"
    return f'<section><h2>Samples</h2><div class="grids">{"".join(figures)}</div></section>'


def _distill_section(root: str) -> str:
    table = _json(storage.join(root, "distill", "eval", "table.json"))
    if table is None:
        return f"<section><h2>Distillation</h2>{_missing('no distillation table yet')}</section>"
    rows = [[_fmt(r.get(key), how) for key, _, how in DISTILL_COLUMNS] for r in table.get("rows", [])]
    parts = ["<section><h2>Distillation</h2>", _table([label for _, label, _ in DISTILL_COLUMNS], rows)]
    ratios = {k: v for k, v in table.items() if k.endswith("_ratio") or "_ratio_" in k}
    if ratios:
        parts.append(
            _table(("ratio", "value"), [(_e(k), _fmt(v, "{:.3f}") or "n/a") for k, v in ratios.items()])
        )
    grids = []
    for r in table.get("rows", []):
        kind, steps = (
            r.get("kind") or ("ensemble" if "ensemble" in str(r.get("model")) else "student"),
            r.get("steps"),
        )
        png = _bytes(storage.join(root, "distill", "eval", f"{kind}-{steps}", "samples.png"))
        if png is not None:
            grids.append(_figure(png, f"{r.get('model')}, {steps} steps"))
    if grids:
        parts.append(f'<div class="grids">{"".join(grids)}</div>')
    return "".join(parts) + "</section>"


def _compare_section(root: str) -> str:
    results = _json(storage.join(root, "compare", "results.json"))
    if results is None:
        return ""  # `ddm compare` is optional: no section until it has run
    rows = [
        [_e(r.get("model"))] + [_fmt(r.get(key), how) for key, _, how in EVAL_COLUMNS]
        for r in results.get("results", [])
    ]
    parts = ["<section><h2>Compute-matched comparison (ddm compare)</h2>",
             _table(["model"] + [label for _, label, _ in EVAL_COLUMNS], rows)]  # fmt: skip
    training = results.get("training") or {}
    if training:
        trows = [
            (_e(name), _fmt(t.get("images"), "{:d}"), _fmt(t.get("flops"), "{:.3g}"))
            for name, t in training.items()
        ]
        parts.append(_table(("trained", "images", "FLOPs"), trows))
    parts.append(
        _figure(
            _bytes(storage.join(root, "compare", "grid.png")), "the same noise and labels through each model"
        )
    )
    return "".join(parts) + "</section>"


# ---------------------------------------------------------------------------------------------------
def build_report(root: str) -> str:
    """The report page of the run at ``root`` as one HTML string (images inline as data: URIs)."""
    manifest = _json(storage.join(root, "manifest.json"))
    config = (manifest or {}).get("config") or {}
    name = config.get("name") or root.rstrip("/").rsplit("/", 1)[-1]
    experts = _children(storage.join(root, "experts"))
    models = _children(storage.join(root, "eval"))
    data = config.get("data") or {}
    summary = ", ".join(
        str(s) for s in (
            f"{len(experts)} expert(s)" if experts else None,
            f"data {data.get('source')}" if data.get("source") else None,
            f"mode {config.get('mode')}" if config.get("mode") else None,
        ) if s
    )  # fmt: skip
    body = "".join(
        (
            _stages_section(manifest),
            _headline_section(root, models),
            _clusters_section(root),
            _training_section(root, experts),
            _samples_section(root, models),
            _distill_section(root),
            _compare_section(root),
        )
    )
    made = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>ddm run {_e(name)}</title><style>{_STYLE}</style></head><body>"
        f"<header><h1>ddm run {_e(name)}</h1><p>{_e(root)} · {_e(summary)} · report made {made}</p></header>"
        f"<main>{body}</main></body></html>\n"
    )


def write_report(root: str, out: str | None = None) -> str:
    """Write the report (atomically) to ``out`` or ``ROOT/report.html``; returns where."""
    url = out or storage.join(root, REPORT_FILE)
    storage.write_bytes(url, build_report(root).encode("utf-8"))
    return url


def add_arguments(parser: Any) -> None:
    parser.add_argument("root", help="run root (local path or s3://bucket/prefix), running or finished")
    parser.add_argument(
        "--out", metavar="PATH", help=f"where to write the page (default: ROOT/{REPORT_FILE})"
    )


def run(args: Any) -> int:
    import sys

    if not storage.exists(storage.join(args.root, "manifest.json")):
        print(f"ddm report: {args.root} is not a run root (no manifest.json); pass the --root of a `ddm run`",
              file=sys.stderr)  # fmt: skip
        return 2
    url = write_report(args.root, args.out)
    print(url)
    return 0
