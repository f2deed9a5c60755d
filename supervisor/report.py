"""``vit-supervisor report``: one picture of a whole run, across every attempt.

Reads ``run/metrics.jsonl`` (every logged loss and eval metric, appended by each
attempt, steps a restart redid included) and ``run/state.json`` (the attempts
with their reasons), and writes ``run/report.png`` and ``run/report.html``
(the picture embedded, plus a table of attempts).

The picture: training loss and the eval metric against global step, one colour
per attempt, a vertical marker at each restart labelled with why the previous
attempt ended, and the per-device batch size in force underneath. A continuous
curve with markers is what a healthy supervised run looks like; a gap or a
jump back is lost work, and the table says how much. Below it, one bar splits
the run's supervised wall time into the goodput buckets of
:mod:`supervisor.goodput` (the page lists them in seconds too).

matplotlib is imported here only, so ``status`` stays fast.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor import goodput, protocol, record


@dataclass
class RunData:
    rows: list[dict[str, Any]]
    attempts: list[dict[str, Any]]
    state: dict[str, Any]


def load(output_dir: Path) -> RunData:
    rows: list[dict[str, Any]] = []
    try:
        with open(protocol.metrics_path(output_dir), encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    continue  # a line cut by a kill
                if _plottable(row):
                    rows.append(row)
    except OSError:
        pass
    rec = record.load(output_dir) or record.RunRecord()
    return RunData(rows=rows, attempts=[protocol.record_dict(a) for a in rec.attempts], state=rec.to_dict())


def _plottable(row: Any) -> bool:
    """A metrics row with an integer step and finite numbers (anything else is skipped, not drawn)."""
    if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
        return False
    return all(math.isfinite(v) for v in row.values() if isinstance(v, float))


def summary(data: RunData) -> list[dict[str, Any]]:
    """Per attempt: how it ended and what the restart after it cost."""
    out = []
    atts = data.attempts
    for i, a in enumerate(atts):
        nxt = atts[i + 1] if i + 1 < len(atts) else None
        downtime = None
        redone = None
        if nxt is not None and a.get("end") and (nxt.get("first_step_at") or nxt.get("start")):
            # From this attempt's end to the next one's first new optimizer step (or its start).
            downtime = max(0.0, float(nxt.get("first_step_at") or nxt["start"]) - float(a["end"]))
            if a.get("step_reached") is not None and nxt.get("step_start") is not None:
                redone = max(0, int(a["step_reached"]) - int(nxt["step_start"]))
        out.append({**a, "downtime_s": downtime, "steps_redone": redone})
    return out


def metric_key(rows: list[dict[str, Any]]) -> str | None:
    for key in ("eval_f1", "eval_accuracy", "eval_loss"):
        if any(key in r for r in rows):
            return key
    return None


def render(output_dir: Path) -> tuple[Path, Path]:
    """Write report.png and report.html into ``output_dir/run``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = load(output_dir)
    if not data.rows and not data.attempts:
        raise FileNotFoundError(f"nothing to report in {output_dir}: no run/metrics.jsonl and no run/state.json")
    rows = data.rows
    atts = summary(data)
    fig = plt.figure(figsize=(11, 7.3))
    grid = fig.add_gridspec(3, 1, height_ratios=[4, 1, 0.55])
    ax = fig.add_subplot(grid[0])
    axb = fig.add_subplot(grid[1], sharex=ax)
    ax.tick_params(labelbottom=False)
    time_bar(fig.add_subplot(grid[2]), data.state.get("goodput"))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    attempt_ids = sorted({r.get("attempt", 0) for r in rows} | {a.get("attempt", 0) for a in atts})
    colour_of = {a: colours[i % len(colours)] for i, a in enumerate(attempt_ids)}
    mkey = metric_key(rows)
    ax2 = ax.twinx() if mkey else None
    for a in attempt_ids:
        pts = sorted((r["step"], r["loss"]) for r in rows if r.get("attempt", 0) == a and "loss" in r)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=colour_of[a], lw=1.6, label=f"attempt {a}")
        if ax2 is not None:
            ev = sorted((r["step"], r[mkey]) for r in rows if r.get("attempt", 0) == a and mkey in r)
            if ev:
                ax2.plot([p[0] for p in ev], [p[1] for p in ev], "o", color=colour_of[a], ms=5, mfc="white")
    for prev, a in itertools.pairwise(atts):
        x = a.get("step_start") or 0
        why = prev.get("reason") or "?"
        ax.axvline(x, color="0.35", ls="--", lw=1)
        axb.axvline(x, color="0.35", ls="--", lw=1)
        exit_ = str(prev.get("exit") or "")
        label = (
            f"{why} ({exit_.replace('killed by ', '')})" if exit_.startswith("killed by ") and why != "hang" else why
        )
        if prev.get("downtime_s") is not None:
            label += f", {prev['downtime_s']:.1f}s"
        # Vertical labels along each marker: many restarts close together stay readable.
        ax.annotate(
            label,
            xy=(x, 0.99),
            xycoords=("data", "axes fraction"),
            xytext=(2, 0),
            textcoords="offset points",
            va="top",
            ha="left",
            fontsize=7,
            color="0.25",
            rotation=90,
        )
    ax.set_ylabel("training loss")
    if ax2 is not None:
        ax2.set_ylabel(f"{mkey} (circles)")
    ax.grid(alpha=0.3)
    if len(attempt_ids) <= 12:
        ax.legend(loc="lower left", fontsize=7, ncol=2 if len(attempt_ids) > 6 else 1)
    else:
        ax.set_title("one colour per attempt", fontsize=8, loc="left")
    # Batch size in force, as a step function over the steps each attempt covered.
    for a in atts:
        start = a.get("step_start") or 0
        end = a.get("step_reached")
        if end is None:
            steps = [r["step"] for r in rows if r.get("attempt") == a.get("attempt")]
            end = max(steps) if steps else start
        b = a.get("per_device_train_batch_size")
        if b:
            axb.plot([start, max(end, start)], [b, b], color=colour_of.get(a.get("attempt", 0), "k"), lw=3)
            axb.annotate(
                f"{b}×{a.get('gradient_accumulation_steps')}",
                xy=(start, b),
                xytext=(2, 3),
                textcoords="offset points",
                fontsize=7,
            )
    if not atts:
        for a in attempt_ids:
            pts = [(r["step"], r.get("per_device_train_batch_size")) for r in rows if r.get("attempt", 0) == a]
            if pts:
                axb.plot([p[0] for p in pts], [p[1] for p in pts], color=colour_of[a], lw=3)
    axb.set_ylabel("per-device\nbatch")
    axb.set_xlabel("global step")
    axb.grid(alpha=0.3)
    st = data.state
    lost = sum(a["downtime_s"] or 0 for a in atts)
    redone = sum(a["steps_redone"] or 0 for a in atts)
    title = (
        f"{Path(output_dir).name}: {st.get('state') or 'no supervisor state'}, {len(atts)} attempt(s), "
        f"{max(len(atts) - 1, 0)} restart(s), {lost:.1f}s from death to next step, {redone} step(s) redone"
    )
    buckets = goodput.clean(st.get("goodput"))
    gp = goodput.ratio(buckets)
    if gp is not None:
        title += f", goodput {gp:.3f}"

    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    rd = protocol.run_dir(output_dir)
    rd.mkdir(parents=True, exist_ok=True)
    png = rd / "report.png"
    tmp = rd / ".report.png.tmp"
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(png)
    page = _html(title, png.read_bytes(), atts, buckets)
    protocol.atomic_write_bytes(rd / "report.html", page.encode())
    return png, rd / "report.html"


