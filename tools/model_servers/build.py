"""Build the virtualenvs of the real model servers the protocol tests run.

    python tools/model_servers/build.py            # both, skipped when up to date
    python tools/model_servers/build.py mlserver   # one of them
    python tools/model_servers/build.py --force    # rebuild even if up to date
    python tools/model_servers/build.py --lock     # re-resolve the requirements files

Each server gets its own venv under `.model-servers/NAME/` at the repository root
(MLflow and MLServer pin conflicting web stacks), made with `uv venv` and filled
with `uv pip install -r tools/model_servers/requirements-NAME.txt`. Both files pin
the same scikit-learn, numpy, pandas, scipy and joblib, so a model trained with
the mlflow venv's Python (tools/model_servers/train.py) loads in MLServer.

A venv is rebuilt only when its marker file does not hold the hash of its
requirements file (or its Python is gone); `--force` rebuilds anyway, for
example with another `--python`. A lock file serialises concurrent builds (two
test sessions starting at once). Each step prints its time.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VENVS = ROOT / ".model-servers"
MARKER = ".requirements.sha256"
SERVERS = ("mlflow", "mlserver")

# What `--lock` resolves; the requirements files are its full, pinned output.
# The scientific stack is pinned alike in both: a pickled scikit-learn model must
# load with the very versions that saved it.
SHARED = ["scikit-learn==1.9.1", "numpy==2.4.6", "pandas==3.1.1", "scipy==1.17.1", "joblib==1.6.0"]
TOP_LEVEL = {
    # The full mlflow (not mlflow-skinny): skinny lacks skops, the default format
    # of mlflow.sklearn.save_model.
    "mlflow": ["mlflow==3.17.2", *SHARED],
    # uvloop 0.22+ kills every MLServer inference worker at start ("There is no
    # current event loop"); train.py also sets parallel_workers: 0.
    "mlserver": ["mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop==0.21.0", *SHARED],
}
PYTHON_VERSION = "3.11"  # the oldest Python the project supports; the lock is universal above it


def uv_command() -> list[str]:
    """uv: the one running us (`uv run` sets UV), else the one on PATH, else `python -m uv`."""
    found = os.environ.get("UV") or shutil.which("uv")
    return [found] if found and Path(found).exists() else [sys.executable, "-m", "uv"]


def requirements(name: str) -> Path:
    return HERE / f"requirements-{name}.txt"


def venv_python(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def venv_bin(name: str) -> Path:
    return VENVS / name / "bin"


def wanted_hash(name: str) -> str:
    return hashlib.sha256(requirements(name).read_bytes()).hexdigest()


def up_to_date(name: str) -> bool:
    """The venv holds exactly its requirements file (its Python still there: the
    symlink resolves). After changing the interpreter, rebuild with --force."""
    marker = VENVS / name / MARKER
    return (
        venv_python(name).exists()
        and marker.exists()
        and marker.read_text().strip() == wanted_hash(name)
    )


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def build_one(name: str, python: str, force: bool) -> float:
    """Build one venv unless up to date; return the seconds spent (0 when skipped)."""
    if not force and up_to_date(name):
        print(f"{name}: up to date in {VENVS / name}", flush=True)
        return 0.0
    began = time.perf_counter()
    target = VENVS / name
    (target / MARKER).unlink(missing_ok=True)
    uv = uv_command()
    run([*uv, "venv", "--quiet", "--clear", "--python", python, str(target)])
    # Bytecode compiled once here: with PYTHONDONTWRITEBYTECODE (set on these machines)
    # every server start would otherwise compile MLflow's imports again (~2x slower).
    run(
        [
            *uv,
            "pip",
            "install",
            "--compile-bytecode",
            "--python",
            str(venv_python(name)),
            "-r",
            str(requirements(name)),
        ]
    )
    (target / MARKER).write_text(wanted_hash(name) + "\n")
    spent = time.perf_counter() - began
    print(f"{name}: built in {spent:.1f}s ({target})", flush=True)
    return spent


def build(
    names: tuple[str, ...] = SERVERS, python: str = sys.executable, force: bool = False
) -> None:
    VENVS.mkdir(exist_ok=True)
    with (VENVS / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits, then finds it up to date
        began = time.perf_counter()
        for name in names:
            build_one(name, python, force)
        print(f"model server venvs ready in {time.perf_counter() - began:.1f}s", flush=True)


def lock(names: tuple[str, ...]) -> None:
    """Resolve TOP_LEVEL again into the pinned requirements files."""
    for name in names:
        began = time.perf_counter()
        spec = HERE / f".requirements-{name}.in"
        spec.write_text("\n".join(TOP_LEVEL[name]) + "\n")
        try:
            run(
                [
                    *uv_command(),
                    "pip",
                    "compile",
                    "--quiet",
                    "--universal",
                    "--python-version",
                    PYTHON_VERSION,
                    "--no-annotate",
                    "--custom-compile-command",
                    f"python tools/model_servers/build.py --lock {name}",
                    "-o",
                    str(requirements(name)),
                    str(spec),
                ]
            )
        finally:
            spec.unlink(missing_ok=True)
        print(f"{name}: locked in {time.perf_counter() - began:.1f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "servers", nargs="*", metavar="SERVER", help="mlflow, mlserver (default: both)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--lock", action="store_true", help="re-resolve the requirements files")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the venvs")
    args = parser.parse_args(argv)
    names = tuple(args.servers) or SERVERS
    unknown = sorted(set(names) - set(SERVERS))
    if unknown:
        parser.error(f"unknown server(s): {', '.join(unknown)} (choose from {', '.join(SERVERS)})")
    if args.lock:
        lock(names)
    else:
        build(names, args.python, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
