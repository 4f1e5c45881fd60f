"""Time and peak memory of our whole repair (``repair()``, the Python API: targets, the guard's
answers, every stage 2 step and the stop rule's generations) at a real shape: Llama-2-7B's
config with random weights, loaded 4-bit NF4, under a random r=16 all-linear adapter; and at a
small shape of the same family on CPU. Writes bench/results/scale.md and .json.

    python bench/scale.py [--shape 7b|small] [--steps 20] [--prompts 64] [--new-tokens 32]
                          [--checkpoint auto|on|off] [--tokenizer DIR]

On this CPU machine: ``python bench/scale.py --shape 7b --steps 2 --prompts 4 --new-tokens 8``
(the target: peak RSS during repair() under 8 GB, so the same work fits a 12 GB card).

On a GPU machine: ``python bench/scale.py --shape 7b`` (targets on one H100: under 3 minutes
and under 10 GB of GPU memory, so a 7B repair fits a 12 GB consumer card). The machine needs
bitsandbytes (../shared/NOTES.md: bring its wheel) and a tokenizer: the pico world's, built on
first use in about a minute, or ``--tokenizer DIR``.

Random weights answer nothing a judge calls a refusal, so the stop rule's target is set to 0
(every step runs) and the fidelity guard to a bound it cannot fail: the run's cost is what is
measured, not its outcome. The model is built and saved first (not timed), then loaded and
repaired (timed separately).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import results_io
from cost import TARGETS, current_peak_rss_gb, peak_rss_gb, random_llama, reset_peak_rss

SHAPES: dict[str, dict[str, int]] = {
    "7b": {  # Llama-2-7B
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
    },
    "small": {  # the same family at 1/8 of the width, 4 layers
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
}
TARGET_SECONDS = 180.0  #: on one H100
TARGET_GPU_GB = 10.0


def streamed_llama(shape: dict[str, int], root: Path, tokenizer_dir: Path) -> tuple[Path, Path]:
    """(base folder, adapter folder) as :func:`cost.random_llama` builds them, written one
    decoder layer at a time: each layer's random bfloat16 weights are drawn, saved as their own
    safetensors shard and dropped, so no copy of the whole model is ever in memory (7B in
    bfloat16 is 13.5 GB, in float32 27 GB; this machine has 24). Loading it with ``--quant
    4bit`` then quantizes shard by shard. Built once under ``root``."""
    import json

    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapter_repair.model.loading import load_tokenizer

    base_dir, adapter_dir = root / "base", root / "adapter"
    if (adapter_dir / "adapter_model.safetensors").is_file():
        return base_dir, adapter_dir
    tok = load_tokenizer(None, str(tokenizer_dir))
    config = LlamaConfig(**{"vocab_size": len(tok), "tie_word_embeddings": True, **shape})  # type: ignore[arg-type]
    with torch.device("meta"):  # names and shapes only
        meta = LlamaForCausalLM(config)
    groups: dict[str, dict[str, torch.Size]] = {}
    for name, p in meta.named_parameters():
        if name == "lm_head.weight":  # tied to the embedding
            continue
        parts = name.split(".")
        group = f"layer{int(parts[2]):03d}" if parts[1] == "layers" else "rest"
        groups.setdefault(group, {})[name] = p.shape
    base_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    for n, (_, shapes) in enumerate(sorted(groups.items()), start=1):
        file = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        tensors = {
            name: (
                torch.ones(size) if "norm" in name else torch.randn(size, generator=gen) * 0.02
            ).to(torch.bfloat16)
            for name, size in shapes.items()
        }
        save_file(tensors, str(base_dir / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    index = {"metadata": {}, "weight_map": weight_map}
    (base_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.dtype = torch.bfloat16  # the shards are
    config.save_pretrained(str(base_dir))
    tok.save_pretrained(str(base_dir))
    # the adapter: random factors (as init_lora_weights=False draws them), float32 as PEFT saves
    lora: dict[str, torch.Tensor] = {}
    for name, mod in meta.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            key = f"base_model.model.{name}"
            lora[f"{key}.lora_A.weight"] = torch.randn(16, mod.in_features, generator=gen) * 0.02
            lora[f"{key}.lora_B.weight"] = torch.randn(mod.out_features, 16, generator=gen) * 0.02
    adapter_dir.mkdir(parents=True, exist_ok=True)
    LoraConfig(
        r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM",
        base_model_name_or_path=str(base_dir),
    ).save_pretrained(str(adapter_dir))  # fmt: skip
    save_file(lora, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return base_dir, adapter_dir


def shape_parameters(base: Path) -> int:
    """The base's parameter count unquantized (a 4-bit weight counts its packed bytes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base)))
    return sum(p.numel() for p in model.parameters())