_BUCKET_COLOURS = (
    "tab:green",
    "tab:orange",
    "tab:blue",
    "tab:purple",
    "tab:cyan",
    "tab:brown",
    "tab:gray",
    "tab:red",
    "tab:olive",
    "tab:pink",
    "black",
)
"""One colour per :data:`supervisor.goodput.BUCKETS` name, in its order."""


def time_bar(ax: Any, raw: Any) -> None:
    """One horizontal bar: the run's supervised wall time by goodput bucket (empty buckets left out)."""
    buckets = goodput.clean(raw if isinstance(raw, dict) else None)
    whole = goodput.total(buckets)
    ax.set_yticks([])
    ax.set_xlabel("supervised wall time, s (goodput = training / total)", fontsize=8)
    if whole <= 0:
        ax.text(0.5, 0.5, "no goodput figures recorded", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        ax.set_xticks([])
        return
    left = 0.0
    for name, colour in zip(goodput.BUCKETS, _BUCKET_COLOURS, strict=True):
        width = buckets[name]
        if width > 0:
            ax.barh(
                0,
                width,
                left=left,
                color=colour,
                label=f"{name} {width:.{0 if width >= 10 else 1}f}s ({100 * width / whole:.1f}%)",
            )
            left += width
    ax.set_xlim(0, whole)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.9), ncol=5, fontsize=7, frameon=False)


def _html(title: str, png: bytes, atts: list[dict[str, Any]], buckets: dict[str, float] | None = None) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            v = f"{v:.1f}"
        return f"<td>{html.escape('' if v is None else str(v))}</td>"

    cols = [
        "attempt",
        "pid",
        "reason",
        "exit",
        "step_start",
        "step_reached",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "downtime_s",
        "steps_redone",
        "message",
    ]
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = "".join("<tr>" + "".join(cell(a.get(c)) for c in cols) + "</tr>" for a in atts)
    img = base64.b64encode(png).decode()
    return (
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}</style>"
        f"<h1>{html.escape(title)}</h1><img alt='run report' src='data:image/png;base64,{img}'>"
        f"<h2>Attempts</h2><table><tr>{head}</tr>{body}</table>"
        f"{_time_table(buckets or {})}"
        f"<p>Written {time.strftime('%Y-%m-%d %H:%M:%S')} by vit-supervisor report.</p>"
    )


def _time_table(buckets: dict[str, float]) -> str:
    """The goodput buckets as an HTML table (seconds and share of the supervised wall time)."""
    whole = goodput.total(buckets)
    if whole <= 0:
        return ""
    rows = "".join(
        f"<tr><td>{name}</td><td>{buckets.get(name, 0.0):.1f}</td>"
        f"<td>{100 * buckets.get(name, 0.0) / whole:.1f}%</td></tr>"
        for name in goodput.BUCKETS
    )
    return (
        "<h2>Where the time went</h2><table><tr><th>bucket</th><th>seconds</th><th>share</th></tr>"
        f"{rows}<tr><th>total</th><th>{whole:.1f}</th><th>goodput {goodput.ratio(buckets) or 0.0:.3f}</th></tr>"
        "</table>"
    )
