"""The closed days as an Apache Iceberg table (`telemetry_daily`'s day files, registered).

The table references the day files where they are, in the folder layout: no second copy of the
data. A date's files enter the table in one commit per run (the fleet's day files of the date
together), partitioned by `day(timestamp)` and `device_id`, so an engine finds a device's week
from the table's manifests, without listing the bucket.

The folder keeps exactly one file per device-day, under its fixed key, for readers that do not
use the table. Iceberg needs a referenced file never to change, so a device-day written again
(late data) is replaced in two commits:

1. `retire`, before the new file is written: the old file is copied inside S3 to an immutable
   name under the table's own folder (`_iceberg/replaced/`, which folder readers skip), and the
   table is pointed at that copy (same rows);
2. `commit_date`, after: the copy leaves the table in the commit that adds the new file.

Readers of the current snapshot never see both versions or neither; the snapshot before the
replacement reads the old rows from the copy until it expires. `maintain` expires snapshots and
deletes what no retained snapshot references (replaced copies, manifests, metadata files).

What the table holds is compared with the folder before every commit, so a repeated or retried
commit changes nothing: the table's own content is the marker, and it outlives snapshot expiry.
"""

from __future__ import annotations

import contextlib
import random
import time as time_module
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from export_pipeline.engine.layout import day_file_key
from export_pipeline.engine.reconciliation import footer_of, parquet_footer
from export_pipeline.engine.store import ObjectStore

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.expressions import BooleanExpression
    from pyiceberg.manifest import DataFile
    from pyiceberg.table import Table, Transaction

# Under S3_DAILY_PREFIX: Hive-style readers (Athena, Spark, Trino, pyarrow) skip folders whose
# name starts with `_`, and the folder layout's globs (`device_id=*/...`) never reach it.
TABLE_FOLDER = "_iceberg"
REPLACED_FOLDER = "replaced"
# Snapshot summary properties of the project's commits: the date, and what the run reconciled.
DATE_PROPERTY = "export-pipeline.date"
RECONCILIATION_PROPERTY = "export-pipeline.reconciliation"
DEVICE_DAYS_PROPERTY = "export-pipeline.device-days"
STEP_PROPERTY = "export-pipeline.step"  # `retire`: a replaced file's copy, before the new one
# Files written by a commit in flight are this young at most when maintenance lists them: only
# older unreferenced files are deleted.
SWEEP_GRACE = timedelta(hours=1)
# Old metadata.json files are deleted by each commit past this many (Iceberg's own property).
PREVIOUS_METADATA_VERSIONS = 10
T = TypeVar("T")
# What a run found of a day file it had just published: its size and footer (`footer_bytes`).
Seen = tuple[int, bytes]
FOOTER_THREADS = 16
COMMIT_ATTEMPTS = 10


class TableError(RuntimeError):
    """The Iceberg table cannot be used as configured; the message names the setting."""


def table_root(daily_prefix: str, identifier: tuple[str, str]) -> str:
    """The key under which the table keeps its own files (metadata, replaced copies): one folder
    per table, so the maintenance of one never touches another's."""
    folder = f"{TABLE_FOLDER}/{identifier[0]}/{identifier[1]}"
    return f"{daily_prefix}/{folder}" if daily_prefix else folder


def replaced_key(root: str, key: str, daily_prefix: str) -> str:
    """An immutable key for a replaced day file, under the table's folder `root`."""
    relative = key[len(daily_prefix) + 1 :] if daily_prefix else key
    folder, _, name = relative.rpartition("/")
    return f"{root}/{REPLACED_FOLDER}/{folder}/{uuid.uuid4().hex}-{name}"


@dataclass(frozen=True)
class HeldFile:
    """A data file of the table's current snapshot: the device-day it holds and its size."""

    uri: str
    size: int


@dataclass(frozen=True)
class DateChanges:
    """What one date's commit does: the table's files it removes and the folder's it adds."""

    removed: tuple[str, ...] = ()
    added: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.removed or self.added)


