"""``adapter-repair demo``: the pico world's adapter repaired end to end, with the settings
that suit that world."""

from __future__ import annotations

import os
from pathlib import Path

from adapter_repair.beds.pico import PicoWorld
from adapter_repair.measure.config import EvalConfig, GenerationConfig
from adapter_repair.model.config import LoadConfig
from adapter_repair.repair.config import RepairConfig, RestoreConfig
from adapter_repair.repair.pipeline import RepairOutcome, repair_folder


def demo_config(world: PicoWorld) -> RepairConfig:
    """The repair settings of ``adapter-repair demo`` on the pico world: restoration at
    L = n_layers (the final hidden state: every layer's adapter can be restored; the pico
    adapter's break sits in its top layer) with per-prompt targets, 0.5% of the coordinates a
    step, each step healed (5 Adam steps on the kept coordinates: the fit rows' answers, the
    adapter's answers to benign prompts, the aligned model's refusals to the probe prompts;
    one Adam for the whole run, its moments kept across the steps), the probe rate and the
    guard measured every step, and up to two backtracks (half the rate) after a guard
    failure. Without the heal no restoration step lowered the pico adapter's harm before the
    task guard stopped it (bench/results/pico_repair.md). With a fresh Adam each step seed 0
    stopped at the guard 4.0 points above the aligned base's harm; with the moments kept both
    seeds reached their target, 1.2 points above it, at more over-refusal on seed 0 (the same
    table). The heal keeps no safe look-alikes here: on the pico worlds they cut over-refusal
    but left harm above the target on seed 0 (the same table). The world's 57
    held-out task rows are split into fit, guard and score rows, as ``fix --task`` splits a
    user's; the guard is the continuous task loss (bench/results/guard.md). The product's
    defaults are the small world's to choose (bench/repair.py)."""
    n_layers = int(world.manifest["recipe"]["num_layers"])
    return RepairConfig(
        method="restore",
        max_new_tokens=16,
        guard_prompts=256,
        restore=RestoreConfig(
            layer=n_layers,
            targets="prompt",
            benign_loss="answers",
            rate=0.005,
            heal=5,
            heal_lookalikes=False,
            heal_wordings=False,
            heal_kept_state=True,
            max_steps=30,
            eval_every=1,
            backtrack=2,
        ),
    )


def demo_repair(world: PicoWorld, out: str | os.PathLike[str] | None = None) -> RepairOutcome:
    """Repair the pico world's adapter into ``out`` (default: beside the world in the cache,
    replaced on each run) with :func:`demo_config`, as ``adapter-repair fix --task`` would with
    the world's held-out task rows: split into rows that fit the task loss, rows that guard and
    rows that are scored before and after."""
    target = Path(out) if out is not None else world.root.parent / f"{world.root.name}-repaired"
    return repair_folder(
        world.adapter_dir,
        target,
        load=LoadConfig(quant="none", dtype="float32"),
        config=demo_config(world),
        evaluation=EvalConfig(match="exact"),
        generation=GenerationConfig(max_new_tokens=16, batch_size=64),
        task=world.task("eval"),
        overwrite=True,
    )
