"""Contract rows for tests: valid by default, any field overridable."""

from __future__ import annotations

import csv
import gzip
import io
from typing import Any

from library.contract import REQUIRED_COLUMNS

HEADER = list(REQUIRED_COLUMNS)


def row(i: int, **overrides: Any) -> dict[str, str]:
    base = {
        "transaction_id": f"tx-{i:06d}",
        "event_time": f"2026-01-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00Z",
        "account_id": f"acc-{i % 97:05d}",
        "merchant_id": f"m-{i % 31:04d}",
        "merchant_category": ("grocery", "travel", "electronics", "fuel")[i % 4],
        "amount": f"{1 + (i * 37) % 99999 / 100:.2f}",
        "currency": "USD",
        "country": "US",
        "channel": ("online", "pos", "atm")[i % 3],
        "card_present": ("true", "false")[i % 2],
    }
    base.update({k: str(v) for k, v in overrides.items()})
    return base


def rows(n: int, start: int = 0) -> list[dict[str, str]]:
    return [row(i) for i in range(start, start + n)]


def to_csv(
    records: list[dict[str, str]], header: list[str] | None = None, line_end: str = "\n"
) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(
        out, fieldnames=header or HEADER, lineterminator=line_end, extrasaction="ignore"
    )
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()


def gz(text: str) -> bytes:
    return gzip.compress(text.encode())


def zst(text: str) -> bytes:
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        from backports import zstd  # type: ignore[no-redef]
    return zstd.compress(text.encode())  # type: ignore[no-any-return]
