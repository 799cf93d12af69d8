"""Source stage: listing, streaming, and parsing CSV the way users write it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from library import source
from library.errors import MissingColumnsError, SourceError
from library.models import LINE_COLUMN, SourceObject
from tests.conftest import S3_KEY, S3_SECRET, Bucket
from tests.helpers.data import HEADER, gz, row, rows, to_csv, zst

OBJ = SourceObject("s3://bucket/in.csv", "etag")


def parse(
    text: str, batch: int = 1000, resume_after: int = 1
) -> tuple[list[dict[str, object]], list[tuple[int, str, str]]]:
    """All rows of `text` (as dicts with their line) and its malformed rows."""
    good: list[dict[str, object]] = []
    bad: list[tuple[int, str, str]] = []
    for chunk in source.read_chunks(OBJ, io.StringIO(text, newline=""), batch, resume_after):
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
    big = "x" * (source.MAX_FIELD_CHARS + 10)
    text = to_csv([row(1), row(2, account_id=big), row(3)])
    good, bad = parse(text)
    assert [g["transaction_id"] for g in good] == ["tx-000001", "tx-000003"]
    assert bad[0][0] == 3 and "field larger than field limit" in bad[0][2]
    assert len(bad[0][1]) < source.MAX_RAW_TEXT_CHARS + 100


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
