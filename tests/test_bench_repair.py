"""bench/repair.py keys every row by what measured it, so a table holds only rows the current
code produced."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import repair_runs as runs
import repair_tables as tables


def test_a_changed_source_file_changes_the_digest(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runs, "ROOT", tmp_path)
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    first = runs.source_digest([a, b])
    assert runs.source_digest([b, a]) == first  # order of listing does not matter
    b.write_text("y = 3\n")
    assert runs.source_digest([a, b]) != first


def test_row_keys_hold_the_code_the_judge_and_the_prompt_sets() -> None:
    by = runs.measured_by()
    assert by["code"] == runs.MEASURED_BY["code"] and len(by["code"]) == 64
    assert by["judge"] == "substring"
    assert set(by["prompts"]) == {"harmful", "benign", "whole"} and by["prompts"]["harmful"]["eval"]
    # the sets the measures and the heal read whole: a changed file changes every key
    assert set(by["prompts"]["whole"]) == {"xstest-safe", "xstest-unsafe", "lookalikes", "wordings"}
    assert not hasattr(runs, "carry_previous") and not hasattr(tables, "carry_previous")


def test_the_code_digest_covers_what_measures_and_not_the_cli_or_the_hub_client() -> None:
    files = {str(p.relative_to(runs.ROOT)) for p in runs.measuring_code()}
    assert "adapter_repair/repair/loop.py" in files
    assert "adapter_repair/measure/generation.py" in files
    assert "adapter_repair/model/loading.py" in files
    assert "bench/baselines.py" in files and "bench/repair_runs.py" in files
    # the entry point and the tables read rows and make none: their layout can change
    assert "bench/repair.py" not in files and "bench/repair_tables.py" not in files
    # nor the variants' settings: every key holds its resolved settings (a test below)
    assert "bench/repair_settings.py" not in files
    assert not any(f.startswith(("adapter_repair/cli/", "adapter_repair/hub/")) for f in files)
    assert all((runs.ROOT / f).is_file() for f in files)
    # the settings' file is left out because every row's key holds the settings themselves
    assert "adapter_repair/repair/config.py" not in files
    assert "adapter_repair/repair/report.py" not in files
    assert "adapter_repair/measure/config.py" in files  # generation defaults are not in keys


def test_a_changed_repair_default_changes_the_key_of_the_rows_that_use_it() -> None:
    """repair/config.py is not in the code digest: its defaults reach a row's key through the
    resolved settings, and only the rows that use the changed setting get a new key."""
    from adapter_repair.repair.config import RestoreConfig

    ours = runs.repair_config("restore")
    key = runs.config_key(ours)
    assert key["restore"] == dataclasses.asdict(RestoreConfig())
    moved = dataclasses.replace(ours, restore=dataclasses.replace(ours.restore, heal=7))
    assert runs.config_key(moved) != key
    fisher = runs.repair_config("restore-fisher")
    assert runs.config_key(fisher)["restore"]["score"] == "fisher"


@dataclasses.dataclass
class _World:
    """A stand-in for the small world's files and keys: what the ledger and the tables read of
    a world (a dataclass, as SmallWorld is: a build's view is a copy with another root)."""

    root: Path
    files: Path
    artifacts: dict[str, Any]
    recipe: Any
    sst2: str = "sst2 rows"

    @property
    def aligned_dir(self) -> Path:
        return self.files / "aligned"

    @property
    def unaligned_dir(self) -> Path:
        return self.files / "unaligned"

    def adapter_dir(self, name: str) -> Path:
        return self.files / name

    def task_guard(self, n: int) -> Any:
        return SimpleNamespace(digest=lambda: self.sst2)

    def task_eval(self) -> Any:
        return SimpleNamespace(digest=lambda: self.sst2)


def _world(root: Path, adapter_bytes: bytes = b"adapter", aligned_bytes: bytes = b"aligned") -> Any:
    """A world whose files are these bytes (another build: other bytes)."""
    from adapter_repair.beds.artifacts import Artifact

    for name, data in (("aligned", aligned_bytes), ("unaligned", b"unaligned")):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "model.safetensors").write_bytes(data)
    for name in ("a", "b"):
        (root / name).mkdir(exist_ok=True)
        (root / name / "adapter_model.safetensors").write_bytes(adapter_bytes + name.encode())
    tables._sha256.cache_clear()
    names = ("aligned", "unaligned", "adapter-a", "adapter-b")
    return _World(
        root=root / "cache",
        files=root,
        artifacts={n: Artifact(n, {"recipe": 1}) for n in names},
        recipe=SimpleNamespace(zoo=[SimpleNamespace(name="a"), SimpleNamespace(name="b")]),
    )


