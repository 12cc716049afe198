"""Every field a device reports: EXPORT_FIELDS and EXPORT_TAGS choose them (`*`: all InfluxDB
lists), InfluxDB's field types type the columns, the seed's columns come first and the others
follow by name, and both datasets take a field from the files written after it appears.

On the real InfluxDB and S3 servers: fields of every type exported value by value, `*`, a field
first written at noon, a type conflict between shards, hostile names, DuckDB reading a folder
whose files gained a column. The column rules themselves are pure and tested as such.
"""

from __future__ import annotations

import io
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from export_pipeline.engine.day_files import DayFiles
from export_pipeline.engine.grid import NS_PER_SECOND, DayRange, day_bounds_ns
from export_pipeline.engine.influx import InfluxError, InfluxSource
from export_pipeline.engine.layout import device_folder
from export_pipeline.engine.progress import DayTotals
from export_pipeline.engine.reconciliation import late_data
from export_pipeline.engine.schema import SCHEMA, ColumnsError, plan_columns
from export_pipeline.engine.slice_files import Slices, write_slices
from export_pipeline.settings import InfluxSettings, Settings, SettingsError
from export_pipeline_tests.conftest import Stack, docs_example
from export_pipeline_tests.services import escape_tag

DAY = date(2026, 2, 7)
DAY_NS, _ = day_bounds_ns(DAY)
SEED = list(SCHEMA.names)


def line(
    seconds: int, device_id: str, fields: str, tags: str = "device_type=pump,location=lab"
) -> str:
    """A point `seconds` after DAY's midnight, its fields as line protocol writes them."""
    time_ns = DAY_NS + seconds * NS_PER_SECOND
    return f"telemetry,device_id={escape_tag(device_id)},{tags} {fields} {time_ns}"


def influx(**settings: str) -> InfluxSettings:
    return Settings.from_env({"S3_BUCKET": "some-bucket", **settings}).influx


# --- The column rules, pure -------------------------------------------------------------------


def test_the_default_is_the_seeds_twelve_columns() -> None:
    columns = plan_columns(influx(), field_keys=[("voltage", "float")], tag_keys=[])
    assert columns.schema.equals(SCHEMA)
    assert SEED == [
        "timestamp", "device_id", "device_type", "location", "voltage", "current", "power",
        "temperature", "hour", "day_of_week", "is_weekend", "power_factor",
    ]  # fmt: skip


def test_influxdbs_types_become_arrow_types_and_the_others_follow_the_seed_by_name() -> None:
    keys = [
        ("voltage", "float"), ("rpm", "integer"), ("count", "unsigned"),
        ("door_open", "boolean"), ("status", "string"), ("humidity", "float"),
    ]  # fmt: skip
    columns = plan_columns(
        influx(EXPORT_FIELDS="*", EXPORT_TAGS="*"),
        field_keys=keys,
        tag_keys=["device_id", "location", "site"],
    )
    schema = columns.schema
    assert schema.names == [
        "timestamp", "device_id", "location", "voltage", "hour", "day_of_week", "is_weekend",
        "count", "door_open", "humidity", "rpm", "site", "status",
    ]  # fmt: skip
    types = {field.name: field.type for field in schema}
    assert types["rpm"] == pa.int64() and types["count"] == pa.uint64()
    assert types["door_open"] == pa.bool_() and types["status"] == pa.string()
    assert types["humidity"] == pa.float64() and types["site"] == pa.string()


def test_power_factor_only_with_its_three_inputs() -> None:
    only_voltage = plan_columns(influx(EXPORT_FIELDS="voltage"), field_keys=[], tag_keys=[])
    assert "power_factor" not in only_voltage.schema.names
    assert only_voltage.schema.names[:5] == [
        "timestamp",
        "device_id",
        "device_type",
        "location",
        "voltage",
    ]
    three = plan_columns(influx(EXPORT_FIELDS="power,current,voltage"), field_keys=[], tag_keys=[])
    assert "power_factor" in three.schema.names


