"""Source stage: objects -> byte streams -> chunks of parsed rows.

Objects are listed from S3 (one key, or every CSV under a prefix, in key order)
or from the local file system (one file, or every CSV under a folder). Each is
streamed with smart-open, decompressed by its extension (.gz, .zst) and parsed
with the standard library's csv reader, which follows RFC 4180 (quoted commas,
quotes and newlines) and never holds more than one row in memory. Rows are
gathered into chunks of ROW_BATCH_SIZE, each row keeping the physical line of
the file where it starts and its raw text, so that an invalid row can be shown
exactly as it was written.

Rows that cannot be split into the header's fields (wrong field count, bytes
that are not UTF-8, NUL characters, an oversized field) become invalid rows
here; everything else goes on to validation as text.
"""

from __future__ import annotations

import csv
import io
import logging
import operator
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import polars as pl

from library.contract import REQUIRED_COLUMNS
from library.errors import MissingColumnsError, SourceError
from library.models import LINE_COLUMN, InvalidRow, Reason, RowChunk, SourceObject

log = logging.getLogger(__name__)

CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.zst")
COMPRESSION_SUFFIXES = (".gz", ".zst")
MAX_FIELD_CHARS = 128 * 1024  # a longer field is an invalid row, not a memory hazard
MAX_RAW_TEXT_CHARS = 8 * 1024  # raw text kept for an invalid row
ROW_REASON = "_row"

csv.field_size_limit(MAX_FIELD_CHARS)


# -- listing -------------------------------------------------------------------


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        bucket, _, key = uri[len("s3://") :].partition("/")
        return cls(bucket, key)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def is_csv_name(name: str) -> bool:
    return name.lower().endswith(CSV_SUFFIXES)


def make_s3_client(key: str | None, secret: str | None, endpoint_url: str | None) -> Any:
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name=session.region_name or "us-east-1",
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10),
    )


