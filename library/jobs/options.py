"""What the user asked of `run` beyond the settings: its command-line options."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunOptions:
    dry_run: bool = False
    limit: int | None = None  # at most this many objects
    reprocess: bool = False  # read objects again even if completed at this version
    migrate: bool = False  # apply pending migrations before running