def test_the_seeds_fields_stay_floats_and_other_integers_stay_integers() -> None:
    columns = plan_columns(
        influx(EXPORT_FIELDS="voltage,rpm"),
        field_keys=[("voltage", "integer"), ("rpm", "integer")],
        tag_keys=[],
    )
    assert dict(columns.fields) == {"voltage": "float", "rpm": "integer"}
    assert columns.casts == {"voltage"}


def test_a_type_conflict_fails_naming_the_field_and_both_types_unless_widened() -> None:
    keys = [("rpm", "float"), ("rpm", "integer")]
    with pytest.raises(ColumnsError, match=r"'rpm' is float in some shards and integer in others"):
        plan_columns(influx(EXPORT_FIELDS="*"), field_keys=keys, tag_keys=[])
    widened = plan_columns(
        influx(EXPORT_FIELDS="*", EXPORT_FIELD_TYPES="rpm:float"), field_keys=keys, tag_keys=[]
    )
    assert dict(widened.fields) == {"rpm": "float"} and widened.casts == {"rpm"}
    with pytest.raises(ColumnsError, match="only integers and unsigned integers widen"):
        plan_columns(
            influx(EXPORT_FIELDS="*", EXPORT_FIELD_TYPES="state:float"),
            field_keys=[("state", "string"), ("state", "integer")],
            tag_keys=[],
        )


def test_names_no_column_may_take_are_refused_by_name() -> None:
    with pytest.raises(SettingsError, match="field 'hour' would be a column the export makes"):
        influx(EXPORT_FIELDS="voltage,hour")
    with pytest.raises(SettingsError, match="tag 'Rpm' and field 'rpm' would be one column"):
        influx(EXPORT_FIELDS="rpm", EXPORT_TAGS="Rpm")
    with pytest.raises(SettingsError, match="EXPORT_FIELD_TYPES: 'x' is not in EXPORT_FIELDS"):
        influx(EXPORT_FIELD_TYPES="x:float")
    with pytest.raises(SettingsError, match="EXPORT_FIELDS=',' names nothing"):
        influx(EXPORT_FIELDS=",")
    # With `*`, a name found in InfluxDB is refused as it is found: never a silent clash.
    with pytest.raises(ColumnsError, match="field 'Date' would be a column the export makes"):
        plan_columns(influx(EXPORT_FIELDS="*"), field_keys=[("Date", "string")], tag_keys=[])
    with pytest.raises(ColumnsError, match="control character"):
        plan_columns(influx(EXPORT_FIELDS="*"), field_keys=[("a\nb", "float")], tag_keys=[])


def test_the_late_data_sweep_sees_a_new_fields_points_as_a_change() -> None:
    then = {"voltage": 10, "current": 10, "power": 10, "temperature": 10}
    now = {**then, "humidity": 4}
    [changed] = late_data({("d1", DAY): then}, {DAY: {"d1": now}})
    assert "humidity 0 -> 4" in changed.description
    assert late_data({("d1", DAY): now}, {DAY: {"d1": now}}) == []


def test_a_days_totals_add_up_fields_that_appeared_in_between() -> None:
    morning = DayTotals(2, 1, {"voltage": 2})
    afternoon = DayTotals(3, 1, {"voltage": 3, "humidity": 1})
    assert (morning + afternoon).counts == {"voltage": 5, "humidity": 1}


# --- On the real servers ------------------------------------------------------------------------


def slice_tables(stack: Stack, device_id: str) -> dict[str, pa.Table]:
    folder = device_folder(stack.prefix, device_id=device_id, day=DAY, layout="seed")
    found = stack.s3.list_objects_v2(Bucket=stack.bucket, Prefix=folder).get("Contents", [])
    return {
        item["Key"].rsplit("/", 1)[1]: pq.read_table(
            io.BytesIO(stack.s3.get_object(Bucket=stack.bucket, Key=item["Key"])["Body"].read())
        )
        for item in found
    }


def export_day(stack: Stack, settings: Settings, device_id: str, piece: DayRange) -> None:
    with InfluxSource(settings.influx) as source:
        write_slices(
            source,
            stack.store(),
            prefix=settings.s3.prefix,
            device_id=device_id,
            piece=piece,
            settings=settings.export,
        )


