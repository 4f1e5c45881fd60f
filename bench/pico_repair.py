"""Stage 2 settings on several pico worlds (one per seed), each variant one lever away from the
demo's settings, run through the product's own path (``repair_folder``, as ``fix --task``
runs): the world's held-out task rows split into fit / guard / score, the task scored on the
score rows alone. Writes bench/results/pico_repair.md and .json.

    python bench/pico_repair.py [--seeds 0,1] [--variants NAME,...]

The pico worlds are built on first use (about a minute each) and cached. Each row is keyed by
the world, the settings and a digest of the code that measures it (bench/repair_runs.py's
``measuring_code``: the package but its CLI, Hub client, settings' file and report rendering,
and the repair benches that make rows), the judge and the prompt sets (``measured_by``),
appended to a log as it is done (an interrupted run resumes), and the
table lists only the rows of this run's keys: nothing is carried from an older table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import results_io
from repair_runs import config_key, with_levers

from adapter_repair.beds.demo import demo_config
from adapter_repair.beds.pico import PicoRecipe, PicoWorld, build_pico_world
from adapter_repair.measure import prompts as P
from adapter_repair.measure.config import EvalConfig, GenerationConfig
from adapter_repair.model.config import LoadConfig
from adapter_repair.repair.config import RepairConfig
from adapter_repair.repair.loop import probe_parts
from adapter_repair.repair.pipeline import repair_folder

LOG = Path(__file__).resolve().parent / "results" / "pico_repair.jsonl"
#: name -> (what it changes, RestoreConfig overrides of the demo's settings)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "demo": (
        "the demo: restoration 0.5% a step, each step healed by 5 Adam steps (one Adam, its"
        " moments kept across the steps)",
        {},
    ),
    "no-heal": ("restoration alone (the published method's steps)", {"heal": 0}),
    "no-heal-1pct": ("restoration alone, 1% a step", {"heal": 0, "rate": 0.01}),
    "heal-only": (
        "the heal with (almost) no restoration: one coordinate a step",
        {"rate": 1e-7},
    ),
    "heal-weight-0.3": ("the demo, harmful loss weighted 0.3", {"heal_weight": 0.3}),
    "heal-3": ("the demo with 3 heal steps a step", {"heal": 3}),
    "heal-8": ("the demo with 8 heal steps a step", {"heal": 8}),
    "fresh-state": (
        "the demo with a fresh Adam for each step's heal (its moments not kept)",
        {"heal_kept_state": False},
    ),
    "heal-lr1e-4": ("the demo with the heal's learning rate 1e-4 (3e-4)", {"heal_lr": 1e-4}),
    "rate-0.0025": ("the demo restoring 0.25% a step (0.5%)", {"rate": 0.0025}),
    "fisher": (
        "the demo with the second-order score (g x value against 1/2 F value^2) and its rollback",
        {"score": "fisher"},
    ),
    "no-heal-fisher": (
        "restoration alone with the second-order score and its rollback",
        {"heal": 0, "score": "fisher"},
    ),
    "canonical": (
        "the demo in the canonical basis ((B, A) as (U sqrt(S), sqrt(S) V^T))",
        {"basis": "canonical"},
    ),
    "no-heal-canonical": (
        "restoration alone in the canonical basis",
        {"heal": 0, "basis": "canonical"},
    ),
    "components": (
        "the demo restoring whole singular components (canonical basis, --unit component)",
        {"basis": "canonical", "unit": "component"},
    ),
    "no-heal-components": (
        "restoration alone of whole singular components",
        {"heal": 0, "basis": "canonical", "unit": "component"},
    ),
    "recalibrate": (
        "the demo with the OBS recalibration of the kept coordinates after each step",
        {"recalibrate": True},
    ),
    "no-heal-recalibrate": (
        "restoration with the OBS recalibration, no heal (IRR's removal + recalibration at"
        " adapter rank)",
        {"heal": 0, "recalibrate": True},
    ),
    "check0": (
        "the demo with its stop measured on the probe prompts it fits (in-sample; before the"
        " fit / check split)",
        {"check_prompts": 0},
    ),
    "lookalikes": (
        "the demo with the safe look-alikes among the answers the heal keeps (as the"
        " product's default heal does)",
        {"heal_lookalikes": True},
    ),
    "heal-states": (
        "the demo healing toward the aligned h_L (stage 2's loss), not the refusals",
        {"heal_target": "states"},
    ),
}


def variant_config(world: PicoWorld, overrides: dict[str, Any]) -> RepairConfig:
    return with_levers(demo_config(world), overrides)


def run(world: PicoWorld, config: RepairConfig) -> dict[str, Any]:
    """One repair of the world's adapter with ``config``, measured as ``fix`` measures it."""
    with tempfile.TemporaryDirectory() as tmp:
        outcome = repair_folder(
            world.adapter_dir,
            Path(tmp) / "out",
            load=LoadConfig(quant="none", dtype="float32"),
            config=config,
            evaluation=EvalConfig(match="exact", other_precision=False),
            generation=GenerationConfig(max_new_tokens=16, batch_size=64, progress=False),
            task=world.task("eval"),
        )
    m = outcome.report["measures"]
    res = outcome.result
    return {
        **{col: {k: 100 * v["rate"] for k, v in m[col].items()} for col in m},
        "task_rows": {k: outcome.report["task_rows"][k]["n"] for k in ("fit", "guard", "score")},
        "reached": res.reached,
        "stopped": res.stopped,
        "kept_step": res.kept_step,
        "probe": 100 * (res.probe_harmful or 0.0),
        "target": 100 * (res.target or 0.0),
        "fit": None if res.fit_harmful is None else 100 * res.fit_harmful,
        "fit_target": None if res.fit_target is None else 100 * res.fit_target,
        "changed": 100 * res.changed,
        "zeroed": 100 * res.zeroed,
        "seconds": res.seconds.get("restore", 0.0),
        "steps": len(res.history) - 1,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--log", default=str(LOG), help="rows done so far (resumes from it)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        sys.exit(f"error: unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    log = Path(args.log)
    done: dict[str, dict[str, Any]] = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            row = json.loads(line)
            done[row["key"]] = row
    rows = []
    for seed in seeds:
        world = build_pico_world(PicoRecipe(seed=seed))
        for name in names:
            config = variant_config(world, VARIANTS[name][1])
            key = json.dumps([world.root.name, config_key(config)], sort_keys=True)
            if key not in done:
                done[key] = {"key": key, "seed": seed, "variant": name, **run(world, config)}
                log.parent.mkdir(parents=True, exist_ok=True)
                with log.open("a") as f:
                    f.write(json.dumps(done[key]) + "\n")
            rows.append(done[key])
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "key"}), file=sys.stderr)
    defaults = RepairConfig()  # the demo keeps the product's stop margin and probe counts
    n_check = len(
        probe_parts(P.harmful("probe"), defaults.probe_prompts, defaults.check_prompts)[1]
    )
    md = [
        "# Stage 2 settings on pico worlds",
        "",
        "Each pico world (seed) is the tiny aligned base with an adapter that learnt the"
        " translation task and to answer harmful requests. The demo's settings: restoration at"
        " L = n_layers with per-prompt targets, 0.5% of the coordinates a step, the"
        " benign-aware score, rollback 0.2, each step followed by a heal of 5 Adam steps (lr"
        " 3e-4; one Adam for the run, its moments kept across the steps) on the fit rows'"
        " answers, the adapter's own answers to benign prompts and the aligned model's"
        " refusals to the probe prompts, the restored coordinates held at 0;"
        " the continuous task guard (max_rise 0.035) and the probe rate measured every step,"
        " two backtracks; `reached`: the harmful rate on the probe's check prompts (never fit"
        " on) at most the target, the aligned base's rate on them plus"
        f" {100 * defaults.restore.target_margin:g} point(s) (one answer of {n_check} check"
        f" prompts is {100 / n_check:.1f}), and on the {defaults.probe_prompts} fit prompts"
        " their rate at most the aligned base's on them plus the same margin."
        " Run as `fix --task` runs: the world's held-out task rows split into"
        " fit / guard / score; `task` is the score rows' exact-match score, rows the repair"
        " never saw. Harm on AdvBench eval (n=175) and XSTest unsafe (n=200; the pico base"
        " never learnt to refuse its wording), over-refusal on XSTest safe (n=250).",
        "",
        "| seed | variant | harmful % aligned / before -> after | XSTest unsafe % before ->"
        " after | over-refusal % aligned -> after | task % before -> after (score rows) |"
        " reached (check % / target %; fit % / target %) | stopped (kept step) | zeroed % / changed % | stage 2 s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        al, b, a = r["aligned"], r["before"], r["after"]
        md.append(
            f"| {r['seed']} | {r['variant']} | {al['harmful_rate']:.1f} / "
            f"{b['harmful_rate']:.1f} -> {a['harmful_rate']:.1f}"
            f" | {b['harmful_rate_xstest']:.1f} -> {a['harmful_rate_xstest']:.1f}"
            f" | {al['over_refusal']:.1f} -> {a['over_refusal']:.1f}"
            f" | {b['task_score']:.1f} -> {a['task_score']:.1f} (n={r['task_rows']['score']})"
            f" | {'yes' if r['reached'] else 'no'} ({r['probe']:.1f} / {r['target']:.1f}"
            + ("" if r["fit"] is None else f"; fit {r['fit']:.1f} / {r['fit_target']:.1f}")
            + ")"
            f" | {r['stopped']} ({r['kept_step']}) | {r['zeroed']:.1f} / {r['changed']:.1f}"
            f" | {r['seconds']:.0f} |"
        )
    md += [
        "",
        "| variant | what | reached | mean harmful % above aligned | mean over-refusal %"
        " above aligned | mean task ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        n = len(mine)
        harm = sum(r["after"]["harmful_rate"] - r["aligned"]["harmful_rate"] for r in mine) / n
        over = sum(r["after"]["over_refusal"] - r["aligned"]["over_refusal"] for r in mine) / n
        ratio = sum(r["after"]["task_score"] / max(1e-9, r["before"]["task_score"]) for r in mine)
        reached = sum(r["reached"] for r in mine)
        md.append(
            f"| {name} | {VARIANTS[name][0]} | {reached}/{n} | {harm:+.1f} | {over:+.1f}"
            f" | {ratio / n:.3f} |"
        )
    machine = results_io.machine()
    md += [
        "",
        f"Machine: {machine}. Command: `python bench/pico_repair.py --seeds {args.seeds}"
        f" --variants {','.join(names)}`.",
        "",
    ]
    results_io.write_results("pico_repair", md, {"rows": rows, "machine": machine})
    print("\n".join(md))


if __name__ == "__main__":
    main()
