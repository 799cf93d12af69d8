"""Cut a validated chunk into work units: one API batch each, in line order.

A unit holds up to API_BATCH_SIZE valid transactions and the invalid rows
whose lines fall in the same stretch of the file, and it ends at a line: once
the unit is written, every row of the object up to that line is stored. That
is what makes a checkpoint exact, however the chunk is cut.
"""

from __future__ import annotations

from collections.abc import Iterator

from library.models import LINE_COLUMN, InvalidRow, PreparedChunk, WorkUnit


def plan_units(
    prepared: PreparedChunk, api_batch_size: int, first_seq: int, chunk_number: int
) -> Iterator[WorkUnit]:
    """The chunk's units; each takes its slice of the transactions, of the codec's
    request rows and of the COPY lines together (slices share the chunk's memory)."""
    chunk, requests, copy_lines = prepared.chunk, prepared.requests, prepared.copy_lines
    valid = chunk.valid
    invalid = chunk.invalid
    if valid.height == 0:
        yield WorkUnit(
            chunk.obj,
            first_seq,
            valid,
            requests,
            copy_lines,
            list(invalid),
            chunk.last_line,
            chunk_number,
        )
        return
    lines = valid.get_column(LINE_COLUMN)
    taken = 0
    seq = first_seq
    for start in range(0, valid.height, api_batch_size):
        last = start + api_batch_size >= valid.height
        end_line = chunk.last_line if last else int(lines[start + api_batch_size - 1])
        beside: list[InvalidRow] = []
        while taken < len(invalid) and (last or invalid[taken].line_number <= end_line):
            beside.append(invalid[taken])
            taken += 1
        yield WorkUnit(
            chunk.obj,
            seq,
            valid.slice(start, api_batch_size),
            requests.slice(start, api_batch_size),
            copy_lines.slice(start, api_batch_size),
            beside,
            end_line,
            chunk_number,
            last_of_chunk=last,
        )
        seq += 1
