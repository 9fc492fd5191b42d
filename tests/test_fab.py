"""The FAB `flwr run` ships: built with Flower's own builder from this checkout.

Flower refuses a FAB over 10 MiB before any round starts, and only `flwr run` against
a SuperLink finds out; this test finds out in a second. It also pins what is shipped:
the apps, the library and the configs, nothing else (no results, tests or benchmarks).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import FAB_MAX_SIZE

ROOT = Path(__file__).resolve().parents[1]
# Not ours to fix: Flower 1.42 compiles every FAB pattern, its built-in ones and our fab-include alike,
# with pathspec.PathSpec.from_lines("gitwildmatch", ...) (build_pathspec, flwr/cli/utils.py), and the
# pathspec>=1.0.4 that Flower itself requires deprecates that style name for "gitignore". The style is
# not a setting of [tool.flwr.app], and any other builder would not test what `flwr run` ships. Only
# that message, issued from pathspec's own modules, is ignored here.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:GitWildMatchPattern \('gitwildmatch'\) is deprecated\. Use 'gitignore':DeprecationWarning:"
    r"pathspec\.(pathspec|pattern)\Z"
)


def test_the_fab_holds_the_apps_library_and_configs_and_fits_flowers_cap():
    fab = build_fab_from_disk(ROOT)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert len(fab) < FAB_MAX_SIZE // 10  # room to grow: the code is far from the cap
    assert {n.split("/")[0] for n in names} == {".info", "pyproject.toml", "fedse", "clients", "server", "configs"}
    shipped = {n for n in names if n.endswith(".py") and not n.startswith(".info")}
    apps = ("fedse", "clients", "server")
    on_disk = {p.relative_to(ROOT).as_posix() for top in apps for p in (ROOT / top).rglob("*.py")}
    assert shipped == on_disk  # every module the apps may import
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.yaml")}
    assert configs <= set(names)