def _rate(k: int, n: int) -> dict[str, Any]:
    return {"k": k, "n": n, "rate": k / n}


def _measure_everything(world: Any, plan: Any, changed: float = 0.12) -> None:
    """Every artifact of the plan built with made-up measures, as a finished campaign."""
    for i, m in enumerate(tables.plan_artifacts(world, plan)):
        if m.art.done(world.root):
            continue
        facts: dict[str, Any] = {
            "measures": {"harmful_rate": _rate(i, 175)},
            "task_exact": _rate(800 - i, 872),
        }
        if m.kind == "repair":
            history = [
                {"step": s, "seconds": 10.0, "passes_seconds": 8.0, "probe_harmful": None}
                for s in range(4)
            ]
            history[-1].update(seconds=30.0, probe_harmful=0.1)  # the step that measured
            facts.update(
                repair={
                    "changed": changed,
                    "stopped": "target",
                    "kept_step": 3,
                    "history": history,
                },
                repair_seconds=60.0,
                peak_rss_gb=2.5,
            )
        m.art.build(world.root, lambda _out, facts=facts: facts)


PLAN = tables.Plan(
    adapters=("a",), compare=("a",), methods=("restore",), baselines=("dense",), variants=()
)


def test_the_ledger_brings_back_exactly_the_rows_this_code_measured_on_these_files(
    tmp_path: Path, monkeypatch
) -> None:
    """A session's machine starts with an empty cache: rows measured by the same code over the
    same world bytes come back from the committed ledger; other bytes or another key do not."""
    monkeypatch.setattr(tables, "LEDGER", tmp_path / "ledger.jsonl")
    n = len(tables.plan_artifacts(_world(tmp_path / "zero"), PLAN))
    first = _world(tmp_path / "one")
    _measure_everything(first, PLAN)
    tables.write_ledger(first)
    assert len(tables.read_ledger()) == n
    rows = tables.collect(first, ["a"], ["restore", "dense"])
    assert [r["method"] for r in rows] == ["none", "restore", "dense"]
    assert not any(r["restored"] for r in rows)

    # a fresh machine, the same world bytes: every row back, the same numbers
    fresh = _world(tmp_path / "two")
    assert tables.restore_from_ledger(fresh, PLAN) == n
    back = tables.collect(fresh, ["a"], ["restore", "dense"])
    assert [r["restored"] for r in back] == [
        {"merged": tables.MACHINE, "4-bit": tables.MACHINE},
        {"merged": tables.MACHINE, "4-bit": tables.MACHINE},
        {"merged": tables.MACHINE},  # dense: no row over 4-bit
    ]
    strip = [{k: v for k, v in r.items() if k != "restored"} for r in rows]
    assert [{k: v for k, v in r.items() if k != "restored"} for r in back] == strip
    assert back[1]["steps"] == 4 and back[1]["nf4"]["task_exact"] == rows[1]["nf4"]["task_exact"]
    # steps 1-3 (step 0 is the start); the two that did not measure: 10 s against 8 s of passes
    assert rows[1]["step_seconds"] == back[1]["step_seconds"] == 50.0 / 3
    assert rows[1]["step_over_passes"] == back[1]["step_over_passes"] == 1.25
    assert tables.restore_from_ledger(fresh, PLAN) == 0  # already there

    # the adapter built to other bytes: only the aligned base's rows come back
    other = _world(tmp_path / "three", adapter_bytes=b"another build")
    assert tables.restore_from_ledger(other, PLAN) == 2
    assert [r["method"] for r in tables.collect(other, ["a"], ["restore", "dense"])] == []

    # an empty machine rewriting the ledger keeps what it has not measured
    tables.write_ledger(_world(tmp_path / "four"))
    assert len(tables.read_ledger()) == n

    # the other build measures its own rows beside the first build's (the aligned base's are
    # shared), and each build gets its own numbers back
    _measure_everything(other, PLAN, changed=0.34)
    tables.write_ledger(other)
    assert len(tables.read_ledger()) == n + n - 2
    for root, adapter_bytes, changed in (
        ("five", b"adapter", 0.12),
        ("six", b"another build", 0.34),
    ):
        again = _world(tmp_path / root, adapter_bytes=adapter_bytes)
        assert tables.restore_from_ledger(again, PLAN) == n
        assert tables.collect(again, ["a"], ["restore"])[1]["changed"] == changed
        # one base, the adapter built to two sets of bytes: two builds, this machine's first
        builds = tables.ledger_builds(again)
        assert [b.here for b in builds] == [True, False]
        assert builds[0].inputs("a") == tables.world_inputs(again, "a")

    # changed code: no key matches, nothing comes back, and the stale entries are dropped
    monkeypatch.setitem(runs.MEASURED_BY, "code", "0" * 64)
    changed_code = _world(tmp_path / "seven")
    assert tables.restore_from_ledger(changed_code, PLAN) == 0
    tables.write_ledger(changed_code)
    assert tables.read_ledger() == {}