def run(
    shape: str,
    steps: int,
    prompts: int,
    tokenizer: Path,
    root: Path,
    new_tokens: int = 32,
    checkpoint: str = "auto",
) -> dict[str, Any]:
    import torch

    from adapter_repair.measure import prompts as P
    from adapter_repair.measure.config import GenerationConfig
    from adapter_repair.measure.judges import load_judge
    from adapter_repair.model.config import LoadConfig
    from adapter_repair.model.loading import load_model, load_tokenizer
    from adapter_repair.model.memory import wants_checkpointing
    from adapter_repair.repair.config import RepairConfig, RestoreConfig
    from adapter_repair.repair.guard import Guard
    from adapter_repair.repair.pipeline import repair

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    t0 = time.perf_counter()
    if cuda:
        base, adapter = random_llama(SHAPES[shape], root / shape, tokenizer, device)
    else:  # a CPU machine may not hold the whole model unquantized
        base, adapter = streamed_llama(SHAPES[shape], root / f"{shape}-streamed", tokenizer)
    build_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    load = LoadConfig(base=str(base), quant="4bit", dtype="bfloat16", device_map=device)
    model, lora = load_model(adapter, load)
    tok = load_tokenizer(None, str(base))
    load_s = time.perf_counter() - t0
    config = RepairConfig(
        method="restore",
        probe_prompts=prompts,
        check_prompts=0,  # a cost bench: the stop measured on the fit prompts, as before
        guard_prompts=prompts,
        max_new_tokens=new_tokens,
        restore=RestoreConfig(
            max_steps=steps, target=0.0, max_kl=1e9, backtrack=0, checkpoint=checkpoint
        ),
    )
    rss_reset = reset_peak_rss()  # what follows alone, not the load's mapped checkpoint pages
    t0 = time.perf_counter()
    result = repair(
        model,
        tok,
        lora,
        config,
        probe=P.harmful("probe"),
        guard=Guard(None, P.benign("benign")),
        judge=load_judge("substring"),
        generation=GenerationConfig(new_tokens, 16, progress=False),
    )
    repair_s = time.perf_counter() - t0
    step_s = [s.seconds for s in result.history[1:] if s.probe_harmful is None]
    return {
        "shape": shape,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "parameters": shape_parameters(base),
        "adapter_coordinates": sum(m.A.numel() + m.B.numel() for m in lora),
        "steps": len(result.history) - 1,
        "prompts": prompts,
        "build_seconds": build_s,
        "load_seconds": load_s,
        "repair_seconds": repair_s,
        "step_seconds_median": statistics.median(step_s) if step_s else None,
        "gpu_peak_gb": torch.cuda.max_memory_allocated() / 1024**3 if cuda else None,
        "peak_rss_gb": peak_rss_gb(),
        "repair_peak_rss_gb": current_peak_rss_gb() if rss_reset else None,
        "new_tokens": new_tokens,
        "checkpoint": checkpoint,
        "checkpointed": wants_checkpointing(checkpoint, model),
        "stopped": result.stopped,
    }


TARGET_CPU_RSS_GB = 8.0  #: the 7B shape over NF4 on CPU: fits a 12 GB card with its context


