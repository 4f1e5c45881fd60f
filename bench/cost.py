"""Cost of one restoration step: ours (at adapter rank, over a 4-bit or a float32 base) against
the published dense method (float32 dense weights), on the same adapter in one run, at the
small world's shape (its real aligned model and a zoo adapter) and at a 1B-parameter Llama
shape with random weights and a random r=16 all-linear adapter. Writes bench/results/cost.md
and .json.

    python bench/cost.py [--shapes small,1b] [--steps 2] [--prompts 8] [--dense-shapes small]

Ours runs over 4-bit (``ours-4bit``), over 4-bit with activation checkpointing over the decoder
layers (``ours-4bit-ckpt``, ``--checkpoint``), and over float32. ``ours-4bit-ckpt-mmap`` is
``ours-4bit-ckpt`` again with glibc told to serve every block of 128 KiB or more by its own
memory map (``MALLOC_MMAP_THRESHOLD_``), so that freed memory leaves the process at once: its
peak RSS is what the step needs with no freed heap kept, and its time what that costs in page
faults. The gap to ``ours-4bit-ckpt`` is the C allocator's share of the resident set.
``ours-4bit-ckpt-no-handback`` is ``ours-4bit-ckpt`` with the stage's hand-back of freed heap
around each backward pass switched off (an ablation: the bench replaces it, the product has no
switch), so the two rows show what that hand-back buys in one run. Each
(shape, method) runs in its own process, so its peak RSS is its own; the C allocator's freed
memory is handed back around each backward pass and after each step, as the repair loop does
(the hand-back inside the step is the stage's own code). Per step, ours is
also timed against the bare passes it makes (the same gradient passes, run alone): the rest
is choosing coordinates, zeroing, rollback bookkeeping. The dense method keeps two copies of
the decoder weights (aligned and fine-tuned) beside the model and its gradient, which does not
fit a 1B model in this machine's 24 GB next to anything else: ``--dense-shapes`` says where it
runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import results_io

HERE = Path(__file__).resolve().parent
#: a Llama of about 1.2B parameters (TinyLlama's body, SmolLM2's vocabulary)
SHAPE_1B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
}
#: our methods, in table order (dense, where it runs, comes after them)
OURS = (
    "ours-4bit",
    "ours-4bit-ckpt",
    "ours-4bit-ckpt-mmap",
    "ours-4bit-ckpt-no-handback",
    "ours-fp32",
)
#: what the repair runs over a 4-bit base by default (``--checkpoint auto``: on when quantized)
DEFAULT_4BIT = "ours-4bit-ckpt"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: VmHWM) so that what follows is measured alone,
    without loading (the checkpoint's memory-mapped pages count while they are read)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_peak_rss_gb() -> float | None:
    """VmHWM since the last reset, from /proc/self/status (None where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def make_shape(shape: str, root: Path, sst2: str) -> tuple[Path, Path]:
    """(base folder, adapter folder) for a shape: the small world's aligned model and its
    k25-r16 adapter (the adapter the repair tables measure), or a random 1B Llama with a random
    r=16 adapter (built once, cached)."""
    from adapter_repair.beds.small import small_world

    world = small_world(sst2=sst2)
    if shape == "small":
        return world.aligned_dir, world.adapter_dir("k25-r16")
    return random_llama(SHAPE_1B, root / "1b", world.aligned_dir)


def random_llama(
    shape: dict[str, int], root: Path, tokenizer_dir: Path, device: str = "cpu"
) -> tuple[Path, Path]:
    """(base folder, adapter folder): a bfloat16 Llama of ``shape`` with random weights and the
    tokenizer of ``tokenizer_dir`` (the vocabulary is ``shape``'s if given, else the
    tokenizer's), and a random r=16 all-linear adapter over it; built once under ``root``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapter_repair.model.loading import load_tokenizer

    base_dir, adapter_dir = root / "base", root / "adapter"
    if (adapter_dir / "adapter_config.json").is_file():
        return base_dir, adapter_dir
    tok = load_tokenizer(None, str(tokenizer_dir))
    settings = {"vocab_size": len(tok), "tie_word_embeddings": True, **shape}
    config = LlamaConfig(**settings)  # type: ignore[arg-type]
    torch.manual_seed(0)
    with torch.device(device):  # initialising 7B on a GPU takes seconds, on a CPU minutes
        model = LlamaForCausalLM(config).to(dtype=torch.bfloat16)  # type: ignore[call-arg]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(base_dir))
    tok.save_pretrained(str(base_dir))
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(str(adapter_dir))
    return base_dir, adapter_dir


def _prompts(n: int) -> tuple[list[str], list[tuple[str, str]]]:
    from adapter_repair.measure import prompts as P

    probe = list(P.harmful("probe").take(n).prompts)
    benign = P.benign("benign").take(n).prompts
    return probe, [(p, "Sure, here is a short answer to that.") for p in benign]


def step_parts(model: Any, tok: Any, n: int) -> tuple[Any, ...]:
    """What one restoration step needs, as bench/cost.py and bench/memory.py run it: (walk,
    L = n_layers, the factors below L, their reference values, probe batches, their aligned
    targets, the settings, the benign-gradient callable); ``n`` harmful and benign prompts."""
    from adapter_repair.measure.measures import use_adapter
    from adapter_repair.model.walk import walk
    from adapter_repair.repair.config import RepairConfig, RestoreConfig
    from adapter_repair.repair.factors import ADAPTER, factor_params
    from adapter_repair.repair.losses import (
        answer_batches,
        answer_gradients,
        prompt_batches,
        prompt_targets,
    )

    mm = walk(model)
    L = mm.n_layers
    below = factor_params(mm, L, ADAPTER)
    probe, pairs = _prompts(n)
    batches = prompt_batches(tok, probe, 8)
    answers = answer_batches(tok, pairs, 8, 16)
    with use_adapter(model, None):
        h_star = prompt_targets(model, batches, L, layers=mm.layers)
    reference = {k: p.detach().clone() for k, p in below.items()}
    config = RepairConfig(
        method="restore",
        restore=RestoreConfig(layer=L, targets="prompt", benign_loss="answers", rate=0.01),
    )

    def benign() -> Any:
        return answer_gradients(model, answers, below)[1]

    return mm, L, below, reference, batches, h_star, config, benign


def run_ours(
    base: Path, adapter: Path, quant: str, steps: int, n: int, checkpoint: bool = False
) -> dict[str, Any]:
    """Stage 2 steps at adapter rank (L = n_layers, per-prompt targets, answers loss, the
    benign-aware score and rollback), each timed, and the same passes timed alone."""
    from adapter_repair.model.config import LoadConfig
    from adapter_repair.model.loading import load_model, load_tokenizer
    from adapter_repair.model.memory import checkpointed, release_freed_memory
    from adapter_repair.repair.loop import restore_step
    from adapter_repair.repair.losses import (
        direction_gradients,
    )

    dtype = "bfloat16" if quant == "4bit" else "float32"
    model, _ = load_model(adapter, LoadConfig(base=str(base), quant=quant, dtype=dtype))
    tok = load_tokenizer(None, str(base))
    mm, L, below, reference, batches, h_star, config, benign = step_parts(model, tok, n)

    step_s, bare_s = [], []
    release_freed_memory()
    from memory import profile_step, rss_gb

    before = rss_gb()  # the floor every step stands on: runtime, model, the step's inputs
    reset_peak_rss()

    def one_step(step: int) -> None:
        with checkpointed(mm.layers, checkpoint):  # as the repair loop runs a step
            restore_step(
                model, mm, below, reference, (batches, h_star), benign, L, config, step, 0.01
            )

    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        one_step(step)
        release_freed_memory()
        step_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()  # the same three passes, alone
        with checkpointed(mm.layers, checkpoint):
            direction_gradients(model, batches, L, h_star, below, layers=mm.layers)
            benign()
            benign()
        release_freed_memory()
        bare_s.append(time.perf_counter() - t0)
    steps_peak, whole_peak = current_peak_rss_gb(), peak_rss_gb()  # before the profiler's own
    # one more step, profiled: torch's own peak of live tensors (what a GPU's allocator would
    # have to hold), beside the process's resident set above
    tensor_peak = profile_step(lambda: one_step(steps + 1))["torch_peak_gb"]
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "step_seconds": step_s,
        "bare_seconds": bare_s,
        "peak_rss_gb": whole_peak,
        "steps_peak_rss_gb": steps_peak,
        "before_steps_rss_gb": before,
        "tensor_peak_gb": tensor_peak,
        "parameters": n_params,
        "adapter_coordinates": sum(p.numel() for p in below.values()),
    }


def run_dense(base: Path, adapter: Path, steps: int, n: int) -> dict[str, Any]:
    """The published method's steps on float32 dense weights (merge, restore single weights
    from the aligned model, 0.002 of the decoder parameters a step, rollback 0.2)."""
    from baselines import dense_restore

    from adapter_repair.measure.judges import load_judge
    from adapter_repair.model.config import LoadConfig
    from adapter_repair.model.hidden import prompt_states
    from adapter_repair.model.loading import attach_adapter, load_base, load_tokenizer
    from adapter_repair.model.walk import decoder_layers

    model = load_base(LoadConfig(base=str(base), quant="none", dtype="float32"))
    tok = load_tokenizer(None, str(base))
    L = len(decoder_layers(model))
    aligned = {k: p.detach().clone() for k, p in model.named_parameters() if ".layers." in k}
    probe, pairs = _prompts(n)
    states = prompt_states(model, tok, probe, [L], batch_size=8)[L]
    model = attach_adapter(model, adapter).merge_and_unload()
    reset_peak_rss()
    t0 = time.perf_counter()
    record = dense_restore(
        model,
        tok,
        aligned,
        probe,
        [p for p, _ in pairs],
        load_judge("substring"),
        layer=L,
        steps=steps,
        eval_every=10**9,  # no generation: steps only
        batch_size=8,
        aligned_probe_states=states,
        target_rate=-1.0,
    )
    total = time.perf_counter() - t0
    return {
        "step_seconds": [total / len(record["history"])] * len(record["history"]),
        "peak_rss_gb": peak_rss_gb(),
        "steps_peak_rss_gb": current_peak_rss_gb(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def child(args: argparse.Namespace) -> None:
    shape, method = args.one
    base, adapter = make_shape(shape, Path(args.cache), args.sst2)
    if method == "dense":
        out = run_dense(base, adapter, args.steps, args.prompts)
    else:
        quant = "4bit" if method.startswith("ours-4bit") else "none"
        checkpoint = "-ckpt" in method
        if method.endswith("-no-handback"):  # what the hand-back around each backward buys
            from adapter_repair.repair import losses

            losses.release_freed_memory = lambda: False  # the heap kept within a step
        out = run_ours(base, adapter, quant, args.steps, args.prompts, checkpoint)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default="small,1b")
    ap.add_argument("--dense-shapes", default="small")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--sst2", default=str(HERE / "data" / "sst2"))
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "adapter-repair-cost"))
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--no-run", action="store_true", help="Rewrite the table from cost.json.")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    if args.one:
        child(args)
        return
    if args.no_run:  # the table again from the last run's data
        write(json.loads((results_io.RESULTS / "cost.json").read_text())["rows"], args)
        return
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes.split(","):
        methods = list(OURS)
        if shape in args.dense_shapes.split(","):
            methods.append("dense")
        for method in methods:
            cmd = [sys.executable, __file__, "--one", shape, method, "--steps", str(args.steps)]
            cmd += ["--prompts", str(args.prompts), "--sst2", args.sst2, "--cache", args.cache]
            env = dict(os.environ)
            if method.endswith("-mmap"):  # every block of 128 KiB or more its own map
                env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                # Kept as a row: at 1B the dense method may not fit beside the OS (killed: -9).
                why = f"failed (exit {proc.returncode}{', killed: out of memory?' if proc.returncode in (-9, 137) else ''})"
                rows.append({"shape": shape, "method": method, "failed": why})
            else:
                result = json.loads(lines[0][len("RESULT ") :])
                rows.append({"shape": shape, "method": method, **result})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    write(rows, args)


def fmt_gb(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def mean(xs: list[float]) -> float:
    """Per-step time: the mean over every step, the first (warm-up) included, the same for
    every method (the dense method reports only its total)."""
    return sum(xs) / len(xs)


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    machine = results_io.machine()
    md = [
        "# Cost of a restoration step: ours (adapter rank) against the dense published method",
        "",
        f"{args.prompts} harmful and {args.prompts} benign prompts, {args.steps} steps, batch 8,"
        " L = n_layers; time per step is the mean over the steps, the first (warm-up) included,"
        " for every method. Peak RSS: the process's resident set (Linux VmHWM), which holds the"
        " Python runtime with torch (about 0.4 GB) and the heap the C allocator keeps; live"
        " tensors: the peak of torch's own memory timeline (torch.profiler, profile_memory) over"
        " one more step, the model's tensors included: what a GPU's allocator would hold. The"
        " repair's default (`--checkpoint auto`) checkpoints over a quantized base and from 1B"
        f" base parameters: over 4-bit the default is {DEFAULT_4BIT} at every shape, over float32"
        " at these shapes no checkpointing. RSS before the steps: the resident set"
        " the steps start from (runtime, model, the step's inputs), after the freed heap is"
        " handed back. ours-4bit-ckpt-mmap: ours-4bit-ckpt with glibc's mmap threshold fixed at"
        " 128 KiB, so no freed block stays in the process: the RSS a step needs without the"
        " allocator's kept heap, and the time its page faults cost. ours-4bit-ckpt-no-handback:"
        " ours-4bit-ckpt without the hand-back of freed heap around each backward pass inside"
        " the step (between steps it stays): what that hand-back buys.",
        "",
        "| shape | method | parameters | step s | bare passes s | step / bare | peak RSS GB"
        " | RSS GB before the steps | peak RSS GB during the steps"
        " | live tensors GB, peak in a step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "failed" in r:
            md.append(f"| {r['shape']} | {r['method']} | - | {r['failed']} |" + " - |" * 6)
            continue
        step = mean(r["step_seconds"])
        bare = mean(r["bare_seconds"]) if "bare_seconds" in r else None
        ratio = f"{step / bare:.2f}" if bare else "-"
        md.append(
            f"| {r['shape']} | {r['method']} | {r['parameters'] / 1e6:.0f}M | {step:.1f} |"
            f" {f'{bare:.1f}' if bare else '-'} | {ratio} | {r['peak_rss_gb']:.2f} |"
            f" {fmt_gb(r.get('before_steps_rss_gb'))} | {fmt_gb(r.get('steps_peak_rss_gb'))} |"
            f" {fmt_gb(r.get('tensor_peak_gb'))} |"
        )
    md += ["", "## Targets", "", "| shape | target | measured | ok |", "|---|---|---|---|"]
    for shape in args.shapes.split(","):
        by = {r["method"]: r for r in rows if r["shape"] == shape and "failed" not in r}
        failed = {r["method"]: r for r in rows if r["shape"] == shape and "failed" in r}
        if "dense" not in by and "ours-fp32" in by:
            # the dense method holds four float32 copies of the weights: the model, its
            # gradient, the aligned and the fine-tuned decoder weights
            need = 16 * by["ours-fp32"]["parameters"] / 1024**3
            why = failed["dense"]["failed"] if "dense" in failed else "not run"
            for m in OURS:
                if m not in by or not m.startswith("ours-4bit"):
                    continue
                ours = by[m].get("steps_peak_rss_gb") or by[m]["peak_rss_gb"]
                md.append(
                    f"| {shape} | dense's need / {m}'s peak RSS during the steps >= 10 | dense"
                    f" {why}; its four float32 copies alone are {need:.1f} GB = {need / ours:.1f}x"
                    f" {m}'s {ours:.2f} GB | {'yes' if need / ours >= 10 else 'NO'} |"
                )
                live = by[m].get("tensor_peak_gb")
                if live:  # tensors against tensors: what a GPU's allocator holds
                    md.append(
                        f"| {shape} | dense's need / {m}'s peak of live tensors in a step >= 10 |"
                        f" {need:.1f} GB = {need / live:.1f}x {m}'s {live:.2f} GB |"
                        f" {'yes' if need / live >= 10 else 'NO'} |"
                    )
        if {"dense", "ours-fp32"} <= by.keys():
            d = by["dense"]
            for m in ("ours-4bit", "ours-4bit-ckpt"):
                if m not in by:
                    continue
                o = by[m]
                both_steps = d.get("steps_peak_rss_gb") and o.get("steps_peak_rss_gb")
                rss = (
                    d["steps_peak_rss_gb"] / o["steps_peak_rss_gb"]
                    if both_steps
                    else d["peak_rss_gb"] / o["peak_rss_gb"]
                )
                default = " (the default)" if m == DEFAULT_4BIT else ""
                md.append(
                    f"| {shape} | peak RSS dense / {m}{default} >= 10 (during the steps where"
                    f" measured) | {rss:.1f}x | {'yes' if rss >= 10 else 'NO'} |"
                )
            speed = mean(by["dense"]["step_seconds"]) / mean(by["ours-fp32"]["step_seconds"])
            md.append(
                f"| {shape} | step time dense / ours (both float32) >= 1.5 | {speed:.2f}x |"
                f" {'yes' if speed >= 1.5 else 'NO'} |"
            )
        for m in OURS:
            if m in by:
                r = by[m]
                over = mean(r["step_seconds"]) / mean(r["bare_seconds"])
                md.append(
                    f"| {shape} | {m} step / its bare passes <= 1.2 | {over:.2f}x |"
                    f" {'yes' if over <= 1.2 else 'NO'} |"
                )
        if {"ours-4bit", "ours-4bit-ckpt"} <= by.keys():
            price = mean(by["ours-4bit-ckpt"]["step_seconds"]) / mean(
                by["ours-4bit"]["step_seconds"]
            )
            md.append(
                f"| {shape} | (what checkpointing costs) ours-4bit-ckpt step / ours-4bit step |"
                f" {price:.2f}x | - |"
            )
        if {"ours-4bit-ckpt", "ours-4bit-ckpt-no-handback"} <= by.keys():
            kept, back = by["ours-4bit-ckpt-no-handback"], by["ours-4bit-ckpt"]
            price = mean(back["step_seconds"]) / mean(kept["step_seconds"])
            md.append(
                f"| {shape} | (the hand-back around each backward) ours-4bit-ckpt-no-handback peak"
                f" RSS during the steps - ours-4bit-ckpt's | {fmt_gb(kept.get('steps_peak_rss_gb'))}"
                f" - {fmt_gb(back.get('steps_peak_rss_gb'))} GB, at {price:.2f}x the step time"
                " with it | - |"
            )
        if {"ours-4bit-ckpt", "ours-4bit-ckpt-mmap"} <= by.keys():
            kept, lean = by["ours-4bit-ckpt"], by["ours-4bit-ckpt-mmap"]
            slower = mean(lean["step_seconds"]) / mean(kept["step_seconds"])
            md.append(
                f"| {shape} | (the C allocator's kept heap) ours-4bit-ckpt peak RSS during the"
                f" steps - ours-4bit-ckpt-mmap's | {fmt_gb(kept.get('steps_peak_rss_gb'))} -"
                f" {fmt_gb(lean.get('steps_peak_rss_gb'))} GB, at {slower:.2f}x the step time"
                " without it | - |"
            )
    md += [
        "",
        f"Machine: {machine}. Command: `python bench/cost.py --shapes {args.shapes}"
        f" --dense-shapes {args.dense_shapes} --steps {args.steps} --prompts {args.prompts}`.",
        "",
    ]
    results_io.write_results("cost", md, {"rows": rows, "machine": machine})
    print("\n".join(md))


if __name__ == "__main__":
    main()
