"""How answers are generated and judged (no torch at import: ``--help`` stays instant)."""

from __future__ import annotations

from dataclasses import dataclass

from adapter_repair.settings import setting

#: Kept here (not imported from judges / measures) so that configs stay free of torch;
#: tests/test_layering.py checks that they agree.
REFUSAL_LIST_NAMES = ("jailbreakbench", "gcg", "xstest")
MATCH_RULES = ("exact", "contains", "choice")


@dataclass(frozen=True)
class GenerationConfig:
    """How answers are generated for measurement."""

    max_new_tokens: int = setting(
        32,
        "Tokens generated per answer (greedy); the same default as the repair's "
        "--max-new-tokens, so that `eval` and `fix` measure one adapter alike.",
        metavar="N",
    )
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
    other_precision: bool = setting(
        True,
        "fix: also measure the harmful rates (AdvBench eval, XSTest unsafe) of the aligned "
        "base, the fine-tuned and the repaired adapter over the base at the other precision: "
        "4-bit NF4 when the repair ran unquantized, unquantized when it ran over 4- or 8-bit "
        "(one adapter refused 3.4% merged in bf16 and 34.3% over 4-bit: "
        "bench/results/precision.md). Loads the base a second time, after the first is freed.",
    )
