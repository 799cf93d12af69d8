"""The values that flow between the stages, in the one direction they flow.

    SourceObject  --source-->  RowChunk  --validate-->  ValidatedChunk
        --prepare-->  PreparedChunk  --batching-->  WorkUnit  --score-->  ScoreResult
        --sink-->  PostgreSQL

Rows travel in chunks as polars DataFrames (columnar, so validation, JSON
encoding and COPY run over whole chunks instead of row by row). Every row keeps
the physical line of the file where it starts (`LINE_COLUMN`), its lineage and
the checkpoint of a resumed run.

What a stage prepares for a later one over a whole chunk (the codec's request
rows, the sink's COPY lines) travels beside the transactions in named fields,
aligned row for row, and is cut with them: never as extra columns of the
transactions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import polars as pl

LINE_COLUMN = "_line"
MAX_RAW_TEXT_CHARS = 8 * 1024  # raw text kept for an invalid row


@dataclass(frozen=True)
class SourceObject:
    """One input file: an S3 object or a local file, at one version."""

    uri: str
    version: str  # S3 ETag, or "size-mtime_ns" for a local file
    size: int | None = None
    index: int = 0  # position in the run's key order


@dataclass(frozen=True)
class Reason:
    """Why a row is invalid, naming the column (or "_row" for the row as a whole)."""

    column: str
    message: str
    value: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"column": self.column, "message": self.message}
        if self.value is not None:
            out["value"] = self.value
        return out


@dataclass(frozen=True)
class InvalidRow:
    line_number: int
    raw_text: str
    reasons: tuple[Reason, ...]


# Undecodable bytes (surrogate escapes) and NUL: PostgreSQL's text cannot hold them.
_UNSAFE_FOR_POSTGRES = re.compile("[\udc80-\udcff\x00]")


def printable(text: str, limit: int = MAX_RAW_TEXT_CHARS, length: int | None = None) -> str:
    """Text safe to store in PostgreSQL: undecodable bytes and NULs become U+FFFD.

    `length` is the length of the whole text when `text` is only its beginning."""
    length = len(text) if length is None else length
    if length > limit:
        text = text[:limit] + f"... [{length - limit} more characters]"
    if _UNSAFE_FOR_POSTGRES.search(text):
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        text = text.replace("\x00", "\ufffd")
    return text


def strip_newline(text: str) -> str:
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith(("\n", "\r")):
        return text[:-1]
    return text


def stored_raw_text(raw: str) -> str:
    """A row's raw text as stored with an invalid row (by the source for the rows it cannot
    split, by validation for the rows it rejects): no line end, safe for PostgreSQL."""
    return printable(strip_newline(raw))


@dataclass
class RowChunk:
    """Up to ROW_BATCH_SIZE parsed rows of one object, still as text."""

    obj: SourceObject
    index: int
    frame: pl.DataFrame  # the required columns as strings, plus LINE_COLUMN
    raw_text: Sequence[str] | pl.Series  # the row's text as read, aligned with `frame`
    malformed: list[InvalidRow]  # rows that could not be split into the header's fields
    last_line: int  # the line where the chunk's last row starts

    @property
    def rows_read(self) -> int:
        return self.frame.height + len(self.malformed)


@dataclass
class ValidatedChunk:
    obj: SourceObject
    index: int
    valid: pl.DataFrame  # typed columns of the contract, plus LINE_COLUMN
    invalid: list[InvalidRow]  # sorted by line
    last_line: int

    @property
    def rows(self) -> int:
        return self.valid.height + len(self.invalid)


@dataclass
class PreparedChunk:
    """A validated chunk with the later stages' work done over all of it at once, on the
    reader thread (polars over whole chunks is the speed: per batch or per row it costs
    several times more). Row i of `requests` and `copy_lines` belongs to row i of
    `chunk.valid`."""

    chunk: ValidatedChunk
    requests: pl.DataFrame  # the codec's request rows (Codec.prepare)
    copy_lines: pl.Series  # each transaction's part of its COPY line (Sink.prepare_copy_lines)

    def __post_init__(self) -> None:
        check_aligned(self.chunk.valid, self.requests, self.copy_lines)


def check_aligned(
    transactions: pl.DataFrame, requests: pl.DataFrame, copy_lines: pl.Series
) -> None:
    """A preparation that does not match its transactions row for row is a bug."""
    assert requests.height == transactions.height == copy_lines.len(), (
        f"prepared rows are not aligned: {transactions.height} transactions, "
        f"{requests.height} request rows, {copy_lines.len()} COPY lines"
    )


@dataclass
class WorkUnit:
    """One API batch and the invalid rows beside it: the unit of ordering and checkpoints.

    Units of an object cover consecutive line ranges; once a unit is written,
    every row of its object starting at or before `checkpoint_line` is stored.
    `requests` and `copy_lines` are the unit's slice of its chunk's preparation.
    """

    obj: SourceObject
    seq: int  # position in the run; the sink writes units in this order
    transactions: pl.DataFrame
    requests: pl.DataFrame  # what the codec prepared for these transactions, row for row
    copy_lines: pl.Series  # what the sink prepared for these transactions, row for row
    invalid: list[InvalidRow]
    checkpoint_line: int
    chunk: int = 0  # the run's chunk number, for the per-chunk log line
    last_of_chunk: bool = True

    def __post_init__(self) -> None:
        check_aligned(self.transactions, self.requests, self.copy_lines)

    @property
    def rows(self) -> int:
        return self.transactions.height + len(self.invalid)

    def counts(self, result: ScoreResult) -> Counts:
        """The unit's rows by outcome. Scoring accounts for every id, so a row not
        failed is scored; a repeated id counts once per row."""
        failed = 0
        if result.failures:
            failed_ids = {f.transaction_id for f in result.failures}
            ids = result.ids_of(self.transactions)
            failed = sum(1 for i in ids if i in failed_ids)
        valid = self.transactions.height
        return Counts(self.rows, valid, len(self.invalid), valid - failed, failed)


class Prediction(NamedTuple):
    """One model answer, as a row: for the few places that look at one (the `check`
    command, tests). Scoring carries a batch's answers as columns (`Predictions`)."""

    transaction_id: str
    fraud_score: float
    is_fraud: bool
    model_version: str


