"""The row schema: every rule of the contract, one case per line."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from pydantic import ValidationError

from library.contract import Transaction
from tests.helpers.data import row


def errors(**overrides: str) -> dict[str, str]:
    try:
        Transaction.model_validate(row(1, **overrides))
    except ValidationError as exc:
        return {str(e["loc"][0]): e["msg"].removeprefix("Value error, ") for e in exc.errors()}
    return {}


def test_a_valid_row_is_typed() -> None:
    tx = Transaction.model_validate(
        row(1, event_time="2026-01-11T10:00:00+02:00", amount="42.1", card_present="TRUE")
    )
    assert tx.event_time == datetime(2026, 1, 11, 8, 0, tzinfo=UTC)
    assert tx.amount == Decimal("42.10")
    assert tx.card_present is True


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("transaction_id", "", "is required"),
        ("transaction_id", "tx 1", "may contain only A-Z a-z 0-9 . _ : -"),
        ("transaction_id", "x" * 65, "must be at most 64 characters"),
        ("event_time", "2026-01-11", "must be an ISO 8601 timestamp such as 2026-01-11T10:00:00Z"),
        ("event_time", "1700000000", "must be an ISO 8601 timestamp such as 2026-01-11T10:00:00Z"),
        ("event_time", "2026-02-29T00:00:00Z", "is not a valid calendar date"),
        ("event_time", "2026-01-11T24:00:00Z", "is not a valid time of day"),
        ("event_time", "2026-01-11T10:00:60Z", "is not a valid time of day"),
        ("event_time", "2026-01-11T10:00:00+24:00", "has an invalid UTC offset"),
        ("event_time", "0001-01-01T00:00:00+01:00", "is out of range once converted to UTC"),
        ("account_id", "   ", "must not be blank"),
        ("account_id", "a" * 65, "must be at most 64 characters"),
        ("merchant_id", "", "is required"),
        (
            "merchant_category",
            "Grocery",
            "must be 1-32 characters of lowercase letters, digits and _",
        ),
        (
            "merchant_category",
            "a" * 33,
            "must be 1-32 characters of lowercase letters, digits and _",
        ),
        ("amount", "0", "must be greater than 0"),
        ("amount", "0.00", "must be greater than 0"),
        ("amount", "-5", "must be greater than 0"),
        ("amount", "1.234", "must have at most 2 decimal places"),
        ("amount", "10000000000", "must be less than 10000000000"),
        ("amount", "1e3", "must be a plain decimal number such as 42.17"),
        ("amount", "1,000.00", "must be a plain decimal number such as 42.17"),
        ("currency", "usd", "must be an ISO 4217 code: 3 upper-case letters"),
        ("currency", "US", "must be an ISO 4217 code: 3 upper-case letters"),
        ("country", "USA", "must be an ISO 3166-1 alpha-2 code: 2 upper-case letters"),
        ("channel", "web", "must be one of online, pos, atm"),
        ("channel", "POS", "must be one of online, pos, atm"),
        ("card_present", "yes", "must be true, false, 1 or 0"),
    ],
)
def test_each_rule_names_its_column(column: str, value: str, message: str) -> None:
    assert errors(**{column: value}) == {column: message}


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("event_time", "2026-01-11T10:00:00Z"),
        ("event_time", "2026-01-11 10:00"),
        ("event_time", "2026-01-11t10:00:00.123456789-05:30"),
        ("event_time", "2024-02-29T00:00:00+0100"),
        ("event_time", "9999-12-31T23:59:59.999999Z"),
        ("transaction_id", "A.b_c:d-9"),
        ("amount", "9999999999.99"),
        ("amount", "0.01"),
        ("amount", "42.100"),
        ("amount", "007"),
        ("card_present", "False"),
        ("card_present", "0"),
        ("account_id", " padded "),
        ("account_id", "ünïcödé"),
    ],
)
def test_accepted_values(column: str, value: str) -> None:
    assert errors(**{column: value}) == {}


def test_every_broken_column_is_reported_at_once() -> None:
    assert set(errors(amount="-1", currency="x", channel="?")) == {"amount", "currency", "channel"}


def test_time_without_offset_is_utc_and_fraction_truncated_to_microseconds() -> None:
    tx = Transaction.model_validate(row(1, event_time="2026-01-11T10:00:00.1234569"))
    assert tx.event_time == datetime(2026, 1, 11, 10, 0, 0, 123456, tzinfo=UTC)
