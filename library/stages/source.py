"""Source stage: objects -> byte streams -> chunks of parsed rows.

Objects are listed from S3 (one key, or every CSV under a prefix, in key order)
or from the local file system (one file, or every CSV under a folder). Each is
streamed with smart-open, decompressed by its extension (.gz, .zst) and parsed
with the standard library's csv reader, which follows RFC 4180 (quoted commas,
quotes and newlines) and never holds more than one row in memory. Rows are
gathered into chunks of ROW_BATCH_SIZE, each row keeping the physical line of
the file where it starts and its raw text, so that an invalid row can be shown
exactly as it was written. Lines of plain text (no quote, carriage return, NUL or
non-ASCII character) are parsed a block at a time by polars instead, as the csv
reader would parse them, at about a tenth of the CPU (see `read_chunks`).

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

from library.config import (
    DEFAULT_MAX_QUOTED_FIELD_CHARS,
    DEFAULT_S3_CONNECT_TIMEOUT,
    DEFAULT_S3_MAX_ATTEMPTS,
    SourceSettings,
)
from library.contract import REQUIRED_COLUMNS
from library.errors import MissingColumnsError, SourceError, UnterminatedQuoteError
from library.models import (
    LINE_COLUMN,
    MAX_RAW_TEXT_CHARS,
    InvalidRow,
    Reason,
    RowChunk,
    SourceObject,
    printable,
    stored_raw_text,
    strip_newline,
)

log = logging.getLogger(__name__)

CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.zst")
COMPRESSION_SUFFIXES = (".gz", ".zst")
MAX_ROW_CHARS = 128 * 1024  # a longer row is an invalid row, not a memory hazard
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


def s3_client_for(settings: SourceSettings) -> Any | None:
    if settings.uri and is_s3(settings.uri):
        return make_s3_client(settings.key, settings.secret_value, settings.endpoint_url)
    return None


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
        config=Config(
            retries={"max_attempts": DEFAULT_S3_MAX_ATTEMPTS, "mode": "standard"},
            connect_timeout=DEFAULT_S3_CONNECT_TIMEOUT,
        ),
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
        raw = printable(strip_newline(self.head), length=self.chars)
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
        text: IO[str] | BlockReader,
        uri: str,
        max_quoted_field_chars: int,
        *,
        piece_chars: int = LINE_PIECE_CHARS,
        max_row_chars: int = MAX_ROW_CHARS,
    ) -> None:
        if not 2 <= piece_chars <= max_row_chars <= max_quoted_field_chars:
            raise ValueError("need 2 <= piece_chars <= max_row_chars <= max_quoted_field_chars")
        self._readline = text.readline
        self.max_row_chars = max_row_chars
        self._uri = uri
        self._max_quoted = max_quoted_field_chars
        self._piece = piece_chars
        self._max_row = max_row_chars
        self.lines: list[str] = []
        self.first_line = 1  # the physical line where the current row starts
        self.long_row: LongRow | None = None  # the current row, if too long to parse
        self.ahead = ""  # the next line's start, read already (after a cut "\r" or a long row)
        self._held = 0  # characters in `lines` once it holds two or more (the rare path)

    def between_rows(self) -> bool:
        """No line of a row held and nothing read ahead: the next row starts at the
        stream's position, so lines may be taken from the stream past the reader."""
        return not self.lines and not self.ahead and self.long_row is None

    def __iter__(self) -> Iterator[str]:
        readline = self._readline
        lines = self.lines
        piece = self._piece
        line = readline(piece)
        while True:
            if lines or not line or len(line) == piece:
                line, self.ahead = self._unusual(line)
                if not line:
                    return
                lines.append(line)
                yield line
                line = self.ahead or readline(piece)
                self.ahead = ""
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


# Text read at once. Its plain lines are set aside and parsed with the rest of the
# chunk's; a block shorter than MAX_ROW_CHARS holds no line too long by its length
# alone, so no block needs a line-by-line look (`_take_plain`).
FAST_BLOCK_CHARS = 1 << 16
# What only the csv reader may read: a quote, a carriage return (a line end of its
# own, or half of one), NUL, and anything not ASCII (undecodable bytes among them).
_NOT_PLAIN = re.compile("[^\x01-\x0c\x0e-\x21\x23-\x7f]")
_LINE_END = re.compile("\r\n|\r|\n")


def _is_plain(text: str) -> bool:
    return text.isascii() and "\r" not in text and "\x00" not in text