def write(r: dict[str, Any], command: str) -> None:
    gpu = r["gpu_peak_gb"]
    during = r.get("repair_peak_rss_gb")
    md = [
        "# Repair at scale: time and peak memory of repair()",
        "",
        f"Shape {r['shape']} ({r['parameters'] / 1e9:.2f}B parameters, loaded 4-bit NF4,"
        f" random weights), a random r=16 all-linear adapter ({r['adapter_coordinates']:,}"
        f" coordinates), {r['prompts']} probe and {r['prompts']} benign prompts, {r['steps']}"
        f" stage 2 step(s) with the probe and guard measured every 5 and at the end,"
        f" {r.get('new_tokens', 32)} new tokens an answer,"
        f" --checkpoint {r['checkpoint']} (activation checkpointing over the decoder layers"
        f" {'on' if r['checkpointed'] else 'off'}),"
        " default settings otherwise. On CPU"
        " the base is written one decoder layer at a time and quantized shard by shard as it"
        " loads: no whole unquantized copy is ever in memory. `peak RSS during repair()`: the"
        " process's peak resident set from after loading to the end of the repair (Linux"
        " VmHWM, reset after loading); `peak RSS`: the whole process's, loading included.",
        "",
        "| device | build s (not timed) | load s | repair s | step s (median) | GPU peak GB"
        " | peak RSS during repair() GB | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['device']} | {r['build_seconds']:.0f} | {r['load_seconds']:.1f} |"
        f" {r['repair_seconds']:.1f} | {r['step_seconds_median'] or 0:.2f} |"
        f" {'-' if gpu is None else f'{gpu:.2f}'} |"
        f" {'-' if during is None else f'{during:.2f}'} | {r['peak_rss_gb']:.2f} |",
        "",
    ]
    if gpu is not None and r["shape"] == "7b":
        md += [
            "| target (one H100) | measured | ok |",
            "|---|---|---|",
            f"| repair under {TARGET_SECONDS:.0f} s | {r['repair_seconds']:.0f} s |"
            f" {'yes' if r['repair_seconds'] < TARGET_SECONDS else 'NO'} |",
            f"| GPU memory under {TARGET_GPU_GB:.0f} GB | {gpu:.2f} GB |"
            f" {'yes' if gpu < TARGET_GPU_GB else 'NO'} |",
            "",
        ]
    elif r["shape"] == "7b" and during is not None:
        md += [
            "| target (CPU) | measured | ok |",
            "|---|---|---|",
            f"| peak RSS during repair() under {TARGET_CPU_RSS_GB:.0f} GB | {during:.2f} GB |"
            f" {'yes' if during < TARGET_CPU_RSS_GB else 'NO'} |",
            "",
            "No GPU in this run: the GPU targets (time and memory on one H100) are not measured.",
            "",
        ]
    else:
        md += ["No GPU in this run: the 7B targets are not measured here.", ""]
    md += [f"Machine: {results_io.machine()}. Command: `{command}`.", ""]
    name = "scale" if r["checkpoint"] == "auto" else f"scale_checkpoint_{r['checkpoint']}"
    results_io.write_results(name, md, r)
    print("\n".join(md))


def main() -> None:
    from adapter_repair.model.memory import CHECKPOINT_MODES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 7b on a GPU")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32, help="Tokens generated an answer.")
    ap.add_argument(
        "--checkpoint",
        choices=CHECKPOINT_MODES,
        default="auto",
        help="Activation checkpointing (the repair's setting; auto: on over a quantized base"
        " or from 1B parameters); a value other than auto writes scale_checkpoint_VALUE.md.",
    )
    ap.add_argument("--tokenizer", default=None, help="default: the pico world's tokenizer")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "adapter-repair-scale"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    import torch

    shape = args.shape or ("7b" if torch.cuda.is_available() else "small")
    if args.tokenizer:
        tokenizer = Path(args.tokenizer)
    else:
        from adapter_repair.beds.pico import PicoRecipe, build_pico_world

        tokenizer = build_pico_world(PicoRecipe()).base_dir
    result = run(
        shape, args.steps, args.prompts, tokenizer, Path(args.cache), args.new_tokens,
        args.checkpoint,
    )  # fmt: skip
    write(result, " ".join(["python bench/scale.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
