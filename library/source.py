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
that are not UTF-8, NUL characters, a row longer than MAX_ROW_CHARS) become
invalid rows here; everything else goes on to validation as text.

Memory never follows the length of a line: lines are read in pieces, and a row
longer than MAX_ROW_CHARS is read to its end here (following its quotes as the
csv reader would) without being kept or parsed. Text inside a quoted field never
becomes a row: a quoted field still open at the end of the object, or after
MAX_QUOTED_FIELD_CHARS characters, fails the object there (UnterminatedQuoteError),
the rows before it being yielded first.
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

from library.config import DEFAULT_MAX_QUOTED_FIELD_CHARS
from library.contract import REQUIRED_COLUMNS
from library.errors import MissingColumnsError, SourceError, UnterminatedQuoteError
from library.models import LINE_COLUMN, InvalidRow, Reason, RowChunk, SourceObject

log = logging.getLogger(__name__)

CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.zst")
COMPRESSION_SUFFIXES = (".gz", ".zst")
MAX_ROW_CHARS = 128 * 1024  # a longer row is an invalid row, not a memory hazard
MAX_RAW_TEXT_CHARS = 8 * 1024  # raw text kept for an invalid row
LINE_PIECE_CHARS = 64 * 1024  # lines are read in pieces of at most this many characters
ROW_REASON = "_row"

# Rows longer than MAX_ROW_CHARS never reach the csv reader, so it never stops in
# the middle of a field (and never resumes there, inside a quoted field).
csv.field_size_limit(max(csv.field_size_limit(), 2 * MAX_ROW_CHARS))


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


def printable(text: str, limit: int = MAX_RAW_TEXT_CHARS, length: int | None = None) -> str:
    """Text safe to store in PostgreSQL: undecodable bytes and NULs become U+FFFD.

    `length` is the length of the whole text when `text` is only its beginning."""
    length = len(text) if length is None else length
    if length > limit:
        text = text[:limit] + f"... [{length - limit} more characters]"
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


# Where the csv reader stands within a row, as far as quotes go: its own states
# (dialect excel, strict off), and the end of the row.
_FIELD_START, _UNQUOTED, _QUOTED, _QUOTE_IN_QUOTED, _ENDED = range(5)
_QUOTED_TEXT = re.compile(r'[^"]*(?:""[^"]*)*')  # up to the quote that may close the field


def _scan(state: int, text: str) -> tuple[int, int]:
    """The csv reader's state after `text`, a piece of one physical line (a line end
    can only come last), and where in it the last quoted field opened (-1: none).

    Only a quote at the start of a field opens a quoted field; in a quoted field a
    doubled quote is a quote and a single one closes it; text after the closing
    quote joins the field, unquoted. A line end outside a quoted field ends the row.
    """
    opened = -1
    pos = 0
    while pos < len(text):
        if state == _QUOTED:
            end = text.find('"', pos)
            if end < 0:
                return state, opened
            if text.startswith('""', end):  # doubled quotes: skip them all at once
                quoted = _QUOTED_TEXT.match(text, end)  # it matches "": never None
                end = quoted.end() if quoted else end
                if end == len(text):
                    return state, opened
            state, pos = _QUOTE_IN_QUOTED, end + 1
        elif state == _QUOTE_IN_QUOTED:
            char = text[pos]
            if char == '"':
                state = _QUOTED
            elif char == ",":
                state = _FIELD_START
            elif char in "\r\n":
                return _ENDED, opened
            else:
                state = _UNQUOTED
            pos += 1
        elif state == _FIELD_START and text[pos] == '"':
            state, opened, pos = _QUOTED, pos, pos + 1
        else:  # unquoted: the next quoted field can only open right after a comma
            i = text.find(',"', pos)
            if i < 0:
                last = text[-1]
                if last in "\r\n":
                    return _ENDED, opened
                return (_FIELD_START if last == "," else _UNQUOTED), opened
            state, opened, pos = _QUOTED, i + 1, i + 2
    return state, opened


@dataclass(frozen=True)
class LongRow:
    """A row longer than MAX_ROW_CHARS, read to its end but not parsed."""

    first_line: int
    last_line: int
    chars: int  # its length, line end excluded
    head: str  # its first MAX_RAW_TEXT_CHARS characters
    limit: int = MAX_ROW_CHARS

    def invalid_row(self) -> InvalidRow:
        lines = f" over lines {self.first_line}-{self.last_line}"
        reason = (
            f"row of {self.chars} characters{lines if self.last_line > self.first_line else ''}"
            f" is longer than the limit of {self.limit}"
        )
        raw = printable(_strip_newline(self.head), length=self.chars)
        return InvalidRow(self.first_line, raw, (Reason(ROW_REASON, reason),))