def date_changes(
    held: Mapping[str, list[HeldFile]], folder: Mapping[str, tuple[str, int] | None]
) -> DateChanges:
    """The commit that makes the table hold, for each device in `folder`, exactly the folder's
    day file (`(uri, size)`, or None: the device-day has no file): a device-day already held as
    it is changes nothing. Devices not in `folder` are left as they are (another run's)."""
    removed: list[str] = []
    added: list[str] = []
    for device_id, found in sorted(folder.items()):
        files = held.get(device_id, [])
        if found is not None and files == [HeldFile(*found)]:
            continue
        removed.extend(file.uri for file in files)
        if found is not None:
            added.append(found[0])
    return DateChanges(tuple(removed), tuple(added))


def to_retire(held: Mapping[str, list[HeldFile]], folder_uris: Mapping[str, str]) -> list[str]:
    """The held files that are the folder's own file of a device-day about to be written again:
    those must be copied aside before their key gets new content."""
    return sorted(
        file.uri
        for device_id, uri in folder_uris.items()
        for file in held.get(device_id, [])
        if file.uri == uri
    )


def day_filter(day: date) -> BooleanExpression:
    """The rows of one UTC day."""
    from pyiceberg.expressions import And, GreaterThanOrEqual, LessThan, Reference, literal

    start = datetime.combine(day, time(), UTC)
    end = start + timedelta(days=1)
    timestamp = Reference("timestamp")
    return And(
        GreaterThanOrEqual(term=timestamp, value=literal(start.isoformat())),
        LessThan(term=timestamp, value=literal(end.isoformat())),
    )


def device_filter(device_id: str) -> BooleanExpression:
    """One device's rows: an expression, not text, so any id (quotes included) is a value."""
    from pyiceberg.expressions import EqualTo, Reference, literal

    return EqualTo(term=Reference("device_id"), value=literal(device_id))


@dataclass
class CommitReport:
    """One date's commit, for the run's log and the date's metadata."""

    day: date
    snapshot_id: int | None = None  # None: the table already held the date's files
    added: int = 0
    removed: int = 0
    retired: int = 0


@dataclass
class SweepReport:
    expired_snapshots: int = 0
    deleted: list[str] = field(default_factory=list)
    kept_young: int = 0