def describe_s3_error(exc: BaseException, uri: str) -> str:
    """One clear line for an S3 failure; botocore's own text never includes the secret."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "")) or "error"
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return (
                f"S3 access denied ({code}, HTTP {status}) for {uri}: "
                "check KEY, SECRET and ENDPOINT_URL"
            )
        if code in ("NoSuchBucket", "NoSuchKey", "404"):
            return f"S3 {code} for {uri}: check SOURCE_URI"
        return f"S3 error {code} (HTTP {status}) for {uri}: {error.get('Message', '')}".rstrip(": ")
    if isinstance(exc, EndpointConnectionError):
        return f"cannot reach the S3 endpoint for {uri}: {exc}; check ENDPOINT_URL"
    if isinstance(exc, NoCredentialsError):
        return f"no S3 credentials for {uri}: set KEY and SECRET"
    return f"cannot read {uri}: {type(exc).__name__}: {exc}"


def list_objects(source_uri: str, s3_client: Any | None) -> list[SourceObject]:
    """The objects a SOURCE_URI names, in key order, with their versions and sizes."""
    if is_s3(source_uri):
        if s3_client is None:
            raise SourceError("an S3 client is needed for " + source_uri, source_uri)
        found = _list_s3(S3Location.parse(source_uri), s3_client, source_uri)
    else:
        found = _list_local(Path(source_uri))
    return [
        SourceObject(uri=o.uri, version=o.version, size=o.size, index=i)
        for i, o in enumerate(found)
    ]


def _list_s3(loc: S3Location, client: Any, uri: str) -> list[SourceObject]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        if loc.key and not loc.key.endswith("/"):
            try:
                head = client.head_object(Bucket=loc.bucket, Key=loc.key)
                return [
                    SourceObject(
                        uri=uri,
                        version=str(head.get("ETag", "")).strip('"'),
                        size=int(head.get("ContentLength", 0)),
                    )
                ]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey"):
                    raise
            prefix = loc.key + "/"  # s3://bucket/folder means the folder
        else:
            prefix = loc.key
        objects = []
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=loc.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                key = item["Key"]
                if not is_csv_name(key):
                    log.debug("skipping %s: not a .csv, .csv.gz or .csv.zst object", key)
                    continue
                objects.append(
                    SourceObject(
                        uri=f"s3://{loc.bucket}/{key}",
                        version=str(item.get("ETag", "")).strip('"'),
                        size=int(item.get("Size", 0)),
                    )
                )
    except (ClientError, BotoCoreError) as exc:
        raise SourceError(describe_s3_error(exc, uri), uri) from exc
    if not objects and loc.key and not loc.key.endswith("/"):
        raise SourceError(f"no object or prefix at {uri}", uri)
    return sorted(objects, key=lambda o: o.uri)


def local_version(path: Path) -> tuple[str, int]:
    stat = path.stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}", stat.st_size


def _list_local(path: Path) -> list[SourceObject]:
    path = path.resolve()  # lineage must not depend on the working directory
    if path.is_file():
        version, size = local_version(path)
        return [SourceObject(uri=str(path), version=version, size=size)]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and is_csv_name(p.name))
        out = []
        for p in files:
            version, size = local_version(p)
            out.append(SourceObject(uri=str(p), version=version, size=size))
        return out
    raise SourceError(f"no such file or folder: {path}", str(path))


# -- opening -------------------------------------------------------------------


class CountingReader(io.RawIOBase):
    """Counts the bytes read from the underlying (possibly compressed) stream."""

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.bytes_read += n
        return n

    def close(self) -> None:
        self._inner.close()
        super().close()


def read_error(exc: BaseException, uri: str) -> SourceError:
    """An exception met while reading an object's bytes, as a SourceError naming it.

    botocore and urllib3 errors (after smart-open's own retries), a corrupt gzip or
    zstd stream, a truncated file: the object cannot be read, the run goes on."""
    if isinstance(exc, SourceError):
        return exc
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, BotoCoreError | ClientError):
        return SourceError(describe_s3_error(exc, uri), uri)
    kind = type(exc).__name__
    return SourceError(
        f"cannot read {uri}: {kind}: {exc}" if str(exc) else f"cannot read {uri}: {kind}", uri
    )


class ClassifyingReader(io.RawIOBase):
    """Reads through `inner`; any error it raises comes out as a SourceError."""

    def __init__(self, inner: IO[bytes], uri: str) -> None:
        self._inner = inner
        self._uri = uri

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._inner.read(len(buffer))
        except Exception as exc:  # the boundary: classified once, here
            raise read_error(exc, self._uri) from exc
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        self._inner.close()
        super().close()


@contextmanager
def open_text(obj: SourceObject, s3_client: Any | None) -> Iterator[tuple[IO[str], CountingReader]]:
    """The object as text: BOM removed, newlines untouched (the csv module needs them),
    undecodable bytes kept as surrogates so that their rows can be reported, not lost."""
    import smart_open
    from smart_open.compression import compression_wrapper

    params = {"client": s3_client} if is_s3(obj.uri) else {}
    try:
        raw = smart_open.open(obj.uri, "rb", compression="disable", transport_params=params)
    except Exception as exc:
        raise SourceError(describe_s3_error(exc, obj.uri), obj.uri) from exc
    counting = CountingReader(raw)
    buffered = io.BufferedReader(counting, buffer_size=1 << 20)
    suffix = next((s for s in COMPRESSION_SUFFIXES if obj.uri.lower().endswith(s)), None)
    stream = compression_wrapper(buffered, "rb", compression=suffix) if suffix else buffered
    # The boundary: whatever the transport or the decompressor raises while the
    # object is read becomes a SourceError naming the object, here and only here.
    classified = io.BufferedReader(ClassifyingReader(stream, obj.uri), buffer_size=1 << 16)
    text = io.TextIOWrapper(classified, encoding="utf-8-sig", errors="surrogateescape", newline="")
    try:
        yield text, counting
    finally:
        text.close()


# -- parsing -------------------------------------------------------------------


def printable(text: str, limit: int = MAX_RAW_TEXT_CHARS) -> str:
    """Text safe to store in PostgreSQL: undecodable bytes and NULs become U+FFFD."""
    if len(text) > limit:
        text = text[:limit] + f"... [{len(text) - limit} more characters]"
    if any("\udc80" <= ch <= "\udcff" or ch == "\x00" for ch in text):
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        text = text.replace("\x00", "\ufffd")
    return text


def _strip_newline(text: str) -> str:
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith(("\n", "\r")):
        return text[:-1]
    return text


_SURROGATE = re.compile("[\udc80-\udcff]")


def _row_problem(row: list[str], width: int, raw: str) -> str | None:
    if len(row) != width:
        return f"expected {width} fields as in the header, found {len(row)}"
    if raw.isascii():  # nearly every row: no NUL and no undecodable byte to look for
        return "contains a NUL character" if "\x00" in raw else None
    if "\x00" in raw:
        return "contains a NUL character"
    if _SURROGATE.search(raw):
        return "is not valid UTF-8"
    return None


class HeaderMap:
    """Where each required column sits in the object's header."""

    def __init__(self, header: list[str], uri: str) -> None:
        names = [h.strip().lstrip("\ufeff").strip().lower() for h in header]
        positions: dict[str, int] = {}
        for i, name in enumerate(names):
            if name in REQUIRED_COLUMNS and name in positions:
                raise SourceError(f"{uri}: the header names column {name} twice", uri)
            positions.setdefault(name, i)
        missing = [c for c in REQUIRED_COLUMNS if c not in positions]
        if missing:
            raise MissingColumnsError(uri, missing)
        self.width = len(header)
        self.indices = [positions[c] for c in REQUIRED_COLUMNS]
        self.pick: Callable[[list[str]], tuple[str, ...]] = operator.itemgetter(*self.indices)


class _LineRecorder:
    """Feeds the csv reader line by line and keeps the lines of the current row."""

    def __init__(self, text: IO[str]) -> None:
        self._text = text
        self.lines: list[str] = []

    def __iter__(self) -> Iterator[str]:
        lines = self.lines
        for line in self._text:
            lines.append(line)
            yield line

    def take(self) -> str:
        raw = "".join(self.lines)
        self.lines.clear()
        return raw


def read_chunks(
    obj: SourceObject,
    text: IO[str],
    row_batch_size: int,
    resume_after_line: int = 1,
) -> Iterator[RowChunk]:
    """Parse an object's text into chunks of at most `row_batch_size` rows.

    Rows starting at or before `resume_after_line` (a checkpoint) are skipped.
    Raises MissingColumnsError before yielding anything if the header lacks a
    required column.
    """
    recorder = _LineRecorder(text)
    reader = csv.reader(recorder, strict=False)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise SourceError(f"{obj.uri}: unreadable header: {exc}", obj.uri) from exc
    if header is None:
        log.warning("%s is empty: no header, no rows", obj.uri)
        return
    recorder.take()
    columns = HeaderMap(header, obj.uri)

    chunk_index = 0
    values: list[tuple[str, ...]] = []
    lines: list[int] = []
    raws: list[str] = []
    malformed: list[InvalidRow] = []
    last_line = 1
    line_before = reader.line_num  # lines consumed so far

    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            start = line_before + 1
            line_before = reader.line_num
            raw = recorder.take()
            if start > resume_after_line:
                malformed.append(
                    InvalidRow(start, stored_raw_text(raw), (Reason(ROW_REASON, str(exc)),))
                )
                last_line = start
            continue
        start = line_before + 1
        line_before = reader.line_num
        raw = recorder.take()
        if not row:  # a blank line is not a row
            continue
        if start <= resume_after_line:
            continue
        last_line = start
        problem = _row_problem(row, columns.width, raw)
        if problem is not None:
            malformed.append(
                InvalidRow(start, stored_raw_text(raw), (Reason(ROW_REASON, problem),))
            )
        else:
            values.append(columns.pick(row))
            lines.append(start)
            raws.append(raw)
        if len(values) + len(malformed) >= row_batch_size:
            yield _chunk(obj, chunk_index, values, lines, raws, malformed, last_line)
            chunk_index += 1
            values, lines, raws, malformed = [], [], [], []
    if values or malformed:
        yield _chunk(obj, chunk_index, values, lines, raws, malformed, last_line)


def _chunk(
    obj: SourceObject,
    index: int,
    values: list[tuple[str, ...]],
    lines: list[int],
    raws: list[str],
    malformed: list[InvalidRow],
    last_line: int,
) -> RowChunk:
    if values:
        columns = list(zip(*values, strict=True))
        data: dict[str, Any] = {
            name: pl.Series(name, col, dtype=pl.String)
            for name, col in zip(REQUIRED_COLUMNS, columns, strict=True)
        }
    else:
        data = {name: pl.Series(name, [], dtype=pl.String) for name in REQUIRED_COLUMNS}
    data[LINE_COLUMN] = pl.Series(LINE_COLUMN, lines, dtype=pl.Int64)
    return RowChunk(obj, index, pl.DataFrame(data), raws, malformed, last_line)


def stored_raw_text(raw: str) -> str:
    """A row's raw text as stored with an invalid row: no line end, safe for PostgreSQL."""
    return printable(_strip_newline(raw))