class _LineRecorder:
    """Feeds the csv reader whole physical lines and keeps the lines of the current row.

    The csv reader asks for another line before it returns a row only when the row
    is inside a quoted field: lines still held when it asks mean an open quote. So
    the common path (a short line, a new row) costs a length check; the rare ones
    (a line longer than a piece, a row inside a quoted field, the end of the
    object) go through `_unusual`. A row longer than MAX_ROW_CHARS is not given to
    the reader: `_skip_long_row` reads it to its end, keeping its head only, and
    hands the reader a line that ends the row at once.
    """

    def __init__(
        self,
        text: IO[str],
        uri: str,
        max_quoted_field_chars: int,
        *,
        piece_chars: int = LINE_PIECE_CHARS,
        max_row_chars: int = MAX_ROW_CHARS,
    ) -> None:
        if not 2 <= piece_chars <= max_row_chars <= max_quoted_field_chars:
            raise ValueError("need 2 <= piece_chars <= max_row_chars <= max_quoted_field_chars")
        self._readline = text.readline
        self._uri = uri
        self._max_quoted = max_quoted_field_chars
        self._piece = piece_chars
        self._max_row = max_row_chars
        self.lines: list[str] = []
        self.first_line = 1  # the physical line where the current row starts
        self.long_row: LongRow | None = None  # the current row, if too long to parse
        self._held = 0  # characters in `lines` once it holds two or more (the rare path)

    def __iter__(self) -> Iterator[str]:
        readline = self._readline
        lines = self.lines
        piece = self._piece
        line = readline(piece)
        while True:
            if lines or not line or len(line) == piece:
                line, ahead = self._unusual(line)  # `ahead`: the next line's start, read already
                if not line:
                    return
                lines.append(line)
                yield line
                line = ahead or readline(piece)
                continue
            lines.append(line)
            yield line
            line = readline(piece)

    def take(self) -> str:
        """The current row's text; the next row starts on the next line."""
        lines = self.lines
        if self.long_row is not None:
            raw = self.long_row.head
            self.first_line = self.long_row.last_line + 1
            self.long_row = None
        else:
            raw = "".join(lines)
            self.first_line += len(lines)  # one physical line each
        lines.clear()
        return raw

    def _unusual(self, line: str) -> tuple[str, str]:
        """The next line for the reader ("" at the end) and a piece read ahead."""
        lines = self.lines
        if not line:
            if lines:  # the reader wants more of a quoted field: none will come
                raise UnterminatedQuoteError(
                    self._uri, self._open_quote_line(), self.first_line, "at the end of the object"
                )
            return "", ""
        parts = [line]
        size = (len(lines[0]) if len(lines) == 1 else self._held if lines else 0) + len(line)
        ahead = ""
        while len(line) == self._piece and line[-1] != "\n" and size <= self._max_row:
            cut_at_cr = line[-1] == "\r"
            line = self._readline(self._piece)
            if cut_at_cr:  # the piece ended at a "\r": the "\n" of a cut "\r\n", or a new line
                if line == "\n":
                    parts.append(line)
                    size += 1
                else:
                    ahead = line
                break
            if not line:
                break
            parts.append(line)
            size += len(line)
        if size > self._max_row:
            return self._skip_long_row(parts, ahead)
        self._held = size
        return "".join(parts), ahead

    def _open_quote_line(self) -> int:
        """The line where the quoted field the held lines end in opened."""
        state, line, quote_line = _FIELD_START, self.first_line, self.first_line
        for piece in self.lines:
            state, opened = _scan(state, piece)
            if opened >= 0:
                quote_line = line
            if piece[-1] in "\r\n":
                line += 1
        return quote_line

    def _skip_long_row(self, parts: list[str], ahead: str) -> tuple[str, str]:
        """Read a row too long to parse to its end, following its quotes, keeping its head.

        `parts` are the pieces of the current line read so far (not given to the
        reader yet); `ahead` the start of the next line, if read already. Returns
        the line that ends the row in the reader, and a piece read ahead.
        """
        pieces = [*self.lines, *parts]
        if ahead:
            pieces.append(ahead)
        pieces.reverse()  # popped from the end
        readline = self._readline
        limit = self._max_quoted
        chars = self._piece
        state, line, size = _FIELD_START, self.first_line, 0
        quote_line = quote_at = 0
        head: list[str] = []
        kept = 0
        piece = ""
        while True:
            previous = piece
            piece = pieces.pop() if pieces else readline(chars)
            if not piece:  # the end of the object
                if state == _QUOTED:
                    raise UnterminatedQuoteError(
                        self._uri, quote_line, self.first_line, "at the end of the object"
                    )
                last_line = line
                break
            if kept < MAX_RAW_TEXT_CHARS:
                head.append(piece[: MAX_RAW_TEXT_CHARS - kept])
                kept += len(head[-1])
            if piece == "\n" and len(previous) == chars and previous[-1] == "\r":
                size += 1  # the rest of a "\r\n" cut in two, inside a quoted field
                continue
            state, opened = _scan(state, piece)
            if opened >= 0:
                quote_line, quote_at = line, size + opened
            size += len(piece)
            if state == _ENDED:
                last_line = line
                size -= len(piece) - len(piece.rstrip("\r\n"))
                if len(piece) == chars and piece[-1] == "\r":
                    rest = pieces.pop() if pieces else readline(chars)
                    if rest != "\n":
                        pieces.append(rest)
                break
            if piece[-1] in "\r\n":
                line += 1
            if state == _QUOTED and size - quote_at > limit:
                raise UnterminatedQuoteError(
                    self._uri,
                    quote_line,
                    self.first_line,
                    f"after {limit} characters (MAX_QUOTED_FIELD_CHARS), at line {line}",
                )
        self.long_row = LongRow(self.first_line, last_line, size, "".join(head), self._max_row)
        # The reader holds this row's lines if it is inside a quoted field: close it.
        end = '"\n' if self.lines else "\n"
        return end, "".join(reversed(pieces))  # at most the next line's start


