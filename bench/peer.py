"""The peer: the seed's design (`../shared/peer/seed_baseline.py`), run beside the
pipeline by the benchmark on the same input and services.

It is never copied into the project: it runs from where it is, in a venv of its
own under .batch-pipeline/bench/peer-venv (its dependencies, SQLAlchemy and
tenacity among them, are not the project's), on a database of its own (it creates
its own tables). It reads one object, so it gets the benchmark's rows joined into
one CSV; the pipeline is measured on that same object beside it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PEER_SCRIPT = Path(
    os.environ.get(
        "BENCH_PEER",
        Path(__file__).resolve().parent.parent.parent / "shared" / "peer" / "seed_baseline.py",
    )
)
PEER_REQUIREMENTS = ["boto3", "requests", "pydantic", "tenacity", "SQLAlchemy", "psycopg[binary]"]
_ELAPSED = re.compile(r"Elapsed ([0-9.]+)s")


def peer_available() -> bool:
    return PEER_SCRIPT.is_file()


def peer_python(workdir: Path) -> Path:
    """The peer venv's Python, built once with uv (about 2 s from a warm cache)."""
    venv = workdir / "peer-venv"
    python = venv / "bin" / "python"
    marker = venv / ".complete"
    if marker.exists() and python.exists():
        return python
    uv = uv_command()
    subprocess.run([*uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    subprocess.run(
        [*uv, "pip", "install", "-q", "--python", str(python), *PEER_REQUIREMENTS], check=True
    )
    marker.touch()
    return python


def uv_command() -> list[str]:
    """uv: the one running us (`uv run` sets UV), else uv or `python3 -m uv` from PATH."""
    found = os.environ.get("UV") or shutil.which("uv")
    if found and Path(found).exists():
        return [found]
    return [shutil.which("python3") or sys.executable, "-m", "uv"]


def one_object(paths: list[Path], folder: Path) -> Path:
    """The objects' rows in one CSV (header once), in object order; cached."""
    out = folder / "all.csv"
    marker = folder / ".complete"
    if marker.exists():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as sink:
        for i, path in enumerate(paths):
            with path.open("rb") as part:
                header = part.readline()
                if i == 0:
                    sink.write(header)
                while block := part.read(1 << 20):
                    sink.write(block)
    marker.touch()
    return out


def elapsed_seconds(output: str) -> float:
    """The peer's own `Elapsed 98.12s` (start-up excluded, like the pipeline's `time:`)."""
    found = _ELAPSED.search(output)
    if not found:
        raise RuntimeError("the peer printed no 'Elapsed' line:\n" + output[-2000:])
    return float(found.group(1))