class BlockReader:
    """An object's text in blocks, for two readers at once.

    `plain_lines` hands the vectorised parser the complete lines, from the
    current position, before the first character only the csv reader may read;
    `readline` serves the csv reader's line feeder exactly as the text stream's own
    readline would (line ends "\r\n", "\r", "\n", and a limit). Both move the
    same position, so every line goes to exactly one of them, in order.
    """

    def __init__(self, text: IO[str], block_chars: int = FAST_BLOCK_CHARS) -> None:
        self._text = text
        self._block = block_chars
        self._buf = ""
        self._pos = 0

    def readline(self, limit: int) -> str:
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            return self._text.readline(limit)
        end = min(len(buf), pos + limit)
        found = _LINE_END.search(buf, pos, end)
        if found:
            self._pos = found.end()
            return buf[pos : found.end()]
        self._pos = end
        part = buf[pos:end]
        if len(part) < limit:  # the line goes on past the block
            part += self._text.readline(limit - len(part))
        return part

    def plain_lines(self) -> str:
        """Complete lines of plain text from the current position ("" if the next line
        is not plain, or not complete in the block)."""
        if self._pos >= len(self._buf):
            buf = self._text.read(self._block)
            while buf.endswith("\r"):  # never cut a "\r\n" between two blocks
                more = self._text.read(1)
                if not more:
                    break
                buf += more
            self._buf, self._pos = buf, 0
        buf, pos = self._buf, self._pos
        quote = buf.find('"', pos)  # the usual special character, found at memchr speed
        stop = len(buf) if quote < 0 else quote
        end = buf.rfind("\n", pos, stop) + 1
        if end > pos and not _is_plain(buf[pos:end]):
            special = _NOT_PLAIN.search(buf, pos, end)
            end = buf.rfind("\n", pos, special.start() if special else end) + 1
        if end <= pos:
            return ""
        self._pos = end
        return buf[pos:end]

    def unread(self, chars: int) -> None:
        """Give back the last `chars` characters `plain_lines` returned."""
        self._pos -= chars


RAW_COLUMN = "_raw"  # a row's text while a chunk is gathered (RowChunk.raw_text after)


@dataclass
class _Gathered:
    """The rows of the chunk being gathered: the csv reader's one by one, the
    vectorised parser's as frames, or as spans of plain lines parsed all at once
    when the chunk is made."""

    values: list[tuple[str, ...]]
    lines: list[int]
    raws: list[str]
    malformed: list[InvalidRow]
    frames: list[pl.DataFrame]
    spans: list[tuple[str, int, int]]  # text, first line, lines (each a row)
    rows: int = 0
    last_line: int = 1

    @classmethod
    def empty(cls, last_line: int) -> _Gathered:
        return cls([], [], [], [], [], [], 0, last_line)


def _plain_rows(
    span: str,
    first_line: int,
    resume_after_line: int,
    room: int,
    max_row_chars: int,
    gathered: _Gathered,
) -> tuple[pl.DataFrame, int, int]:
    """The rows of lines of plain text (no quote, CR, NUL or non-ASCII character) as
    the csv reader would read them: a line is a row; a blank line is no row. At
    most `room` rows are taken, and none from a line the csv reader would find too
    long (nor any after it).

    Returns the rows (text and line), the physical lines consumed and the characters
    of `span` left over."""
    lines = pl.Series([span]).str.split("\n").explode()
    lines = lines.head(lines.len() - 1)  # the "" after the last line end
    length = lines.str.len_bytes()  # ASCII: bytes are characters
    too_long = (length >= max_row_chars).arg_true()
    if too_long.len():
        lines, length = lines.head(too_long[0]), length.head(too_long[0])
    number = pl.int_range(first_line, first_line + lines.len(), dtype=pl.Int64, eager=True)
    counted = (length > 0) & (number > resume_after_line)
    taken = counted.cum_sum()
    if taken.len() and taken[-1] > room:
        keep = int((taken == room).arg_true()[0]) + 1
        lines, length, number, counted = (s.head(keep) for s in (lines, length, number, counted))
    left = len(span) - int((length + 1).sum())
    frame = pl.DataFrame({RAW_COLUMN: lines, LINE_COLUMN: number}).filter(counted)
    if frame.height:
        gathered.rows += frame.height
        gathered.last_line = int(frame.get_column(LINE_COLUMN)[-1])
    return frame, lines.len(), left


