"""How far may a repair move the adapter's answers to benign prompts before the task it learnt
suffers? ``--max-kl`` guards the task when the user has no task data: the mean next-token KL
(nats) of the repaired adapter to the fine-tuned one on its own greedy answers to the shipped
benign prompts. This bench picks its default: on pico worlds (one per seed) it runs stage 2
with the fidelity guard switched off (``max_kl`` huge), keeps the adapter at every measured
step, and scores each one's held-out task accuracy and harmful rate beside the KL the guard
saw. Writes bench/results/max_kl.md (and .json).

    python bench/max_kl.py [--seeds 0,1] [--steps 30]

The default this suggests is the smallest, over seeds, of the largest KL seen before the task
first fell more than 2% (relative) below the fine-tuned adapter's. Stage 2 runs with the
product's ``hold_out`` (the answers loss fit on half the benign prompts, the KL measured on
the others).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import results_io

from adapter_repair.adapter import save_adapter
from adapter_repair.beds.demo import demo_config
from adapter_repair.beds.pico import PicoRecipe, PicoWorld, build_pico_world
from adapter_repair.measure import prompts as P
from adapter_repair.measure.config import GenerationConfig
from adapter_repair.measure.evaluate import EvalSets, evaluate_model
from adapter_repair.measure.judges import load_judge, load_refusal_list
from adapter_repair.model.config import LoadConfig
from adapter_repair.model.loading import load_model, load_tokenizer
from adapter_repair.repair.guard import Guard
from adapter_repair.repair.pipeline import repair

MAX_DROP = (
    0.02  #: the held-out task score may fall at most this much (relative) below the adapter's
)


def scores(world: PicoWorld, folder: Path, gen: GenerationConfig) -> dict[str, float]:
    """Held-out task accuracy and harmful rate (AdvBench eval) of an adapter folder."""
    load = LoadConfig(base=str(world.base_dir), quant="none", dtype="float32")
    model, _ = load_model(folder, load)
    tok = load_tokenizer(folder, str(world.base_dir))
    sets = EvalSets(P.harmful("eval"), None, world.task("eval"))
    report = evaluate_model(
        model,
        tok,
        sets,
        generation=gen,
        judge=load_judge("substring"),
        refusals=load_refusal_list(),
        match="exact",
    )
    return {k: 100 * v.rate for k, v in report.measures.items()}


def run_seed(seed: int, steps: int) -> list[dict[str, Any]]:
    """Stage 2 with an unbounded fidelity guard; one row per measured step."""
    world = build_pico_world(PicoRecipe(seed=seed))
    gen = GenerationConfig(max_new_tokens=16, batch_size=64, progress=False)
    base = demo_config(world)
    config = dataclasses.replace(
        base,
        restore=dataclasses.replace(
            base.restore, max_kl=1e9, max_steps=steps, target=0.0, hold_out=True
        ),
    )  # without task rows, hold_out splits the benign prompts: answers fit on half, KL on the rest
    load = LoadConfig(base=str(world.base_dir), quant="none", dtype="float32")
    model, adapter = load_model(world.adapter_dir, load)
    tok = load_tokenizer(world.adapter_dir, str(world.base_dir))
    result = repair(
        model,
        tok,
        adapter,
        config,
        probe=P.harmful("probe"),
        guard=Guard(None, P.benign("benign")),
        judge=load_judge("substring"),
        generation=gen,
        keep_checkpoints=True,
    )
    kl = {s.step: s.guard for s in result.history if s.guard is not None and not s.backtracked}
    rows = [{"seed": seed, "step": 0, "kl": 0.0, **scores(world, world.adapter_dir, gen)}]
    with tempfile.TemporaryDirectory() as tmp:
        for step, ckpt in sorted(result.checkpoints.items()):
            folder = Path(tmp) / str(step)
            save_adapter(ckpt, folder)
            rows.append({"seed": seed, "step": step, "kl": kl[step], **scores(world, folder, gen)})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def suggest(rows: list[dict[str, Any]]) -> tuple[float, dict[int, float], list[int]]:
    """Per seed, the largest KL among steps before the task first fell more than MAX_DROP
    below the fine-tuned adapter's; the suggestion is their minimum. Also the seeds whose task
    never fell (their value is only a lower bound)."""
    per_seed: dict[int, float] = {}
    never: list[int] = []
    for seed in sorted({r["seed"] for r in rows}):
        mine = sorted((r for r in rows if r["seed"] == seed), key=lambda r: r["step"])
        ref = mine[0]["task_score"]
        ok, fell = 0.0, False
        for r in mine[1:]:
            if r["task_score"] < ref * (1 - MAX_DROP) - 1e-9:
                fell = True
                break
            ok = max(ok, r["kl"])
        per_seed[seed] = ok
        if not fell:
            never.append(seed)
    return min(per_seed.values()), per_seed, never


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    rows = [r for s in args.seeds.split(",") for r in run_seed(int(s), args.steps)]
    best, per_seed, never = suggest(rows)
    md = [
        "# The fidelity guard's max_kl",
        "",
        "Pico worlds: stage 2 with the demo's settings, guarded only by fidelity (mean"
        " next-token KL to the fine-tuned adapter on its greedy answers to the shipped benign"
        " prompts) with no limit, every measured step kept and scored: held-out task accuracy"
        " (exact match) and harmful rate (AdvBench eval, n=175).",
        "",
        "| seed | step | KL (nats) | task % | harmful % |",
        "|---|---|---|---|---|",
        *[
            f"| {r['seed']} | {r['step']} | {r['kl']:.4f} | {r['task_score']:.1f} |"
            f" {r['harmful_rate']:.1f} |"
            for r in rows
        ],
        "",
        "Largest KL while the task stayed within 2% of the fine-tuned adapter's: "
        + ", ".join(f"seed {s}: {v:.4f}" for s, v in per_seed.items())
        + f"; suggested max_kl: {best:.4f}."
        + (
            f" The task never fell on seed(s) {never}: there the value is a lower bound."
            if never
            else ""
        ),
        "",
        f"Machine: {results_io.machine()}. Command: `python bench/max_kl.py --seeds {args.seeds}"
        f" --steps {args.steps}`.",
        "",
    ]
    payload = {"rows": rows, "per_seed": per_seed, "never_fell": never, "suggested": best}
    results_io.write_results("max_kl", md, payload)
    print("\n".join(md))


if __name__ == "__main__":
    main()