def read_chunks(
    obj: SourceObject,
    text: IO[str],
    row_batch_size: int,
    resume_after_line: int = 1,
    *,
    max_quoted_field_chars: int = DEFAULT_MAX_QUOTED_FIELD_CHARS,
) -> Iterator[RowChunk]:
    """Parse an object's text into chunks of at most `row_batch_size` rows.

    Rows starting at or before `resume_after_line` (a checkpoint) are skipped.
    Raises MissingColumnsError before yielding anything if the header lacks a
    required column. Raises UnterminatedQuoteError where a quoted field never
    closes (or stays open past `max_quoted_field_chars`), after yielding the rows
    before it.
    """
    recorder = _LineRecorder(text, obj.uri, max_quoted_field_chars)
    reader = csv.reader(recorder, strict=False)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise SourceError(f"{obj.uri}: unreadable header: {exc}", obj.uri) from exc
    if header is None:
        log.warning("%s is empty: no header, no rows", obj.uri)
        return
    if recorder.long_row is not None:
        raise SourceError(
            f"{obj.uri}: the header is longer than {MAX_ROW_CHARS} characters", obj.uri
        )
    recorder.take()
    columns = HeaderMap(header, obj.uri)

    chunk_index = 0
    values: list[tuple[str, ...]] = []
    lines: list[int] = []
    raws: list[str] = []
    malformed: list[InvalidRow] = []
    last_line = 1

    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except UnterminatedQuoteError:
            if values or malformed:  # the rows before it are kept, with their checkpoint
                yield _chunk(obj, chunk_index, values, lines, raws, malformed, last_line)
            raise
        except csv.Error as exc:
            start = recorder.first_line
            raw = recorder.take()
            if start > resume_after_line:
                malformed.append(
                    InvalidRow(start, stored_raw_text(raw), (Reason(ROW_REASON, str(exc)),))
                )
                last_line = start
            continue
        start = recorder.first_line
        long_row = recorder.long_row
        raw = recorder.take()
        if start <= resume_after_line:
            continue
        if long_row is not None:
            malformed.append(long_row.invalid_row())
        elif not row:  # a blank line is not a row
            continue
        else:
            problem = _row_problem(row, columns.width, raw)
            if problem is not None:
                malformed.append(
                    InvalidRow(start, stored_raw_text(raw), (Reason(ROW_REASON, problem),))
                )
            else:
                values.append(columns.pick(row))
                lines.append(start)
                raws.append(raw)
        last_line = start
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