def _split_plain(frame: pl.DataFrame, columns: HeaderMap, gathered: _Gathered) -> None:
    """Split rows of plain text at every comma into the header's fields, as the csv
    reader would; a row with the wrong number of fields is malformed."""
    fields = frame.get_column(RAW_COLUMN).str.count_matches(",", literal=True) + 1
    misfit = fields != columns.width
    if misfit.any():
        for raw, line, found in zip(
            frame.get_column(RAW_COLUMN).filter(misfit).to_list(),
            frame.get_column(LINE_COLUMN).filter(misfit).to_list(),
            fields.filter(misfit).to_list(),
            strict=True,
        ):
            problem = f"expected {columns.width} fields as in the header, found {found}"
            gathered.malformed.append(
                InvalidRow(line, stored_raw_text(raw), (Reason(ROW_REASON, problem),))
            )
        frame = frame.filter(~misfit)
    if frame.height:
        split = frame.get_column(RAW_COLUMN).str.split_exact(",", columns.width - 1)
        parts = split.struct.unnest()
        gathered.frames.append(
            parts.select(
                [
                    parts.get_column(f"field_{i}").alias(name)
                    for name, i in zip(REQUIRED_COLUMNS, columns.indices, strict=True)
                ]
            ).with_columns(frame.get_column(LINE_COLUMN), frame.get_column(RAW_COLUMN))
        )


def _take_plain(
    span: str,
    first_line: int,
    columns: HeaderMap,
    resume_after_line: int,
    room: int,
    max_row_chars: int,
    gathered: _Gathered,
) -> tuple[int, int]:
    """Take a span of plain lines into the chunk. The usual span (every line a row,
    none too long) is only set aside, parsed with the chunk's others in one pass; one
    that runs past the chunk's room is cut at its last line that fits (the rest is read
    again for the next chunk). Any other goes through `_plain_rows` at once.

    Returns the physical lines consumed and the characters of `span` left over."""
    n = span.count("\n")
    taken, left = span, 0
    if n > room:
        end = _end_of_line(span, room)
        taken, left, n = span[:end], len(span) - end, room
    if (
        len(taken) < max_row_chars
        and first_line > resume_after_line
        and "\n\n" not in taken
        and taken[0] != "\n"
    ):
        gathered.spans.append((taken, first_line, n))
        gathered.rows += n
        gathered.last_line = first_line + n - 1
        return n, left
    frame, consumed, left = _plain_rows(
        span, first_line, resume_after_line, room, max_row_chars, gathered
    )
    if frame.height:
        _split_plain(frame, columns, gathered)
    return consumed, left


def _end_of_line(text: str, lines: int) -> int:
    """Where the `lines`-th line of `text` ends (after its line end)."""
    end = -1
    for _ in range(lines):
        end = text.index("\n", end + 1)
    return end + 1


