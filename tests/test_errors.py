"""The error boundary: every third-party error the code can meet is classified once,
where it is raised, into the error tree by how the caller reacts."""

from __future__ import annotations

import gzip
import inspect
import io
import string
from typing import Any

import botocore.exceptions
import psycopg
import pytest
import urllib3.exceptions
from psycopg import errors as pg_errors

from library.errors import DatabaseError, SourceError, TransientDatabaseError
from library.models import SourceObject
from library.score.client import TRANSPORT_ERRORS, describe_transport_error
from library.stages import source
from library.state import db


def subclasses(base: type[BaseException]) -> list[type[BaseException]]:
    found: list[type[BaseException]] = []
    todo = [base]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(set(found), key=lambda c: c.__module__ + c.__qualname__)


def _module_classes(module: Any, base: type[BaseException]) -> list[type[BaseException]]:
    return [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, base) and not issubclass(cls, Warning)
    ]


# -- psycopg: every error class -> DatabaseError, transient or not -------------------


@pytest.mark.parametrize("cls", subclasses(psycopg.Error), ids=lambda c: c.__qualname__)
def test_every_psycopg_error_is_classified(cls: type[psycopg.Error]) -> None:
    error = db.classify(cls("something broke"), "writing a flush")
    assert isinstance(error, DatabaseError)
    assert "writing a flush" in str(error)


def test_what_is_transient_and_what_is_not() -> None:
    transient = [
        psycopg.OperationalError("connection refused"),
        pg_errors.AdminShutdown("terminating connection due to administrator command"),
        pg_errors.DeadlockDetected("deadlock detected"),
        pg_errors.SerializationFailure("could not serialize access"),
        pg_errors.CannotConnectNow("the database system is starting up"),
    ]
    for exc in transient:
        assert isinstance(db.classify(exc, "x"), TransientDatabaseError), exc
    permanent = [
        psycopg.OperationalError('password authentication failed for user "u"'),
        psycopg.OperationalError('database "nope" does not exist'),
        pg_errors.CheckViolation("new row violates check constraint"),
        pg_errors.UndefinedTable('relation "transactions" does not exist'),
        psycopg.ProgrammingError("syntax error"),
    ]
    for exc in permanent:
        error = db.classify(exc, "x")
        assert isinstance(error, DatabaseError) and not isinstance(error, TransientDatabaseError)


# -- urllib3: every error the HTTP client can raise is caught and described ---------


class _Response(io.BytesIO):
    length_remaining = 3


def _make(cls: type[BaseException]) -> BaseException:
    candidates: list[tuple[Any, ...]] = [
        ("boom",),
        (0, 1),
        (_Response(), b"zz"),
        (None, "boom"),
        (None, None, "boom"),
        (),
    ]
    for args in candidates:
        try:
            made = cls(*args)
            str(made)
            return made
        except (TypeError, AttributeError):
            continue
    raise AssertionError(f"cannot build {cls}")


# Raised only by urllib3's ProxyManager, which the client does not use.
NOT_MET = {"ProxySchemeUnsupported"}


@pytest.mark.parametrize(
    "cls",
    [
        c
        for c in _module_classes(urllib3.exceptions, Exception)
        if c.__module__ == "urllib3.exceptions" and c.__name__ not in NOT_MET
    ],
    ids=lambda c: c.__qualname__,
)
def test_every_urllib3_error_is_caught_by_the_client_and_described(
    cls: type[BaseException],
) -> None:
    # The client catches TRANSPORT_ERRORS around each request and turns them into a
    # TransientApiError with this description.
    assert issubclass(cls, TRANSPORT_ERRORS)
    described = describe_transport_error(_make(cls))
    assert described and "\n" not in described


# -- botocore: every error of a listing or a read becomes a SourceError naming the object


def _boto(cls: type[BaseException]) -> BaseException:
    if issubclass(cls, botocore.exceptions.ClientError):
        response: Any = {
            "Error": {"Code": "AccessDenied", "Message": "no"},
            "ResponseMetadata": {"HTTPStatusCode": 403},
        }
        try:
            return cls(response, "GetObject")
        except TypeError:
            return botocore.exceptions.ClientError(response, "GetObject")
    fmt = getattr(cls, "fmt", "")
    names = {f for _, f, _, _ in string.Formatter().parse(fmt) if f}
    kwargs: dict[str, Any] = {n: "x" for n in names}
    if "last_response" in inspect.signature(cls).parameters:
        kwargs["last_response"] = {}
    return cls(**kwargs)


@pytest.mark.parametrize(
    "cls",
    [
        *subclasses(botocore.exceptions.BotoCoreError),
        *subclasses(botocore.exceptions.ClientError),
    ],
    ids=lambda c: c.__qualname__,
)
def test_every_botocore_error_becomes_a_source_error_naming_the_object(
    cls: type[BaseException],
) -> None:
    error = source.read_error(_boto(cls), "s3://bucket/key.csv")
    assert isinstance(error, SourceError)
    assert "s3://bucket/key.csv" in str(error)


def test_a_corrupt_gzip_object_is_a_source_error_not_a_crash(tmp_path: Any) -> None:
    good = gzip.compress(b"transaction_id,event_time\n" + b"tx-1,2026-01-01T00:00:00Z\n" * 50_000)
    path = tmp_path / "broken.csv.gz"
    path.write_bytes(good[: len(good) // 2] + b"\x00garbage" + good[len(good) // 2 + 8 :])
    obj = SourceObject(str(path), "v1")
    with (
        pytest.raises(SourceError, match=r"broken\.csv\.gz"),
        source.open_text(obj, None) as (
            text,
            _counter,
        ),
    ):
        io.StringIO(text.read())
