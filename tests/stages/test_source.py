"""Source stage: listing, streaming, and parsing CSV the way users write it."""

from __future__ import annotations

import csv
import io
import itertools
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from library import models
from library.config import DEFAULT_MAX_QUOTED_FIELD_CHARS
from library.errors import MissingColumnsError, SourceError, UnterminatedQuoteError
from library.models import LINE_COLUMN, SourceObject
from library.stages import source
from tests.conftest import S3_KEY, S3_SECRET, Bucket
from tests.helpers.data import HEADER, gz, row, rows, to_csv, zst

OBJ = SourceObject("s3://bucket/in.csv", "etag")


def parse(
    text: str, batch: int = 1000, resume_after: int = 1, **options: int
) -> tuple[list[dict[str, object]], list[tuple[int, str, str]]]:
    """All rows of `text` (as dicts with their line) and its malformed rows."""
    good: list[dict[str, object]] = []
    bad: list[tuple[int, str, str]] = []
    text_io = io.StringIO(text, newline="")
    for chunk in source.read_chunks(OBJ, text_io, batch, resume_after, **options):
        good.extend(chunk.frame.to_dicts())
        bad.extend((m.line_number, m.raw_text, m.reasons[0].message) for m in chunk.malformed)
    return good, bad


def test_quoted_commas_quotes_and_newlines_survive() -> None:
    text = to_csv([row(1, account_id='acc, "quoted"\nsecond line'), row(2)])
    good, bad = parse(text)
    assert bad == []
    assert good[0]["account_id"] == 'acc, "quoted"\nsecond line'
    assert [g[LINE_COLUMN] for g in good] == [2, 4]  # the first row spans lines 2-3


def test_bom_crlf_and_missing_final_newline() -> None:
    text = "\ufeff" + to_csv(rows(3), line_end="\r\n").rstrip("\r\n")
    good, bad = parse(text)
    assert bad == []
    assert [g["transaction_id"] for g in good] == ["tx-000000", "tx-000001", "tx-000002"]
    assert good[-1]["card_present"] == "true"  # the last field, with no line end after it


def test_columns_in_any_order_extra_columns_ignored_header_case_and_spaces() -> None:
    header = ["note", *reversed(HEADER)]
    text = to_csv([{**row(1), "note": "x"}], header=header)
    text = text.replace("transaction_id", " Transaction_ID ", 1)
    good, _ = parse(text)
    assert good[0]["transaction_id"] == "tx-000001"
    assert good[0]["amount"] == row(1)["amount"]


def test_blank_lines_are_skipped_and_line_numbers_stay_physical() -> None:
    lines = to_csv(rows(2)).splitlines()
    text = "\n".join([lines[0], "", lines[1], "", "", lines[2]]) + "\n"
    good, _ = parse(text)
    assert [g[LINE_COLUMN] for g in good] == [3, 6]


def test_malformed_rows_are_kept_with_line_raw_text_and_reason() -> None:
    lines = to_csv(rows(2)).splitlines()
    text = (
        "\n".join([lines[0], lines[1], "tx-x,only,three", lines[2] + ",extra", "tx-n,\x00"]) + "\n"
    )
    good, bad = parse(text)
    assert [g["transaction_id"] for g in good] == ["tx-000000"]
    assert bad == [
        (3, "tx-x,only,three", "expected 10 fields as in the header, found 3"),
        (4, lines[2] + ",extra", "expected 10 fields as in the header, found 11"),
        (5, "tx-n,\ufffd", "expected 10 fields as in the header, found 2"),
    ]


def test_invalid_utf8_is_an_invalid_row_not_a_crash(tmp_path: Path) -> None:
    data = (
        to_csv(rows(1)).encode()
        + b"tx-\xff\xfe,"
        + to_csv([row(2)]).splitlines()[1].encode()[10:]
        + b"\n"
    )
    path = tmp_path / "latin.csv"
    path.write_bytes(data)
    [obj] = source.list_objects(str(path), None)
    with source.open_text(obj, None) as (text, counter):
        chunks = list(source.read_chunks(obj, text, 100))
    assert counter.bytes_read == len(data)
    [bad] = chunks[0].malformed
    assert bad.line_number == 3
    assert bad.reasons[0].message == "is not valid UTF-8"
    assert "\ufffd" in bad.raw_text


