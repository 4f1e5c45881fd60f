"""bench/repair.py keeps the rows of its last table when their cache entries are gone."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import repair as bench_repair


def row(adapter: str, method: str, harm: float | None, nf4: float | None = None) -> dict:
    measures = {"harmful_rate": {"rate": harm}} if harm is not None else None
    return {
        "adapter": adapter,
        "method": method,
        "measures": measures,
        "nf4": {"harmful_rate": {"rate": nf4}} if nf4 is not None else None,
    }


def test_carry_previous_fills_gone_rows_and_fields_and_keeps_new_ones() -> None:
    now = [row("a", "none", None), row("a", "restore", 0.1)]
    previous = [
        row("a", "none", 1.0, nf4=1.0),
        row("a", "restore", 0.5, nf4=0.2),  # measured now: the new measures win
        row("a", "project", 0.9),
        row("b", "restore", 0.3),  # an adapter not asked for
        row("a", "gone-method", 0.3),  # a method not shown
    ]
    out = bench_repair.carry_previous(now, previous, ["a"], ["project", "restore"])
    assert [(r["adapter"], r["method"]) for r in out] == [
        ("a", "none"),
        ("a", "project"),
        ("a", "restore"),
    ]
    none, project, restore = out
    assert none["measures"]["harmful_rate"]["rate"] == 1.0 and none["carried"]
    assert project["carried"]
    assert restore["measures"]["harmful_rate"]["rate"] == 0.1  # not the old 0.5
    assert restore["nf4"]["harmful_rate"]["rate"] == 0.2 and restore["carried"]