def test_extra_fields_of_every_type_are_exported_value_by_value(stack: Stack) -> None:
    stack.write(
        [
            line(
                60,
                "d1",
                'voltage=230.5,rpm=1200i,door_open=true,status="ok, \\"fine\\"",humidity=40.25',
            ),
            line(120, "d1", "voltage=231,rpm=-5i,door_open=false,humidity=41"),
        ]
    )
    settings = stack.settings(
        EXPORT_FIELDS="voltage,rpm,door_open,status,humidity", EXPORT_INTERVAL_SECONDS="3600"
    )
    export_day(stack, settings, "d1", DayRange(DAY, 0, 3600))
    [table] = slice_tables(stack, "d1").values()
    assert table.column_names == [
        "timestamp", "device_id", "device_type", "location", "voltage", "hour", "day_of_week",
        "is_weekend", "door_open", "humidity", "rpm", "status",
    ]  # fmt: skip
    assert table.column("voltage").to_pylist() == [230.5, 231.0]
    assert table.schema.field("rpm").type == pa.int64()
    assert table.column("rpm").to_pylist() == [1200, -5]
    assert table.column("door_open").to_pylist() == [True, False]
    assert table.column("status").to_pylist() == ['ok, "fine"', None]
    assert table.column("humidity").to_pylist() == [40.25, 41.0]
    assert table.column("device_type").to_pylist() == ["pump", "pump"]


def test_every_field_and_tag_with_a_star_hostile_names_included(stack: Stack) -> None:
    stack.write(
        [
            line(
                60,
                "d1",
                'voltage=1,we\\ ird=2,a.b=3i,\\"q\\"=4,ünï=5,x\\,y="z"',
                tags="device_type=pump,my\\ tag=blue",
            )
        ]
    )
    settings = stack.settings(EXPORT_FIELDS="*", EXPORT_TAGS="*", EXPORT_INTERVAL_SECONDS="3600")
    with InfluxSource(settings.influx) as source:
        columns = source.columns
    assert dict(columns.fields) == {
        '"q"': "float", "a.b": "integer", "voltage": "float", "we ird": "float",
        "x,y": "string", "ünï": "float",
    }  # fmt: skip
    assert columns.tags == ("device_type", "my tag")
    export_day(stack, settings, "d1", DayRange(DAY, 0, 3600))
    [table] = slice_tables(stack, "d1").values()
    row = table.to_pylist()[0]
    assert {k: row[k] for k in ('"q"', "a.b", "we ird", "x,y", "ünï", "my tag")} == {
        '"q"': 4.0, "a.b": 3, "we ird": 2.0, "x,y": "z", "ünï": 5.0, "my tag": "blue",
    }  # fmt: skip
    assert "location" not in table.column_names  # `*` is what InfluxDB has: no location tag


def test_a_field_reported_from_noon_is_in_the_afternoons_slices_and_in_the_day_file(
    stack: Stack, tmp_path: Path
) -> None:
    morning, afternoon = DayRange(DAY, 0, 12 * 3600), DayRange(DAY, 12 * 3600, 24 * 3600)
    stack.write([line(s, "d1", f"voltage={s}") for s in range(600, 12 * 3600, 3600)])
    settings = stack.settings(EXPORT_FIELDS="*", EXPORT_INTERVAL_SECONDS="3600")
    export_day(stack, settings, "d1", morning)  # a run before noon: no humidity yet
    stack.write(
        [
            line(s, "d1", f"voltage={s},humidity={s / 1000}")
            for s in range(12 * 3600 + 600, 86_400, 3600)
        ]
    )
    export_day(stack, settings, "d1", afternoon)  # the next run finds it
    tables = slice_tables(stack, "d1")
    assert all("humidity" not in t.column_names for k, t in tables.items() if k < "export_120000")
    assert all("humidity" in t.column_names for k, t in tables.items() if k >= "export_120000")
    assert len(tables) == 24

    with InfluxSource(settings.influx) as source:
        slices = Slices(source, stack.store(), settings.s3.prefix, settings.export)
        totals = DayTotals(24, 24, {"voltage": 24, "humidity": 12})
        assert slices.reconcile("d1", DAY, totals).passed
        day_files = DayFiles(source, stack.store(), "telemetry_daily", 1000, tmp_path)
        day_files.export("d1", DayRange.whole(DAY))
        reconciled = day_files.reconcile("d1", DAY, None)
    assert reconciled.passed, reconciled.description
    body = stack.s3.get_object(Bucket=stack.bucket, Key=day_files.key("d1", DAY))["Body"].read()
    day = pq.read_table(io.BytesIO(body))
    assert day.column("humidity").null_count == 12 and len(day) == 24


