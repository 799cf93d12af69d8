"""`report --format html`: one self-contained page of a run's figures and charts.

The page must open anywhere: from an e-mail attachment, an artifact store, a
laptop offline. So it is one file with no script, no font, no image and no
stylesheet to fetch: the charts are inline SVG drawn here, the style is inline,
and a Content-Security-Policy forbids any load at all. Every value is escaped
with `html.escape`; object names, raw rows and model error bodies are untrusted.

Charts: the score distribution and the share predicted fraud, invalid rows and
failures by reason, throughput and concurrency over the run (from the progress
samples of the run's summary: "not recorded" for runs from before them), the
stages' busy and wait times, and the trend of the last runs. Each chart is a
`<figure class="chart" data-chart="...">`, its data marks carry class "mark"
(the browser test counts them).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from datetime import datetime
from html import escape
from typing import Any

WIDTH, HEIGHT = 880, 220
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 14, 44
LABEL_CHARS = 62  # bar labels longer than this are cut (the full text is in the tooltip)

BLUE, RED, GREY, AMBER, GREEN = "#3b6fb6", "#c8413b", "#9aa3ad", "#d99a1e", "#3e9a52"
STATUS_COLOURS = {
    "completed": GREEN,
    "completed_with_errors": AMBER,
    "failed": RED,
    "interrupted": GREY,
    "processing": BLUE,
}

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
 color:#1d232a;margin:0;background:#f4f6f8}
main{max-width:920px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.sub{color:#5b6570;word-break:break-all}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;color:#fff;font-size:12px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(140px,1fr));gap:10px;margin:16px 0}
.card{background:#fff;border-radius:8px;padding:10px 12px;box-shadow:0 1px 2px #0002}
.card b{display:block;font-size:20px}.card span{color:#5b6570;font-size:12px}
figure{background:#fff;border-radius:8px;padding:12px;margin:0 0 14px;box-shadow:0 1px 2px #0002}
figcaption{font-weight:600;margin-bottom:6px}figcaption small{font-weight:400;color:#5b6570}
svg text{font-size:11px;fill:#39424c}.axis{stroke:#c3c9cf}.grid{stroke:#eceff2}
.empty{color:#5b6570;font-style:italic;margin:8px 0}
table{border-collapse:collapse;background:#fff;width:100%;font-size:13px;margin-bottom:10px}
th{white-space:nowrap}
th,td{border-bottom:1px solid #e3e7eb;padding:4px 8px;text-align:left;vertical-align:top;
 word-break:break-word}
td.n,th.n{text-align:right}code{white-space:pre-wrap;word-break:break-all}
.legend i{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px;border-radius:2px}
"""

CSP = "default-src 'none'; style-src 'unsafe-inline'"

# The counts of a run or an object, in the order every report shows them.
ROW_COUNTS = ("rows_read", "rows_valid", "rows_invalid", "rows_scored", "rows_failed")


# -- formatting ------------------------------------------------------------------


def _e(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        value = value.isoformat(timespec="seconds")
    return escape(str(value), quote=True)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if float(value).is_integer():
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.2f}%"


