"""The command line: every setting is a flag, every command and variable is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from library.config import ENV_NAMES
from pipeline.batch.main import build_parser, flag_name

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def subcommands() -> dict[str, object]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices)  # type: ignore[arg-type]


def test_every_setting_is_a_flag_of_run() -> None:
    run = subcommands()["run"]
    flags = {opt for a in run._actions for opt in a.option_strings}  # type: ignore[attr-defined]
    for name in ENV_NAMES:
        assert flag_name(name) in flags, name
    assert "--source" in flags


def test_flags_parse_into_settings() -> None:
    from pipeline.batch.main import settings_from

    args = build_parser().parse_args(["run", "--source", "s3://b/p/", "--api-max-workers", "7"])
    s = settings_from(args)
    assert s.source.uri == "s3://b/p/" and s.scoring.max_workers == 7


def test_every_command_and_variable_is_in_the_readme() -> None:
    for command in subcommands():
        assert re.search(rf"batch-pipeline {command}\b", README), command
    for name in ENV_NAMES:
        assert f"`{name}`" in README, name


def test_the_readme_opens_with_the_user_and_the_test_commands() -> None:
    """The user's command installs only what the job needs (--no-dev: no pytest, moto,
    mypy, hadolint...); the tests' command is the one CI runs, with the dev group."""
    block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    demo, tests = (line.split("#")[0].strip() for line in block.splitlines())
    assert demo == "python3 -m pip install uv && python3 -m uv run --no-dev batch-pipeline demo"
    assert tests == "python3 -m pip install uv && python3 -m uv run pytest"
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert tests in ci.splitlines()
    # Every other `uv run batch-pipeline` a user pastes skips the dev group too.
    assert not re.search(r"uv run batch-pipeline", README)


def test_the_readme_starts_the_model_servers_as_the_tests_do(tmp_path: Path) -> None:
    """The README's MLflow / MLServer block is pasted as is: it must carry every option
    the tests' launchers (tools/model_servers/servers.py) need, wait for readiness on the
    same path, and --reprocess the demo's objects."""
    from tools.model_servers.servers import mlflow_server, mlserver_server

    section = README.split("### A real model, served by MLflow or MLServer", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    mlflow = mlflow_server(tmp_path / "mlflow", 5001, tmp_path)
    served = " ".join(mlflow.command[1:]).replace(str(tmp_path / "mlflow"), "")
    served = served.replace("-m  ", "-m .batch-pipeline/model/mlflow ")
    assert f"mlflow {served}" in block
    assert f"127.0.0.1:5001{mlflow.ready_path}" in block
    mlserver = mlserver_server(tmp_path / "mlserver", "fraud", 8080, 8081, tmp_path)
    for name, value in mlserver.env.items():
        if name.startswith("MLSERVER_"):
            assert re.search(rf"(^|\s){name}={re.escape(value)}(\s|$)", block, re.M), name
    assert f"127.0.0.1:8080{mlserver.ready_path}" in block
    runs = [line for line in block.splitlines() if "batch-pipeline run" in line]
    assert len(runs) == 2 and all("--reprocess" in line for line in runs)
    assert block.count("until python3 -c") == 2


def help_of(command: str) -> str:
    parser = subcommands()[command]
    return parser.format_help()  # type: ignore[attr-defined,no-any-return]


def test_each_setting_is_in_exactly_one_group() -> None:
    from pipeline.batch.main import COMMAND_GROUPS, SETTING_GROUPS

    grouped = [name for names in SETTING_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(ENV_NAMES)
    assert set(COMMAND_GROUPS) == set(subcommands()) - {"model-server", "schema"}
    for groups in COMMAND_GROUPS.values():
        assert set(groups) <= set(SETTING_GROUPS)


def test_each_command_lists_only_the_settings_it_uses() -> None:
    status = help_of("status")
    assert len(status.splitlines()) < 60, status
    assert "--database-url" in status and "--embedded-db-dir" in status
    for unused in ("--api-max-workers", "--source", "--ml-api-url", "--progress", "--metrics-job"):
        assert unused not in status
    check = help_of("check")
    for used in ("--source", "--ml-api-url", "--ml-api-protocol", "--pushgateway-url"):
        assert used in check
    assert "--db-row-batch-size" not in check and "--api-wait-ready" not in check
    retry = help_of("retry-failed")
    assert "--api-wait-ready" in retry and "--source" not in retry
    assert "--max-invalid-ratio" not in retry  # retry-failed checks no ratio
    assert "--source" not in help_of("schema") and "--database-url" not in help_of("schema")


def test_version_and_run_id_are_documented(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.batch.main import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert re.fullmatch(r"batch-pipeline \d+\.\d+\.\d+\n", capsys.readouterr().out)
    top = build_parser().format_help()
    assert "RUN_ID: each run's id, batch_YYYYMMDD_HHMMSS" in top
    assert "batch_YYYYMMDD_HHMMSS" in help_of("status")
    assert "`RUN_ID`" in README and "batch_YYYYMMDD_HHMMSS" in README


def test_every_command_has_one_handler() -> None:
    from pipeline.batch.main import COMMAND_GROUPS, COMMANDS, STANDALONE

    assert set(COMMANDS) | set(STANDALONE) == set(subcommands())
    assert not set(COMMANDS) & set(STANDALONE)
    assert set(COMMANDS) == set(COMMAND_GROUPS)  # those that read settings list theirs


def test_tables_off_a_terminal_are_plain_unwrapped_text(capsys: pytest.CaptureFixture[str]) -> None:
    """Piped or captured, a table is `a | b` lines under a `-+-` rule, one line per row at
    any length, and a cell is never taken for rich markup."""
    from pipeline.batch.render import print_table

    long_uri = "s3://bucket/" + "x" * 300 + ".csv"
    print_table(["run_id", "source"], [("batch_1", long_uri), ("[bold]b[/bold]", None)])
    lines = capsys.readouterr().out.splitlines()
    width = len("[bold]b[/bold]")
    assert lines == [
        "run_id".ljust(width) + " | " + "source".ljust(len(long_uri)),
        "-" * width + "-+-" + "-" * len(long_uri),
        "batch_1".ljust(width) + " | " + long_uri,
        "[bold]b[/bold] | " + " " * len(long_uri),
        "(2 rows)",
    ]


def test_summary_lines_off_a_terminal_are_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.batch.render import print_labelled

    lines = ["run_id:        batch_1 [dry]", "plan:          read a.csv", "               b.csv"]
    print_labelled(lines)
    assert capsys.readouterr().out.splitlines() == lines
