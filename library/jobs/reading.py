"""One way through an object: open it, parse it from its checkpoint, validate it;
what an unreadable object or an empty listing means for the run.

`run`, `run --dry-run` and the benchmark's stages all read objects through
`ObjectReader.chunks`, so that a row is read, numbered and judged the same way
whatever then happens to it. The source's errors (`SourceError`: unreadable,
undecodable, a missing column, an unterminated quote) reach the caller, which
decides what they mean for the object.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from typing import Any

from library.config import SourceSettings
from library.errors import MissingColumnsError, SourceError
from library.models import SourceObject, ValidatedChunk
from library.observability.progress import LiveState, StageTimes
from library.stages import source
from library.stages.validate import validate_chunk

log = logging.getLogger(__name__)


class ObjectReader:
    """Turns an object and its checkpoint into validated chunks, in line order.

    `times` (when given) gets the reading and validating time; `live` (when given)
    follows the bytes and rows read, for the progress display.
    """

    def __init__(
        self,
        s3_client: Any | None,
        row_batch_size: int,
        max_quoted_field_chars: int,
        *,
        times: StageTimes | None = None,
        live: LiveState | None = None,
    ) -> None:
        self.s3_client = s3_client
        self.row_batch_size = row_batch_size
        self.max_quoted_field_chars = max_quoted_field_chars
        self.times = times or StageTimes()
        self.live = live or LiveState()

    @classmethod
    def from_settings(
        cls, settings: SourceSettings, s3_client: Any | None, live: LiveState | None = None
    ) -> ObjectReader:
        return cls(s3_client, settings.row_batch_size, settings.max_quoted_field_chars, live=live)

    def chunks(
        self, obj: SourceObject, resume_after_line: int = 1
    ) -> Generator[ValidatedChunk, None, None]:
        """The object's rows after `resume_after_line`, ROW_BATCH_SIZE rows a chunk."""
        times, live = self.times, self.live
        with source.open_text(obj, self.s3_client) as (text, counter):
            live.begin_object(counter, obj.size)
            parsed_chunks = source.read_chunks(
                obj,
                text,
                self.row_batch_size,
                resume_after_line,
                max_quoted_field_chars=self.max_quoted_field_chars,
            )
            while True:
                began = time.perf_counter()
                chunk = next(parsed_chunks, None)
                parsed = time.perf_counter()
                times.read += parsed - began
                if chunk is None:
                    return
                live.rows_read += chunk.rows_read
                validated = validate_chunk(chunk)
                times.validate += time.perf_counter() - parsed
                yield validated


def read_outcome(exc: SourceError) -> tuple[str, str]:
    """(status, message) for an object that could not be read (classified by the source)."""
    if isinstance(exc, MissingColumnsError):
        return "refused", str(exc)
    return "failed", str(exc)


def check_found(objects: list[SourceObject], settings: SourceSettings) -> None:
    """An empty listing: a nightly job that finds no input usually means a broken
    upstream, so say so, or fail the run if FAIL_ON_EMPTY_SOURCE is set."""
    if objects:
        return
    message = (
        f"no objects found under {settings.uri}: no .csv, .csv.gz or .csv.zst there; "
        "check SOURCE_URI and the upstream export"
    )
    if settings.fail_on_empty:
        raise SourceError(message + " (FAIL_ON_EMPTY_SOURCE is set)", settings.uri)
    log.warning("%s", message)