def _nice_max(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above value: round axis ends."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for m in (1, 2, 2.5, 5, 10):
        if m * power >= value:
            return float(m * power)
    return float(10 * power)


# -- SVG building blocks -----------------------------------------------------------


def _svg(body: list[str], label: str, height: int = HEIGHT) -> str:
    return (
        f'<svg role="img" aria-label="{_e(label)}" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}">' + "".join(body) + "</svg>"
    )


def _y_axis(top: float, height: int, fmt: Callable[[float], str] = _num) -> list[str]:
    """Horizontal grid lines and their labels from 0 to top."""
    bottom = height - BOTTOM
    out = []
    for i in range(5):
        value = top * i / 4
        y = bottom - (bottom - TOP) * i / 4
        out.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
        )
        out.append(
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_e(fmt(value))}</text>'
        )
    out.append(f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{bottom}" y2="{bottom}"/>')
    return out


def _rect(x: float, y: float, w: float, h: float, colour: str, tip: str, extra: str = "") -> str:
    return (
        f'<rect class="mark" x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" '
        f'height="{max(h, 0):.1f}" fill="{colour}"{extra}><title>{_e(tip)}</title></rect>'
    )


def _columns(
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[float]]],
    colours: Sequence[str] | Callable[[int, int], str],
    *,
    stacked: bool,
    fmt: Callable[[float], str] = _num,
    every: int = 1,
    outline: int | None = None,
) -> list[str]:
    """Vertical bars, one slot per label; series stacked or side by side."""
    n = max(len(labels), 1)
    totals = [
        sum(s[1][i] for s in series) if stacked else max(s[1][i] for s in series)
        for i in range(len(labels))
    ]
    top = _nice_max(max(totals, default=0))
    bottom = HEIGHT - BOTTOM
    scale = (bottom - TOP) / top
    slot = (WIDTH - LEFT - RIGHT) / n
    out = _y_axis(top, HEIGHT, fmt)
    for i, label in enumerate(labels):
        x0 = LEFT + i * slot + slot * 0.1
        width = slot * 0.8
        base = float(bottom)
        for k, (name, values) in enumerate(series):
            value = values[i]
            colour = colours(i, k) if callable(colours) else colours[k]
            h = value * scale
            if stacked:
                x, w, y = x0, width, base - h
                base -= h
            else:
                w = width / len(series)
                x, y = x0 + k * w, bottom - h
            if value > 0:
                extra = ' stroke="#1d232a" stroke-width="1.5"' if outline == i else ""
                out.append(_rect(x, y, w, h, colour, f"{label}: {name} {fmt(value)}", extra))
        if i % every == 0:
            out.append(
                f'<text x="{LEFT + (i + 0.5) * slot:.1f}" y="{bottom + 14}" '
                f'text-anchor="middle">{_e(label)}</text>'
            )
    return out


def _hbars(
    items: Sequence[tuple[str, float, str]], fmt: Callable[[float], str] = _num
) -> tuple[list[str], int]:
    """Horizontal bars, label on the left: (label, value, colour) each."""
    row, label_width = 22, 400
    height = TOP + row * len(items) + 8
    top = _nice_max(max((v for _, v, _ in items), default=0))
    span = WIDTH - RIGHT - label_width - 70
    out = []
    for i, (label, value, colour) in enumerate(items):
        y = TOP + i * row
        w = span * value / top
        out.append(
            f'<text x="{label_width - 8}" y="{y + 14}" text-anchor="end">'
            f"<title>{_e(label)}</title>{_e(_clip(label, LABEL_CHARS))}</text>"
        )
        if value > 0:
            out.append(
                _rect(label_width, y + 3, max(w, 1.5), row - 8, colour, f"{label}: {fmt(value)}")
            )
        out.append(
            f'<text x="{label_width + max(w, 1.5) + 6:.1f}" y="{y + 14}">{_e(fmt(value))}</text>'
        )
    out.append(
        f'<line class="axis" x1="{label_width}" x2="{label_width}" y1="{TOP - 4}" y2="{height - 6}"/>'
    )
    return out, height


def _lines(
    series: Sequence[tuple[str, str, Sequence[tuple[float, float]]]], x_name: str
) -> list[str]:
    """Lines over one x range, (name, colour, points) each, the area under each
    shaded (so a flat line still has a size)."""
    every = [p for _, _, points in series for p in points]
    x_max = max((x for x, _ in every), default=0) or 1.0
    top = _nice_max(max((y for _, y in every), default=0))
    bottom = HEIGHT - BOTTOM
    span_x, span_y = WIDTH - LEFT - RIGHT, bottom - TOP

    def at(x: float, y: float) -> str:
        return f"{LEFT + span_x * x / x_max:.1f},{bottom - span_y * y / top:.1f}"

    out = _y_axis(top, HEIGHT)
    for name, colour, points in series:
        line = " L".join(at(x, y) for x, y in points)
        area = f"M{at(points[0][0], 0)} L{line} L{at(points[-1][0], 0)} Z"
        out.append(
            f'<path class="mark" d="{area}" fill="{colour}" fill-opacity="0.15" stroke="none">'
            f"<title>{_e(name)}</title></path>"
        )
        out.append(
            f'<path class="mark" d="M{line}" fill="none" stroke="{colour}" stroke-width="2">'
            f"<title>{_e(name)}</title></path>"
        )
    for i in range(5):
        x = x_max * i / 4
        out.append(
            f'<text x="{LEFT + span_x * i / 4:.1f}" y="{bottom + 14}" text-anchor="middle">'
            f"{_e(_num(round(x, 1)))}</text>"
        )
    out.append(f'<text x="{WIDTH - RIGHT}" y="{bottom + 32}" text-anchor="end">{_e(x_name)}</text>')
    return out


