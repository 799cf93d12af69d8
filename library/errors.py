"""The error tree, grouped by how the caller reacts.

    PipelineError                      carries the exit code of the contract (section 5)
    +-- ConfigError                    2  bad setting or usage, raised before any work
    +-- SchemaNotReadyError            2  the database lacks migrations; `migrate` or --migrate
    +-- SourceError                    1  an object cannot be listed or read; the run goes on
    |   +-- MissingColumnsError        3  an object refused: its header lacks a required column
    |   +-- UnterminatedQuoteError     1  a quoted field never closes (or runs past
    |                                     MAX_QUOTED_FIELD_CHARS): the object fails there
    +-- ApiError                          one request to the model API failed (never escapes
    |   |                                 the scoring client: it becomes retries or failed rows)
    |   +-- TransientApiError             retry: connection, timeout, 429, 5xx, malformed answer
    |   +-- RejectedBatchError            do not retry: 400/422, split the batch to find the culprit
    +-- ApiUnavailableError            1  the API stayed down past its retries: stop the run
    +-- DatabaseError                  1
    |   +-- TransientDatabaseError        retry the whole flush: connection lost, deadlock
    +-- ThresholdExceededError         4  MAX_INVALID_RATIO or MAX_FAILED_RATIO crossed
    +-- InterruptedRun                 130 / 143 after SIGINT / SIGTERM

Third-party exceptions (psycopg, urllib3, botocore, OS errors) are classified in
one place per boundary: `library.state.db.classify`, `library.score.client`, and
`library.stages.source`. Messages never carry secrets.
"""

from __future__ import annotations

EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_COMPLETED_WITH_ERRORS = 3
EXIT_THRESHOLD = 4
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""

    exit_code = EXIT_FAILED


class ConfigError(PipelineError):
    exit_code = EXIT_USAGE


class SchemaNotReadyError(PipelineError):
    exit_code = EXIT_USAGE


class SourceError(PipelineError):
    """An object could not be listed or read."""

    def __init__(self, message: str, uri: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri


class MissingColumnsError(SourceError):
    """The object's header lacks required columns: the object is refused whole."""

    exit_code = EXIT_COMPLETED_WITH_ERRORS

    def __init__(self, uri: str, missing: list[str]) -> None:
        self.missing = missing
        columns = ", ".join(missing)
        noun = "column" if len(missing) == 1 else "columns"
        super().__init__(f"{uri}: missing required {noun}: {columns}", uri)


class UnterminatedQuoteError(SourceError):
    """A quoted field is still open at the end of the object, or past the limit.

    Nothing after the row that holds it can be read safely (where that row ends is
    unknown), so the object fails there; the rows before it are kept.
    """

    def __init__(self, uri: str, quote_line: int, row_line: int, still_open: str) -> None:
        self.quote_line = quote_line  # the physical line where the quote opened
        self.row_line = row_line  # the line where the row holding it starts
        super().__init__(
            f"{uri}: line {quote_line}: unterminated quoted field: the quote opened there is "
            f"still open {still_open} (an unmatched quote?); nothing from line {row_line} on "
            "is read",
            uri,
        )


class ApiError(PipelineError):
    """One request to the model API failed."""

    def __init__(
        self, message: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.attempts = 0  # set by the scoring client: the attempts made for the batch


class TransientApiError(ApiError):
    """Worth retrying: connection error, timeout, 429, 5xx, or a malformed answer."""


class RejectedBatchError(ApiError):
    """The service refused something in the request (400, 422): not retried."""


class ApiUnavailableError(PipelineError):
    """The model API stayed unavailable past its retries; the run stops."""


class DatabaseError(PipelineError):
    """A database error that stops the run."""


class TransientDatabaseError(DatabaseError):
    """The connection was lost or the transaction was aborted by a conflict: retry the flush."""


class ThresholdExceededError(PipelineError):
    exit_code = EXIT_THRESHOLD


class InterruptedRun(PipelineError):
    def __init__(self, signal_name: str, exit_code: int) -> None:
        super().__init__(f"interrupted by {signal_name}")
        self.exit_code = exit_code