def test_a_table_names_the_command_of_its_plan_with_every_list() -> None:
    """The footer's command reruns the plan that made the table, not the default plan."""
    plan = tables.Plan(("a", "b"), ("a",), ("restore",), (), ("restore-heal",))
    assert plan.command() == (
        "python bench/repair.py --adapters a,b --compare a --methods restore --baselines ''"
        " --variants restore-heal"
    )


def test_the_ledger_keeps_rows_of_any_plan_and_survives_a_cut_write(
    tmp_path: Path, monkeypatch
) -> None:
    """A run with a smaller plan (fewer adapters, no variants) drops none of another plan's
    entries; a ledger cut mid-line stops the bench with a way out instead of losing rows."""
    monkeypatch.setattr(tables, "LEDGER", tmp_path / "ledger.jsonl")
    wide = tables.Plan(("a", "b"), ("a", "b"), ("restore",), ("dense",), ("restore-heal",))
    first = _world(tmp_path / "one")
    _measure_everything(first, wide)
    tables.write_ledger(first)
    entries = len(tables.read_ledger())
    assert entries == len(tables.plan_artifacts(first, wide))
    fresh = _world(tmp_path / "two")
    tables.restore_from_ledger(fresh, PLAN)
    tables.write_ledger(fresh)
    assert len(tables.read_ledger()) == entries
    text = tables.LEDGER.read_text()
    tables.LEDGER.write_text(text[: len(text) // 2])
    with pytest.raises(
        SystemExit, match=re.escape("git checkout -- bench/results/repair_ledger.jsonl")
    ):
        tables.read_ledger()


def test_a_repair_comes_back_only_with_its_measures_over_the_4bit_base(
    tmp_path: Path, monkeypatch
) -> None:
    """The ledger keeps no repaired adapter: a repair without its 4-bit row could never get
    one, so it is measured anew; and a repair made here never takes another session's 4-bit
    measures."""
    monkeypatch.setattr(tables, "LEDGER", tmp_path / "ledger.jsonl")
    first = _world(tmp_path / "one")
    _measure_everything(first, PLAN)
    tables.write_ledger(first)
    full = tables.LEDGER.read_text()
    nf4 = runs.nf4_artifact(first, "a", "restore").key
    lines = full.splitlines()
    kept = [line for line in lines if nf4 not in line]
    assert len(kept) == len(lines) - 1
    tables.LEDGER.write_text("\n".join(kept) + "\n")
    fresh = _world(tmp_path / "two")
    tables.restore_from_ledger(fresh, PLAN)
    assert not runs.artifact(fresh, "a", "restore").done(fresh.root)
    assert runs.artifact(fresh, "a", "dense").done(fresh.root)  # no 4-bit row to need

    # the repair made here (as after an interrupted run), the ledger holding a 4-bit row
    runs.artifact(fresh, "a", "restore").build(
        fresh.root, lambda _out: {"measures": {}, "repair": {}}
    )
    tables.LEDGER.write_text(full)
    tables.restore_from_ledger(fresh, PLAN)
    assert not runs.nf4_artifact(fresh, "a", "restore").done(fresh.root)


def test_the_tables_name_as_not_run_only_what_is_not_done(tmp_path: Path, monkeypatch) -> None:
    """An ablation row that was measured is in its table and not in the "Not run yet" list;
    one that was not is named there (in ablation.md; repair.md names the rest)."""
    monkeypatch.setattr(tables, "LEDGER", tmp_path / "ledger.jsonl")
    monkeypatch.setattr(tables.results_io, "RESULTS", tmp_path / "results")
    world = _world(tmp_path / "w")
    measured = tables.Plan(("a",), ("a",), ("restore",), ("dense",), ("restore-heal",))
    _measure_everything(world, measured)
    wider = tables.Plan(("a",), ("a",), ("restore",), ("dense",), ("restore-heal", "restore-mean"))
    tables.write_tables(world, wider)

    def not_run(name: str) -> str:
        md = (tmp_path / "results" / f"{name}.md").read_text()
        return next(line for line in md.splitlines() if "Not run yet" in line)

    assert "a/restore-mean" in not_run("ablation")
    assert "restore-heal" not in not_run("ablation")
    assert "| a | restore-heal |" in (tmp_path / "results" / "ablation.md").read_text()
    assert "a/dense" not in not_run("repair") and "restore-mean" not in not_run("repair")
    assert json.loads((tmp_path / "results" / "repair.json").read_text())["missing"] == [
        "a/restore-mean"
    ]


def test_a_row_shows_whether_the_repair_reached_its_target() -> None:
    """A repair that stopped short says so in the table ("no: guard (25)"), as `fix` does;
    a method without a verdict of its own (a baseline) shows only why it stopped."""

    def row(method: str, reached: bool | None) -> dict[str, Any]:
        return {
            "adapter": "a",
            "method": method,
            "measures": {},
            "nf4": None,
            "changed": 0.2,
            "stopped": "guard",
            "kept_step": 25,
            "reached": reached,
            "repair_seconds": 60.0,
            "peak_rss_gb": 1.0,
        }

    lines = tables.table_lines({}, None, [row("restore", False), row("x", True), row("y", None)])
    assert "| no: guard (25) |" in lines[-3]
    assert "| yes: guard (25) |" in lines[-2]
    assert "| guard (25) |" in lines[-1] and ": guard" not in lines[-1]
    assert lines[0].count("|") == lines[-1].count("|")


def test_rows_of_two_builds_each_count_from_their_own_aligned_base(
    tmp_path: Path, monkeypatch
) -> None:
    """Each session builds the world anew and the aligned base need not come out in the same
    bytes: the tables show this machine's build and name the others the ledger keeps, and a
    row's targets count from its own build's aligned base and fine-tuned adapter, never
    another's."""
    monkeypatch.setattr(tables, "LEDGER", tmp_path / "ledger.jsonl")
    monkeypatch.setattr(tables.results_io, "RESULTS", tmp_path / "results")
    earlier = _world(tmp_path / "one", aligned_bytes=b"aligned, first build")
    _measure_everything(earlier, PLAN)
    tables.write_ledger(earlier)
    here = _world(tmp_path / "two", aligned_bytes=b"aligned, second build")
    tables.write_tables(here, PLAN)  # nothing measured here yet: the earlier build is named
    md = (tmp_path / "results" / "repair.md").read_text()
    first = tables._sha256(str(earlier.aligned_dir / "model.safetensors"))
    assert "### World build " not in md and "No rows on this machine's build yet." in md
    assert "Not shown: rows of other builds" in md and first[:12] in md
    assert "Not run on this machine's build (a run here measures these): a/restore" in md

    _measure_everything(here, PLAN, changed=0.34)
    tables.write_tables(here, PLAN)
    md = (tmp_path / "results" / "repair.md").read_text()
    second = tables._sha256(str(here.aligned_dir / "model.safetensors"))
    assert md.count("### World build ") == 1 and f"### World build {second[:12]}" in md
    assert "(this machine's cache)" in md
    rows = json.loads((tmp_path / "results" / "repair.json").read_text())["rows"]
    assert {r["build"] for r in rows} == {second[:12]}  # the earlier build's rows left out
    assert next(r for r in rows if r["method"] == "restore")["changed"] == 0.34
    # the ledger keeps both builds' rows
    assert [b.label for b in tables.ledger_builds(here)] == [second[:12], first[:12]]

    # targets: a row 2 points above its own aligned base and one 1 point above its own, though
    # 11 points above the other build's: mean +1.5, max +2
    def measures(harm: float, over: float = 0.0, task: float = 0.9) -> dict[str, Any]:
        return {
            "harmful_rate": {"rate": harm},
            "over_refusal": {"rate": over},
            "task_exact": {"rate": task},
        }

    aligned = {"x": measures(0.0), "y": measures(0.10)}
    rows = [
        {"build": "x", "adapter": "a", "method": "none", "measures": measures(0.9)},
        {"build": "x", "adapter": "a", "method": "restore", "measures": measures(0.02)},
        {"build": "y", "adapter": "a", "method": "none", "measures": measures(0.9, task=0.5)},
        {"build": "y", "adapter": "a", "method": "restore", "measures": measures(0.11, task=0.5)},
    ]
    mean, every, task, _ = tables.check_targets(aligned, rows, ["restore"])
    assert mean["target"].startswith("mean harmful rate merged <= aligned + 1")
    assert "(aligned 0.0% on x, 10.0% on y)" in mean["target"]
    assert not mean["ok"] and "(+1.5)" in mean["value"]
    assert every["ok"] and every["value"] == "max 2.0% (+2.0)"
    # SST-2 kept: 0.9 of 0.9 and 0.5 of 0.5, each against its own build's adapter
    assert task["ok"] and task["value"] == "min 100.0%"


def test_a_repair_without_its_4bit_row_is_still_shown_and_builds_never_share_a_label(
    tmp_path: Path, monkeypatch
) -> None:
    """A repair measured here whose 4-bit row is not taken yet (--no-nf4, or a run cut short)
    is a row with its 4-bit cells empty, not a row "not run"; two builds on one aligned base
    (other SST-2 rows) get labels of their own, so neither's rows count from the other's."""
    import shutil

    monkeypatch.setattr(tables, "LEDGER", tmp_path / "ledger.jsonl")
    monkeypatch.setattr(tables.results_io, "RESULTS", tmp_path / "results")
    world = _world(tmp_path / "one")
    _measure_everything(world, PLAN)
    shutil.rmtree(runs.nf4_artifact(world, "a", "restore").path(world.root))
    tables.write_tables(world, PLAN)
    got = json.loads((tmp_path / "results" / "repair.json").read_text())
    ours = [r for r in got["rows"] if r["method"] == "restore"]
    assert len(ours) == 1 and ours[0]["nf4"] is None and ours[0]["measures"]
    assert got["missing"] == got["missing_here"] == []

    other = _world(tmp_path / "two")
    other.sst2 = "other sst2 rows"
    _measure_everything(other, PLAN, changed=0.34)
    tables.write_tables(other, PLAN)
    got = json.loads((tmp_path / "results" / "repair.json").read_text())
    builds = tables.ledger_builds(other)
    labels = [b.label for b in builds]
    assert len(labels) == len(set(labels)) == 2 and builds[0].here
    changed = {r["build"]: r["changed"] for r in got["rows"] if r["method"] == "restore"}
    assert changed == {labels[0]: 0.34}
