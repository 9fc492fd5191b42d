"""docs/results.md is what ``python docs/build_results.py`` makes of docs/results.in.md and the result
folders it names; and the check notices a figure that changed in a folder, or a folder that is gone."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _builder():
    spec = importlib.util.spec_from_file_location("build_results", ROOT / "docs" / "build_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_results = _builder()

FOLDER = "docs/results/digits_dir5_bn"
TEMPLATE = f"""# Tiny

Some prose, with a command: `fedse compare ... --out {FOLDER}`.

## The table

| method | personalized | gain over fedavg |
|---|---|---|
<!-- rows {FOLDER}
| {{method}} | {{personalized_mean_last}} | {{gain}} |
bold fedse: 2
-->

## After

<!-- hand-written: a note that does not reach the output -->
Nothing else.
"""


def test_results_md_is_up_to_date():
    stale = build_results.check()
    assert not stale, "docs/results.md is stale; run `python docs/build_results.py`:\n" + "\n".join(stale)


def test_results_md_says_it_is_generated_and_by_which_command():
    first = (ROOT / "docs" / "results.md").read_text().splitlines()[0]
    assert first.startswith("<!--") and "python docs/build_results.py" in first


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A repository root holding one small comparison folder, a template naming it, and its output."""
    shutil.copytree(ROOT / FOLDER, tmp_path / FOLDER)
    (tmp_path / "docs" / "results.in.md").write_text(TEMPLATE)
    build_results.write(build_results.build(root=tmp_path), tmp_path / "docs" / "results.md")
    return tmp_path


def test_the_table_is_the_folders(tiny: Path):
    out = (tiny / "docs" / "results.md").read_text()
    table = json.loads((tiny / FOLDER / "comparison.json").read_text())["table"]
    fedse = next(r for r in table if r["method"] == "fedse")
    assert f"| fedse | **{fedse['personalized_mean_last']}** | +" in out  # the folder's own table.md figure
    assert "| fedavg | " in out and "<!--" not in out.split("\n", 1)[1]  # directives and notes are gone
    assert build_results.check(root=tiny) == []


def test_check_fails_when_a_folders_figure_changes(tiny: Path):
    path = tiny / FOLDER / "comparison.json"
    data = json.loads(path.read_text())
    run = next(r for r in data["runs"] if r["method"] == "fedse")
    run["clients"][0]["local_acc"] = 0.0  # one client of one seed: the method's mean moves
    path.write_text(json.dumps(data))
    stale = build_results.check(root=tiny)
    assert len(stale) == 1 and stale[0].startswith("## The table: differs"), stale
    assert "| fedse |" in stale[0]


def test_check_fails_when_the_output_was_edited(tiny: Path):
    out = tiny / "docs" / "results.md"
    out.write_text(out.read_text().replace("Nothing else.", "Something else."))
    assert [s.split(":")[0] for s in build_results.check(root=tiny)] == ["## After"]


def test_a_path_the_template_names_must_exist(tiny: Path):
    template = tiny / "docs" / "results.in.md"
    template.write_text(TEMPLATE.replace("--out docs/results/digits_dir5_bn", "--out docs/results/gone"))
    with pytest.raises(build_results.BuildError, match="docs/results/gone"):
        build_results.build(root=tiny)
    template.write_text(TEMPLATE + "\nEvery `docs/results/digits_<setting>_bn`, and `docs/results/x_<a>`.\n")
    with pytest.raises(build_results.BuildError, match=r"docs/results/x_<a> \(matches nothing") as err:
        build_results.build(root=tiny)
    assert "digits_<setting>_bn" not in str(err.value)  # a placeholder that matches a folder is fine
