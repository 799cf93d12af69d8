"""Deterministic sample transactions per the contract, for the demo and the benchmark.

About `invalid_ratio` of the rows break a rule (each kind of mistake users
make: a negative amount, a lowercase currency, an impossible date, a missing
field, an unknown channel) and about `duplicate_ratio` repeat an earlier
transaction_id with a corrected amount, so the latest-row-wins upsert shows.
A few values need quoting (commas, quotes, a newline inside a field).
"""

from __future__ import annotations

import csv
import gzip
import io
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from library.contract import REQUIRED_COLUMNS

DEMO_ROWS = 20_000  # the demo's sample: enough rows to see every stage at work

CATEGORIES = (
    "grocery",
    "travel",
    "electronics",
    "fuel",
    "restaurants",
    "pharmacy",
    "jewelry",
    "gift_cards",
)
COUNTRIES = ("US", "GB", "DE", "FR", "NL", "ES", "IT", "CA")
CURRENCIES = {"US": "USD", "GB": "GBP", "CA": "CAD"}
CHANNELS = ("online", "pos", "atm")


def _valid_row(rng: random.Random, i: int) -> list[str]:
    country = rng.choice(COUNTRIES)
    day = 1 + i % 28
    hour = rng.randrange(24)
    channel = rng.choice(CHANNELS)
    amount = rng.lognormvariate(3.3, 1.1)
    amount = min(max(amount, 0.01), 99_999.99)
    account = f"acc-{rng.randrange(50_000):05d}"
    merchant = f"m-{rng.randrange(5_000):04d}"
    if i % 997 == 0:
        merchant = f'Shop "{merchant}", Ltd.'  # needs quoting
    if i % 1999 == 0:
        account = f"{account}\nsecond line"  # a newline inside a quoted field
    return [
        f"tx-{i:010d}",
        f"2026-01-{day:02d}T{hour:02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}Z",
        account,
        merchant,
        rng.choice(CATEGORIES),
        f"{amount:.2f}",
        CURRENCIES.get(country, "EUR"),
        country,
        channel,
        "true" if channel == "pos" and rng.random() < 0.9 else "false",
    ]


def _break(rng: random.Random, fields: list[str]) -> list[str]:
    kind = rng.randrange(5)
    broken = list(fields)
    if kind == 0:
        broken[5] = "-" + broken[5]
    elif kind == 1:
        broken[6] = broken[6].lower()
    elif kind == 2:
        broken[1] = "2026-02-30T10:00:00Z"
    elif kind == 3:
        broken = broken[:-1]  # a field short
    else:
        broken[8] = "web"
    return broken


def generate_rows(
    n: int, seed: int = 7, invalid_ratio: float = 0.01, duplicate_ratio: float = 0.01
) -> Iterator[list[str]]:
    """`n` rows (header not included) of which about the given shares are invalid or repeats."""
    rng = random.Random(seed)
    recent: list[list[str]] = []
    for i in range(n):
        draw = rng.random()
        if draw < invalid_ratio:
            yield _break(rng, _valid_row(rng, i))
            continue
        if draw < invalid_ratio + duplicate_ratio and recent:
            again = list(rng.choice(recent))
            again[5] = f"{float(again[5]) + 1:.2f}"  # a corrected amount: the latest row wins
            yield again
            continue
        fields = _valid_row(rng, i)
        if len(recent) < 1000:
            recent.append(fields)
        else:
            recent[rng.randrange(1000)] = fields
        yield fields


def write_csv(path: Path, rows: Iterator[list[str]]) -> Path:
    """Stream rows under the contract's header; .gz and .zst by the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw: Any
    if path.name.endswith(".gz"):
        raw = gzip.GzipFile(path, "wb", mtime=0)  # no timestamp: same rows, same bytes
    elif path.name.endswith(".zst"):
        try:
            from compression import zstd
        except ImportError:
            from backports import zstd
        raw = zstd.open(path, "wb")
    else:
        raw = path.open("wb")
    with raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(REQUIRED_COLUMNS)
        writer.writerows(rows)
    return path


def write_sample(
    folder: Path,
    total_rows: int,
    files: int = 3,
    seed: int = 7,
    suffixes: tuple[str, ...] = (".csv", ".csv.gz", ".csv.zst"),
) -> list[Path]:
    """Split a deterministic sample over `files` objects, taking the suffixes in turn
    (plain, gzip and zstd by default)."""
    rows = generate_rows(total_rows, seed)
    per_file = -(-total_rows // files)
    written = []
    for f in range(files):
        take = [r for _, r in zip(range(per_file), rows, strict=False)]
        name = f"transactions_{f + 1:03d}{suffixes[f % len(suffixes)]}"
        written.append(write_csv(folder / name, iter(take)))
    return written
