"""Does a repaired adapter refuse the same over the 4-bit base it was repaired on as merged into
the bfloat16 base the benches score? The fine-tuned adapter and bench/curve.py's checkpoints,
harmful rate on AdvBench `probe` (what the stop rule sees, 64) and `eval` (175) both ways.
Writes bench/results/precision.md (and .json).

    python bench/precision.py [--adapter k100-r8] [--method restore-ratio] [--steps 10,20]

Needs the curve's artifact (``python bench/curve.py`` with the same adapter and method).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import curve
import results_io

from adapter_repair.beds.small import small_world
from adapter_repair.measure import prompts as P
from adapter_repair.measure.config import GenerationConfig
from adapter_repair.measure.generation import generate
from adapter_repair.measure.judges import load_judge
from adapter_repair.measure.measures import Rate
from adapter_repair.model.config import LoadConfig
from adapter_repair.model.loading import load_base, load_model, load_tokenizer

HERE = Path(__file__).resolve().parent


def rates(model: Any, tok: Any, sets: dict[str, list[str]]) -> dict[str, float]:
    judge = load_judge("substring")
    gen = GenerationConfig(32, 64, progress=False)
    return {
        name: 100 * Rate.of(judge.harmful(prompts, generate(model, tok, prompts, gen))).rate
        for name, prompts in sets.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--adapter", default="k100-r8")
    ap.add_argument("--method", default="restore-ratio")
    ap.add_argument("--steps", default="10,20")
    ap.add_argument("--sst2", default=str(HERE / "data" / "sst2"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    world = small_world(sst2=args.sst2)
    art = curve.artifact(world, args.adapter, args.method)
    if not art.done(world.root):
        sys.exit(f"error: no curve for {args.adapter}/{args.method}; run python bench/curve.py")
    sets = {
        "probe": list(P.harmful("probe").take(64).prompts),
        "eval": list(P.harmful("eval").prompts),
    }
    points = [("fine-tuned", world.adapter_dir(args.adapter))]
    points += [
        (f"step {s}", art.path(world.root) / "steps" / s / "adapter") for s in args.steps.split(",")
    ]
    tok = load_tokenizer(None, str(world.aligned_dir))
    rows = []
    # The aligned base itself both ways: the level each column's repair is judged against.
    dense = load_base(LoadConfig(base=str(world.aligned_dir), quant="none", dtype="bfloat16"))
    nf4_base = load_base(LoadConfig(base=str(world.aligned_dir), quant="4bit", dtype="bfloat16"))
    rows.append(
        {
            "point": "aligned base",
            "merged_bf16": rates(dense, tok, sets),
            "over_4bit": rates(nf4_base, tok, sets),
        }
    )
    del dense, nf4_base
    print(rows[-1], file=sys.stderr, flush=True)
    for label, folder in points:
        merged, mtok = world.load_merged(folder)
        bf16 = rates(merged, mtok, sets)
        del merged
        load = LoadConfig(base=str(world.aligned_dir), quant="4bit", dtype="bfloat16")
        model, _ = load_model(folder, load)
        nf4 = rates(model, tok, sets)
        del model
        rows.append({"point": label, "merged_bf16": bf16, "over_4bit": nf4})
        print(rows[-1], file=sys.stderr, flush=True)
    md = [
        "# Harmful rate by the base's precision",
        "",
        f"{args.adapter}, {args.method} (bench/results/curve.md): each adapter merged in float32"
        " into the bfloat16 aligned base (how the benches score) and loaded over the 4-bit NF4"
        " aligned base (how it was trained and repaired; what the stop rule measures); the aligned"
        " base itself in bfloat16 and in NF4. Substring judge, 32 new tokens.",
        "",
        "| point | probe % merged bf16 | probe % over 4-bit | eval % merged bf16 | eval % over 4-bit |",
        "|---|---|---|---|---|",
        *[
            f"| {r['point']} | {r['merged_bf16']['probe']:.1f} | {r['over_4bit']['probe']:.1f} |"
            f" {r['merged_bf16']['eval']:.1f} | {r['over_4bit']['eval']:.1f} |"
            for r in rows
        ],
        "",
        f"Machine: {results_io.machine()}. Command: `python bench/precision.py --adapter"
        f" {args.adapter} --method {args.method} --steps {args.steps}`.",
        "",
    ]
    results_io.write_results("precision", md, {"rows": rows})
    print("\n".join(md))


if __name__ == "__main__":
    main()