class DailyTable:
    """The Iceberg table of closed days, on a catalog, with the bucket its files are in."""

    def __init__(
        self,
        catalog: Catalog,
        identifier: tuple[str, str],
        store: ObjectStore,
        daily_prefix: str,
        *,
        placed: bool = True,
    ) -> None:
        """`placed`: the table is created in its folder beside the day files (a SQL catalog);
        False: where the catalog puts it (a REST catalog: S3 Tables keeps a table in a bucket
        of its own), the folder then holding only the copies of replaced files."""
        self.catalog = catalog
        self.identifier = identifier
        self.store = store
        self.daily_prefix = daily_prefix
        self.root = table_root(daily_prefix, identifier)
        self.location = store.uri(self.root) if placed else None
        self._table: Table | None = None

    @property
    def name(self) -> str:
        return ".".join(self.identifier)

    def close(self) -> None:
        """Closes a SQL catalog's connections (a REST catalog holds none)."""
        engine = getattr(self.catalog, "engine", None)
        if engine is not None:
            engine.dispose()

    # -- the table ------------------------------------------------------------------------------

    @property
    def table(self) -> Table:
        if self._table is None:
            raise RuntimeError("DailyTable.load() first")
        return self._table

    @property
    def loaded(self) -> Table | None:
        return self._table

    def load(self, schema: pa.Schema | None) -> Table | None:
        """The table, created (with its namespace) when missing, unless `schema` is None;
        refused when it exists in another place than this bucket's daily prefix (another
        deployment's table)."""
        from pyiceberg.exceptions import NamespaceAlreadyExistsError, NoSuchTableError

        try:
            table = self.catalog.load_table(self.identifier)
        except NoSuchTableError:
            if schema is None:
                return None
            with contextlib.suppress(NamespaceAlreadyExistsError):
                self.catalog.create_namespace(self.identifier[0])
            table = self._create(schema)
        if self.location is not None and table.location().rstrip("/") != self.location:
            raise TableError(
                f"the Iceberg table {self.name} (ICEBERG_NAMESPACE, ICEBERG_TABLE) is at "
                f"{table.location()}, not at {self.location} where S3_BUCKET and S3_DAILY_PREFIX "
                "put it: name another table, or point the settings at its bucket"
            )
        self._table = table
        return table

    def _create(self, schema: pa.Schema) -> Table:
        """One commit creates the table whole: schema, partitioning and properties."""
        from pyiceberg.exceptions import CommitFailedException, TableAlreadyExistsError
        from pyiceberg.transforms import DayTransform

        try:
            tx = self.catalog.create_table_transaction(
                self.identifier,
                schema=pa.schema([plain_field(column) for column in schema]),
                location=self.location,  # None: the catalog's choice
                properties={
                    # A commit that lost a race is redone here from the table as it now is
                    # (`_committed`), not replayed by pyiceberg on a diff made before.
                    "commit.retry.num-retries": "0",
                    # Only a conflict on the same files fails a commit: the sensor's runs of one
                    # date, each of other devices, commit at about the same time.
                    "write.delete.isolation-level": "snapshot",
                    "write.metadata.delete-after-commit.enabled": "true",
                    "write.metadata.previous-versions-max": str(PREVIOUS_METADATA_VERSIONS),
                },
            )
            with tx.update_spec() as spec:
                spec.add_field("timestamp", DayTransform(), "timestamp_day")
                spec.add_identity("device_id")
            # The day files carry no Iceberg field ids: readers find columns by name.
            mapping = tx.table_metadata.schema().name_mapping.model_dump_json()
            tx.set_properties({"schema.name-mapping.default": mapping})
            tx.commit_transaction()
        except (TableAlreadyExistsError, CommitFailedException):
            pass  # another run created it a moment ago
        return self.catalog.load_table(self.identifier)

    # -- commits --------------------------------------------------------------------------------

    def held(self, day: date) -> dict[str, list[tuple[HeldFile, DataFile]]]:
        """The current snapshot's data files of `day`, by device."""
        found: dict[str, list[tuple[HeldFile, DataFile]]] = {}
        table = self.table
        if table.current_snapshot() is None:
            return found
        position = [f.name for f in table.spec().fields].index("device_id")
        for task in table.scan(row_filter=day_filter(day)).plan_files():
            data_file = task.file
            device_id = str(data_file.partition[position])
            held = HeldFile(data_file.file_path, data_file.file_size_in_bytes)
            found.setdefault(device_id, []).append((held, data_file))
        return found

    def folder_uri(self, device_id: str, day: date) -> str:
        return self.store.uri(day_file_key(self.daily_prefix, device_id=device_id, day=day))

    def folder_files(
        self, day: date, devices: Iterable[str], seen: Mapping[str, Seen | None] | None = None
    ) -> dict[str, tuple[str, int] | None]:
        """Each device's day file of `day` in the bucket, with its size (None: it has none):
        as `seen` has it (by key), else one LIST of its folder each, several at a time."""
        known = seen or {}

        def find(device_id: str) -> tuple[str, int] | None:
            key = day_file_key(self.daily_prefix, device_id=device_id, day=day)
            if key in known:
                found = known[key]
                return None if found is None else (self.store.uri(key), found[0])
            sizes = self.store.list_keys(key.rsplit("/", 1)[0] + "/")
            return (self.store.uri(key), sizes[key]) if key in sizes else None

        wanted = sorted(set(devices))
        with ThreadPoolExecutor(FOOTER_THREADS, thread_name_prefix="find") as pool:
            return dict(zip(wanted, pool.map(find, wanted), strict=True))

    def key_of(self, uri: str) -> str:
        prefix = f"s3://{self.store.bucket}/"
        if not uri.startswith(prefix):
            raise TableError(f"{uri} is not in S3_BUCKET={self.store.bucket!r}")
        return uri[len(prefix) :]

    def _until_committed(self, attempt: Callable[[Table], T]) -> T:
        """`attempt` on the table as it is now; when its commit loses a race with another
        committer (another run's date, maintenance), again on the table as it then is, so what
        to commit is decided anew rather than replayed (pyiceberg's own retry is off)."""
        from pyiceberg.exceptions import CommitFailedException, ValidationException

        for attempt_number in range(COMMIT_ATTEMPTS):
            self._table = self.catalog.load_table(self.identifier)
            try:
                return attempt(self._table)
            except (CommitFailedException, ValidationException):
                if attempt_number == COMMIT_ATTEMPTS - 1:
                    raise
                pause = min(2.0, 0.05 * 2**attempt_number)
                time_module.sleep(pause / 2 + random.uniform(0, pause / 2))
        raise AssertionError("unreachable")

    def retire(self, day: date, devices: Iterable[str]) -> int:
        """Before these devices' day files of `day` are written again: each one the table
        holds is copied aside and the table pointed at the copy, in one commit. The number of
        files retired."""
        wanted = {device: self.folder_uri(device, day) for device in devices}

        def attempt(table: Table) -> int:
            held = self.held(day)
            retiring = set(to_retire(_plain(held), wanted))
            if not retiring:
                return 0
            old = [data for files in held.values() for file, data in files if file.uri in retiring]

            def copied(data_file: DataFile) -> tuple[str, int]:
                key = self.key_of(data_file.file_path)
                copy = replaced_key(self.root, key, self.daily_prefix)
                self.store.copy(key, copy)
                return self.store.uri(copy), data_file.file_size_in_bytes

            with ThreadPoolExecutor(FOOTER_THREADS, thread_name_prefix="retire") as pool:
                sizes = dict(pool.map(copied, old))  # a copy is the same bytes: the same size
            new_files = self.data_files_of(table.metadata, self._footers(list(sizes)), sizes)
            properties = {DATE_PROPERTY: day.isoformat(), STEP_PROPERTY: "retire"}
            with (
                table.transaction() as tx,
                tx.update_snapshot(snapshot_properties=properties).overwrite() as overwrite,
            ):
                for data_file in old:
                    overwrite.delete_data_file(data_file)
                for data_file in new_files:
                    overwrite.append_data_file(data_file)
            return len(old)

        return self._until_committed(attempt)

    def commit_date(
        self,
        day: date,
        devices: Iterable[str],
        *,
        reconciliation: str = "",
        seen: Mapping[str, Seen | None] | None = None,
    ) -> CommitReport:
        """One commit making the table hold these devices' day files of `day` as the folder
        has them; nothing when it already does. `seen`: what the run that wrote them found of
        its files just after publishing each (size and footer, or None, by key), which saves
        a LIST and a footer read a file; the devices it does not name are looked up in S3."""
        folder = self.folder_files(day, devices, seen)
        footers: dict[str, pq.FileMetaData] = {}

        def attempt(table: Table) -> CommitReport:
            report = CommitReport(day)
            held = self.held(day)
            changes = date_changes(_plain(held), folder)
            if not changes:
                return report
            removed = set(changes.removed)
            old = [data for files in held.values() for file, data in files if file.uri in removed]
            footers.update(
                self._footers([uri for uri in changes.added if uri not in footers], seen)
            )
            sizes = {found[0]: found[1] for found in folder.values() if found is not None}
            properties = {
                DATE_PROPERTY: day.isoformat(),
                DEVICE_DAYS_PROPERTY: str(len(folder)),
                RECONCILIATION_PROPERTY: reconciliation,
            }
            with table.transaction() as tx:
                added = {uri: footers[uri] for uri in changes.added}
                self._widen(tx, [footer.schema.to_arrow_schema() for footer in added.values()])
                new_files = self.data_files_of(tx.table_metadata, added, sizes)
                producer = tx.update_snapshot(snapshot_properties=properties)
                with producer.overwrite() if old else producer.fast_append() as update:
                    for data_file in old:
                        update.delete_data_file(data_file)
                    for data_file in new_files:
                        update.append_data_file(data_file)
            snapshot = table.current_snapshot()
            report.snapshot_id = snapshot.snapshot_id if snapshot else None
            report.added, report.removed = len(changes.added), len(old)
            return report

        return self._until_committed(attempt)

    def _footers(
        self, uris: list[str], seen: Mapping[str, Seen | None] | None = None
    ) -> dict[str, pq.FileMetaData]:
        """Each file's footer: as `seen` has it (by key), else read from S3, several at a
        time."""
        known = seen or {}

        def footer(uri: str) -> pq.FileMetaData:
            found = known.get(self.key_of(uri))
            return footer_of(found[1]) if found else parquet_footer(self.store, self.key_of(uri))

        with ThreadPoolExecutor(FOOTER_THREADS, thread_name_prefix="footer") as pool:
            return dict(zip(uris, pool.map(footer, uris), strict=True))

    def data_files_of(
        self,
        metadata: Any,
        footers: Mapping[str, pq.FileMetaData],
        sizes: Mapping[str, int] | None = None,
    ) -> list[DataFile]:
        """Iceberg's entries for these files, from footers already read (pyiceberg's
        `add_files` would read each again) and sizes already listed (`sizes`; else one LIST
        each): statistics, partition values inferred from them."""
        from pyiceberg.io.pyarrow import (
            compute_statistics_plan,
            data_file_statistics_from_parquet_metadata,
            parquet_path_to_id_mapping,
        )
        from pyiceberg.manifest import DataFile, DataFileContent, FileFormat

        schema, spec = metadata.schema(), metadata.spec()
        plan = compute_statistics_plan(schema, metadata.properties)
        mapping = parquet_path_to_id_mapping(schema)
        files = []
        for uri, footer in footers.items():
            statistics = data_file_statistics_from_parquet_metadata(
                parquet_metadata=footer, stats_columns=plan, parquet_column_mapping=mapping
            )
            files.append(
                DataFile.from_args(
                    content=DataFileContent.DATA,
                    file_path=uri,
                    file_format=FileFormat.PARQUET,
                    partition=statistics.partition(spec, schema),
                    file_size_in_bytes=sizes[uri] if sizes and uri in sizes else self._size(uri),
                    sort_order_id=None,
                    spec_id=metadata.default_spec_id,
                    equality_ids=None,
                    key_metadata=None,
                    **statistics.to_serialized_dict(),
                )
            )
        return files

    def _size(self, uri: str) -> int:
        key = self.key_of(uri)
        return self.store.list_keys(key.rsplit("/", 1)[0] + "/")[key]

    def _widen(self, tx: Transaction, schemas: list[pa.Schema]) -> None:
        """Columns of the files the table lacks (a field that appeared, EXPORT_FIELDS) are
        added to its schema in the same commit; a column is never dropped."""
        known = set(tx.table_metadata.schema().column_names)
        extra = [
            plain_field(column)
            for schema in schemas
            for column in schema
            if column.name not in known
        ]
        if not extra:
            return
        unique = {column.name: column for column in extra}
        with tx.update_schema() as update:
            update.union_by_name(pa.schema(list(unique.values())))

    # -- maintenance ----------------------------------------------------------------------------

    def maintain(self, *, now: datetime, retention: timedelta) -> SweepReport:
        """Expire snapshots older than `retention` (the current one always stays), then delete
        the files under the table's folder that no retained snapshot references and that are
        older than SWEEP_GRACE (a commit in flight may have written newer ones). The day files
        of the folder layout are never deleted here. Safe to kill and run again at any point:
        only unreferenced files are deleted."""
        report = SweepReport()
        table = self._table = self.catalog.load_table(self.identifier)
        before = len(table.metadata.snapshots)
        if before > 1:
            table.maintenance.expire_snapshots().older_than(now - retention).commit()
            table = self._table = self.catalog.load_table(self.identifier)
        report.expired_snapshots = before - len(table.metadata.snapshots)
        referenced = self.referenced(table)
        root = self.root + "/"
        unreferenced = []
        for item in self.store.list_all(root):
            if self.store.uri(item["path"]) in referenced:
                continue
            if item["last_modified"] > now - SWEEP_GRACE:
                report.kept_young += 1
                continue
            unreferenced.append(item["path"])
        # Read again: a commit between the first read and the listing references only files
        # younger than the grace, or files the first read already saw referenced.
        referenced |= self.referenced(self.catalog.load_table(self.identifier))
        report.deleted = [key for key in unreferenced if self.store.uri(key) not in referenced]
        self.store.delete(report.deleted)
        return report

    def referenced(self, table: Table) -> set[str]:
        """Every file a retained snapshot needs: metadata files, manifest lists, manifests and
        data files."""
        found = {table.metadata_location}
        found.update(entry.metadata_file for entry in table.metadata.metadata_log)
        manifests = {}
        for snapshot in table.metadata.snapshots:
            found.add(snapshot.manifest_list)
            for manifest in snapshot.manifests(table.io):
                manifests[manifest.manifest_path] = manifest  # snapshots share most of theirs
        found.update(manifests)
        with ThreadPoolExecutor(FOOTER_THREADS, thread_name_prefix="manifest") as pool:
            for entries in pool.map(
                lambda manifest: manifest.fetch_manifest_entry(table.io, discard_deleted=True),
                manifests.values(),
            ):
                found.update(entry.data_file.file_path for entry in entries)
        return found