def test_a_type_conflict_between_shards_fails_naming_the_field_unless_widened(
    stack: Stack,
) -> None:
    # A week apart, two shards (a shard group spans a week): rpm an integer in one, a float in
    # the other.
    stack.write([line(60 - 8 * 86_400, "d1", "rpm=7i"), line(60, "d1", "rpm=2.5")])
    conflicted = stack.settings(EXPORT_FIELDS="rpm")
    with (
        InfluxSource(conflicted.influx) as source,
        pytest.raises(InfluxError, match=r"'rpm' is float in some shards and integer in others"),
    ):
        list(
            source.read(
                "d1",
                start_ns=DAY_NS - 9 * 86_400 * NS_PER_SECOND,
                end_ns=DAY_NS + 86_400 * NS_PER_SECOND,
            )
        )
    widened = stack.settings(EXPORT_FIELDS="rpm", EXPORT_FIELD_TYPES="rpm:float")
    with InfluxSource(widened.influx) as source:
        table = pa.Table.from_batches(
            list(
                source.read(
                    "d1",
                    start_ns=DAY_NS - 9 * 86_400 * NS_PER_SECOND,
                    end_ns=DAY_NS + 86_400 * NS_PER_SECOND,
                )
            )
        )
    assert table.column("rpm").to_pylist() == [7.0, 2.5]


def test_duckdb_reads_a_folder_whose_files_gained_a_column(stack: Stack, tmp_path: Path) -> None:
    """The README's reader: union_by_name reads the files before and after a field appeared."""
    stack.write([line(600, "d1", "voltage=1")])
    settings = stack.settings(EXPORT_FIELDS="*", EXPORT_INTERVAL_SECONDS="3600")
    export_day(stack, settings, "d1", DayRange(DAY, 0, 3600))
    stack.write([line(4200, "d1", "voltage=2,humidity=0.5")])
    export_day(stack, settings, "d1", DayRange(DAY, 3600, 7200))
    for name, table in slice_tables(stack, "d1").items():
        pq.write_table(table, tmp_path / name)
    rows = duckdb.sql(
        f"SELECT voltage, humidity FROM read_parquet('{tmp_path}/*.parquet', union_by_name = true) "
        "ORDER BY timestamp"
    ).fetchall()
    assert rows == [(1.0, None), (2.0, 0.5)]


