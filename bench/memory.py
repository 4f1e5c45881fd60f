"""Where a restoration step's memory goes, at the 1.2B shape over the 4-bit base (and the small
world's shape): measured with torch's own profiler, beside the process's resident set.

    python bench/memory.py [--shapes 1b,small] [--prompts 4] [--quant 4bit] [--checkpoint]

For each shape, in a process of its own (its RSS is its own):

* the resident set after importing the stack, after loading the model, and at its peak
  during one restoration step (Linux VmHWM, reset before the step);
* every tensor the model holds, by kind: packed 4-bit weights and their quantization state,
  unquantized weights (embedding, head, norms), adapter factors;
* the step under ``torch.profiler`` (``profile_memory``): torch's memory timeline by
  category (parameters, gradients, activations, temporaries, inputs, autograd detail), its
  peak, the breakdown at the peak, and the operators that allocate most;

so that what is not the model (the allocator's free pages, a dequantized copy kept for the
backward, full-vocabulary logits) shows as the difference. Writes bench/results/memory.md and
.json (memory_checkpoint with ``--checkpoint``). Issue 20 asks where the 1.2B shape's 5.68 GB (bench/results/cost.md) goes.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import results_io
from cost import current_peak_rss_gb, make_shape, reset_peak_rss, step_parts

HERE = Path(__file__).resolve().parent
GB = 1024**3


def rss_gb() -> float:
    """This process's resident set now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def held_tensors(model: Any) -> dict[str, float]:
    """GB the model's parameters and buffers hold, by kind (each storage counted once)."""
    import torch

    kinds: dict[str, float] = {}
    seen: set[int] = set()

    def add(kind: str, t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # tied weights (embedding and head) share one storage
            return
        seen.add(ptr)
        kinds[kind] = kinds.get(kind, 0.0) + t.untyped_storage().nbytes() / GB

    for name, p in model.named_parameters():
        if "lora_" in name:
            add("adapter factors", p)
        elif p.__class__.__name__ == "Params4bit":
            add("packed 4-bit weights", p)
            state = getattr(p, "quant_state", None)
            for part in state.as_dict(packed=False).values() if state else []:
                if isinstance(part, torch.Tensor):
                    add("4-bit quantization state", part)
        elif "embed" in name or "lm_head" in name:
            add(f"embedding and head ({p.dtype})".replace("torch.", ""), p)
        else:
            add(f"other unquantized ({p.dtype})".replace("torch.", ""), p)
    for _, b in model.named_buffers():
        add("buffers", b)
    return kinds


def profile_step(step: Any) -> dict[str, Any]:
    """Run ``step`` under torch.profiler with memory on: the peak of torch's CPU memory
    timeline, the categories at that peak, and the operators that allocate most."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

    with profile(
        activities=[ProfilerActivity.CPU],
        profile_memory=True,
        record_shapes=True,
        with_stack=True,
    ) as prof:
        step()
    timeline = MemoryProfileTimeline(prof._memory_profile())
    _, sizes = timeline._coalesce_timeline("cpu")
    totals = [sum(row) for row in sizes]
    at = max(range(len(totals)), key=totals.__getitem__)
    names = {
        i + 1: (c.name.lower() if c is not None else "unknown")
        for c, i in _CATEGORY_TO_INDEX.items()
    }
    breakdown = {
        names.get(i, "unknown"): v / GB for i, v in enumerate(sizes[at]) if v and i in names
    }
    ops = sorted(
        prof.key_averages(group_by_input_shape=True),
        key=lambda e: e.cpu_memory_usage,
        reverse=True,
    )[:12]
    return {
        "torch_peak_gb": totals[at] / GB,
        "torch_start_gb": totals[0] / GB,
        "at_peak": breakdown,
        "top_ops": [
            {
                "op": e.key,
                "shapes": str(e.input_shapes)[:160],
                "allocated_gb": e.cpu_memory_usage / GB,
                "calls": e.count,
            }
            for e in ops
        ],
    }


def run(
    shape: str, quant: str, n: int, cache: Path, sst2: str, checkpoint: bool = False
) -> dict[str, Any]:
    """One shape: RSS along the way, the model's tensors by kind, one step profiled."""
    import torch  # noqa: F401  (the stack's import, measured)
    import transformers  # noqa: F401

    from adapter_repair.model.config import LoadConfig
    from adapter_repair.model.loading import load_model, load_tokenizer
    from adapter_repair.model.memory import checkpointed, release_freed_memory
    from adapter_repair.repair.loop import restore_step

    out: dict[str, Any] = {"rss_after_import_gb": rss_gb()}
    base, adapter = make_shape(shape, cache, sst2)
    dtype = "bfloat16" if quant == "4bit" else "float32"
    t0 = time.perf_counter()
    model, _ = load_model(adapter, LoadConfig(base=str(base), quant=quant, dtype=dtype))
    out["load_seconds"] = time.perf_counter() - t0
    out["rss_after_load_gb"] = rss_gb()
    out["held"] = held_tensors(model)
    tok = load_tokenizer(None, str(base))
    mm, L, below, reference, batches, h_star, config, benign = step_parts(model, tok, n)

    def step(k: int) -> None:  # as the repair loop runs one
        with checkpointed(mm.layers, checkpoint):
            restore_step(model, mm, below, reference, (batches, h_star), benign, L, config, k, 0.01)
        release_freed_memory()

    step(1)  # warm-up: lazily built state (kernels, caches) is not the step's
    out["rss_before_step_gb"] = rss_gb()
    reset_peak_rss()
    t0 = time.perf_counter()
    step(2)
    out["step_seconds"] = time.perf_counter() - t0
    out["rss_peak_step_gb"] = current_peak_rss_gb()
    out["profiled"] = profile_step(lambda: step(3))
    out["parameters"] = sum(p.numel() for p in model.parameters())
    return out


def child(args: argparse.Namespace) -> None:
    shape = args.one
    print(
        "RESULT "
        + json.dumps(
            run(shape, args.quant, args.prompts, Path(args.cache), args.sst2, args.checkpoint)
        ),
        flush=True,
    )


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    md = [
        "# Where a restoration step's memory goes",
        "",
        f"One restoration step (L = n_layers, per-prompt targets, answers loss, rate 0.01) on"
        f" {args.prompts} harmful and {args.prompts} benign prompts, batch 8, the base loaded"
        f" {args.quant}{', activation checkpointing over the decoder layers' if args.checkpoint else ''},"
        " run as the repair loop runs it (the C allocator's freed memory handed back around"
        " each backward pass and after each step). RSS from /proc/self/status (the peak is VmHWM, reset before the step);"
        " torch's view from `torch.profiler` with `profile_memory` (its memory timeline by"
        " category, parameters alive before the step included). A step after a warm-up step.",
        "",
    ]
    for r in rows:
        if "failed" in r:
            md += [f"## {r['shape']}: {r['failed']}", ""]
            continue
        prof = r["profiled"]
        md += [
            f"## {r['shape']} ({r['parameters'] / 1e6:.0f}M parameters)",
            "",
            "| resident set | GB |",
            "|---|---|",
            f"| after importing torch and transformers | {r['rss_after_import_gb']:.2f} |",
            f"| after loading the model ({r['load_seconds']:.0f} s) | {r['rss_after_load_gb']:.2f} |",
            f"| before the step | {r['rss_before_step_gb']:.2f} |",
            f"| peak during the step ({r['step_seconds']:.1f} s) | {r['rss_peak_step_gb']:.2f} |",
            "",
            "| tensors the model holds | GB |",
            "|---|---|",
            *(f"| {k} | {v:.3f} |" for k, v in sorted(r["held"].items(), key=lambda kv: -kv[1])),
            f"| total | {sum(r['held'].values()):.3f} |",
            "",
            f"torch's memory timeline: {prof['torch_start_gb']:.2f} GB at the step's start,"
            f" peak {prof['torch_peak_gb']:.2f} GB; at the peak, by category:",
            "",
            "| category | GB |",
            "|---|---|",
            *(
                f"| {k} | {v:.3f} |"
                for k, v in sorted(prof["at_peak"].items(), key=lambda kv: -kv[1])
            ),
            "",
            "Operators that allocate most over the step (allocated, not live at once):",
            "",
            "| operator | input shapes | GB allocated | calls |",
            "|---|---|---|---|",
            *(
                f"| {o['op']} | `{o['shapes']}` | {o['allocated_gb']:.3f} | {o['calls']} |"
                for o in prof["top_ops"]
            ),
            "",
        ]
    md.append(
        f"Machine: {results_io.machine()}. Command: `python bench/memory.py --shapes {args.shapes}"
        f" --prompts {args.prompts} --quant {args.quant}{' --checkpoint' if args.checkpoint else ''}`."
    )
    name = "memory_checkpoint" if args.checkpoint else "memory"
    results_io.write_results(name, md, {"rows": rows, "args": vars(args)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default="1b,small")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--quant", default="4bit", choices=["4bit", "none"])
    ap.add_argument("--sst2", default=str(HERE / "data" / "sst2"))
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "adapter-repair-cost"))
    ap.add_argument(
        "--checkpoint", action="store_true", help="Activation checkpointing over the layers."
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    if args.one:
        child(args)
        return
    rows = []
    for shape in args.shapes.split(","):
        cmd = [sys.executable, __file__, "--one", shape, "--prompts", str(args.prompts)]
        cmd += ["--quant", args.quant, "--sst2", args.sst2, "--cache", args.cache]
        cmd += ["--checkpoint"] if args.checkpoint else []
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            rows.append({"shape": shape, "failed": f"failed (exit {proc.returncode})"})
        else:
            rows.append({"shape": shape, **json.loads(lines[0][len("RESULT ") :])})
        print(json.dumps(rows[-1])[:400], file=sys.stderr, flush=True)
    write(rows, args)


if __name__ == "__main__":
    main()