def test_an_oversized_field_is_an_invalid_row_and_reading_goes_on() -> None:
    big = "x" * (source.MAX_ROW_CHARS + 10)
    text = to_csv([row(1), row(2, account_id=big), row(3)])
    good, bad = parse(text)
    assert [g["transaction_id"] for g in good] == ["tx-000001", "tx-000003"]
    assert [g[LINE_COLUMN] for g in good] == [2, 4]
    line = text.splitlines()[2]
    assert bad == [
        (
            3,
            line[: models.MAX_RAW_TEXT_CHARS]
            + f"... [{len(line) - models.MAX_RAW_TEXT_CHARS} more characters]",
            f"row of {len(line)} characters is longer than the limit of {source.MAX_ROW_CHARS}",
        )
    ]


# -- quotes: text inside a quoted field never becomes a row -------------------------


def smuggling_text(field_chars: int) -> tuple[str, str]:
    """Three rows; the second holds a quoted field of about `field_chars` characters
    whose lines include a whole CSV row (tx-SMUGGLED). Returns the text and that row."""
    smuggled = to_csv([row(99, transaction_id="tx-SMUGGLED", amount="9999.00")]).splitlines()[1]
    filler = "y" * 999 + "\n"
    field = filler * (field_chars // 2000) + smuggled + "\n" + filler * (field_chars // 2000)
    return to_csv([row(1), row(2, account_id=field), row(3)]), smuggled


def test_a_csv_line_inside_a_long_quoted_field_is_never_read_as_a_row() -> None:
    text, smuggled = smuggling_text(140_000)
    assert "\n" + smuggled + "\n" in text and len(text) > 140_000
    good, bad = parse(text)
    last = 3 + text.count("\n", text.index("tx-000002"), text.index("tx-000003")) - 1
    assert [(g["transaction_id"], g[LINE_COLUMN]) for g in good] == [
        ("tx-000001", 2),
        ("tx-000003", last + 1),
    ]
    [(line, raw, reason)] = bad
    assert line == 3 and raw.startswith(text.splitlines()[2])
    assert reason.startswith("row of ") and reason.endswith(
        f" characters over lines 3-{last} is longer than the limit of {source.MAX_ROW_CHARS}"
    )
    assert "SMUGGLED" not in raw  # past the raw text kept


def test_a_10mb_quoted_field_with_newlines_within_the_limit_is_one_invalid_row() -> None:
    field = ("z" * 99 + "\n") * 100_000  # 10 MB over 100,000 lines
    text = to_csv([row(1), row(2, account_id=field), row(3)])
    good, bad = parse(text, max_quoted_field_chars=16 * 1024 * 1024)
    assert [(g["transaction_id"], g[LINE_COLUMN]) for g in good] == [
        ("tx-000001", 2),
        ("tx-000003", 100_004),
    ]
    long_row = text[text.index("tx-000002") : text.index("tx-000003") - 1]
    assert [(b[0], b[2]) for b in bad] == [
        (
            3,
            f"row of {len(long_row)} characters over lines 3-100003"
            f" is longer than the limit of {source.MAX_ROW_CHARS}",
        )
    ]
    assert bad[0][1].startswith(long_row[:100]) and len(bad[0][1]) < models.MAX_RAW_TEXT_CHARS + 50


def test_a_quoted_field_open_past_the_limit_fails_the_object_naming_its_line() -> None:
    field = ("z" * 99 + "\n") * 100_000
    text = to_csv([row(1), row(2), row(3, account_id=field), row(4)])
    chunks = source.read_chunks(OBJ, io.StringIO(text, newline=""), 1000)
    first = next(chunks)  # the rows before it come first, to be written
    assert first.frame.get_column("transaction_id").to_list() == ["tx-000001", "tx-000002"]
    assert first.last_line == 3
    with pytest.raises(UnterminatedQuoteError) as err:
        next(chunks)
    assert (err.value.quote_line, err.value.row_line) == (4, 4)
    assert str(err.value).startswith(
        "s3://bucket/in.csv: line 4: unterminated quoted field: the quote opened there is still"
        f" open after {DEFAULT_MAX_QUOTED_FIELD_CHARS} characters (MAX_QUOTED_FIELD_CHARS)"
    )
    assert str(err.value).endswith("nothing from line 4 on is read")


def test_a_quote_left_open_to_the_end_of_the_object_fails_it_naming_the_line() -> None:
    lines = to_csv(rows(30)).splitlines(keepends=True)
    lines[11] = lines[11].replace(",acc-", ',"acc-', 1)  # row 10 (line 12): a stray quote
    text = "".join(lines)
    chunks = source.read_chunks(OBJ, io.StringIO(text, newline=""), 4)
    got = [c.frame.get_column(LINE_COLUMN).to_list() for c in itertools.islice(chunks, 3)]
    assert got == [[2, 3, 4, 5], [6, 7, 8, 9], [10, 11]]  # every row before it
    with pytest.raises(UnterminatedQuoteError) as err:
        next(chunks)
    assert (err.value.quote_line, err.value.row_line) == (12, 12)
    assert "the quote opened there is still open at the end of the object" in str(err.value)


def test_the_error_names_the_line_where_the_quote_opened_not_where_the_row_starts() -> None:
    text = to_csv([row(1)]) + 'tx-2,"two\nlines",x,"open\nand never\nclosed\n'
    with pytest.raises(UnterminatedQuoteError) as err:
        parse(text)
    assert (err.value.quote_line, err.value.row_line) == (4, 3)


def test_a_long_unquoted_line_is_one_invalid_row_even_with_quotes_inside() -> None:
    # Quotes inside an unquoted field are text; a quoted field opening after a comma
    # closes on the same line: the row ends at the line's end.
    long_line = "tx-long," + 'a"b' * 400_000 + ',"quoted, ""field""",' + "c" * 300_000
    lines = to_csv(rows(3)).splitlines(keepends=True)
    text = "".join([*lines[:2], long_line + "\r\n", *lines[2:]])
    good, bad = parse(text)
    assert [g[LINE_COLUMN] for g in good] == [2, 4, 5]
    assert [(b[0], b[2]) for b in bad] == [
        (
            3,
            f"row of {len(long_line)} characters is longer than the limit of {source.MAX_ROW_CHARS}",
        )
    ]


@pytest.mark.parametrize("line_end", ["\n", "\r\n", "\r"])
def test_line_ends_cut_by_the_piece_limit_keep_line_numbers(line_end: str) -> None:
    # A line of exactly one piece, and of one piece minus one character (its "\r\n" cut
    # in two by the limit): both join again, so the lines after keep their numbers.
    lines = to_csv(rows(4)).splitlines()
    for pad in (source.LINE_PIECE_CHARS - len(line_end), source.LINE_PIECE_CHARS - 1):
        padded = lines[2] + ",x" + "x" * (pad - len(lines[2]) - 2)
        text = line_end.join([lines[0], lines[1], padded, lines[3], lines[4]]) + line_end
        good, bad = parse(text)
        assert [g[LINE_COLUMN] for g in good] == [2, 4, 5], (pad, line_end)
        assert [b[0] for b in bad] == [3] and "found 11" in bad[0][2]


def test_missing_column_fails_the_object_naming_column_and_object() -> None:
    header = [c for c in HEADER if c != "amount"]
    with pytest.raises(MissingColumnsError) as err:
        parse(to_csv(rows(2), header=header))
    assert str(err.value) == "s3://bucket/in.csv: missing required column: amount"


def test_duplicate_header_column_is_refused() -> None:
    text = ",".join([*HEADER, "amount"]) + "\n"
    with pytest.raises(SourceError, match="names column amount twice"):
        parse(text)


def test_empty_object_yields_nothing() -> None:
    assert parse("") == ([], [])


def test_chunks_hold_at_most_row_batch_size_rows_and_end_at_their_last_line() -> None:
    text = to_csv(rows(25))
    chunks = list(source.read_chunks(OBJ, io.StringIO(text, newline=""), 10))
    assert [c.rows_read for c in chunks] == [10, 10, 5]
    assert [c.last_line for c in chunks] == [11, 21, 26]


def test_resume_skips_rows_up_to_the_checkpoint() -> None:
    good, _ = parse(to_csv(rows(10)), resume_after=6)
    assert [g[LINE_COLUMN] for g in good] == [7, 8, 9, 10, 11]


def test_local_folder_lists_csv_gz_zst_recursively_in_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.csv.gz").write_bytes(gz(to_csv(rows(2))))
    (tmp_path / "1.csv").write_text(to_csv(rows(3)))
    (tmp_path / "3.csv.zst").write_bytes(zst(to_csv(rows(4))))
    (tmp_path / "notes.txt").write_text("not data")
    objects = source.list_objects(str(tmp_path), None)
    assert [Path(o.uri).relative_to(tmp_path.resolve()).as_posix() for o in objects] == [
        "1.csv",
        "3.csv.zst",
        "b/2.csv.gz",
    ]
    counts = []
    for obj in objects:
        with source.open_text(obj, None) as (text, _):
            counts.append(sum(c.rows_read for c in source.read_chunks(obj, text, 100)))
    assert sorted(counts) == [2, 3, 4]


def test_local_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file or folder"):
        source.list_objects(str(tmp_path / "nope"), None)


def s3_client(endpoint: str, secret: str = S3_SECRET) -> object:
    return source.make_s3_client(S3_KEY, secret, endpoint)


def test_s3_prefix_lists_csv_objects_in_key_order_with_etag_and_size(
    bucket: Bucket, s3_endpoint: str
) -> None:
    bucket.put("in/b.csv", to_csv(rows(1)))
    bucket.put("in/a.csv.gz", gz(to_csv(rows(1))))
    bucket.put("in/c.csv.zst", zst(to_csv(rows(1))))
    bucket.put("in/readme.md", "no")
    bucket.put("other/x.csv", to_csv(rows(1)))
    objects = source.list_objects(bucket.uri("in/"), s3_client(s3_endpoint))
    assert [o.uri for o in objects] == [
        bucket.uri(k) for k in ("in/a.csv.gz", "in/b.csv", "in/c.csv.zst")
    ]
    assert all(o.version and o.size for o in objects)
    for obj in objects:
        with source.open_text(obj, s3_client(s3_endpoint)) as (text, _):
            [chunk] = list(source.read_chunks(obj, text, 100))
            assert chunk.frame.get_column("transaction_id").to_list() == ["tx-000000"]


def test_s3_single_key_and_folder_without_slash(bucket: Bucket, s3_endpoint: str) -> None:
    uri = bucket.put("in/one.csv", to_csv(rows(1)))
    bucket.put("in/two.csv", to_csv(rows(1)))
    client = s3_client(s3_endpoint)
    assert [o.uri for o in source.list_objects(uri, client)] == [uri]
    assert len(source.list_objects(bucket.uri("in"), client)) == 2
    with pytest.raises(SourceError, match="no object or prefix"):
        source.list_objects(bucket.uri("missing"), client)


def test_s3_missing_bucket_is_a_clear_source_error(s3_endpoint: str) -> None:
    with pytest.raises(SourceError, match=r"NoSuchBucket.*check SOURCE_URI"):
        source.list_objects("s3://no-such-bucket-here/in/", s3_client(s3_endpoint))


# -- the line reader against the csv reader, on any text ----------------------------


def reference_rows(text: str) -> tuple[list[tuple[int, int, int, list[str]]], bool]:
    """The rows the csv reader reads from whole lines: (first line, last line,
    characters, fields), and whether the text ends inside a quoted field."""
    lines = io.StringIO(text, newline="").readlines()
    given = {"lines": 0, "open_at_end": False}

    def feed() -> Iterator[str]:
        for line in lines:
            given["lines"] += 1
            yield line
        given["open_at_end"] = given["lines"] > 0  # asked for more in the middle of a row

    rows: list[tuple[int, int, int, list[str]]] = []
    first = 1
    for fields in csv.reader(feed(), strict=False):
        n, given["lines"] = int(given["lines"]), 0
        rows.append((first, first + n - 1, sum(map(len, lines[first - 1 : first - 1 + n])), fields))
        first += n
    return rows, bool(given["open_at_end"])


def line_end_length(text: str, line: int) -> int:
    physical = io.StringIO(text, newline="").readlines()[line - 1]
    return len(physical) - len(physical.rstrip("\r\n"))


@settings(max_examples=800, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "b", ",", '"', "\n", "\r", "\r\n"]), max_size=60).map("".join),
    st.integers(2, 6),
    st.integers(0, 12),
)
def test_the_line_reader_splits_rows_as_the_csv_reader_does(
    text: str, piece: int, extra: int
) -> None:
    """Rows up to the row limit are the csv reader's own; a longer row is read to the end
    the csv reader would give it, never parsed; an open quote at the end is an error."""
    max_row = piece + extra
    expected: list[tuple[object, ...]] = []
    rows, open_at_end = reference_rows(text)
    for i, (first, last, chars, fields) in enumerate(rows):
        if open_at_end and i == len(rows) - 1:
            expected.append(("open", first))
        elif chars > max_row:
            expected.append(("long", first, last, chars - line_end_length(text, last)))
        else:
            expected.append(("row", first, fields))
    recorder = source._LineRecorder(
        io.StringIO(text, newline=""), "mem", 10**6, piece_chars=piece, max_row_chars=max_row
    )
    got: list[tuple[object, ...]] = []
    try:
        for fields in csv.reader(recorder, strict=False):
            first, long_row = recorder.first_line, recorder.long_row
            recorder.take()
            if long_row is None:
                got.append(("row", first, fields))
            else:
                got.append(("long", first, long_row.last_line, long_row.chars))
    except UnterminatedQuoteError as exc:
        got.append(("open", exc.row_line))
    assert got == expected


