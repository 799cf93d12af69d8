"""`report`: every format keeps hostile input inert, and the HTML report draws its
charts in a real browser (headless Chromium) with nothing fetched from the network."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from markdown_it import MarkdownIt

from library.jobs.report_html import render_html
from library.jobs.reports import render_csv, render_markdown
from library.observability.progress import ProgressSamples
from tests.conftest import Bucket, Database, run_cli
from tests.helpers.data import row, rows, to_csv
from tests.helpers.fake_model import FakeModel

IMG = "<img src=x onerror=alert(1)>"
SCRIPT = "<script>alert(1)</script>"
HOSTILE = [
    IMG,
    SCRIPT,
    "a|b||c",
    "line\rbreak",
    "line\nbreak\r\nagain",
    "`leading backtick",
    "``double`` and ```triple``` runs",
    "trailing backslash\\",
    "*emph* _under_ [link](javascript:alert(1)) ![i](x) ~~s~~ &amp; &#60;b&#62;",
    "<https://evil.example/>",
    '=HYPERLINK("http://evil")',
    "x" * 300,
]


def hostile_report() -> dict[str, Any]:
    """A report as `run_report` returns it, with a hostile value in every text field."""
    when = datetime(2026, 12, 4, 7, 0, tzinfo=UTC)
    run = {
        "run_id": f"batch_{IMG}",
        "status": "completed_with_errors",
        "source_uri": f"s3://b/{SCRIPT}\r\n| x |",
        "started_at": when,
        "finished_at": when,
        "duration_seconds": 1.5,
        "rows_read": 3,
        "rows_valid": 2,
        "rows_invalid": 1,
        "rows_scored": 1,
        "rows_failed": 1,
        "objects_total": 1,
        "objects_done": 1,
        "objects_failed": 0,
        "objects_skipped": 0,
        "objects_left": 0,
        "rows_per_second": 2,
        "model_version": f"m{IMG}",
        "error": "\n".join(HOSTILE),
    }
    return {
        "run": run,
        "objects": [
            {
                "source_uri": f"s3://b/{value}.csv",
                "source_version": value,
                "status": "completed",
                "rows_read": 1,
                "rows_valid": 1,
                "rows_invalid": 0,
                "rows_scored": 1,
                "rows_failed": 0,
            }
            for value in HOSTILE
        ],
        "invalid_reasons": [
            {
                "column_name": value,
                "reason": value,
                "rows": 1,
                "examples": [{"source_uri": value, "line_number": 2, "raw_text": value}],
            }
            for value in HOSTILE
        ],
        "failures": [
            {
                "reason": value,
                "http_status": 422,
                "transactions": 1,
                "resolved_since": 0,
                "examples": [value],
            }
            for value in HOSTILE
        ],
        "timings": {"started_at": when, "note": IMG},
        "scores": None,
        "trend": [],
    }


def check_markdown(markdown: str) -> str:
    """Render as CommonMark with GFM tables; fail on any raw HTML or a broken table row."""
    parser = MarkdownIt("commonmark").enable("table")
    tokens = parser.parse(markdown)
    html_tokens = [t for t in tokens if t.type == "html_block"] + [
        c for t in tokens for c in t.children or [] if c.type == "html_inline"
    ]
    assert html_tokens == [], html_tokens
    columns: list[int] = []
    cells = 0
    for t in tokens:
        if t.type == "tr_open":
            cells = 0
        elif t.type in ("th_open", "td_open"):
            cells += 1
        elif t.type == "tr_close":
            columns.append(cells)
        elif t.type == "table_close":
            assert len(set(columns)) == 1, f"rows of different widths: {columns}"
            columns = []
    rendered = parser.render(markdown)
    elements = Elements()
    elements.feed(rendered)
    # Only the report's own structure: no element made from a value (img, a, em, code...).
    allowed = {"h1", "h2", "p", "ul", "li", "strong", "table", "thead", "tbody", "tr", "th", "td"}
    assert elements.tags <= allowed, elements.tags - allowed
    return rendered


class Elements(HTMLParser):
    """Every element and attribute of an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attrs: list[tuple[str, str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs.extend((tag, name, value) for name, value in attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_markdown_report_keeps_hostile_values_as_text() -> None:
    report = hostile_report()
    markdown = render_markdown(report)
    rendered = check_markdown(markdown)
    # Each table keeps one line per row: no CR or LF from a value reaches the source.
    assert "\r" not in markdown
    assert markdown.count("\n| ") == 3 * (1 + len(HOSTILE)) + 1 + len(report["timings"])
    # The values are shown as text: escaped, not dropped.
    assert "&lt;img src=x onerror=alert(1)&gt;" in rendered
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered
    assert "line\u240dbreak" in rendered and "a|b||c" in rendered
    assert "`leading backtick" in rendered and "&amp;amp; &amp;#60;b&amp;#62;" in rendered
    # Long reasons and raw rows are cut with an ellipsis (object names are not).
    assert "| " + "x" * 199 + "… |" in markdown
    assert "“" + "x" * 79 + "…”" in markdown


def test_csv_report_never_starts_a_cell_with_a_formula() -> None:
    table = list(csv.reader(io.StringIO(render_csv(hostile_report()))))
    cells = [cell for r in table for cell in r]
    assert any(c.startswith("'=HYPERLINK") for c in cells)
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]


def test_html_report_escapes_everything() -> None:
    page = render_html(hostile_report())
    elements = Elements()
    elements.feed(page)
    assert elements.tags.isdisjoint({"img", "script", "a", "link", "iframe", "object"})
    assert not [a for a in elements.attrs if a[1].startswith("on")]
    assert IMG in "".join(elements.text)  # shown, as text
    assert 'data-chart="throughput"><figcaption>Throughput over the run</figcaption>' in page
    assert "not recorded for this run" in page  # no progress samples: said, not a blank chart
    assert no_network_reference(page) == []


def no_network_reference(page: str) -> list[str]:
    """Anything in markup or style that a browser would fetch."""
    elements = Elements()
    elements.feed(page)
    loads = [
        f"{tag} {name}={value}"
        for tag, name, value in elements.attrs
        if name in ("src", "href", "srcset", "xlink:href", "action", "data", "poster")
    ]
    styles = re.findall(r"url\(|@import", page)
    return loads + styles


def test_progress_samples_stay_evenly_spread_and_keep_the_end() -> None:
    samples = ProgressSamples(cap=10)
    for tick in range(100):
        samples.add([tick, tick, tick, 4])
    samples.add([100.5, 101, 101, 4], final=True)
    points = samples.as_dict()["points"]
    assert len(points) <= 11
    steps = {b[0] - a[0] for a, b in itertools.pairwise(points[:-1])}
    assert steps == {16}  # every 16th tick: evenly spread over the whole run
    assert points[0][0] == 0 and points[-1][0] == 100.5


def hostile_run(bucket: Bucket, env: dict[str, str], fake_model: FakeModel) -> dict[str, str]:
    fake_model.knobs.poison_ids = {"tx-000003"}
    fake_model.knobs.poison_error = f"{SCRIPT} | `x` ``y`` {{id}}"
    bad = row(90, transaction_id="`tx|" + IMG + "\rz``")  # a CR inside a quoted field
    bucket.put(f"in/{IMG}.csv", to_csv([*rows(20), bad], line_end="\r\n"))
    env = {
        **env,
        "ML_API_URL": fake_model.url,
        "SOURCE_URI": bucket.uri("in/"),
        "MAX_INVALID_RATIO": "0.5",
        "MAX_FAILED_RATIO": "0.5",
    }
    result = run_cli(["run"], env)
    assert result.code == 3, result.output
    return env


def test_reports_of_a_run_with_a_hostile_file_name_row_and_error_body(
    bucket: Bucket, cli_env: dict[str, str], fake_model: FakeModel, database: Database
) -> None:
    env = hostile_run(bucket, cli_env, fake_model)
    [raw] = database.rows("SELECT raw_text FROM invalid_rows")
    assert raw[0].startswith('"`tx|' + IMG + '\rz``",')  # kept as read, CR and all
    assert SCRIPT in database.value("SELECT reason FROM failed_transactions")

    markdown = run_cli(["report"], env)  # the latest run, Markdown by default
    assert markdown.code == 0, markdown.output
    rendered = check_markdown(markdown.stdout)
    assert "&lt;img src=x onerror=alert(1)&gt;.csv" in rendered
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered
    assert "## Failures by reason\n\n| reason |" in markdown.stdout

    page = run_cli(["report", "--format", "html"], env)
    assert page.code == 0, page.output
    elements = Elements()
    elements.feed(page.stdout)
    assert elements.tags.isdisjoint({"img", "script"})
    assert IMG + ".csv" in "".join(elements.text)

    table = list(csv.reader(io.StringIO(run_cli(["report", "--format", "csv"], env).stdout)))
    assert any(IMG in cell for r in table for cell in r)


def test_markdown_report_says_when_nothing_failed(bucket: Bucket, cli_env: dict[str, str]) -> None:
    bucket.put("in/a.csv", to_csv(rows(5)))
    env = {**cli_env, "SOURCE_URI": bucket.uri("in/")}
    assert run_cli(["run"], env).code == 0
    markdown = run_cli(["report"], env).stdout
    assert "## Failures by reason\n\nNo transaction failed.\n" in markdown
    assert "## Invalid rows by reason\n\nNo invalid row.\n" in markdown
    check_markdown(markdown)


# -- the HTML report in a real browser ------------------------------------------------

CHARTS = [
    "scores",
    "fraud-share",
    "invalid",
    "failures",
    "throughput",
    "concurrency",
    "stages",
    "trend-throughput",
    "trend-rates",
]

# Appended to a copy of the page (whose policy forbids scripts): measures, in the
# laid-out page, each chart's drawing and its data marks of non-zero size.
MEASURE = """<script>
const out = {};
for (const fig of document.querySelectorAll("figure.chart")) {
  const svg = fig.querySelector("svg");
  const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
  const marks = [...fig.querySelectorAll(".mark")].filter(m => {
    const r = m.getBoundingClientRect(); return r.width > 0 && r.height > 0; });
  out[fig.dataset.chart] = {svg: [box.width, box.height], marks: marks.length,
                            empty: fig.classList.contains("empty-chart")};
}
const pre = document.createElement("pre"); pre.id = "measured";
pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
</script>"""


@pytest.fixture
def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed: .ci/run must install it (apt-get)")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    return binary


def browse(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            chromium,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_html_report_draws_its_charts_in_chromium(
    bucket: Bucket,
    cli_env: dict[str, str],
    fake_model: FakeModel,
    tmp_path: Path,
    chromium: str,
) -> None:
    fake_model.knobs.delay_seconds = 0.05  # a run long enough for progress samples
    bucket.put("in/a.csv", to_csv(rows(60)))
    env = {
        **cli_env,
        "ML_API_URL": fake_model.url,
        "SOURCE_URI": bucket.uri("in/"),
        "API_BATCH_SIZE": "2",
        "API_MAX_WORKERS": "2",
        "PROGRESS": "off",  # sampled all the same
        "PROGRESS_INTERVAL": "0.1",
        "DB_ROW_BATCH_SIZE": "10",  # flushes during the run, not one at its end
        "MAX_INVALID_RATIO": "0.5",
        "MAX_FAILED_RATIO": "0.5",
    }
    assert run_cli(["run"], env).code == 0
    fake_model.knobs.poison_ids = {"tx-000102"}
    bucket.put("in/b.csv", to_csv([*rows(30, start=100), row(190, amount="-1")]))
    second = run_cli(["run"], env)
    assert second.code == 3, second.output
    run_id = second.stdout.split()[1]

    page_path = tmp_path / "report.html"
    result = run_cli(["report", "--format", "html", "--output", str(page_path)], env)
    assert result.code == 0, result.output
    assert f"wrote the html report of {run_id}" in result.stderr
    page = page_path.read_text()
    assert no_network_reference(page) == []
    assert "Content-Security-Policy" in page and "<script" not in page
    assert "<h1>Run " + run_id in page

    measuring = tmp_path / "measure.html"
    measuring.write_text(
        re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page).replace(
            "</body>", MEASURE + "</body>"
        )
    )
    dom = browse(chromium, tmp_path, "--window-size=1000,1000", "--dump-dom", measuring.as_uri())
    assert dom.returncode == 0, dom.stderr
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stdout[-2000:]
    measured = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    for chart in CHARTS:
        assert chart in measured, (chart, measured)
        got = measured[chart]
        assert not got["empty"], (chart, got)
        assert got["svg"][0] > 100 and got["svg"][1] > 40, (chart, got)
        assert got["marks"] >= 1, (chart, got)
    assert measured["scores"]["marks"] >= 3  # a distribution, not one bar
    assert measured["trend-throughput"]["marks"] == 2  # the two runs

    shot = tmp_path / "report.png"
    taken = browse(
        chromium, tmp_path, "--window-size=1000,4200", f"--screenshot={shot}", page_path.as_uri()
    )
    assert taken.returncode == 0, taken.stderr
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == 1000  # IHDR width
    assert len(png) > 40_000  # charts and text, not a blank page
    print(f"screenshot of the HTML report: {shot}")