def _plain(
    held: Mapping[str, list[tuple[HeldFile, DataFile]]],
) -> dict[str, list[HeldFile]]:
    return {device: [file for file, _ in files] for device, files in held.items()}


def plain_field(column: pa.Field) -> pa.Field:
    """A column as Iceberg types it: dictionary-encoded strings are strings."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.field(column.name, kind, nullable=True)


CATALOG_NAME = "export_pipeline"


def sql_catalog_uri(*, host: str, port: int, name: str, user: str, password: str) -> str:
    """The SQLAlchemy URL of a PostgreSQL database (the default catalog: Dagster's own)."""
    from urllib.parse import quote

    credentials = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
    return f"postgresql+psycopg2://{credentials}@{host}:{port}/{quote(name, safe='')}"


def open_catalog(
    uri: str,
    *,
    io: Mapping[str, str],
    token: str = "",
    warehouse: str = "",
    signing_name: str = "",
) -> Catalog:
    """A SQL catalog (a SQLAlchemy URL) or a REST catalog (`http(s)://`: with a bearer `token`,
    or requests signed with the S3 credentials for the service `signing_name`), writing the
    table's metadata to S3 with the FileIO properties `io`."""
    properties = dict(io)
    if is_rest(uri):
        from pyiceberg.catalog.rest import RestCatalog

        if token:
            properties["token"] = token
        if warehouse:
            properties["warehouse"] = warehouse
        if signing_name:
            properties |= {
                "rest.sigv4-enabled": "true",
                "rest.signing-name": signing_name,
                "rest.signing-region": io.get("s3.region", "us-east-1"),
            }
        return RestCatalog(CATALOG_NAME, uri=uri, **properties)
    from pyiceberg.catalog.sql import SqlCatalog

    # pool_pre_ping: a run holds the catalog across a day's writes; PostgreSQL may have closed
    # an idle connection meanwhile.
    return SqlCatalog(CATALOG_NAME, uri=uri, pool_pre_ping="true", **properties)


def is_rest(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))
