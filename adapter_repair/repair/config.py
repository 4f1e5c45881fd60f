"""What the repair runs: stage 1 (projection), stage 2 (restoration) and the settings around
them, as frozen dataclasses whose fields carry their help text (no torch at import)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from adapter_repair.settings import check_choices, setting

REPAIR_METHODS = ("project", "restore", "both")
DIRECTION_KINDS = ("shift", "refusal")
PROJECTION_SIDES = ("write", "read", "both")
RESTORE_SCORES = ("grad", "grad_x_value", "benign_aware", "ratio", "fisher")
#: what RestoreConfig.search varies, tried in this order after the configured settings: the
#: levers whose best value moved between adapters and worlds (bench/results/pico_repair.md)
SEARCH_SPACE: dict[str, tuple[Any, ...]] = {
    "score": ("benign_aware", "ratio"),
    "rollback": (0.2, 0.5, 0.0),
    "rate": (0.01, 0.005, 0.02),
}


@dataclass(frozen=True)
class ProjectConfig:
    """Stage 1: project the adapter's factors off a direction per layer (closed form)."""

    direction: str = setting(
        "shift",
        "shift: the adapter's own harmful shift (mean hidden state on probe prompts with the "
        "adapter minus without, less its part shared with benign prompts). refusal: the aligned "
        "model's refusal direction (mean probe minus mean benign), which a first trial found "
        "ineffective.",
        choices=DIRECTION_KINDS,
    )
    sides: str = setting(
        "both",
        "write: modules that add to the residual stream (o, down) stop writing the direction; "
        "read: modules that read it (q, k, v, gate, up) stop reacting to it; or both.",
        choices=PROJECTION_SIDES,
    )
    strength: float = setting(1.0, "How much of the direction to remove, in [0, 1].", metavar="A")

    def __post_init__(self) -> None:
        check_choices(self)
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1]; got {self.strength}")


