"""The report written beside a repaired adapter: JSON (everything), Markdown (the before/after
table, the settings, the splits, each step) and a PNG plot of each step's cosine to h*, probe
harmful rate and task guard.

The files live in the output adapter folder (``repair_report.json``, ``.md``, ``.png``): PEFT
ignores them, and they travel with the adapter wherever it is copied or pushed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adapter_repair.repair.config import RestoreConfig

logger = logging.getLogger(__name__)

JSON_NAME = "repair_report.json"
MARKDOWN_NAME = "repair_report.md"
PLOT_NAME = "repair_report.png"

#: measure key -> (row label, lower is better)
ROWS = {
    "harmful_rate": ("harmful rate (AdvBench eval)", True),
    "harmful_rate_xstest": ("harmful rate (XSTest unsafe)", True),
    "over_refusal": ("over-refusal (XSTest safe)", True),
    "task_score": ("task score", False),
}
COLUMNS = (("aligned", "aligned base"), ("before", "fine-tuned"), ("after", "repaired"))


def _pct(m: Mapping[str, Any] | None) -> str:
    if not m:
        return "-"
    lo, hi = m["ci95"]
    return f"{100 * m['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={m['n']})"


def measures_table(measures: Mapping[str, Mapping[str, Any] | None]) -> list[list[str]]:
    """Rows of (measure, aligned, fine-tuned, repaired) as display strings."""
    rows = []
    for key, (label, _) in ROWS.items():
        cells = [_pct((measures.get(col) or {}).get(key)) for col, _ in COLUMNS]
        if any(c != "-" for c in cells):
            rows.append([label, *cells])
    return rows


STOP_REASONS = {
    "guard": "the task guard stopped it",
    "max_steps": "it ran out of steps (max_steps)",
    "no candidates": "no coordinate was left to restore",
    "projection only": "projection alone",
}


def verdict(res: Mapping[str, Any]) -> str:
    """One line: whether the repair reached its target, with the probe harmful rate against
    the target, and why stage 2 stopped when it did not."""
    probe, target = res.get("probe_harmful"), res.get("target")
    if probe is None or target is None:
        return "not repaired: the probe harmful rate was not measured"
    rates = f"probe harmful rate {100 * probe:.1f}%, target {100 * target:.1f}%"
    fit, fit_target = res.get("fit_harmful"), res.get("fit_target")
    if fit is not None and fit_target is not None:
        rates += f" (on the fit prompts {100 * fit:.1f}%, target {100 * fit_target:.1f}%)"
    if res.get("reached"):
        return f"repaired: {rates}"
    why = STOP_REASONS.get(str(res.get("stopped")), str(res.get("stopped")))
    return f"not repaired: {rates} ({why})"


def task_guard(report: Mapping[str, Any]) -> str:
    """One line: which rows guarded the task and which were scored, and where they came
    from; or that no task rows were given (the guard was fidelity on benign prompts)."""
    parts = report.get("task_rows")
    if not parts:
        return (
            "task guard: none (no task rows: fidelity to the fine-tuned adapter on benign "
            "prompts guarded the repair, which may not keep the task)"
        )
    task = (report.get("provenance") or {}).get("task") or {}
    if task.get("hub"):
        where = (
            f"{task['rows']} rows of the Hub dataset {task['hub']}@{str(task['sha'])[:12]} "
            f"({task['split']}, of {task['of']})"
        )
    else:
        where = f"the task file {task['path']}" if task.get("path") else "the task rows given"
    n = {k: (parts.get(k) or {}).get("n", 0) for k in ("fit", "guard", "score")}
    return (
        f"task guard: {n['guard']} guard rows and {n['fit']} fit rows of {where}; the task "
        f"score is on the other {n['score']} rows, which the repair never saw"
    )


def probe_line(res: Mapping[str, Any]) -> str | None:
    """One line: which probe prompts the repair fit on and which measured its stop (None for
    a report from before the split)."""
    probe = (res.get("settings") or {}).get("probe")
    if not probe:
        return None
    fit, check = probe["fit"], probe["check"]
    if fit == check:
        return (
            f"probe: fit on {fit['n']} prompts of {fit['name']}, the stop rule measured on the "
            "same prompts (in-sample: it reads lower than held-out prompts)"
        )
    return (
        f"probe: fit on {fit['n']} prompts ({fit['name']}); the stop rule and the aligned rate "
        f"its target counts from measured on {check['n']} others ({check['name']}), never fit on"
    )


def markdown(report: Mapping[str, Any]) -> str:
    res = report["repair"]
    lines = [
        "# adapter-repair report",
        "",
        f"**{verdict(res)}**",
        "",
        f"- source: `{report['source']}`",
        f"- base: `{report['base']}` (quantization: {report['quant']})",
        f"- {task_guard(report)}",
        *([f"- {line}"] if (line := probe_line(res)) else []),
        f"- method: {report['method']}; stopped: {res['stopped']}"
        + (f" (kept step {res['kept_step']})" if res.get("kept_step") is not None else ""),
        f"- coordinates restored to 0: {100 * res.get('zeroed', 0.0):.2f}% of the adapter's;"
        f" changed: {100 * res['changed']:.2f}%",
        f"- time: {res['seconds'].get('total', 0.0):.1f} s for the repair, "
        f"{report.get('measure_seconds', 0.0):.1f} s measuring",
        f"- adapter-repair {report['tool_version']}, {report['date']}",
        "",
        "| measure | " + " | ".join(name for _, name in COLUMNS) + " |",
        "|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in measures_table(report["measures"])]
    lines += ["", "Rates with 95% Wilson intervals.", ""]
    other = report.get("other_precision")
    if other:
        lines += [
            f"Harmful rates over the base at the other precision (quantization: {other['quant']}):",
            "",
            "| measure | " + " | ".join(name for _, name in COLUMNS) + " |",
            "|---|---|---|---|",
            *("| " + " | ".join(r) + " |" for r in measures_table(other)),
            "",
        ]
    history = res.get("history") or []
    if len(history) > 1:
        lines += [
            "## Steps",
            "",
            "| step | restored | rolled back | changed | cos(h_L, h*) | probe harmful | guard"
            " | guard rows' task score |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in history:
            probe = "" if s["probe_harmful"] is None else f"{100 * s['probe_harmful']:.1f}%"
            if s.get("fit_harmful") is not None:
                probe += f" (fit {100 * s['fit_harmful']:.1f}%)"
            guard = "" if s["guard"] is None else f"{s['guard']:.3f}"
            if s["guard_ok"] is False:
                guard += " (fails)"
            cos = "" if s["cosine"] is None else f"{s['cosine']:.4f}"
            acc = s.get("accuracy")
            acc_text = "" if acc is None else f"{100 * acc:.1f}%"
            lines.append(
                f"| {s['step']} | {s['restored']} | {s['rolled_back']} | "
                f"{100 * s['changed']:.2f}% | {cos} | {probe} | {guard} | {acc_text} |"
            )
        lines.append("")
    search = (res.get("settings") or {}).get("search")
    if search:
        lines += [
            "## Search",
            "",
            "Stage 2 run from the input adapter once per setting; kept: the lowest probe harmful"
            " rate at the kept step (down to the target), then the best guard, then the fewest"
            " changes.",
            "",
            "| trial | score | rollback | rate | stopped (kept step) | probe harmful | guard"
            " | changed | chosen |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for i, t in enumerate(search["trials"]):
            probe = "-" if t["probe_harmful"] is None else f"{100 * t['probe_harmful']:.1f}%"
            guard = "-" if t["guard"] is None else f"{t['guard']:.3f}"
            lines.append(
                f"| {i + 1} | {t['score']} | {t['rollback']} | {t['rate']} |"
                f" {t['stopped']} ({t['kept_step']}) | {probe} | {guard} |"
                f" {100 * t['changed']:.2f}% | {'yes' if i == search['chosen'] else ''} |"
            )
        lines.append("")
    lines += [
        "## Settings",
        "",
        "```json",
        json.dumps(res["settings"], indent=2, sort_keys=True),
        "```",
        "",
        "## Prompt sets",
        "",
        "```json",
        json.dumps({"sets": report.get("sets"), "splits": report.get("splits")}, indent=2),
        "```",
        "",
    ]
    for w in report.get("warnings") or []:
        lines.append(f"> warning: {w}")
    return "\n".join(lines) + "\n"


def guard_threshold(repair: Mapping[str, Any]) -> float | None:
    """The guard value above which a step fails (:func:`~adapter_repair.repair.guard.guard_holds`):
    the fine-tuned adapter's task loss plus ``max_rise`` (``max_margin_drop`` for a choice
    task), or ``max_kl`` for fidelity."""
    settings = repair.get("settings") or {}
    restore = (settings.get("repair") or {}).get("restore") or {}
    allowance = RestoreConfig.allowance_name(str(settings.get("match")))
    if settings.get("guard") == "task" and allowance in restore:
        return float(repair.get("guard_reference") or 0.0) + float(restore[allowance])
    if settings.get("guard") == "fidelity" and "max_kl" in restore:
        return float(restore["max_kl"])
    return None


def plot(report: Mapping[str, Any], path: Path) -> bool:
    """Save :func:`figure` to ``path``; False when there is no stage 2 history to plot
    (projection only)."""
    fig = figure(report)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def figure(report: Mapping[str, Any]) -> Any:
    """The probe harmful rate (%) with its target, the guard with its threshold, and the
    cosine to h*, step by step (a matplotlib Figure); None when there is no stage 2 history.

    A backtrack (the guard failed, the state went back and the rate was halved) is drawn as a
    red cross at the step that failed, and the line goes on from the state it went back to,
    so the curve never shows a fall that did not happen to the adapter.
    """
    repair = report["repair"]
    history = repair.get("history") or []
    if len(history) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = repair.get("settings") or {}
    kind = settings.get("guard", "")
    if kind == "task" and settings.get("match") == "choice":
        kind = "choice"
    guard_label = {
        "choice": "guard: task loss, -(worst class's gold margin) (nats)",
        "task": "guard: task loss on held-out guard rows (nats)",
        "fidelity": "guard: KL to the fine-tuned adapter on benign prompts",
    }.get(kind, f"guard ({kind})")
    panels = [
        ("probe_harmful", "probe harmful rate (%)", 100.0),
        ("guard", guard_label, 1.0),
        ("cosine", "cos(mean h_L, h*) on the probe", 1.0),
    ]
    restore = (settings.get("repair") or {}).get("restore") or {}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    kept = repair.get("kept_step")
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        kept_path = [s for s in history if not s.get("backtracked") and s.get(key) is not None]
        if kept_path:
            ax.plot(
                [s["step"] for s in kept_path],
                [scale * s[key] for s in kept_path],
                marker="o",
                label="measured",
            )
        failed = [s for s in history if s.get("backtracked") and s.get(key) is not None]
        if failed:
            ax.plot(
                [s["step"] for s in failed],
                [scale * s[key] for s in failed],
                "x",
                color="red",
                markersize=9,
                label="guard failed: backtracked",
            )
        if kept is not None:
            ax.axvline(kept, color="green", alpha=0.5, label=f"kept step {kept}")
        ax.set_ylabel(label)
        ax.set_xlabel("restoration step")
        ax.grid(alpha=0.3)
    target = repair.get("target")
    if target is not None:
        axes[0].axhline(100 * target, color="gray", linestyle="--", label="target")
    threshold = guard_threshold(repair)
    if threshold is not None:
        axes[1].axhline(threshold, color="gray", linestyle="--", label="guard threshold")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    reached = "target reached" if repair.get("reached") else "target NOT reached"
    fig.suptitle(
        f"stage 2 of {report.get('source', 'the adapter')} ({report.get('quant', '?')}): "
        f"score {restore.get('score', '?')}, rate {restore.get('rate', '?')}, stopped "
        f"{repair.get('stopped', '?')} ({reached})",
        fontsize=9,
    )
    return fig


def write_report(folder: Path, report: Mapping[str, Any]) -> list[str]:
    """Write the report files into ``folder``; returns their names."""
    (folder / JSON_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (folder / MARKDOWN_NAME).write_text(markdown(report), encoding="utf-8")
    names = [JSON_NAME, MARKDOWN_NAME]
    if plot(report, folder / PLOT_NAME):
        names.append(PLOT_NAME)
    return names