@pytest.mark.parametrize("quoted", [False, True])
def test_memory_does_not_follow_the_length_of_a_line(tmp_path: Path, quoted: bool) -> None:
    # 40 MB on one line, unquoted (one invalid row) or in a quoted field closed within
    # the limit: the reader holds a piece and a row's worth at most, never the line.
    path = tmp_path / "long.csv"
    lines = to_csv(rows(2)).splitlines(keepends=True)
    with path.open("w") as out:
        out.write(lines[0] + lines[1])
        out.write('tx-long,"' if quoted else "tx-long,")
        for _ in range(40):
            out.write("w" * 1_000_000)
        out.write('"\n' if quoted else "\n")
        out.write(lines[2])
    [obj] = source.list_objects(str(path), None)
    with source.open_text(obj, None) as (text, _):  # imports done before measuring
        text.readline(10)
    tracemalloc.start()
    try:
        with source.open_text(obj, None) as (text, _):
            chunks = list(source.read_chunks(obj, text, 100, max_quoted_field_chars=64 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [c.frame.height for c in chunks] == [2]
    [long_row] = chunks[0].malformed
    chars = len("tx-long,") + 40_000_000 + (2 if quoted else 0)
    assert long_row.line_number == 3 and f"row of {chars} characters" in long_row.reasons[0].message
    assert peak < 3 << 20  # the 1 MiB read buffer and a row's worth, not the 40 MB line


# -- the vectorised parser against the csv reader, on any text -------------------------

PLAIN = ["a", "b", "1", " ", "-", ".", "Z"]
FIELD_CHARS = st.sampled_from([*PLAIN * 6, ",", '"', '"', "\n", "\r", "é", "\x00", "\udc80"])
FIELD = st.one_of(
    st.text(st.sampled_from(PLAIN), max_size=5),
    st.text(FIELD_CHARS, max_size=4),
    st.text(st.sampled_from(PLAIN), min_size=30, max_size=90),  # rows over the row limit
)
LINE = st.tuples(
    st.lists(FIELD, min_size=0, max_size=12).map(",".join),
    st.sampled_from(["\n", "\n", "\n", "\n", "\r\n", "\r", ""]),
).map("".join)


def chunks_of(text: str, vectorised: bool, **options: int) -> list[tuple[object, ...]]:
    """Everything read_chunks yields (rows, lines, raw text as stored, malformed rows,
    chunk ends) and the error that ends the object, if any."""
    out: list[tuple[object, ...]] = []
    text_io = io.StringIO(text, newline="")
    try:
        for chunk in source.read_chunks(OBJ, text_io, vectorised=vectorised, **options):  # type: ignore[arg-type]
            out.append(
                (
                    chunk.index,
                    chunk.last_line,
                    chunk.frame.to_dicts(),
                    [models.stored_raw_text(raw) for raw in chunk.raw_text],
                    [(m.line_number, m.raw_text, m.reasons) for m in chunk.malformed],
                )
            )
    except SourceError as exc:
        out.append((type(exc).__name__, str(exc)))
    return out


@settings(max_examples=600, deadline=None)
@given(
    st.lists(LINE, max_size=40).map("".join),
    st.integers(1, 300),
    st.integers(8, 64),
    st.integers(120, 170),
    st.integers(0, 300),
    st.integers(1, 7),
    st.integers(1, 12),
)
def test_the_vectorised_parser_reads_every_text_as_the_csv_reader_path_does(
    body: str,
    block: int,
    piece: int,
    max_row: int,
    quoted_extra: int,
    batch: int,
    resume_after: int,
) -> None:
    """Plain lines parsed by polars, every other line by the csv reader: the same rows,
    line numbers, raw text, reasons, chunks and errors as the csv reader alone."""
    text = ",".join(HEADER) + "\n" + body
    options = {
        "row_batch_size": batch,
        "resume_after_line": resume_after,
        "block_chars": block,
        "piece_chars": piece,
        "max_row_chars": max_row,
        "max_quoted_field_chars": max_row + quoted_extra,
    }
    assert chunks_of(text, True, **options) == chunks_of(text, False, **options)


def test_the_vectorised_parser_takes_plain_lines_and_leaves_the_rest() -> None:
    """A quoted row between plain ones: both parsers used, rows in line order."""
    text = to_csv([row(1), row(2, account_id='acc "x"\ny'), row(3), row(4)])
    text_io = io.StringIO(text, newline="")
    [chunk] = source.read_chunks(OBJ, text_io, 100)
    assert chunk.frame[LINE_COLUMN].to_list() == [2, 3, 5, 6]
    assert chunk.frame["account_id"][1] == 'acc "x"\ny'
    assert models.stored_raw_text(chunk.raw_text[2]) == text.splitlines()[4]
