"""The benchmark runs from a clean clone: a tiny input, every measure once.

It asserts that the figures exist and make sense, not how fast they are: speed
targets belong to the benchmark's own report, never to a timed test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_the_benchmark_runs_and_reports_every_measure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--rows",
            "3000",
            "--objects",
            "3",
            "--repeat",
            "1",
            "--scale",
            "2000",
            "--only",
            "stages,cpu,peer,one_core,scale,adaptive,observability",
            "--output",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    stages = figures["stages"]
    for name in ("end_to_end", "read_validate", "score", "write"):
        assert stages[name]["rows_per_second"] > 0, name
    assert stages["slowest_stage"] in ("read_validate", "score", "write")
    assert stages["efficiency"] > 0 and stages["peak_rss_mb"] > 0
    assert figures["scale"][0]["rows"] == 2000
    assert set(figures["adaptive"]["cases"]) == {
        "fixed_at_capacity_4",
        "adaptive_ceiling_16",
        "fixed_at_16",
    }
    assert "cost" in figures["observability"]
    cpu = figures["cpu"]
    assert cpu["cpu_us_per_row"] > 0
    assert set(cpu["us_per_row_by_stage"]) == {
        "read",
        "validate",
        "encode_request",
        "decode_response",
        "prepare_copy",
        "start_up",
        "other",
    }
    assert all(v >= 0 for k, v in cpu["us_per_row_by_stage"].items() if k != "other")
    peer = figures["peer"]  # run from ../shared/peer when it is there
    assert "skipped" in peer or (peer["speed_up"] > 0 and peer["peer"]["cpu_us_per_row"] > 0)
    assert figures["one_core"]["rows_per_second"] > 0
    assert figures["one_core"]["own_rate_per_core"] > 0
    assert "efficiency" in proc.stdout and "end to end" in proc.stdout


def test_a_measured_process_reports_its_own_peak_memory_not_the_benchmarks() -> None:
    # Linux gives a child's ru_maxrss the forking process's high-water mark at exec:
    # the benchmark holds its generated input, so wait4 alone would report at least
    # the benchmark's own peak for every run it measures.
    from bench.run import timed_process

    held = bytearray(200 * 1024 * 1024)
    held[::4096] = b"\x01" * len(held[::4096])  # resident, not just reserved
    child = (
        "import time\n"
        "b = bytearray(40 * 1024 * 1024)\n"
        "b[::4096] = b'\\x01' * len(b[::4096])\n"
        "time.sleep(0.3)\n"
    )
    _seconds, peak_mb, code, output, _cpu = timed_process([sys.executable, "-c", child], {})
    assert code == 0, output
    assert 40 <= peak_mb < 120, peak_mb
    del held
