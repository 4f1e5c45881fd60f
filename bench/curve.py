"""The path of one stage 2 run on a small-world adapter: the adapter at every measured step
(every 5) scored like the zoo, so the step count and the stop rule are chosen from harm and
task along the whole path, not only where a run stopped. Writes bench/results/curve.md (and
.json).

    python bench/curve.py [--adapter k100-r8] [--method restore-ratio] [--sst2 DIR]

The settings are bench/repair_runs.py's for that method (``restore`` or an ablation variant); the
run and its measures are cached as one small-world artifact, so a second call only rewrites
the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import repair_runs as bench
import repair_tables as tables
import results_io
from repair_settings import VARIANTS

from adapter_repair.beds.artifacts import Artifact
from adapter_repair.beds.small import SmallWorld, small_world

HERE = Path(__file__).resolve().parent


def artifact(world: SmallWorld, adapter: str, method: str) -> Artifact:
    config = bench.config_key(bench.repair_config(method))
    payload = {
        "adapter": world.artifacts[f"adapter-{adapter}"].key,
        "aligned": world.artifacts["aligned"].key,
        "config": config,
        "guard_rows": bench.GUARD_ROWS,
    }
    return Artifact(f"curve-{adapter}-{method}", payload)


def make(world: SmallWorld, adapter: str, method: str, out: Path) -> dict[str, Any]:
    from adapter_repair.adapter import save_adapter

    result, seconds = bench.repair_zoo_adapter(world, adapter, method, keep_checkpoints=True)
    history = {s.step: s for s in result.history}
    points = []
    for step, fixed in sorted(result.checkpoints.items()):
        folder = out / "steps" / str(step)
        save_adapter(fixed, folder / "adapter")
        merged, mtok = world.load_merged(folder / "adapter")
        measures = bench.measure_into(folder, world, merged, mtok, f"{adapter} step {step}")
        measures["task_exact"] = tables.task_exact(folder / "measures.json")
        s = history[step]
        points.append(
            {
                "step": step,
                "changed": s.changed,
                "probe_harmful": s.probe_harmful,
                "guard": s.guard,
                "measures": measures,
            }
        )
    return {"repair": result.as_dict(), "repair_seconds": seconds, "points": points}


def write(world: SmallWorld, adapter: str, method: str) -> None:
    art = artifact(world, adapter, method)
    info = art.info(world.root)
    zoo = world.measures()
    aligned, tuned = zoo.get("aligned") or {}, zoo.get(adapter) or {}
    r, f = tables.rate, tables.fmt
    lines = [
        f"| fine-tuned | 0 | - | - | {f(r(tuned, 'harmful_rate'))} |"
        f" {f(r(tuned, 'harmful_rate_xstest'))} | {f(r(tuned, 'over_refusal'))} |"
        f" {f(r(tuned, 'task_exact'))} |"
    ]
    for p in info["points"]:
        m = p["measures"]
        lines.append(
            f"| step {p['step']} | {100 * p['changed']:.1f} | {100 * p['probe_harmful']:.1f} |"
            f" {p['guard']:.4f} | {f(r(m, 'harmful_rate'))} |"
            f" {f(r(m, 'harmful_rate_xstest'))} | {f(r(m, 'over_refusal'))} |"
            f" {f(r(m, 'task_exact'))} |"
        )
    restore = dataclasses.asdict(bench.repair_config(method).restore)
    md = [
        f"# The path of stage 2: {adapter}, {method}",
        "",
        "The adapter at each measured step whose guard held, merged and scored like the zoo"
        " (AdvBench eval n=175, XSTest unsafe n=200 and safe n=250, SST-2 dev n=872 bare label)."
        f" Probe and guard: what the stop rule saw ({bench.GUARD_ROWS // 2} held-out guard rows)."
        f" Aligned base: harmful {f(r(aligned, 'harmful_rate'))}%, over-refusal"
        f" {f(r(aligned, 'over_refusal'))}%.",
        "",
        f"Settings: `{json.dumps(restore)}`; stopped: {info['repair']['stopped']}"
        f" (kept step {info['repair']['kept_step']}), {info['repair_seconds'] / 60:.1f} min.",
        "",
        "| point | changed % | probe harmful % | guard (task loss) | harmful AdvBench eval % |"
        " harmful XSTest unsafe % | over-refusal % | SST-2 % bare label |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
        "",
        f"Machine: {results_io.machine()}. Command: `python bench/curve.py --adapter {adapter}"
        f" --method {method}`.",
        "",
    ]
    results_io.write_results("curve", md, {"adapter": adapter, "method": method, **info})
    print("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--adapter", default="k100-r8")
    ap.add_argument("--method", default="restore-ratio")
    ap.add_argument("--sst2", default=str(HERE / "data" / "sst2"))
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    known = ("restore", *VARIANTS)
    if args.method not in known:
        sys.exit(f"error: unknown method {args.method!r}; choose from {', '.join(known)}")
    world = small_world(cache_dir=args.cache_dir, sst2=args.sst2)
    if not world.artifacts[f"adapter-{args.adapter}"].done(world.root):
        sys.exit(f"error: zoo adapter {args.adapter} is not built; run python bench/bed.py first")
    artifact(world, args.adapter, args.method).build(
        world.root, lambda out: make(world, args.adapter, args.method, out)
    )
    write(world, args.adapter, args.method)


if __name__ == "__main__":
    main()
