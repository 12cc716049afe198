"""The files the datasets write: Parquet or CSV from Arrow batches, with the settings each
dataset's files are written with."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from export_pipeline.engine.schema import SEED_COLUMNS, Columns
from export_pipeline.engine.store import MULTIPART_THRESHOLD

# CSV timestamps read as ISO-8601 with microseconds and a Z: 2026-02-07T12:00:00.000000Z
# (Arrow's %S carries the fraction for microsecond timestamps).
CSV_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

# A slice holds one interval (tens to thousands of rows): dictionaries pay off for the device and
# its tags only (`Columns.dictionary_columns`).
SLICE_PARQUET: dict[str, Any] = {
    "compression": "zstd",
    "write_statistics": True,
}
# A slice of fewer rows than this (a minute at 1 Hz) is mostly its footer: zstd's set-up for each
# column is half the CPU of writing such a file and saves about 2 % of its bytes, so it is
# compressed with Snappy, Parquet's default codec, instead; bigger slices keep zstd (a third
# smaller at 600 rows). Measured with bench P12.
SMALL_SLICE_ROWS = 128
SMALL_SLICE_COMPRESSION = "snappy"
# A day file holds a whole device-day, read by analytics for years: encodings chosen by measuring
# a 1 Hz simulator day (benchmark P6 in bench/results.json). Timestamps delta-encoded; every other
# column, floats included, dictionary-encoded (a day's voltage, current, power and temperature
# take about a thousand values each; where a dictionary outgrows its page, Arrow falls back to
# plain); zstd level 9 (levels up to 19 saved 3 % more for 4-5 times the encoding time).
# Statistics, a page index and the declared sort by timestamp let readers skip by time.
DAY_FILE_PARQUET: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 9,
    "use_dictionary": True,  # every column but the timestamp (`parquet_options`)
    "column_encoding": {"timestamp": "DELTA_BINARY_PACKED"},
    "write_statistics": True,
    "write_page_index": True,
    "sorting_columns": [pq.SortingColumn(0)],
}
# Rows per row group of a day file: a 1 Hz day is one group; bigger days are cut into groups of
# about 1 MB that readers can skip by their timestamp statistics. It bounds the writer's memory:
# a 5 M-row day's run peaks at ~365 MiB with 128 Ki rows a group, ~400 MiB with 256 Ki, for
# 1.5 % fewer bytes (bench P4).
DAY_FILE_ROWS_PER_GROUP = 128 * 1024


_CSV_TIMESTAMP = pa.field("timestamp", pa.string(), nullable=False)


def csv_schema(schema: pa.Schema) -> pa.Schema:
    """A CSV file's columns: the rows' own, the timestamp as ISO-8601 text."""
    return schema.set(0, _CSV_TIMESTAMP)


def parquet_options(parquet: Mapping[str, Any], columns: Columns) -> dict[str, Any]:
    """`parquet` for these columns: `use_dictionary` True is every column whose encoding is not
    set; unset, the device and its tags."""
    options = dict(parquet)
    if options.get("use_dictionary") is True:
        encoded = options.get("column_encoding", {})
        options["use_dictionary"] = [n for n in columns.schema.names if n not in encoded]
    else:
        options.setdefault("use_dictionary", columns.dictionary_columns)
    return options


class ExportFile:
    """Rows written to `path` (or, without one, to memory: a single small slice) as Parquet or
    CSV, buffered into row groups of `rows_per_group`."""

    def __init__(
        self,
        path: Path | None,
        fmt: str,
        *,
        rows_per_group: int,
        columns: Columns = SEED_COLUMNS,
        parquet: Mapping[str, Any] = SLICE_PARQUET,
        small_file_rows: int = 0,
    ) -> None:
        """`small_file_rows`: a Parquet file whose rows all reach the writer at its close
        (fewer than `rows_per_group`) and number fewer than this is compressed with
        SMALL_SLICE_COMPRESSION (the writer is made when the first rows are flushed, when that
        is known)."""
        if fmt not in ("parquet", "csv"):
            raise ValueError(f"EXPORT_FORMAT={fmt!r} is not one of parquet, csv")
        self.path = path
        self.fmt = fmt
        self.schema = columns.schema
        self.batch_rows = rows_per_group
        self.rows = 0
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._memory = pa.BufferOutputStream() if path is None else None
        self._parquet = parquet_options(parquet, columns)
        self._small_file_rows = small_file_rows
        self._writer: pq.ParquetWriter | pacsv.CSVWriter | None = None

    def _writer_for(self, closing: bool) -> pq.ParquetWriter | pacsv.CSVWriter:
        if self._writer is None:
            sink: Any = self._memory if self.path is None else self.path
            if self.fmt == "csv":
                options = pacsv.WriteOptions(quoting_style="needed")
                self._writer = pacsv.CSVWriter(sink, csv_schema(self.schema), write_options=options)
            else:
                parquet = self._parquet
                if closing and self.rows < self._small_file_rows:
                    parquet = {**parquet, "compression": SMALL_SLICE_COMPRESSION}
                self._writer = pq.ParquetWriter(sink, self.schema, **parquet)
        return self._writer

    def write(self, batch: pa.RecordBatch) -> None:
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        self.rows += batch.num_rows
        if self._pending_rows >= self.batch_rows:
            self._flush(whole_groups=True)

    def _flush(self, whole_groups: bool = False) -> None:
        """Write what is pending; with `whole_groups`, only full row groups of `batch_rows` rows
        (the rest stays pending), so every row group but the last is full."""
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        keep = table.num_rows % self.batch_rows if whole_groups else 0
        table, rest = table.slice(0, table.num_rows - keep), table.slice(table.num_rows - keep)
        self._pending, self._pending_rows = rest.to_batches(), rest.num_rows
        writer = self._writer_for(closing=not whole_groups)
        if isinstance(writer, pq.ParquetWriter):
            writer.write_table(table, row_group_size=self.batch_rows)
        else:
            text = pc.strftime(table.column("timestamp"), format=CSV_TIMESTAMP_FORMAT)
            writer.write_table(table.set_column(0, _CSV_TIMESTAMP, text))

    def abandon(self) -> None:
        """Close the file after a failure; it is never uploaded."""
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            if self.path is not None:
                self.path.unlink(missing_ok=True)

    def close(self) -> int:
        """Finish the file; return its size in bytes."""
        self._flush()
        self._writer_for(closing=True).close()
        if self._memory is not None:
            return int(self._memory.tell())
        assert self.path is not None
        size = os.path.getsize(self.path)
        if size >= MULTIPART_THRESHOLD:
            # Its upload in parts comes next, and their buffers (outside Arrow's pool) would add
            # to the Arrow memory the writing freed, which Arrow's allocator keeps until told:
            # 25 MiB of a 5 M-row day's peak (bench P4).
            pa.default_memory_pool().release_unused()
        return size

    def body(self) -> bytes:
        """The finished file's bytes, when written to memory."""
        if self._memory is None:
            raise ValueError("the file was written to disk")
        return self._memory.getvalue().to_pybytes()
