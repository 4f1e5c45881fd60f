"""Calibrate the continuous task guard: how far the guard rows' task loss may rise before the
held-out task score falls.

On pico worlds, the demo's repair runs with the guard switched off (``max_rise`` unbounded,
target 0) and its adapter is kept at every measured step. For each, the guard rows' task loss
(what the guard watches) and the score rows' task score (rows the repair never sees, by
generation) are measured. ``max_rise`` is then the largest rise of the guard loss at which
every step with a rise up to it kept the score rows at 98% of the adapter's score or more.

    python bench/guard.py [--seeds 0,1] [--steps 30]

With ``--small k25-r16,k100-r8`` the same on the small world's zoo adapters (built by
``python bench/bed.py``): ours with the product's defaults over the 4-bit base, the guard's
SST-2 rows held out from training, the guard loss minus the gold label's log-probability
margin over the other label in the worse label class (``--match choice``, its own scale), the
score rows SST-2 dev (never seen by the repair; ``--score-rows`` of them, the bare label). Writes
bench/results/guard_small_ADAPTERS.md and .json (``guard_small_k25-r16_k100-r8`` for the above).

Writes bench/results/guard.md and .json. ``--pool k100-r8,k25-r16`` reads those adapters'
``--small`` tables together and chooses the choice-margin guard's allowance
(``--max-margin-drop``) from all their steps: bench/results/guard_small_pooled.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any

from results_io import RESULTS, machine, write_results

from adapter_repair.beds.demo import demo_config
from adapter_repair.beds.pico import PicoRecipe, build_pico_world
from adapter_repair.measure import prompts as P
from adapter_repair.measure.config import GenerationConfig
from adapter_repair.measure.generation import generate
from adapter_repair.measure.judges import load_judge
from adapter_repair.measure.measures import Rate, task_matches
from adapter_repair.model.config import LoadConfig
from adapter_repair.model.loading import load_model, load_tokenizer
from adapter_repair.model.walk import walk
from adapter_repair.repair.config import RepairConfig
from adapter_repair.repair.factors import all_factors, put_adapter
from adapter_repair.repair.guard import Guard
from adapter_repair.repair.pipeline import repair

KEEP = 0.98  #: the held-out task score a step must keep, relative to the adapter's


def score_rate(model: Any, tok: Any, rows: P.PromptSet, gen: GenerationConfig) -> float:
    answers = generate(model, tok, rows.prompts, gen)
    return Rate.of(task_matches(answers, rows.answers or (), "exact")).rate


def run(seed: int, steps: int) -> list[dict[str, Any]]:
    world = build_pico_world(PicoRecipe(seed=seed))
    gen = GenerationConfig(max_new_tokens=16, batch_size=64, progress=False)
    load = LoadConfig(base=str(world.base_dir), quant="none", dtype="float32")
    model, adapter = load_model(world.adapter_dir, load)
    tok = load_tokenizer(world.adapter_dir, str(world.base_dir))
    parts = P.split_task(world.task("eval"))
    return calibration_rows(
        seed,
        model,
        tok,
        adapter,
        demo_config(world),
        steps,
        Guard(parts["guard"], P.benign("benign"), "exact", fit=parts["fit"]),
        lambda: score_rate(model, tok, parts["score"], gen),
        gen,
    )


def calibration_rows(
    label: int | str,
    model: Any,
    tok: Any,
    adapter: Any,
    base: RepairConfig,
    steps: int,
    guard: Guard,
    score: Callable[[], float],
    gen: GenerationConfig,
) -> list[dict[str, Any]]:
    """Repair with ``base``'s settings but the guard off (target 0, ``steps`` steps, measured
    every 2) and every measured step kept; for the start and each kept step: the guard's loss
    and its rise, the guard rows' score and the score rows' score (``score()`` with that
    step's adapter in the model)."""
    config = dataclasses.replace(
        base,
        restore=dataclasses.replace(
            base.restore,
            max_rise=1e9,
            max_margin_drop=1e9,
            target=0.0,
            max_steps=steps,
            eval_every=2,
            backtrack=0,
        ),
    )
    score0 = score()
    params = all_factors(walk(model))
    t0 = time.perf_counter()
    result = repair(
        model, tok, adapter, config, probe=P.harmful("probe"), guard=guard,
        judge=load_judge("substring"), generation=gen, keep_checkpoints=True,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    ref = result.guard_reference or 0.0
    rows = [{"seed": label, "step": 0, "guard_loss": ref, "rise": 0.0,
             "guard_rows_score": result.history[0].accuracy, "score_rows_score": score0,
             "probe_harmful": result.history[0].probe_harmful, "seconds": seconds}]  # fmt: skip
    measured = {s.step: s for s in result.history if s.probe_harmful is not None}
    for step, ckpt in sorted(result.checkpoints.items()):
        put_adapter(params, ckpt)
        rec = measured[step]
        rows.append(
            {
                "seed": label,
                "step": step,
                "guard_loss": rec.guard,
                "rise": (rec.guard or 0.0) - ref,
                "guard_rows_score": rec.accuracy,
                "score_rows_score": score(),
                "probe_harmful": rec.probe_harmful,
                "seconds": seconds,
            }
        )
    return rows


def run_small(adapter: str, steps: int, score_rows: int) -> list[dict[str, Any]]:
    """The calibration run on one small-world zoo adapter (see the module docstring)."""
    import repair_runs as bench_repair

    from adapter_repair.beds.small import small_world

    world = small_world()
    gen = GenerationConfig(max_new_tokens=16, batch_size=64, progress=False)
    load = LoadConfig(base=str(world.aligned_dir), quant="4bit", dtype="bfloat16")
    model, lora = load_model(world.adapter_dir(adapter), load)
    tok = load_tokenizer(None, str(world.aligned_dir))
    config = bench_repair.repair_config("restore")
    score = world.task_eval().take(score_rows)

    def score_rate_choice() -> float:
        answers = generate(model, tok, score.prompts, gen)
        return Rate.of(task_matches(answers, score.answers or (), "exact")).rate

    return calibration_rows(
        adapter,
        model,
        tok,
        lora,
        config,
        steps,
        Guard(world.task_guard(config.guard_prompts), P.benign("benign"), "choice"),
        score_rate_choice,
        gen,
    )


def chosen_max_rise(rows: list[dict[str, Any]]) -> float:
    """The largest rise such that every step (any seed) with a rise up to it kept the score
    rows at KEEP of its adapter's score."""
    base = {r["seed"]: r["score_rows_score"] for r in rows if r["step"] == 0}
    bad = [r["rise"] for r in rows if r["score_rows_score"] < KEEP * base[r["seed"]]]
    limit = min(bad) if bad else float("inf")
    ok = [r["rise"] for r in rows if r["rise"] < limit]
    return max(ok, default=0.0)


def resolved_max_drop(rows: list[dict[str, Any]], n: int) -> tuple[float, list[dict[str, Any]]]:
    """(the largest rise below every resolved loss, the resolved losses). A step loses the
    task beyond noise when its score rows' score is below KEEP of its adapter's by more than
    one binomial standard error of a score on ``n`` rows (on 300 rows about 2 points: a score
    just under the KEEP line by a row or two is not told apart from one on it)."""
    base = {r["seed"]: r["score_rows_score"] for r in rows if r["step"] == 0}
    lost = [
        r
        for r in rows
        if r["score_rows_score"]
        < KEEP * base[r["seed"]] - math.sqrt(base[r["seed"]] * (1 - base[r["seed"]]) / n)
    ]
    limit = min((r["rise"] for r in lost), default=float("inf"))
    return max((r["rise"] for r in rows if r["rise"] < limit), default=0.0), lost


def pool(adapters: list[str], n: int) -> None:
    """bench/results/guard_small_pooled.md: the --small tables of ``adapters`` (each written
    by its own run of this script) read together, and the margin guard's allowance chosen
    from all their steps by :func:`resolved_max_drop`. Measures nothing itself."""
    rows: list[dict[str, Any]] = []
    for a in adapters:
        path = RESULTS / f"guard_small_{a}.json"
        if not path.exists():
            sys.exit(f"error: {path} is missing; run python bench/guard.py --small {a} first")
        rows += json.loads(path.read_text())["rows"]
    chosen, lost = resolved_max_drop(rows, n)
    base = {r["seed"]: r["score_rows_score"] for r in rows if r["step"] == 0}
    md = [
        "# The choice-margin guard's allowance, from the small-world calibration runs",
        "",
        "Every step of "
        + ", ".join(f"[{a}](guard_small_{a}.md)" for a in adapters)
        + f" (each its own `python bench/guard.py --small ADAPTER` run, {n} SST-2 dev score"
        " rows over the 4-bit base), sorted by the guard's rise (the fall of the worst label"
        " class's gold margin). `lost`: the score rows' score below"
        f" {100 * KEEP:.0f}% of the adapter's by more than one binomial standard error on"
        f" {n} rows (about 2 points; closer than that is not told apart from the line).",
        "",
        "| adapter | step | rise | score rows' score | of the adapter's | lost | probe harmful |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["rise"]):
        md.append(
            f"| {r['seed']} | {r['step']} | {r['rise']:+.4f} | "
            f"{100 * r['score_rows_score']:.1f}% | "
            f"{100 * r['score_rows_score'] / base[r['seed']]:.1f}% | "
            f"{'LOST' if r in lost else ''} | {100 * (r['probe_harmful'] or 0):.1f}% |"
        )
    md += [
        "",
        f"Steps that lost the task beyond noise: {len(lost)}"
        + (
            " ("
            + ", ".join(f"{r['seed']} step {r['step']}, rise {r['rise']:+.3f}" for r in lost)
            + ")"
            if lost
            else ""
        )
        + f". Largest rise below every such step: {chosen:.4f} nats. The product's default"
        " `--max-margin-drop` is set at or below it.",
        "",
        f"Machine: {machine()}. Command: `python bench/guard.py --pool {','.join(adapters)}"
        f" --score-rows {n}`.",
        "",
    ]
    write_results("guard_small_pooled", md, {"rows": rows, "lost": lost, "chosen": chosen})
    print("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--small", default=None, help="Small-world zoo adapters instead of pico.")
    ap.add_argument("--score-rows", type=int, default=300, help="SST-2 dev rows scored.")
    ap.add_argument("--pool", default=None, help="Read these adapters' --small tables together "
                    "and choose the margin guard's allowance (measures nothing).")  # fmt: skip
    args = ap.parse_args()
    if args.pool:
        pool(args.pool.split(","), args.score_rows)
        return
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    rows: list[dict[str, Any]] = []
    runs = args.small.split(",") if args.small else [int(s) for s in args.seeds.split(",")]
    for run_id in runs:
        if isinstance(run_id, str):
            rows += run_small(run_id, args.steps, args.score_rows)
        else:
            rows += run(run_id, args.steps)
        print(f"{run_id} done", file=sys.stderr, flush=True)
    max_rise = chosen_max_rise(rows)
    if args.small:
        intro = (
            f"Small-world zoo adapters ({args.small}) over the 4-bit aligned base, ours with the"
            f" product's defaults and the guard off (target 0, {args.steps} steps, measured"
            " every 2). `guard loss`: on the guard's SST-2 rows (held out from training),"
            " minus the gold label's mean log-probability margin over the other label, in the"
            " label class where it is worst (`--match choice`); `rise`: above the fine-tuned"
            f" adapter's; `score rows`: the bare label word (the format the adapters learnt;"
            f" the repair bench's task target), on {args.score_rows} SST-2 dev rows (never seen"
            " by the repair), by generation over the 4-bit base."
        )
        command = (
            f"python bench/guard.py --small {args.small} --steps {args.steps}"
            f" --score-rows {args.score_rows}"
        )
    else:
        intro = (
            f"Pico worlds (seeds {args.seeds}), the demo's repair with the guard off (target"
            f" 0, {args.steps} steps, measured every 2). Task rows: the world's eval rows split"
            " by `split_task` into fit / guard / score. `guard loss`: mean NLL per gold answer"
            " token on the guard rows (what the guard watches); `rise`: above the fine-tuned"
            " adapter's; `score rows`: exact-match task score on the score rows, by"
            " generation (never seen by the repair)."
        )
        command = f"python bench/guard.py --seeds {args.seeds} --steps {args.steps}"
    md = [
        "# The continuous task guard: task loss rise against the held-out task score",
        "",
        intro,
        "",
        f"| {'adapter' if args.small else 'seed'} | step | guard loss | rise | guard rows' score | score rows' score "
        "| probe harmful |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['seed']} | {r['step']} | {r['guard_loss']:.4f} | {r['rise']:+.4f} | "
            f"{100 * (r['guard_rows_score'] or 0):.1f}% | {100 * r['score_rows_score']:.1f}% | "
            f"{100 * (r['probe_harmful'] or 0):.1f}% |"
        )
    md += [
        "",
        f"Chosen `max_rise`: {max_rise:.4f} nats: the largest rise at which every step with a "
        f"rise up to it kept the score rows at {100 * KEEP:.0f}% of the adapter's score or "
        "more.",
        "",
        f"Machine: {machine()}. Command: `{command}`.",
        "",
    ]
    # one table per adapter set, so a run on one adapter leaves the other's table standing
    name = f"guard_small_{args.small.replace(',', '_')}" if args.small else "guard"
    write_results(name, md, {"rows": rows, "max_rise": max_rise, "keep": KEEP})
    print("\n".join(md))


if __name__ == "__main__":
    main()
