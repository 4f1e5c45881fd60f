"""Prompts per second of the harmful-rate evaluation, against plain per-prompt ``generate``
(what the reference code does) and plain batched ``generate`` (file order, same batch size),
on the same prompts in one run. Writes bench/results/eval_speed.md and .json.

    python bench/eval_speed.py [--n 175] [--max-new-tokens 64] [--batch-size 32] [--repeats 3]

Runs on the pico world's broken adapter (built and cached on first use): it answers most
harmful requests, so answers run long, as in the case that matters. Each method's answers are
compared with plain batched ``generate``'s, prompt by prompt: the speed must not come from
answering differently.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapter_repair.beds.pico import build_pico_world
from adapter_repair.measure import prompts as P
from adapter_repair.measure.config import GenerationConfig
from adapter_repair.measure.evaluate import EvalSets, evaluate, model_responder
from adapter_repair.measure.judges import load_judge, load_refusal_list

RESULTS = Path(__file__).resolve().parent / "results"


def plain_per_prompt(
    model: Any, tok: Any, max_new: int
) -> Callable[[Sequence[str], str], list[str]]:
    def respond(prompts: Sequence[str], desc: str) -> list[str]:
        out = []
        for p in prompts:
            text = tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            enc = tok(text, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                ids = model.generate(
                    **enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id
                )
            out.append(
                tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            )
        return out

    return respond


def plain_batched(
    model: Any, tok: Any, max_new: int, batch: int
) -> Callable[[Sequence[str], str], list[str]]:
    def respond(prompts: Sequence[str], desc: str) -> list[str]:
        out = []
        tok.padding_side = "left"
        for i in range(0, len(prompts), batch):
            texts = [
                tok.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts[i : i + batch]
            ]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                ids = model.generate(
                    **enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id
                )
            out += [
                tok.decode(row, skip_special_tokens=True).strip()
                for row in ids[:, enc["input_ids"].shape[1] :]
            ]
        return out

    return respond


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=175, help="harmful eval prompts (175 = all)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs; the median counts")
    args = ap.parse_args()

    world = build_pico_world()
    tok = AutoTokenizer.from_pretrained(world.base_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(world.base_dir), str(world.adapter_dir)
    ).eval()
    sets = EvalSets(P.harmful("eval").take(args.n))
    judge, refusals = load_judge(), load_refusal_list()
    methods = {
        "adapter-repair evaluate": model_responder(
            model, tok, GenerationConfig(args.max_new_tokens, args.batch_size, progress=False)
        ),
        "plain batched generate": plain_batched(model, tok, args.max_new_tokens, args.batch_size),
        "plain per-prompt generate": plain_per_prompt(model, tok, args.max_new_tokens),
    }
    # Interleaved repeats, median time: the machines are shared and noisy.
    times: dict[str, list[float]] = {name: [] for name in methods}
    rates: dict[str, float] = {}
    answers: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for name, respond in methods.items():
            t0 = time.perf_counter()
            report = evaluate(respond, sets, judge, refusals)
            times[name].append(time.perf_counter() - t0)
            rates[name] = report.measures["harmful_rate"].rate
            answers[name] = [s["response"] for s in report.samples["harmful"]]
    plain = answers["plain batched generate"]
    rows: list[dict[str, Any]] = []
    for name in methods:
        dt = statistics.median(times[name])
        rows.append(
            {
                "method": name,
                "seconds": dt,
                "prompts_per_s": len(sets.harmful) / dt,
                "harmful_rate": rates[name],
                "same_answers": sum(a == b for a, b in zip(answers[name], plain, strict=True)),
                "all_seconds": times[name],
            }
        )
    ours = rows[0]["prompts_per_s"]
    for r in rows:
        r["ours_speedup"] = ours / r["prompts_per_s"]
    plain_row = next(r for r in rows if r["method"] == "plain batched generate")
    met = (
        args.max_new_tokens == 64
        and plain_row["ours_speedup"] >= 1.5
        and rows[0]["same_answers"] == len(sets.harmful)
    )
    meta = {
        "target_met": met,
        "n_prompts": len(sets.harmful),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "model": "pico world base + broken adapter (4 layers, hidden 128)",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_speed.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        "# Harmful-rate evaluation speed",
        "",
        f"{meta['n_prompts']} AdvBench eval prompts, greedy, max_new_tokens {meta['max_new_tokens']}, "
        f"batch {meta['batch_size']}; {meta['model']}; {meta['machine']}; {meta['date']}. "
        f"Same prompts, one run, median of {meta['repeats']} interleaved repeats; "
        f"`python bench/eval_speed.py --n {meta['n_prompts']} --max-new-tokens"
        f" {meta['max_new_tokens']} --batch-size {meta['batch_size']} --repeats"
        f" {meta['repeats']}`.",
        "",
        "| method | seconds | prompts/s | ours is x faster | harmful rate | answers as plain batched |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['method']} | {r['seconds']:.2f} | {r['prompts_per_s']:.1f} | {r['ours_speedup']:.2f} | {100 * r['harmful_rate']:.1f}% | {r['same_answers']}/{meta['n_prompts']} |"
            for r in rows
        ],
        "",
        f"Target: at 64 new tokens, ours at least 1.5x plain batched `generate` with the same "
        f"answers: {plain_row['ours_speedup']:.2f}x, {rows[0]['same_answers']}/{meta['n_prompts']}"
        f" the same: {'yes' if met else 'NO'}.",
        "",
        "Where ours gains: prompts sorted by length, the chat template's shared prefix encoded "
        "once, a row leaving the batch and the cache when it ends, inference mode, the LoRA "
        "modules' lean forward (adapter_repair/model/lean.py) and the one-token steps' attention "
        "mask handed in ready-made rather than built by the model's mask code. Here most answers run to "
        "the token limit, so dropping finished rows gains little.",
        "",
    ]
    (RESULTS / "eval_speed.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