def _figure(key: str, caption: str, body: str, note: str = "") -> str:
    small = f" <small>{_e(note)}</small>" if note else ""
    return (
        f'<figure class="chart" data-chart="{_e(key)}"><figcaption>{_e(caption)}{small}'
        f"</figcaption>{body}</figure>"
    )


def _empty(key: str, caption: str, why: str) -> str:
    return (
        f'<figure class="chart empty-chart" data-chart="{_e(key)}"><figcaption>{_e(caption)}'
        f'</figcaption><p class="empty">{_e(why)}</p></figure>'
    )


def _legend(entries: Sequence[tuple[str, str]]) -> str:
    return (
        '<div class="legend">'
        + "".join(f'<i style="background:{c}"></i>{_e(name)}' for name, c in entries)
        + "</div>"
    )


# -- the charts ----------------------------------------------------------------------


def _scores_chart(scores: dict[str, Any] | None) -> str:
    caption = "Score distribution"
    if not scores or not scores["predictions"]:
        return _empty("scores", caption, "no prediction written by this run")
    width = scores["bucket_width"]
    buckets, fraud = scores["buckets"], scores["fraud_by_bucket"]
    legit = [b - f for b, f in zip(buckets, fraud, strict=True)]
    labels = [f"{i * width:.2f}" for i in range(len(buckets))]
    body = _columns(
        labels,
        [("predicted legitimate", legit), ("predicted fraud", fraud)],
        [BLUE, RED],
        stacked=True,
        every=max(len(labels) // 10, 1),
    )
    note = f"{_num(scores['predictions'])} predictions, bins of {width:g} (lower bound shown)"
    return _figure(
        "scores",
        caption,
        _svg(body, caption) + _legend([("predicted legitimate", BLUE), ("predicted fraud", RED)]),
        note,
    )


def _fraud_share_chart(scores: dict[str, Any] | None) -> str:
    caption = "Share predicted fraud"
    if not scores or not scores["predictions"]:
        return _empty("fraud-share", caption, "no prediction written by this run")
    share = scores["fraud_share"] or 0.0
    span = WIDTH - LEFT - RIGHT
    fraud_w = span * share
    body = [
        _rect(LEFT, 10, span - fraud_w, 28, BLUE, f"predicted legitimate: {_pct(1 - share)}"),
        _rect(LEFT + span - fraud_w, 10, fraud_w, 28, RED, f"predicted fraud: {_pct(share)}"),
        f'<text x="{LEFT}" y="56">predicted fraud: {_e(_pct(share))} '
        f"({_e(_num(scores['predicted_fraud']))} of {_e(_num(scores['predictions']))})</text>",
    ]
    return _figure("fraud-share", caption, _svg([b for b in body if b], caption, 64))


def _reasons_chart(key: str, caption: str, items: list[tuple[str, float]], none: str) -> str:
    if not items:
        return _empty(key, caption, none)
    body, height = _hbars(
        [(label, value, RED if key == "failures" else AMBER) for label, value in items]
    )
    return _figure(key, caption, _svg(body, caption, height))


def _samples(progress: dict[str, Any] | None) -> list[dict[str, float]]:
    if not progress or not progress.get("points"):
        return []
    columns = progress.get("columns") or []
    return [dict(zip(columns, p, strict=False)) for p in progress["points"]]


def _throughput_chart(progress: dict[str, Any] | None) -> str:
    caption = "Throughput over the run"
    samples = _samples(progress)
    if len(samples) < 3:
        return _empty("throughput", caption, "not recorded for this run")

    def rate(column: str) -> list[tuple[float, float]]:
        """Rows per second between two samples, drawn as steps over each interval."""
        points = []
        for a, b in itertools.pairwise(samples):
            dt = b["elapsed_s"] - a["elapsed_s"]
            if dt > 0:
                value = max(b[column] - a[column], 0) / dt
                points += [(a["elapsed_s"], value), (b["elapsed_s"], value)]
        return points

    series = [("rows read", GREY, rate("rows_read")), ("rows written", BLUE, rate("rows_written"))]
    body = _lines(series, "seconds since the start")
    legend = _legend([("rows read per second", GREY), ("rows written per second", BLUE)])
    note = "written: committed to the database, flush by flush"
    return _figure("throughput", caption, _svg(body, caption) + legend, note)


def _concurrency_chart(progress: dict[str, Any] | None) -> str:
    caption = "Concurrency over the run"
    samples = _samples(progress)
    if len(samples) < 2:
        return _empty("concurrency", caption, "not recorded for this run")
    points = [(s["elapsed_s"], float(s["concurrency"])) for s in samples]
    body = _lines([("requests allowed in flight", GREEN, points)], "seconds since the start")
    return _figure("concurrency", caption, _svg(body, caption), "requests allowed in flight")


def _stages_chart(stages: dict[str, Any] | None) -> str:
    caption = "Stage busy and wait times"
    if not stages:
        return _empty("stages", caption, "not recorded for this run")
    workers = max(int(stages.get("workers") or 1), 1)
    items = [
        ("read (parse CSV): busy", stages.get("read", 0.0), BLUE),
        ("validate: busy", stages.get("validate", 0.0), BLUE),
        (f"score: busy, per worker ({workers} workers)", stages.get("score", 0.0) / workers, BLUE),
        ("write (flushes): busy", stages.get("write", 0.0), BLUE),
        ("reader waited on a full queue", stages.get("reader_waited", 0.0), GREY),
        ("writer waited on scoring", stages.get("writer_waited_on_score", 0.0), GREY),
        ("writer waited on reading", stages.get("writer_waited_on_read", 0.0), GREY),
    ]
    body, height = _hbars([(n, float(v or 0), c) for n, v, c in items], lambda v: f"{v:.2f}s")
    note = (
        f"wall {float(stages.get('wall') or 0):.1f}s; limited by {stages.get('limited_by') or '?'}"
    )
    legend = _legend([("busy", BLUE), ("waiting", GREY)])
    return _figure("stages", caption, _svg(body, caption, height) + legend, note)


def _trend_charts(runs: list[dict[str, Any]], run_id: str) -> list[str]:
    if not runs:
        return [_empty("trend-throughput", "Throughput, last runs", "no run recorded")]
    labels = [str(r["run_id"])[-6:] for r in runs]
    current = next((i for i, r in enumerate(runs) if r["run_id"] == run_id), None)
    every = max(len(runs) // 10, 1)
    throughput = _columns(
        labels,
        [("rows/s", [float(r["rows_per_second"]) for r in runs])],
        lambda i, _k: STATUS_COLOURS.get(runs[i]["status"], GREY),
        stacked=False,
        every=every,
        outline=current,
    )
    legend = _legend([(s, c) for s, c in STATUS_COLOURS.items()])
    note = f"the last {len(runs)} runs, oldest first; this run outlined; labels: the run id's end"

    def share(part: str, r: dict[str, Any]) -> float:
        return r[part] / r["rows_read"] if r["rows_read"] else 0.0

    def pct(v: float) -> str:
        return f"{100 * v:.1f}%"

    rates = _columns(
        labels,
        [
            ("invalid rows", [share("rows_invalid", r) for r in runs]),
            ("failed transactions", [share("rows_failed", r) for r in runs]),
            ("predicted fraud", [float(r["fraud_share"] or 0.0) for r in runs]),
        ],
        [AMBER, RED, BLUE],
        stacked=False,
        fmt=pct,
        every=every,
        outline=current,
    )
    rates_legend = _legend(
        [("invalid rows", AMBER), ("failed transactions", RED), ("predicted fraud", BLUE)]
    )
    charts = [
        _figure(
            "trend-throughput",
            "Throughput, last runs (rows/s)",
            _svg(throughput, "trend") + legend,
            note,
        )
    ]
    if any(v for r in runs for v in (r["rows_invalid"], r["rows_failed"], r["fraud_share"])):
        charts.append(
            _figure(
                "trend-rates",
                "Invalid, failed and predicted fraud, last runs (share of rows read)",
                _svg(rates, "trend rates") + rates_legend,
                note,
            )
        )
    else:
        charts.append(
            _empty("trend-rates", "Invalid, failed and predicted fraud, last runs", "all zero")
        )
    return charts


# -- tables ----------------------------------------------------------------------------


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: set[int], none: str
) -> str:
    if not rows:
        return f'<p class="empty">{_e(none)}</p>'
    head = "".join(
        f"<th{' class=n' if i in numeric else ''}>{_e(h)}</th>" for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=n' if i in numeric else ''}>{cell}</td>" for i, cell in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _card(value: str, label: str) -> str:
    return f'<div class="card"><b>{_e(value)}</b><span>{_e(label)}</span></div>'


def render_html(report: dict[str, Any]) -> str:
    run = report["run"]
    scores = report.get("scores")
    status = str(run["status"])
    colour = STATUS_COLOURS.get(status, GREY)
    cards = [
        _card(_num(run["rows_read"]), "rows read"),
        _card(_num(run["rows_valid"]), "valid"),
        _card(_num(run["rows_invalid"]), "invalid"),
        _card(_num(run["rows_scored"]), "scored"),
        _card(_num(run["rows_failed"]), "failed"),
        _card(_pct(scores["fraud_share"]) if scores else "-", "predicted fraud"),
        _card(_num(run["rows_per_second"]), "rows/s"),
        _card(f"{run['duration_seconds']:.1f}s", "duration"),
        _card(f"{run['objects_done']}/{run['objects_total']}", "objects done"),
    ]
    invalid = [
        (f"{g['column_name']}: {g['reason']}", float(g["rows"])) for g in report["invalid_reasons"]
    ]
    failures = [(str(f["reason"]), float(f["transactions"])) for f in report["failures"]]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Run {_e(run['run_id'])}</title><style>{STYLE}</style></head><body><main>",
        f'<h1>Run {_e(run["run_id"])} <span class="badge" style="background:{colour}">{_e(status)}</span></h1>',
        f'<div class="sub">source {_e(run["source_uri"])} · started {_e(run["started_at"])} · '
        f"finished {_e(run['finished_at']) or '(still running)'}"
        + (f" · model {_e(run['model_version'])}" if run.get("model_version") else "")
        + "</div>",
    ]
    if run.get("error"):
        parts.append(f'<p class="sub">error: {_e(run["error"])}</p>')
    parts += ['<div class="cards">', *cards, "</div>"]
    parts += ["<h2>Scores</h2>", _scores_chart(scores), _fraud_share_chart(scores)]
    parts += [
        "<h2>Invalid rows and failures</h2>",
        _reasons_chart("invalid", "Invalid rows by reason", invalid, "no invalid row"),
        _reasons_chart("failures", "Failures by reason", failures, "no transaction failed"),
    ]
    parts += [
        "<h2>Over the run</h2>",
        _throughput_chart(report.get("progress")),
        _concurrency_chart(report.get("progress")),
        _stages_chart(report.get("stage_times")),
    ]
    parts += ["<h2>Trend</h2>", *_trend_charts(report.get("trend") or [], run["run_id"])]
    parts += [
        "<h2>Objects</h2>",
        _table(
            ["object", "version", "status", "read", "valid", "invalid", "scored", "failed"],
            [
                [_e(o["source_uri"]), _e(o["source_version"]), _e(o["status"])]
                + [_e(_num(o[k])) for k in ROW_COUNTS]
                for o in report["objects"]
            ],
            {3, 4, 5, 6, 7},
            "no object processed",
        ),
        "<h2>Invalid rows by reason</h2>",
        _table(
            ["column", "reason", "rows", "examples"],
            [
                [
                    _e(g["column_name"]),
                    _e(g["reason"]),
                    _e(_num(g["rows"])),
                    "<br>".join(
                        f"{_e(e['source_uri'])}:{_e(e['line_number'])} "
                        f"<code>{_e(_clip(str(e['raw_text']), 200))}</code>"
                        for e in g["examples"]
                    ),
                ]
                for g in report["invalid_reasons"]
            ],
            {2},
            "no invalid row",
        ),
        "<h2>Failures by reason</h2>",
        _table(
            ["reason", "HTTP status", "transactions", "resolved since", "examples"],
            [
                [
                    _e(f["reason"]),
                    _e(f["http_status"]),
                    _e(_num(f["transactions"])),
                    _e(_num(f["resolved_since"])),
                    _e(", ".join(f["examples"])),
                ]
                for f in report["failures"]
            ],
            {2, 3},
            "no transaction failed",
        ),
        "<h2>Timings</h2>",
        _table(
            ["measure", "value"],
            [[_e(k), _e(v)] for k, v in report["timings"].items()],
            {1},
            "not recorded",
        ),
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"
