"""The package's layout by role holds: data flows one way, defs -> record -> engine -> settings,
and the engine never imports Dagster (docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "export_pipeline"
# What each room may import of the package (besides itself).
ALLOWED = {
    "engine": {"engine", "settings"},
    "record": {"record", "engine", "settings"},
    "defs": {"defs", "record", "engine", "settings"},
}


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_a_room_imports_only_the_rooms_below_it(room: str) -> None:
    wrong = {
        f"{path.name}: {module}"
        for path in (PACKAGE / room).glob("*.py")
        for module in imports_of(path)
        if module.startswith("export_pipeline.") and module.split(".")[1] not in ALLOWED[room]
    }
    assert not wrong


def test_the_engine_and_the_settings_import_nothing_of_dagster() -> None:
    paths = [*(PACKAGE / "engine").glob("*.py"), PACKAGE / "settings.py"]
    wrong = {
        f"{path.name}: {module}"
        for path in paths
        for module in imports_of(path)
        if module.split(".")[0].startswith("dagster")
        and not (path.name == "settings.py" and module == "dagster._utils.schedules")
    }
    assert not wrong
