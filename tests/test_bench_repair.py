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
    """A stand-in for the small world's files and keys: what the tables read of a world."""

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


def _artifacts(world: Any, plan: Any) -> list[tuple[Any, str]]:
    """Every artifact a campaign of ``plan`` makes, with its kind (ref, nf4 or repair)."""
    out = [
        (runs.reference_artifact(world, None), "ref"),
        (runs.nf4_artifact(world, None, "none"), "nf4"),
    ]
    for adapter in dict.fromkeys(a for a, _ in plan.runs()):
        out += [
            (runs.reference_artifact(world, adapter), "ref"),
            (runs.nf4_artifact(world, adapter, "none"), "nf4"),
        ]
    for adapter, method in plan.runs():
        out.append((runs.artifact(world, adapter, method), "repair"))
        if method not in runs.NO_NF4:
            out.append((runs.nf4_artifact(world, adapter, method), "nf4"))
    return out


def _measure_everything(world: Any, plan: Any, changed: float = 0.12) -> None:
    """Every artifact of the plan built with made-up measures and stored SST-2 answers, as a
    finished campaign."""
    for i, (art, kind) in enumerate(_artifacts(world, plan)):
        if art.done(world.root):
            continue
        facts: dict[str, Any] = {"measures": {"harmful_rate": _rate(i, 175)}}
        if kind == "repair":
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

        def make(out: Path, facts: dict[str, Any] = facts, right: int = i % 3) -> dict[str, Any]:
            answers = [{"response": "positive", "answer": "positive"}] * right + [
                {"response": "negative", "answer": "positive"}
            ]
            (out / "measures.json").write_text(json.dumps({"samples": {"task": answers}}))
            return facts

        art.build(world.root, make)


PLAN = tables.Plan(
    adapters=("a",), compare=("a",), methods=("restore",), baselines=("dense",), variants=()
)


def test_a_table_names_the_command_of_its_plan_with_every_list() -> None:
    """The footer's command reruns the plan that made the table, not the default plan."""
    plan = tables.Plan(("a", "b"), ("a",), ("restore",), (), ("restore-heal",))
    assert plan.command() == (
        "python bench/repair.py --adapters a,b --compare a --methods restore --baselines ''"
        " --variants restore-heal"
    )


def test_the_tables_name_as_not_run_only_what_is_not_done(tmp_path: Path, monkeypatch) -> None:
    """An ablation row that was measured is in its table and not in the "Not run yet" list;
    one that was not is named there (in ablation.md; repair.md names the rest)."""
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


def test_a_row_reads_its_measures_steps_and_time_from_this_cache(tmp_path: Path) -> None:
    """collect reads each row from this machine's cache: its measures, its bare-label SST-2
    score scored from the stored answers, its step timing and when it was measured."""
    world = _world(tmp_path / "one")
    _measure_everything(world, PLAN)
    rows = tables.collect(world, ["a"], ["restore", "dense"])
    assert [r["method"] for r in rows] == ["none", "restore", "dense"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", r["measured"]) for r in rows)
    ours = rows[1]
    assert ours["steps"] == 4 and ours["changed"] == 0.12 and ours["nf4"] is not None
    # steps 1-3 (step 0 is the start); the two that did not measure: 10 s against 8 s of passes
    assert ours["step_seconds"] == 50.0 / 3 and ours["step_over_passes"] == 1.25
    exact = [r["measures"]["task_exact"] for r in rows]
    assert all(e["n"] == e["k"] + 1 for e in exact)  # one wrong answer each, the rest right
    assert rows[2]["nf4"] is None  # dense: no row over 4-bit
    # an empty cache over the same bytes holds no row: nothing comes from elsewhere
    assert tables.collect(_world(tmp_path / "two"), ["a"], ["restore", "dense"]) == []


def test_a_table_shows_only_this_caches_rows_and_counts_each_from_its_aligned_base(
    tmp_path: Path, monkeypatch
) -> None:
    """Each session builds the world anew: a table shows the rows this machine's cache
    measured, never an earlier machine's, and a row's targets count from its own build's
    aligned base and fine-tuned adapter, never another's."""
    monkeypatch.setattr(tables.results_io, "RESULTS", tmp_path / "results")
    earlier = _world(tmp_path / "one", aligned_bytes=b"aligned, first build")
    _measure_everything(earlier, PLAN)
    tables.write_tables(earlier, PLAN)
    here = _world(tmp_path / "two", aligned_bytes=b"aligned, second build")
    tables.write_tables(here, PLAN)  # nothing measured here yet
    md = (tmp_path / "results" / "repair.md").read_text()
    second = tables._sha256(str(here.aligned_dir / "model.safetensors"))
    got = json.loads((tmp_path / "results" / "repair.json").read_text())
    assert got["rows"] == [] and "| a | restore |" not in md
    assert "Not run yet: a/restore, a/dense." in md

    _measure_everything(here, PLAN, changed=0.34)
    tables.write_tables(here, PLAN)
    md = (tmp_path / "results" / "repair.md").read_text()
    assert md.count("### World build ") == 1 and f"### World build {second[:12]}" in md
    assert "(this machine's cache)" in md
    rows = json.loads((tmp_path / "results" / "repair.json").read_text())["rows"]
    assert {r["build"] for r in rows} == {second[:12]}
    assert next(r for r in rows if r["method"] == "restore")["changed"] == 0.34
    line = next(x for x in md.splitlines() if x.startswith("| a | restore |"))
    assert line.split("|")[-2].strip() == rows[1]["measured"]

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


def test_a_repair_without_its_4bit_row_is_still_shown(tmp_path: Path, monkeypatch) -> None:
    """A repair measured here whose 4-bit row is not taken yet (--no-nf4, or a run cut short)
    is a row with its 4-bit cells empty, not a row "not run"."""
    import shutil

    monkeypatch.setattr(tables.results_io, "RESULTS", tmp_path / "results")
    world = _world(tmp_path / "one")
    _measure_everything(world, PLAN)
    shutil.rmtree(runs.nf4_artifact(world, "a", "restore").path(world.root))
    tables.write_tables(world, PLAN)
    got = json.loads((tmp_path / "results" / "repair.json").read_text())
    ours = [r for r in got["rows"] if r["method"] == "restore"]
    assert len(ours) == 1 and ours[0]["nf4"] is None and ours[0]["measures"]
    assert got["missing"] == []