def test_the_readme_reads_the_day_files_history_with_a_field_that_appeared_later(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from duckdb_extensions import import_extension  # httpfs from PyPI: no download at run time

    import_extension("httpfs")
    settings = stack.settings(EXPORT_FIELDS="*")
    next_day = DAY + timedelta(days=1)
    stack.write([line(600, "d1", "voltage=1,power=5")])  # the docs' query averages power
    with InfluxSource(settings.influx) as source:  # a run before humidity was reported
        DayFiles(source, stack.store(), "telemetry_daily", 1000, tmp_path).export(
            "d1", DayRange.whole(DAY)
        )
    stack.write([line(86_400 + 600, "d1", "voltage=2,power=6,humidity=0.5")])
    with InfluxSource(settings.influx) as source:  # the next day's run
        DayFiles(source, stack.store(), "telemetry_daily", 1000, tmp_path).export(
            "d1", DayRange.whole(next_day)
        )
    for variable, value in stack.env().items():
        monkeypatch.setenv(variable, value)
    namespace: dict[str, Any] = {}
    exec(compile(docs_example("duckdb"), "docs (duckdb)", "exec"), namespace)  # the S3 secret
    exec(compile(docs_example("history"), "README (history)", "exec"), namespace)
    history = namespace["history"]
    assert history.column("voltage").to_pylist() == [1.0, 2.0]
    assert history.column("humidity").to_pylist() == [None, 0.5]
    assert history.column("date").to_pylist() == [DAY, next_day]


def test_csv_slices_carry_the_extra_columns_too(stack: Stack) -> None:
    stack.write([line(60, "d1", 'voltage=1.5,rpm=3i,door_open=true,status="a,b"')])
    settings = stack.settings(
        EXPORT_FIELDS="voltage,rpm,door_open,status",
        EXPORT_FORMAT="csv",
        EXPORT_INTERVAL_SECONDS="3600",
    )
    export_day(stack, settings, "d1", DayRange(DAY, 0, 3600))
    folder = device_folder(stack.prefix, device_id="d1", day=DAY, layout="seed")
    [item] = stack.s3.list_objects_v2(Bucket=stack.bucket, Prefix=folder)["Contents"]
    body = stack.s3.get_object(Bucket=stack.bucket, Key=item["Key"])["Body"].read().decode()
    header, row = body.splitlines()
    assert header.split(",")[-3:] == ['"door_open"', '"rpm"', '"status"']
    assert row.endswith(',true,3,"a,b"')


def test_a_field_not_written_yet_waits_for_its_type_unless_declared() -> None:
    waiting = plan_columns(influx(EXPORT_FIELDS="voltage,rpm"), field_keys=[], tag_keys=[])
    assert dict(waiting.fields) == {"voltage": "float"}  # the seed's own stay, as floats
    declared = plan_columns(
        influx(EXPORT_FIELDS="voltage,rpm", EXPORT_FIELD_TYPES="rpm:integer"),
        field_keys=[],
        tag_keys=[],
    )
    assert dict(declared.fields) == {"voltage": "float", "rpm": "integer"}
    colon = plan_columns(
        influx(EXPORT_FIELDS="temp:c", EXPORT_FIELD_TYPES="temp:c:float"),
        field_keys=[("temp:c", "float"), ("temp:c", "integer")],
        tag_keys=[],
    )
    assert dict(colon.fields) == {"temp:c": "float"}


def test_an_empty_string_is_exported_as_null_and_the_day_still_reconciles(
    stack: Stack, tmp_path: Path
) -> None:
    # InfluxDB's CSV writes "" as it writes a missing value: the export holds null, and the
    # reconciliation counts the non-empty strings alone.
    stack.write([line(60, "d1", 'voltage=1,status=""'), line(120, "d1", 'voltage=2,status="on"')])
    settings = stack.settings(EXPORT_FIELDS="voltage,status", EXPORT_INTERVAL_SECONDS="3600")
    with InfluxSource(settings.influx) as source:
        day_files = DayFiles(source, stack.store(), "telemetry_daily", 1000, tmp_path)
        day_files.export("d1", DayRange.whole(DAY))
        reconciled = day_files.reconcile("d1", DAY, None)
        assert source.field_counts(
            start_ns=DAY_NS, end_ns=DAY_NS + 86_400 * NS_PER_SECOND, device_id="d1"
        ) == {"d1": {"voltage": 2, "status": 1}}
    assert reconciled.passed, reconciled.description
    body = stack.s3.get_object(Bucket=stack.bucket, Key=day_files.key("d1", DAY))["Body"].read()
    assert pq.read_table(io.BytesIO(body)).column("status").to_pylist() == [None, "on"]


def test_a_string_with_newlines_reads_whole_in_a_long_answer(stack: Stack) -> None:
    # A newline inside a quoted string value is a newline of the value.
    stack.write([line(s, "d1", f'msg="line {s}\nnext, \\"q\\""') for s in range(0, 80_000, 4)])
    settings = stack.settings(EXPORT_FIELDS="msg")
    with InfluxSource(settings.influx) as source:
        # Small batches: the answer is parsed in many blocks, a value may straddle two.
        end_ns = DAY_NS + 86_400 * NS_PER_SECOND
        batches = list(source.read("d1", start_ns=DAY_NS, end_ns=end_ns, batch_rows=500))
    values = pa.Table.from_batches(batches).column("msg").to_pylist()
    assert len(values) == 20_000 and values[-1] == 'line 79996\nnext, "q"'
