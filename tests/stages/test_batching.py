"""Cutting a prepared chunk into work units: what was prepared travels with its rows."""

from __future__ import annotations

import orjson
import pytest

from library.models import PreparedChunk, RowChunk, SourceObject, WorkUnit
from library.score.codec import NativeCodec
from library.stages.batching import plan_units
from library.stages.sink import Sink
from library.stages.validate import validate_chunk
from tests.helpers.data import row, rows
from tests.stages.test_validate import as_frame

OBJ = SourceObject("s3://b/in.csv", "etag-1")


def prepared(records: list[dict[str, str]]) -> PreparedChunk:
    chunk = RowChunk(OBJ, 0, as_frame(records), [""] * len(records), [], len(records) + 1)
    validated = validate_chunk(chunk)
    valid = validated.valid
    return PreparedChunk(validated, NativeCodec().prepare(valid), Sink.prepare_copy_lines(valid))


def test_each_unit_carries_its_own_slice_of_every_preparation() -> None:
    records = rows(250)
    records[120] = row(120, amount="-1")  # one invalid row: the valid rows shift
    units = list(plan_units(prepared(records), 100, first_seq=7, chunk_number=0))
    assert [u.seq for u in units] == [7, 8, 9]
    assert [u.transactions.height for u in units] == [100, 100, 49]
    for u in units:
        ids = u.transactions.get_column("transaction_id").to_list()
        sent = [orjson.loads(p)["transaction_id"] for p in u.requests.get_column("payload")]
        assert sent == ids
        assert [line.split(",", 1)[0] for line in u.copy_lines.to_list()] == ids
    assert [r.line_number for r in units[1].invalid] == [122]  # the line of row 120


def test_a_chunk_without_valid_rows_is_one_unit_of_invalid_rows() -> None:
    [unit] = plan_units(prepared([row(1, amount="x")]), 100, first_seq=0, chunk_number=3)
    assert unit.transactions.height == unit.requests.height == unit.copy_lines.len() == 0
    assert len(unit.invalid) == 1 and unit.chunk == 3


def test_a_preparation_that_does_not_match_its_rows_is_refused() -> None:
    good = prepared(rows(3))
    with pytest.raises(AssertionError, match="not aligned"):
        PreparedChunk(good.chunk, good.requests.slice(0, 2), good.copy_lines)
    with pytest.raises(AssertionError, match="not aligned"):
        WorkUnit(OBJ, 0, good.chunk.valid, good.requests, good.copy_lines.slice(1), [], 4)