def read_chunks(
    obj: SourceObject,
    text: IO[str],
    row_batch_size: int,
    resume_after_line: int = 1,
    *,
    max_quoted_field_chars: int = DEFAULT_MAX_QUOTED_FIELD_CHARS,
    vectorised: bool = True,
    block_chars: int = FAST_BLOCK_CHARS,
    piece_chars: int = LINE_PIECE_CHARS,
    max_row_chars: int = MAX_ROW_CHARS,
) -> Iterator[RowChunk]:
    """Parse an object's text into chunks of at most `row_batch_size` rows.

    Rows starting at or before `resume_after_line` (a checkpoint) are skipped.
    Raises MissingColumnsError before yielding anything if the header lacks a
    required column. Raises UnterminatedQuoteError where a quoted field never
    closes (or stays open past `max_quoted_field_chars`), after yielding the rows
    before it.

    Lines of plain text (no quote, carriage return, NUL or non-ASCII character), nearly
    every line of a usual file, are parsed a block at a time by polars (`_plain_rows`):
    such a line is one row split at every comma, as the csv reader would split it.
    Every other line goes through the csv reader, one row at a time, with the rules
    above; `vectorised=False` sends every line there (the reference the property
    test compares against). The other keywords are the limits, smaller in tests.
    """
    blocks = BlockReader(text, block_chars)
    recorder = _LineRecorder(
        blocks,
        obj.uri,
        max_quoted_field_chars,
        piece_chars=piece_chars,
        max_row_chars=max_row_chars,
    )
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
    rows = _Gathered.empty(1)
    plain = vectorised  # whether the next lines may be plain; off for one row after a long line

    while True:
        if plain and recorder.between_rows():
            span = blocks.plain_lines()
            if span:
                consumed, left = _take_plain(
                    span,
                    recorder.first_line,
                    columns,
                    resume_after_line,
                    row_batch_size - rows.rows,
                    recorder.max_row_chars,
                    rows,
                )
                recorder.first_line += consumed
                if left:
                    blocks.unread(left)
                    plain = consumed > 0  # none: the next line is too long, the reader's
                if rows.rows >= row_batch_size:
                    yield _chunk(obj, chunk_index, rows, columns)
                    chunk_index += 1
                    rows = _Gathered.empty(rows.last_line)
                continue
        plain = vectorised
        try:
            row = next(reader)
        except StopIteration:
            break
        except UnterminatedQuoteError:
            if rows.rows:  # the rows before it are kept, with their checkpoint
                yield _chunk(obj, chunk_index, rows, columns)
            raise
        except csv.Error as exc:
            start = recorder.first_line
            raw = recorder.take()
            if start > resume_after_line:
                rows.malformed.append(
                    InvalidRow(start, stored_raw_text(raw), (Reason(ROW_REASON, str(exc)),))
                )
                rows.rows += 1
                rows.last_line = start
            continue
        start = recorder.first_line
        long_row = recorder.long_row
        raw = recorder.take()
        if start <= resume_after_line:
            continue
        if long_row is not None:
            rows.malformed.append(long_row.invalid_row())
        elif not row:  # a blank line is not a row
            continue
        else:
            problem = _row_problem(row, columns.width, raw)
            if problem is not None:
                rows.malformed.append(
                    InvalidRow(start, stored_raw_text(raw), (Reason(ROW_REASON, problem),))
                )
            else:
                rows.values.append(columns.pick(row))
                rows.lines.append(start)
                rows.raws.append(raw)
        rows.rows += 1
        rows.last_line = start
        if rows.rows >= row_batch_size:
            yield _chunk(obj, chunk_index, rows, columns)
            chunk_index += 1
            rows = _Gathered.empty(rows.last_line)
    if rows.rows:
        yield _chunk(obj, chunk_index, rows, columns)


def _chunk(obj: SourceObject, index: int, rows: _Gathered, columns: HeaderMap) -> RowChunk:
    """The gathered rows as one frame in line order, with their raw text beside it."""
    if rows.spans:
        text = pl.Series(["".join(span for span, _, _ in rows.spans)])
        lines = text.str.split("\n").explode()
        numbers = [
            pl.int_range(first, first + n, dtype=pl.Int64, eager=True) for _, first, n in rows.spans
        ]
        plain = pl.DataFrame(
            {
                RAW_COLUMN: lines.head(lines.len() - 1),
                LINE_COLUMN: numbers[0] if len(numbers) == 1 else pl.concat(numbers),
            }
        )
        _split_plain(plain, columns, rows)
    parts = list(rows.frames)
    if rows.values:
        values = list(zip(*rows.values, strict=True))
        data: dict[str, Any] = {
            name: pl.Series(name, col, dtype=pl.String)
            for name, col in zip(REQUIRED_COLUMNS, values, strict=True)
        }
        data[LINE_COLUMN] = pl.Series(LINE_COLUMN, rows.lines, dtype=pl.Int64)
        data[RAW_COLUMN] = pl.Series(RAW_COLUMN, rows.raws, dtype=pl.String)
        parts.append(pl.DataFrame(data))
    if not parts:
        data = {name: pl.Series(name, [], dtype=pl.String) for name in REQUIRED_COLUMNS}
        data[LINE_COLUMN] = pl.Series(LINE_COLUMN, [], dtype=pl.Int64)
        data[RAW_COLUMN] = pl.Series(RAW_COLUMN, [], dtype=pl.String)
        parts.append(pl.DataFrame(data))
    # The parts are each in line order, and interleave.
    frame = parts[0] if len(parts) == 1 else pl.concat(parts, rechunk=True).sort(LINE_COLUMN)
    malformed = rows.malformed
    malformed.sort(key=lambda r: r.line_number)  # both parsers' malformed rows, in line order
    raw = frame.get_column(RAW_COLUMN)
    return RowChunk(obj, index, frame.drop(RAW_COLUMN), raw, malformed, rows.last_line)
