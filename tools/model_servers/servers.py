"""Real model servers for the protocol tests and the benchmark: MLflow's and MLServer's, on loopback.

* `ensure_venvs()` builds `.model-servers/{mlflow,mlserver}` with
  tools/model_servers/build.py (about two minutes the first time, a no-op after).
* `train_models(folder)` runs tools/model_servers/train.py with the mlflow venv's
  Python: one scikit-learn model, saved for both servers.
* `ModelServer` starts one server as its own process group on 127.0.0.1 and a free
  port, polls its readiness, and stops it (SIGTERM, then SIGKILL of the group after
  10 s); `kill()` and `start()` again simulate a crash and a restart on the same port.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # tools/model_servers/servers.py -> the repository
TOOLS = ROOT / "tools" / "model_servers"
VENVS = ROOT / ".model-servers"
READY_TIMEOUT = 60.0
STOP_GRACE = 10.0
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1"}


def venv_bin(name: str) -> Path:
    return VENVS / name / "bin"


def ensure_venvs() -> None:
    """Build the servers' venvs unless up to date (build.py decides, under a lock)."""
    proc = subprocess.run(
        [sys.executable, str(TOOLS / "build.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"building the model server venvs failed:\n{proc.stdout}{proc.stderr}")


@dataclass(frozen=True)
class TrainedModels:
    folder: Path
    mlflow_model: Path
    mlserver_repository: Path
    model_name: str
    model_version: str
    auc: float
    poison_category: str


def train_models(folder: Path) -> TrainedModels:
    proc = subprocess.run(
        [str(venv_bin("mlflow") / "python"), str(TOOLS / "train.py"), str(folder)],
        cwd=folder.parent,
        env={**os.environ, **QUIET},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"training failed:\n{proc.stdout}{proc.stderr}")
    metrics = json.loads((folder / "metrics.json").read_text())
    return TrainedModels(
        folder=folder,
        mlflow_model=folder / "mlflow",
        mlserver_repository=folder / "mlserver",
        model_name=metrics["model_name"],
        model_version=metrics["model_version"],
        auc=metrics["auc"],
        poison_category=metrics["poison_category"],
    )


def server_env(name: str, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "UV_PROJECT_ENVIRONMENT")
    }
    env.update(QUIET)
    env["VIRTUAL_ENV"] = str(VENVS / name)
    # MLflow execs `uvicorn` by name: the venv's bin must come first on PATH.
    env["PATH"] = f"{venv_bin(name)}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@dataclass
class ModelServer:
    """One real model server process group, on 127.0.0.1:`port`."""

    kind: str  # "mlflow" or "mlserver"
    command: list[str]
    env: dict[str, str]
    workdir: Path
    port: int
    ready_path: str
    proc: subprocess.Popen[bytes] | None = None
    starts: list[float] = field(default_factory=list)  # seconds from spawn to ready, per start
    _spawned: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.kind}.log"

    def start(self, timeout: float = READY_TIMEOUT) -> float:
        """Spawn the server and wait until it is ready; return the seconds it took."""
        self.spawn()
        return self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the process (its own process group) without waiting for it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._spawned = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"\n==== start {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command,
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped (or killed) whole
            )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> float:
        """Poll the readiness URL until it answers 200 (at most `timeout` s from the spawn)."""
        assert self.proc is not None, "spawn() first"
        deadline = self._spawned + timeout
        while True:
            if self.ready():
                spent = time.monotonic() - self._spawned
                self.starts.append(spent)
                return spent
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"{self.kind} exited with {code} before ready:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.kind} not ready after {timeout:.0f}s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_running(self, patience: float = 10.0) -> None:
        """Leave a live server alone (a busy one gets `patience` s to answer); restart a dead one."""
        deadline = time.monotonic() + patience
        while self.running():
            if self.ready():
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.stop()
        self.start()

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash or an OOM kill would."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM the process group; SIGKILL it if it is still there after 10 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_GRACE)
        self._signal_group(signal.SIGKILL)  # stragglers of the group (workers), if any
        if self.proc.poll() is None:
            self.proc.wait(10)

    def requests_seen(self, marker: str = '"POST ') -> int:
        """Requests logged so far (uvicorn's access log), across restarts."""
        try:
            return self.log_path.read_text(errors="replace").count(marker)
        except FileNotFoundError:
            return 0

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def mlflow_server(model: Path, port: int, workdir: Path) -> ModelServer:
    command = [
        str(venv_bin("mlflow") / "mlflow"),
        "models",
        "serve",
        "-m",
        str(model),
        "--env-manager",
        "local",  # the default builds a virtualenv from the model's requirements
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",  # two workers made every keep-alive request take 52 ms (FACTS)
    ]
    return ModelServer("mlflow", command, server_env("mlflow"), workdir, port, "/ping")


def mlserver_server(
    repository: Path, model_name: str, port: int, grpc_port: int, workdir: Path
) -> ModelServer:
    env = server_env(
        "mlserver",
        MLSERVER_HOST="127.0.0.1",
        MLSERVER_HTTP_PORT=str(port),
        MLSERVER_GRPC_PORT=str(grpc_port),  # gRPC cannot be turned off: a free port of its own
        MLSERVER_METRICS_ENDPOINT="",  # no metrics listener
        MLSERVER_PARALLEL_WORKERS="0",  # also in the repository's settings.json
    )
    command = [str(venv_bin("mlserver") / "mlserver"), "start", str(repository)]
    # /v2/health/ready answers an empty body; the model's own readiness is what matters.
    return ModelServer("mlserver", command, env, workdir, port, f"/v2/models/{model_name}/ready")
