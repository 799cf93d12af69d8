"""The vectorised validator classifies and types every row exactly as the schema does."""

from __future__ import annotations

from decimal import Decimal

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from library.contract import REQUIRED_COLUMNS, Transaction
from library.models import LINE_COLUMN, RowChunk, SourceObject
from library.stages.validate import classify, validate_chunk
from tests.helpers.data import row

# Values near the edges of each rule, plus arbitrary text.
EDGE_VALUES = {
    "transaction_id": ["tx-1", "", "a" * 64, "a" * 65, "tx 1", "tx/1", "ü", "A.b_c:d-9"],
    "event_time": [
        "2026-01-11T10:00:00Z",
        "2026-01-11 10:00",
        "2026-02-29T00:00:00Z",
        "2024-02-29T23:59:59.9999999+01:00",
        "2026-01-11T24:00:00Z",
        "2026-01-11T10:00:60Z",
        "2026-01-11T10:00:00+23:59",
        "2026-01-11T10:00:00+24:00",
        "0000-01-01T00:00:00Z",
        "0001-01-01T00:00:00+00:01",
        "9999-12-31T23:59:59-00:01",
        "2026-1-11T10:00:00Z",
        "2026-01-11T10:00:00z",
        "2026-01-11T10:00:00.Z",
        "2026-01-11T10:00:00,5Z",
        "٢٠٢٦-01-11T10:00:00Z",
        "2026-01-11T10:00:00Z\n",
        "1900-02-29T00:00:00Z",
        "2000-02-29T00:00:00Z",
    ],
    "account_id": ["acc", "", " ", "\t\u3000", "\x1c", "a" * 64, "a" * 65, "é" * 64],
    "merchant_id": ["m", "", "\u00a0", "x\ny"],
    "merchant_category": ["grocery", "", "a" * 32, "a" * 33, "Grocery", "gas_1", "gas-1"],
    "amount": [
        "42.17",
        "0",
        "0.00",
        "0.01",
        "-1",
        "1.234",
        "1.230",
        "9999999999.99",
        "10000000000",
        "0009999999999.990",
        "1e3",
        ".5",
        "5.",
        "+5",
        " 5",
        "٣",
        "00000000000000000000001",
        "",
    ],
    "currency": ["USD", "usd", "US", "USDX", "ÜSD", ""],
    "country": ["US", "us", "USA", ""],
    "channel": ["online", "pos", "atm", "POS", "web", ""],
    "card_present": ["true", "TRUE", "False", "1", "0", "yes", "", "truE", "ſalse", " true"],
}


def schema_verdict(values: dict[str, str]) -> Transaction | None:
    try:
        return Transaction.model_validate(values)
    except ValidationError:
        return None


def as_frame(records: list[dict[str, str]]) -> pl.DataFrame:
    data = {c: pl.Series(c, [r[c] for r in records], dtype=pl.String) for c in REQUIRED_COLUMNS}
    data[LINE_COLUMN] = pl.Series(LINE_COLUMN, list(range(2, len(records) + 2)), dtype=pl.Int64)
    return pl.DataFrame(data)


def column_value(column: str) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(EDGE_VALUES[column]), st.text(max_size=12))


@st.composite
def records(draw: st.DrawFn) -> dict[str, str]:
    base = row(draw(st.integers(0, 10_000)))
    for column in draw(st.sets(st.sampled_from(REQUIRED_COLUMNS), max_size=3)):
        base[column] = draw(column_value(column))
    return base


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records(), min_size=1, max_size=20))
def test_vectorised_rules_agree_with_the_schema(batch: list[dict[str, str]]) -> None:
    # Surrogates and NULs never reach validation: the source turns them into invalid rows.
    batch = [
        {k: v.replace("\x00", "").encode("utf-8", "replace").decode() for k, v in r.items()}
        for r in batch
    ]
    typed, mask = classify(as_frame(batch))
    for i, record in enumerate(batch):
        expected = schema_verdict(record)
        assert mask[i] == (expected is not None), record
        if expected is not None:
            got = typed.row(i, named=True)
            for column in REQUIRED_COLUMNS:
                assert got[column] == getattr(expected, column), (column, record)


def test_every_edge_value_is_classified_alike() -> None:
    batch = []
    for column, values in EDGE_VALUES.items():
        batch.extend(row(i, **{column: v}) for i, v in enumerate(values))
    _typed, mask = classify(as_frame(batch))
    for i, record in enumerate(batch):
        assert mask[i] == (schema_verdict(record) is not None), record


def test_validate_chunk_keeps_invalid_rows_with_line_raw_text_and_reasons() -> None:
    records = [row(1), row(2, amount="-3", currency="eur"), row(3)]
    chunk = RowChunk(
        SourceObject("s3://b/k.csv", "v1"),
        0,
        as_frame(records),
        ["raw 1\n", "raw, 2\r\n", "raw 3"],
        [],
        4,
    )
    validated = validate_chunk(chunk)
    assert validated.valid.get_column("transaction_id").to_list() == ["tx-000001", "tx-000003"]
    assert validated.valid.get_column("amount").to_list() == [
        Decimal(row(1)["amount"]),
        Decimal(row(3)["amount"]),
    ]
    [bad] = validated.invalid
    assert bad.line_number == 3
    assert bad.raw_text == "raw, 2"
    assert {(r.column, r.value) for r in bad.reasons} == {("amount", "-3"), ("currency", "eur")}
