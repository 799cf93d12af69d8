"""The input row contract (shared/CONTRACT.md, section 1), written once.

`Transaction` is the pydantic schema of one CSV row. It is the reference: the
vectorised validator in `library.stages.validate` applies the same rules, built from
the same constants below, to whole chunks at once, and a property test checks
that both classify every row alike. Pydantic then explains the few rows that
fail, column by column.

Patterns are unanchored and use only ASCII classes, so that Python's `re`
(fullmatch) and polars' Rust regex (anchored with ^...$) accept exactly the
same strings.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

REQUIRED_COLUMNS: tuple[str, ...] = (
    "transaction_id",
    "event_time",
    "account_id",
    "merchant_id",
    "merchant_category",
    "amount",
    "currency",
    "country",
    "channel",
    "card_present",
)

TRANSACTION_ID_PATTERN = r"[A-Za-z0-9._:-]{1,64}"
MERCHANT_CATEGORY_PATTERN = r"[a-z0-9_]{1,32}"
CURRENCY_PATTERN = r"[A-Z]{3}"
COUNTRY_PATTERN = r"[A-Z]{2}"
CHANNELS: tuple[str, ...] = ("online", "pos", "atm")
TRUE_WORDS: tuple[str, ...] = ("true", "1")
FALSE_WORDS: tuple[str, ...] = ("false", "0")
MAX_ID_CHARS = 64

# White space as both engines agree on it (Python's str.isspace and Rust's
# White_Space differ on a few control characters, so the set is spelled out).
BLANK_CHARS = (
    " \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
BLANK_PATTERN = "[" + BLANK_CHARS + "]*"

# amount: plain decimal digits, optional fraction. Trailing zeros of the
# fraction do not count as decimal places ("42.100" is 42.10).
AMOUNT_PATTERN = r"([0-9]+)(?:\.([0-9]+))?"
AMOUNT_MAX_INTEGER_DIGITS = 10  # amount < 10^10
AMOUNT_MAX_DECIMAL_PLACES = 2

# event_time: ISO 8601 extended format with a time of at least hours and
# minutes; "T", "t" or a space between date and time; fraction of up to 9
# digits (truncated to microseconds, PostgreSQL's resolution); offset "Z",
# "+HH", "+HHMM" or "+HH:MM"; no offset means UTC.
TIMESTAMP_PATTERN = (
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2})"
    r"(?::([0-9]{2})(?:[.,]([0-9]{1,9}))?)?"
    r"(?:(Z|z)|([+-])([0-9]{2})(?::?([0-9]{2}))?)?"
)

_TRANSACTION_ID_RE = re.compile(TRANSACTION_ID_PATTERN)
_MERCHANT_CATEGORY_RE = re.compile(MERCHANT_CATEGORY_PATTERN)
_CURRENCY_RE = re.compile(CURRENCY_PATTERN)
_COUNTRY_RE = re.compile(COUNTRY_PATTERN)
_BLANK_RE = re.compile(BLANK_PATTERN)
_AMOUNT_RE = re.compile(AMOUNT_PATTERN)
_TIMESTAMP_RE = re.compile(TIMESTAMP_PATTERN)

MIN_EVENT_TIME = datetime(1, 1, 1, tzinfo=UTC)
MAX_EVENT_TIME = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be text")
    if value == "":
        raise ValueError("is required")
    return value


def parse_transaction_id(value: Any) -> str:
    text = _text(value)
    if len(text) > MAX_ID_CHARS:
        raise ValueError(f"must be at most {MAX_ID_CHARS} characters")
    if not _TRANSACTION_ID_RE.fullmatch(text):
        raise ValueError("may contain only A-Z a-z 0-9 . _ : -")
    return text


def parse_party_id(value: Any) -> str:
    """account_id and merchant_id: 1-64 characters, not blank."""
    text = _text(value)
    if _BLANK_RE.fullmatch(text):
        raise ValueError("must not be blank")
    if len(text) > MAX_ID_CHARS:
        raise ValueError(f"must be at most {MAX_ID_CHARS} characters")
    return text


def parse_merchant_category(value: Any) -> str:
    text = _text(value)
    if not _MERCHANT_CATEGORY_RE.fullmatch(text):
        raise ValueError("must be 1-32 characters of lowercase letters, digits and _")
    return text


def parse_amount(value: Any) -> Decimal:
    text = _text(value)
    match = _AMOUNT_RE.fullmatch(text)
    if not match:
        if text.startswith("-") and _AMOUNT_RE.fullmatch(text[1:]):
            raise ValueError("must be greater than 0")
        raise ValueError("must be a plain decimal number such as 42.17")
    integer = match.group(1).lstrip("0")
    fraction = (match.group(2) or "").rstrip("0")
    if len(fraction) > AMOUNT_MAX_DECIMAL_PLACES:
        raise ValueError(f"must have at most {AMOUNT_MAX_DECIMAL_PLACES} decimal places")
    if not integer and not fraction:
        raise ValueError("must be greater than 0")
    if len(integer) > AMOUNT_MAX_INTEGER_DIGITS:
        raise ValueError("must be less than 10000000000")
    return Decimal(f"{integer or '0'}.{fraction.ljust(AMOUNT_MAX_DECIMAL_PLACES, '0')}")


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        return 29 if leap else 28
    return 30 if month in (4, 6, 9, 11) else 31


def parse_event_time(value: Any) -> datetime:
    text = _text(value)
    match = _TIMESTAMP_RE.fullmatch(text)
    if not match:
        raise ValueError("must be an ISO 8601 timestamp such as 2026-01-11T10:00:00Z")
    year, month, day, hour, minute = (int(match.group(i)) for i in range(1, 6))
    second = int(match.group(6) or 0)
    micro = int((match.group(7) or "").ljust(6, "0")[:6] or 0)
    if year < 1 or not 1 <= month <= 12 or not 1 <= day <= _days_in_month(year, month):
        raise ValueError("is not a valid calendar date")
    if hour > 23 or minute > 59 or second > 59:
        raise ValueError("is not a valid time of day")
    offset = timedelta(0)
    if match.group(9):
        off_h, off_m = int(match.group(10)), int(match.group(11) or 0)
        if off_h > 23 or off_m > 59:
            raise ValueError("has an invalid UTC offset")
        offset = timedelta(hours=off_h, minutes=off_m) * (-1 if match.group(9) == "-" else 1)
    naive = datetime(year, month, day, hour, minute, second, micro)
    # Compare in naive UTC arithmetic: astimezone() cannot leave years 1-9999.
    utc_naive_min = MIN_EVENT_TIME.replace(tzinfo=None)
    utc_naive_max = MAX_EVENT_TIME.replace(tzinfo=None)
    if (offset > timedelta(0) and naive - utc_naive_min < offset) or (
        offset < timedelta(0) and utc_naive_max - naive < -offset
    ):
        raise ValueError("is out of range once converted to UTC")
    return (naive - offset).replace(tzinfo=UTC) if offset else naive.replace(tzinfo=UTC)


def parse_currency(value: Any) -> str:
    text = _text(value)
    if not _CURRENCY_RE.fullmatch(text):
        raise ValueError("must be an ISO 4217 code: 3 upper-case letters")
    return text


def parse_country(value: Any) -> str:
    text = _text(value)
    if not _COUNTRY_RE.fullmatch(text):
        raise ValueError("must be an ISO 3166-1 alpha-2 code: 2 upper-case letters")
    return text


def parse_channel(value: Any) -> str:
    text = _text(value)
    if text not in CHANNELS:
        raise ValueError("must be one of " + ", ".join(CHANNELS))
    return text


def parse_card_present(value: Any) -> bool:
    text = _text(value)
    word = text.lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError("must be true, false, 1 or 0")


def _csv_text(description: str, pattern: str | None = None, **extra: Any) -> WithJsonSchema:
    """The JSON Schema of a CSV field: text, with the same pattern the validators use."""
    schema: dict[str, Any] = {"type": "string", "description": description, **extra}
    if pattern is not None:
        schema["pattern"] = f"^(?:{pattern})$"
    return WithJsonSchema(schema)


def _any_case(words: tuple[str, ...]) -> str:
    """`true` -> `[Tt][Rr][Uu][Ee]`: JSON Schema patterns have no case-insensitive flag."""
    return "|".join(
        "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c) for c in word)
        for word in words
    )


class Transaction(BaseModel):
    """One row of a transaction CSV: UTF-8 (a leading BOM is tolerated), comma-separated,
    RFC 4180 quoting, one header row; plain, .gz or .zst. Column order is free and extra
    columns are ignored; a file missing a required column is refused whole. Every value
    is text in the file; a row that breaks a rule is kept in invalid_rows with its line
    and every reason, never scored."""

    model_config = ConfigDict(frozen=True, extra="ignore", title="Transaction CSV row")

    transaction_id: Annotated[
        str,
        BeforeValidator(parse_transaction_id),
        _csv_text(
            "The natural key: 1-64 characters of A-Z a-z 0-9 . _ : -. The same id again "
            "(in the same or a later file) is an upsert: the latest row wins.",
            TRANSACTION_ID_PATTERN,
        ),
    ]
    event_time: Annotated[
        datetime,
        BeforeValidator(parse_event_time),
        _csv_text(
            "ISO 8601 timestamp such as 2026-01-11T10:00:00Z: date, T (or a space), hours and "
            "minutes, optional seconds and fraction, optional offset Z, +HH, +HHMM or +HH:MM; "
            "no offset means UTC. Stored as timestamptz, to the microsecond.",
            TIMESTAMP_PATTERN,
        ),
    ]
    account_id: Annotated[
        str,
        BeforeValidator(parse_party_id),
        _csv_text("1-64 characters, not blank.", minLength=1, maxLength=MAX_ID_CHARS),
    ]
    merchant_id: Annotated[
        str,
        BeforeValidator(parse_party_id),
        _csv_text("1-64 characters, not blank.", minLength=1, maxLength=MAX_ID_CHARS),
    ]
    merchant_category: Annotated[
        str,
        BeforeValidator(parse_merchant_category),
        _csv_text("1-32 characters of lowercase letters, digits and _.", MERCHANT_CATEGORY_PATTERN),
    ]
    amount: Annotated[
        Decimal,
        BeforeValidator(parse_amount),
        _csv_text(
            "A plain decimal number such as 42.17: greater than 0, less than 10^10, at most "
            "2 decimal places (trailing zeros do not count). Stored as NUMERIC(12,2).",
            AMOUNT_PATTERN,
        ),
    ]
    currency: Annotated[
        str,
        BeforeValidator(parse_currency),
        _csv_text("ISO 4217 alphabetic code: 3 upper-case letters.", CURRENCY_PATTERN),
    ]
    country: Annotated[
        str,
        BeforeValidator(parse_country),
        _csv_text("ISO 3166-1 alpha-2 code: 2 upper-case letters.", COUNTRY_PATTERN),
    ]
    channel: Annotated[
        str,
        BeforeValidator(parse_channel),
        _csv_text("One of " + ", ".join(CHANNELS) + ".", enum=list(CHANNELS)),
    ]
    card_present: Annotated[
        bool,
        BeforeValidator(parse_card_present),
        _csv_text("true, false, 1 or 0, in any case.", _any_case((*TRUE_WORDS, *FALSE_WORDS))),
    ]


# -- the model API's native protocol (shared/CONTRACT.md, section 2) ----------------
#
# What `POST {ML_API_URL}/predict` receives and must answer. The client's codec builds
# and checks these bodies with vectorised code for speed; these models are the
# documented schema, and the tests hold the codec and the reference model to them.


class PredictTransaction(BaseModel):
    """One valid row as the model receives it: the CSV's values in their contract types."""

    model_config = ConfigDict(extra="forbid")

    transaction_id: str = Field(pattern=f"^(?:{TRANSACTION_ID_PATTERN})$")
    event_time: datetime = Field(description="ISO 8601 in UTC, e.g. 2026-01-11T10:00:00Z.")
    account_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    merchant_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    merchant_category: str = Field(pattern=f"^(?:{MERCHANT_CATEGORY_PATTERN})$")
    amount: float = Field(gt=0, lt=10**AMOUNT_MAX_INTEGER_DIGITS, description="A JSON number.")
    currency: str = Field(pattern=f"^(?:{CURRENCY_PATTERN})$")
    country: str = Field(pattern=f"^(?:{COUNTRY_PATTERN})$")
    channel: Literal["online", "pos", "atm"]
    card_present: bool