@dataclass(frozen=True)
class RestoreConfig:
    """Stage 2: set adapter coordinates back to their aligned value (0), chosen by gradient,
    with a rollback that protects the task."""

    layer: int = setting(
        -1,
        "L, the hidden state h_L (hidden_states[L]) pulled toward the aligned model's; "
        "negative counts from the end as in Python (-1: n_layers, the final normed state, so "
        "every layer's adapter can change; -2: n_layers - 1). Only adapter factors below L "
        "change. Default measured: bench/results/pico_repair.md.",
        metavar="L",
    )
    rate: float = setting(
        0.01, "Share of the adapter coordinates below L restored per step.", metavar="R"
    )
    max_steps: int = setting(
        40,
        "Most restoration steps. A guard failure sends the repair back with half the rate, "
        "so a backtracked repair needs about twice the steps: at 20, k25-r16 of the small "
        "world ran out of steps above its target (bench/results/ablation.md, restore-steps20).",
        metavar="N",
    )
    eval_every: int = setting(
        5, "Measure the probe harmful rate and the task guard every N steps.", metavar="N"
    )
    settle: bool = setting(
        True,
        "When a measured step reaches the target, also measure the steps since the last "
        "measurement (by bisection: one to three more measurements at --eval-every 5) and keep "
        "the earliest whose probe rates are on target and whose guard holds, so the repair "
        "stops nearer the aligned base's refusal of the probe. On k250-r16 of the small world "
        "it kept step 9 of 10: over the 4-bit base 2.3% of AdvBench eval harmful (aligned "
        "6.9%), but over-refusal 64.0% (aligned 48.4%) (bench/results/repair.md); under "
        "earlier code step 7 read 61.2% and step 10 53.2% (docs/repair.md). Without it "
        "(restore-no-settle, bench/results/ablation.md) the same code kept step 10: 4.6% "
        "harmful, over-refusal 44.4%, but XSTest unsafe 30.5% harmful against settle's 13.0% "
        "(aligned 20.5%): on for now, until more adapters are measured.",
    )
    score: str = setting(
        "benign_aware",
        "How coordinates are ranked: grad (|g|, the published method), grad_x_value (|g x "
        "value|), benign_aware (|g| damped where zeroing would hurt the benign/task loss), or "
        "ratio (|g| / |g_b|, both scaled by their mean: harm removed per unit of task "
        "sensitivity, whatever the sign), or fisher (second order: g x value, the harm "
        "zeroing removes, against 1/2 F value^2, the task loss it costs, F the empirical "
        "Fisher of per-row answer gradients, recomputed each step; its rollback returns the "
        "zeroed coordinates of highest cost).",
        choices=RESTORE_SCORES,
    )
    targets: str = setting(
        "prompt",
        "What h_L is pulled toward. mean: the published loss, -cos(mean h_L over a batch, h*) "
        "for harmful prompts and -cos(mean h_L, b*) for the guard's; prompt: each harmful "
        "prompt's h_L toward its own aligned state, each guard prompt's toward its own "
        "fine-tuned state (a mean keeps what prompts share and loses what the task answers).",
        choices=("mean", "prompt"),
    )
    benign_loss: str = setting(
        "answers",
        "The loss whose gradient protects the task (the benign_aware score and the rollback). "
        "direction: -cos(h_L, b*) as published; answers: cross-entropy of the guard's answers "
        "(the task rows' answers, else the fine-tuned adapter's own greedy answers to benign "
        "prompts), which already has a gradient before anything moved.",
        choices=("direction", "answers"),
    )
    hold_out: bool = setting(
        True,
        "Without task rows (or with a Guard that names no fit rows): split the guard's rows, "
        "the benign loss (score and rollback) fit on every other row and the guard checked on "
        "the rest, so the guard measures what the gradient did not fit. Task rows given to "
        "fix are always split into fit, guard and score rows.",
    )
    fit_rows: int = setting(
        64,
        "At most N rows fit the benign loss (the task rows' fit part, or with hold_out the "
        "even guard rows): its gradient is computed every step, so this is the step's cost; "
        "the guard checks all its own rows. 0: no cap.",
        metavar="N",
    )
    per_matrix: bool = setting(
        False, "Normalise scores per factor matrix (A and B live on different scales)."
    )
    rollback: float = setting(
        0.2,
        "Share of each step's restored coordinates that the benign gradient would move back "
        "toward their fine-tuned value, returned to it (0 turns rollback off).",
        metavar="S",
    )
    target: float | None = setting(
        None,
        "Stop once the probe harmful rate is at most this. Default: the aligned base's own "
        "probe harmful rate plus --target-margin.",
        metavar="RATE",
    )
    target_margin: float = setting(
        0.01,
        "Without --target: how far above the aligned base's probe harmful rate still counts "
        "as reached. On 64 probe prompts one answer is 1.6 points, so 0.01 allows no answer "
        "more than the aligned base gave; 0.02 allowed one, and the small world's mean harm "
        "on prompts the repair never saw stayed above the aligned base's + 1 point "
        "(bench/results/ablation.md, restore-margin0.02).",
        metavar="RATE",
    )
    max_rise: float = setting(
        0.035,
        "Task guard with task data that is not a choice: the task loss of the gold answers "
        "(nats per answer token) may rise at most this much above the fine-tuned adapter's, "
        "on guard rows the repair never fits. On two pico worlds the demo's repair (with its "
        "heal) kept 98% of the held-out task score up to a rise of 0.0549 "
        "(bench/results/guard.md); the default stays below it.",
        metavar="NATS",
    )
    max_margin_drop: float = setting(
        0.25,
        "Task guard for --match choice: the gold answer's mean log-probability margin over the "
        "other choices, in the answer class where it is worst, may fall at most this much "
        "below the fine-tuned adapter's (its own scale: margins are nats apart, not nats per "
        "token). On two small-world adapters over the 4-bit base, the one step of 26 that lost "
        "the held-out SST-2 score beyond noise (81.7% against 86.0%) had a fall of 0.30; every "
        "fall up to 0.27 kept it (bench/results/guard_small_pooled.md).",
        metavar="NATS",
    )
    basis: str = setting(
        "trained",
        "The factors stage 2 zeroes coordinates of. trained: (B, A) as the fine-tune left "
        "them; canonical: each module rewritten as (U sqrt(S), sqrt(S) V^T) from the SVD of "
        "B A before stage 2 (the same delta, rank and format), so each rank component is one "
        "singular direction of the delta.",
        choices=("trained", "canonical"),
    )
    unit: str = setting(
        "coordinate",
        "What a restoration step zeroes: single coordinates of A and B, or whole rank "
        "components (row k of A with column k of B: one rank-1 term of the delta, one "
        "singular direction of it with --basis canonical), scored by the sum of their "
        "candidates' scores, --rate of all components a step; the rollback then returns whole "
        "components.",
        choices=("coordinate", "component"),
    )
    recalibrate: bool = setting(
        False,
        "After each restoration step, recalibrate the coordinates kept by the Optimal-Brain-"
        "Surgeon update (as IRR and SparseGPT do on dense weights): in each LoRA module with "
        "restored coordinates, the rest of each factor row moves so that the module's output "
        "on the fit rows' inputs changes least. Holds one d_in x d_in matrix per module for "
        "the step: for small bases.",
    )
    heal: int = setting(
        1,
        "After each restoration step, N Adam steps on the coordinates not restored (the "
        "restored stay at 0) on the answers to keep (the fit rows', the fine-tuned adapter's "
        "own answers to benign prompts and to safe look-alikes) plus --heal-weight times the "
        "harmful loss (--heal-target). Without it no restoration step lowered the pico "
        "adapters' harm to their target before the task guard stopped it "
        "(bench/results/pico_repair.md); with it the small world's k100-r8 reached its "
        "target (bench/results/repair.md). Skipped, with a warning, when the aligned model "
        "refuses none of the probe prompts. 0: the published method.",
        metavar="N",
    )
    heal_target: str = setting(
        "refusals",
        "The heal's harmful loss. refusals: cross-entropy of the aligned model's own refusals "
        "to the probe prompts (its greedy answers the judge calls refusals); states: stage 2's "
        "-cos of each probe prompt's h_L to the aligned model's (on the pico world it left "
        "harm at 100%).",
        choices=("refusals", "states"),
    )
    heal_lr: float = setting(3e-4, "The heal's Adam learning rate.", metavar="LR")
    heal_weight: float = setting(
        1.0,
        "Weight of the heal's harmful loss against the answers it keeps (lower: less "
        "over-refusal, slower fall of harm).",
        metavar="W",
    )
    heal_kept_state: bool = setting(
        False,
        "The heal's Adam keeps its moments from one restoration step to the next (reset on a "
        "backtrack), instead of starting afresh each step: a fresh Adam's first step moves "
        "every coordinate kept by about --heal-lr in its gradient's sign, however small the "
        "gradient; kept moments move most the coordinates whose gradient holds its sign.",
    )
    heal_lookalikes: bool = setting(
        True,
        "The heal also keeps the fine-tuned adapter's own answers to the shipped safe "
        "look-alike prompts (safe requests that sound harmful, written for this project and "
        "apart from XSTest), those it does not refuse: without them the heal's refusals "
        "spread to safe prompts (docs/repair.md, The heal). On the pico worlds they cost "
        "harm, so the demo turns them off.",
    )
    heal_wordings: bool = setting(
        True,
        "The heal also teaches back the aligned model's own refusals to the shipped harmful "
        "requests in other wordings (questions, first-person plans, short asks; written for "
        "this project and apart from XSTest and AdvBench), those it refuses, beside its "
        "refusals to the probe prompts: so that the restored refusals are not tied to the "
        "probe set's phrasing (docs/repair.md, The heal).",
    )
    checkpoint: str = setting(
        "auto",
        "Activation checkpointing over the decoder layers while stage 2 takes gradients: each "
        "layer keeps only its input and runs again in the backward pass, for the same values. "
        "on, off, or auto: on over a quantized base (4-bit or 8-bit, where memory is what "
        "binds, as QLoRA training checkpoints by default) and for a base of 1B parameters or "
        "more, where saved activations are most of a step's memory; off otherwise, for faster "
        "steps (time and memory with and without it: bench/results/cost.md).",
        choices=("auto", "on", "off"),  # model.memory.CHECKPOINT_MODES, kept torch-free here
    )

    @staticmethod
    def allowance_name(match: str) -> str:
        """The setting that bounds the task guard's rise for answers matched by ``match``: a
        choice task's margin and a generated answer's loss per token live on different
        scales."""
        return "max_margin_drop" if match == "choice" else "max_rise"

    backtrack: int = setting(
        2,
        "On a task-guard failure, return to the last step that held, halve the rate and go on, "
        "at most N times (0: stop at the first failure, as the published method does).",
        metavar="N",
    )
    max_kl: float = setting(
        0.1,
        "Task guard without task data: mean next-token KL (nats) to the fine-tuned adapter on "
        "its own greedy answers to benign prompts. Default measured (bench/results/max_kl.md): "
        "on pico worlds the held-out task held at KL 0.12 and fell 3% at 0.26; past 0.4 it "
        "collapsed while harm had hardly moved, so without task data pass --task.",
        metavar="KL",
    )
    search: int = setting(
        0,
        "Per-adapter search: run stage 2 from the input adapter with up to N settings (these; "
        "then score, rollback and rate each moved alone; then their combinations) and keep the "
        "run whose kept step has the lowest probe harmful rate (down to the target), then the "
        "best guard, then the fewest changed coordinates. Costs up to N repairs. 0 or 1: these "
        "settings only; ignored by --method project.",
        metavar="N",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if self.search < 0 or self.fit_rows < 0:
            raise ValueError(
                f"search and fit_rows must be at least 0; got {self.search}, {self.fit_rows}"
            )
        if not 0.0 < self.rate <= 1.0:
            raise ValueError(f"rate must be in (0, 1]; got {self.rate}")
        if not 0.0 <= self.rollback <= 1.0:
            raise ValueError(f"rollback must be in [0, 1]; got {self.rollback}")
        if self.max_steps < 1 or self.eval_every < 1:
            raise ValueError("max_steps and eval_every must be at least 1")
        if self.heal < 0 or self.heal_lr <= 0 or self.heal_weight < 0:
            raise ValueError(
                "heal must be at least 0, heal_lr above 0 and heal_weight at least 0; got "
                f"{self.heal}, {self.heal_lr}, {self.heal_weight}"
            )
        if not 0.0 <= self.target_margin <= 1.0:
            raise ValueError(f"target_margin must be in [0, 1]; got {self.target_margin}")
        if self.backtrack < 0:
            raise ValueError(f"backtrack must be at least 0; got {self.backtrack}")


@dataclass(frozen=True)
class RepairConfig:
    """What the repair runs, and on how many prompts."""

    method: str = setting(
        "restore",
        "project (stage 1 only), restore (stage 2 only), or both (projection, then "
        "restoration). Default restore: in the project's first trial, projection left the "
        "broken adapter 100% harmful on every side and strength.",
        choices=REPAIR_METHODS,
    )
    probe_prompts: int = setting(
        64,
        "Harmful probe prompts the repair fits on: the directions, the gradients and the "
        "heal's refusals (the first N of the AdvBench probe split, disjoint from the eval "
        "split the harmful rate is reported on).",
        metavar="N",
    )
    check_prompts: int = setting(
        64,
        "Harmful probe prompts the stop rule measures, the aligned rate it counts from "
        "included: up to N of the probe split after the fit ones, never fit on (a stop "
        "measured on the fit prompts reads low). 0: check on the fit prompts (in-sample).",
        metavar="N",
    )
    guard_prompts: int = setting(
        256,
        "Most task (or benign) rows the guard checks and the benign loss may fit on (see "
        "--fit-rows): hundreds, so that the guard's mean does not move with single rows.",
        metavar="N",
    )
    batch_size: int = setting(16, "Prompts per forward/backward batch.", metavar="N")
    max_new_tokens: int = setting(
        32,
        "Tokens generated per answer when measuring (the stop rule, the before/after table).",
        metavar="N",
    )
    project: ProjectConfig = dataclasses.field(
        default_factory=ProjectConfig, metadata={"help": "stage 1", "cli": False}
    )
    restore: RestoreConfig = dataclasses.field(
        default_factory=RestoreConfig, metadata={"help": "stage 2", "cli": False}
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if min(self.probe_prompts, self.guard_prompts, self.batch_size) < 1:
            raise ValueError("probe_prompts, guard_prompts and batch_size must be at least 1")
        if self.check_prompts < 0:
            raise ValueError(f"check_prompts must be at least 0; got {self.check_prompts}")