@dataclass(slots=True)
class Predictions:
    """A batch's model answers as parallel columns: row i is `ids[i]`, `scores[i]`,
    `is_fraud[i]`. Columns, not a value per row: a codec fills them with a list
    comprehension each and the sink reads them the same way, where a named tuple per
    row was a tenth of the client's CPU to build and again to take apart.

    `versions` holds one model version per answer merged in, with the number of
    rows it covers, in row order (bisection merges several answers)."""

    ids: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    is_fraud: list[bool] = field(default_factory=list)
    versions: list[tuple[int, str]] = field(default_factory=list)  # (rows, model_version)

    @classmethod
    def answer(
        cls, ids: list[str], scores: list[float], is_fraud: list[bool], model_version: str
    ) -> Predictions:
        """One answer's columns, all of its rows from `model_version`."""
        assert len(ids) == len(scores) == len(is_fraud), "prediction columns are not aligned"
        return cls(ids, scores, is_fraud, [(len(ids), model_version)] if ids else [])

    @classmethod
    def of(cls, rows: Iterable[Prediction]) -> Predictions:
        """Columns from rows (tests, the benchmark)."""
        rows = list(rows)
        out = cls([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
        out._add_versions((1, r[3]) for r in rows)
        return out

    def extend(self, other: Predictions) -> None:
        """Append another answer's rows (the halves of a bisected batch)."""
        self.ids += other.ids
        self.scores += other.scores
        self.is_fraud += other.is_fraud
        self._add_versions(other.versions)

    def _add_versions(self, versions: Iterable[tuple[int, str]]) -> None:
        """Append (rows, model_version) runs, joining a run to the last of the same version."""
        for rows, version in versions:
            if self.versions and self.versions[-1][1] == version:
                self.versions[-1] = (self.versions[-1][0] + rows, version)
            else:
                self.versions.append((rows, version))

    def model_versions(self) -> list[str]:
        """Each row's model version."""
        out: list[str] = []
        for rows, version in self.versions:
            out += [version] * rows
        return out

    @property
    def last_version(self) -> str | None:
        return self.versions[-1][1] if self.versions else None

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[Prediction]:
        return map(Prediction, self.ids, self.scores, self.is_fraud, self.model_versions())


@dataclass(frozen=True, slots=True)
class Failure:
    transaction_id: str
    reason: str
    http_status: int | None
    attempts: int


def latest_positions(ids: list[str]) -> list[int] | None:
    """Where the last row of each id stands, in order; None when no id repeats (the
    usual case, found by one set). The latest row of an id is the one that counts:
    in a request (the client) and in a flush (the sink)."""
    if len(set(ids)) == len(ids):
        return None
    return sorted({tid: i for i, tid in enumerate(ids)}.values())


@dataclass
class ScoreResult:
    """What scoring one batch gave: every transaction either predicted or failed."""

    predictions: Predictions = field(default_factory=Predictions)
    failures: list[Failure] = field(default_factory=list)
    requests: int = 0
    retries: int = 0
    # The batch's transaction ids in row order, repeats included, as the client listed
    # them: the sink reuses the list rather than making it again from the frame.
    ids: list[str] | None = None

    def ids_of(self, transactions: pl.DataFrame) -> list[str]:
        """The ids of `transactions`, the batch this result is for."""
        if self.ids is not None and len(self.ids) == transactions.height:
            return self.ids
        return transactions.get_column("transaction_id").to_list()


@dataclass
class Counts:
    read: int = 0
    valid: int = 0
    invalid: int = 0
    scored: int = 0
    failed: int = 0

    def add(self, other: Counts) -> None:
        self.read += other.read
        self.valid += other.valid
        self.invalid += other.invalid
        self.scored += other.scored
        self.failed += other.failed

    def as_dict(self) -> dict[str, int]:
        return {
            "read": self.read,
            "valid": self.valid,
            "invalid": self.invalid,
            "scored": self.scored,
            "failed": self.failed,
        }