class PredictRequest(BaseModel):
    """The body of POST {ML_API_URL}/predict: API_BATCH_SIZE transactions at most."""

    model_config = ConfigDict(extra="forbid")

    transactions: list[PredictTransaction] = Field(min_length=1)


class PredictionItem(BaseModel):
    """The model's answer for one transaction."""

    transaction_id: str
    fraud_score: float = Field(ge=0, le=1)
    is_fraud: bool = Field(description="true = fraud; stored as predictions.prediction.")


class PredictResponse(BaseModel):
    """The 200 answer: every transaction sent exactly once, in any order; anything else
    (one missing or extra, a score outside [0, 1], not JSON) fails the whole request,
    which is retried. 429 and 5xx are retried; 400 and 422 are not: the batch is split
    until only the refused rows fail."""

    model_config = ConfigDict(protected_namespaces=())

    model_version: str = Field(min_length=1, description="Stored with every prediction.")
    predictions: list[PredictionItem]


SCHEMAS: dict[str, type[BaseModel]] = {
    "row": Transaction,
    "predict-request": PredictRequest,
    "predict-response": PredictResponse,
}


def _one_line_descriptions(node: Any) -> Any:
    """Docstrings wrap at 100 columns; a schema's descriptions read better unwrapped."""
    if isinstance(node, dict):
        return {
            k: " ".join(v.split())
            if k == "description" and isinstance(v, str)
            else _one_line_descriptions(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_one_line_descriptions(v) for v in node]
    return node


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of each model of SCHEMAS, generated from the models themselves."""
    return {
        name: _one_line_descriptions(model.model_json_schema()) for name, model in SCHEMAS.items()
    }
