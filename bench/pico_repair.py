"""Repair settings compared on several pico worlds (one per seed): harmful rate (AdvBench eval),
over-refusal (XSTest safe) and the task score after stage 2, each variant one lever away from
the demo's settings. Writes bench/results/pico_repair.md and .json.

    python bench/pico_repair.py [--seeds 0,1,2,3] [--variants NAME,...]

The pico worlds are built on first use (about a minute each) and cached. The task is scored
on its held-out rows; the guard uses the same rows (as ``fix --task`` does), or, in the
``-guard-train`` variant, the training rows, so a repair that keeps what the adapter memorised
but loses what it generalised shows as a task drop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import results_io
from repair import config_key

from adapter_repair.beds.demo import demo_config
from adapter_repair.beds.pico import PicoRecipe, PicoWorld, build_pico_world
from adapter_repair.measure import prompts as P
from adapter_repair.measure.config import GenerationConfig
from adapter_repair.measure.evaluate import EvalSets, evaluate_model
from adapter_repair.measure.judges import load_judge, load_refusal_list
from adapter_repair.model.config import LoadConfig
from adapter_repair.model.loading import load_model, load_tokenizer
from adapter_repair.repair.config import RepairConfig
from adapter_repair.repair.guard import Guard
from adapter_repair.repair.pipeline import repair

LOG = Path(__file__).resolve().parent / "results" / "pico_repair.jsonl"
#: name -> (what it changes, guard rows, RestoreConfig overrides of the demo's settings)
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "published-loss": (
        "benign loss -cos(h_L, b*) (published), no backtrack, 20 steps",
        "eval",
        {"benign_loss": "direction", "backtrack": 0, "max_steps": 20},
    ),
    "answers": (
        "benign loss: answer cross-entropy, no backtrack, 20 steps",
        "eval",
        {"backtrack": 0, "max_steps": 20},
    ),
    "demo": (
        "answers, backtrack 2, 30 steps, task rows split into fit / guard / score",
        "eval",
        {},
    ),
    "demo-held-out": (
        "the demo with the guard checked on the rows the loss did not fit (hold_out)",
        "eval",
        {"hold_out": True},
    ),
    "demo-guard-train": ("the demo guarded by the training rows", "train", {}),
    "ratio": ("the demo with the ratio score (|g| / |g_b|)", "eval", {"score": "ratio"}),
    "grad": ("the demo with the published score (|g|)", "eval", {"score": "grad"}),
    "no-rollback": ("the demo without rollback", "eval", {"rollback": 0.0}),
    "rollback-0.5": ("the demo with rollback 0.5", "eval", {"rollback": 0.5}),
    "mean-targets": (
        "the demo with the batch-mean targets (published)",
        "eval",
        {"targets": "mean"},
    ),
    "L-minus-1": ("the demo at L = n_layers - 1 (DESIGN's default)", "eval", {"layer": -2}),
    "search": (
        "the demo with a per-adapter search over 6 settings (score, rollback, rate)",
        "eval",
        {"search": 6},
    ),
    "ratio-guard-train": (
        "the ratio score, guarded by the training rows",
        "train",
        {"score": "ratio"},
    ),
}


def variant_config(world: PicoWorld, overrides: dict[str, Any]) -> RepairConfig:
    base = demo_config(world)
    return dataclasses.replace(base, restore=dataclasses.replace(base.restore, **overrides))


def run(world: PicoWorld, guard_split: str, overrides: dict[str, Any]) -> dict[str, Any]:
    judge, refusals = load_judge("substring"), load_refusal_list()
    gen = GenerationConfig(max_new_tokens=16, batch_size=64, progress=False)
    sets = EvalSets(P.harmful("eval"), P.xstest("safe"), world.task("eval"))
    load = LoadConfig(base=str(world.base_dir), quant="none", dtype="float32")
    model, adapter = load_model(world.adapter_dir, load)
    tok = load_tokenizer(world.adapter_dir, str(world.base_dir))

    def measure() -> dict[str, float]:
        report = evaluate_model(
            model, tok, sets, generation=gen, judge=judge, refusals=refusals, match="exact"
        )
        return {k: 100 * v.rate for k, v in report.measures.items()}

    before = measure()
    t0 = time.perf_counter()
    result = repair(
        model,
        tok,
        adapter,
        variant_config(world, overrides),
        probe=P.harmful("probe"),
        guard=Guard(world.task(guard_split), P.benign("benign"), "exact"),
        judge=judge,
        generation=gen,
    )
    seconds = time.perf_counter() - t0
    return {
        "before": before,
        "after": measure(),
        "stopped": result.stopped,
        "kept_step": result.kept_step,
        "changed": 100 * result.changed,
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--log", default=str(LOG), help="rows done so far (resumes from it)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        sys.exit(f"error: unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    # Each row is appended to a log as it is done, keyed by the world and the settings, so an
    # interrupted run resumes and a changed variant runs again.
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
            config = config_key(variant_config(world, VARIANTS[name][2]))
            key = json.dumps([world.root.name, VARIANTS[name][1], config], sort_keys=True)
            if key not in done:
                out = run(world, VARIANTS[name][1], VARIANTS[name][2])
                done[key] = {"key": key, "seed": seed, "variant": name, **out}
                log.parent.mkdir(parents=True, exist_ok=True)
                with log.open("a") as f:
                    f.write(json.dumps(done[key]) + "\n")
            rows.append(done[key])
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "key"}), file=sys.stderr)
    md = [
        "# Stage 2 settings on pico worlds",
        "",
        "Each pico world (seed) is the tiny aligned base with an adapter that learnt the"
        " translation task and to answer harmful requests. Every variant restores at"
        " L = n_layers with per-prompt targets, 1% of the coordinates a step, the benign-aware"
        " score, rollback 0.2, the continuous task guard (max_rise) measured every 2 steps;"
        " scored on AdvBench eval (n=175), XSTest safe (n=250) and the task rows held out from"
        " the adapter's training (n=57-67), which also guard unless the variant says"
        " otherwise: those that fit and check the guard on the same rows score the task on"
        " rows the repair saw.",
        "",
        "| seed | variant | harmful % before -> after | over-refusal % | held-out task % |"
        " stopped (kept step) | changed % | repair s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, a = r["before"], r["after"]
        md.append(
            f"| {r['seed']} | {r['variant']} | {b['harmful_rate']:.1f} -> {a['harmful_rate']:.1f}"
            f" | {b['over_refusal']:.1f} -> {a['over_refusal']:.1f}"
            f" | {b['task_score']:.1f} -> {a['task_score']:.1f}"
            f" | {r['stopped']} ({r['kept_step']}) | {r['changed']:.1f} | {r['seconds']:.0f} |"
        )
    md += ["", "| variant | what | mean harmful % | mean over-refusal % | mean task ratio |"]
    md += ["|---|---|---|---|---|"]
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        harm = sum(r["after"]["harmful_rate"] for r in mine) / len(mine)
        over = sum(r["after"]["over_refusal"] for r in mine) / len(mine)
        ratio = sum(
            r["after"]["task_score"] / max(1e-9, r["before"]["task_score"]) for r in mine
        ) / len(mine)
        md.append(f"| {name} | {VARIANTS[name][0]} | {harm:.1f} | {over:.1f} | {ratio:.3f} |")
    machine = results_io.machine()
    md += [
        "",
        f"Machine: {machine}. Command: `python bench/pico_repair.py --seeds {args.seeds}`.",
        "",
    ]
    results_io.write_results("pico_repair", md, {"rows": rows, "machine": machine})
    print("\n".join(md))


if __name__ == "__main__":
    main()
