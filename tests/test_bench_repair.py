"""bench/repair.py keys every row by what measured it, so a table holds only rows the current
code produced."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import repair as bench_repair


def test_a_changed_source_file_changes_the_digest(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bench_repair, "ROOT", tmp_path)
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    first = bench_repair.source_digest([a, b])
    assert bench_repair.source_digest([b, a]) == first  # order of listing does not matter
    b.write_text("y = 3\n")
    assert bench_repair.source_digest([a, b]) != first


def test_row_keys_hold_the_code_the_judge_and_the_prompt_sets() -> None:
    by = bench_repair.measured_by()
    assert by["code"] == bench_repair.MEASURED_BY["code"] and len(by["code"]) == 64
    assert by["judge"] == "substring"
    assert set(by["prompts"]) == {"harmful", "benign"} and by["prompts"]["harmful"]["eval"]
    assert not hasattr(bench_repair, "carry_previous")


def test_the_code_digest_covers_what_measures_and_not_the_cli_or_the_hub_client() -> None:
    files = {str(p.relative_to(bench_repair.ROOT)) for p in bench_repair.measuring_code()}
    assert "adapter_repair/repair/loop.py" in files
    assert "adapter_repair/measure/generation.py" in files
    assert "adapter_repair/model/loading.py" in files
    assert "bench/baselines.py" in files and "bench/repair.py" in files
    assert not any(f.startswith(("adapter_repair/cli/", "adapter_repair/hub/")) for f in files)
    assert all((bench_repair.ROOT / f).is_file() for f in files)
    # the settings' file is left out because every row's key holds the settings themselves
    assert "adapter_repair/repair/config.py" not in files
    assert "adapter_repair/repair/report.py" not in files
    assert "adapter_repair/measure/config.py" in files  # generation defaults are not in keys


def test_a_changed_repair_default_changes_the_key_of_the_rows_that_use_it() -> None:
    """repair/config.py is not in the code digest: its defaults reach a row's key through the
    resolved settings, and only the rows that use the changed setting get a new key."""
    from adapter_repair.repair.config import RestoreConfig

    ours = bench_repair.repair_config("restore")
    key = bench_repair.config_key(ours)
    assert key["restore"] == dataclasses.asdict(RestoreConfig())
    moved = dataclasses.replace(ours, restore=dataclasses.replace(ours.restore, heal=7))
    assert bench_repair.config_key(moved) != key
    fisher = bench_repair.repair_config("restore-fisher")
    assert bench_repair.config_key(fisher)["restore"]["score"] == "fisher"
