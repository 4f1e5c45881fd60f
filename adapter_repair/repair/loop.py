"""Stage 2's loop (and the stage-1 pass before it when both run) on one PeftModel, whose
adapter, disabled, is the aligned model.

The stages' decisions are pure tensor functions (:mod:`adapter_repair.repair.select`,
:mod:`adapter_repair.repair.project`); this module computes what they need (directions,
gradients), applies their choices to the live adapter factors, measures the stop rule and the
task guard every few steps, backtracks on a failed guard, and returns the repaired adapter with
every step's record. It never writes files: :func:`adapter_repair.repair.report.write_report`
does.

About 400 lines, most of them one function (:func:`repair_once`): the loop's state (the kept
step, the rate, the backtracks) lives in one scope, as the published method's steps do.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

import torch

from adapter_repair.adapter import LoraAdapter
from adapter_repair.measure import prompts as P
from adapter_repair.measure.config import GenerationConfig
from adapter_repair.measure.generation import generate
from adapter_repair.measure.judges import Judge, RefusalList, load_refusal_list
from adapter_repair.measure.measures import Rate, use_adapter
from adapter_repair.model.memory import (
    checkpointed,
    release_freed_memory,
    wants_checkpointing,
)
from adapter_repair.model.walk import ModelMap, walk
from adapter_repair.repair.basis import canonicalize_
from adapter_repair.repair.config import RepairConfig
from adapter_repair.repair.directions import mean_hidden
from adapter_repair.repair.factors import (
    ADAPTER,
    REFERENCE,
    add_reference,
    all_factors,
    changed_share,
    factor_params,
    load_state,
    snapshot,
    to_adapter,
    zeroed_share,
)
from adapter_repair.repair.guard import (
    Guard,
    guard_accuracy,
    guard_answers,
    guard_holds,
    guard_value,
)
from adapter_repair.repair.heal import HealLoss, heal, heal_optimizer
from adapter_repair.repair.losses import (
    Targets,
    answer_gradients,
    answer_loss_terms,
    direction_cosine,
    direction_gradients,
    direction_loss_terms,
    fisher_diagonal,
    generated_answer_batches,
    prompt_batches,
    prompt_targets,
)
from adapter_repair.repair.project import project_adapter, projection_directions
from adapter_repair.repair.recalibrate import recalibrate
from adapter_repair.repair.select import (
    BENIGN_SCORES,
    FISHER_SCORES,
    choose_restored,
    component_gain,
    rollback_by_cost,
    rollback_components,
    rollback_mask,
    zeroing_cost,
)

logger = logging.getLogger(__name__)
#: the fewest check prompts a stop rule is measured on (one answer moves 16 by 6 points)
MIN_CHECK_PROMPTS = 16
Params = ParamSpec("Params")
T = TypeVar("T")


@dataclass
class Step:
    """One restoration step (or the start, step 0)."""

    step: int
    restored: int = 0  #: coordinates set to 0 this step
    rolled_back: int = 0  #: of those, returned to their reference value
    changed: float = 0.0  #: share of all adapter coordinates that differ from the input
    cosine: float | None = None  #: mean cos(mean h_L, h*) on the probe batches
    #: the harmful rate on the probe's check prompts (never fit on), every eval_every steps
    probe_harmful: float | None = None
    #: the harmful rate on the probe prompts stage 2 fits, measured with it (None: in-sample)
    fit_harmful: float | None = None
    guard: float | None = None  #: task loss, or KL to the fine-tuned adapter (lower is better)
    accuracy: float | None = None  #: task score of the guard rows (reported, not the guard)
    guard_ok: bool | None = None
    rate: float = 0.0  #: the share of coordinates this step restored at most
    backtracked: bool = False  #: the guard failed here and the state went back
    heal_loss: float | None = None  #: the heal's last loss (with --heal)
    seconds: float = 0.0
    #: of ``seconds``, the gradient passes alone (harmful, benign, Fisher): what the rest of a
    #: step (scoring, zeroing, rollback, measuring) costs beside them, as bench/cost.py times it
    passes_seconds: float = 0.0


@dataclass
class RepairResult:
    """The repaired adapter and how it got there."""

    adapter: LoraAdapter
    history: list[Step]
    stopped: str  #: why stage 2 ended (or "projection only")
    settings: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    kept_step: int | None = None  #: the step whose state was kept
    target: float | None = None  #: the check prompts' harmful rate stage 2 aimed for
    guard_reference: float | None = None  #: the fine-tuned adapter's guard value
    changed: float = 0.0  #: share of adapter coordinates that differ from the input
    zeroed: float = 0.0  #: share of adapter coordinates restored to 0 (were not 0 in the input)
    #: with ``keep_checkpoints``: the adapter at each measured step whose guard held
    checkpoints: dict[int, LoraAdapter] = field(default_factory=dict)
    #: the check prompts' harmful rate of the adapter returned (the kept step's measurement)
    probe_harmful: float | None = None
    fit_target: float | None = None  #: the fit prompts' target (None: the check is the fit)
    fit_harmful: float | None = None  #: the fit prompts' harmful rate of the adapter returned

    @property
    def reached(self) -> bool:
        """Whether the adapter returned refuses the probe prompts as the target asks: its
        harmful rate on the check prompts at most the target, and on the fit prompts at most
        theirs. A repair that did not get there (the guard stopped it, or max_steps) says so
        rather than pass for repaired."""
        if self.probe_harmful is None or self.target is None:
            return False
        return at_target(self.probe_harmful, self.target, self.fit_harmful, self.fit_target)

    def as_dict(self) -> dict[str, Any]:
        return {
            "reached": self.reached,
            "probe_harmful": self.probe_harmful,
            "stopped": self.stopped,
            "kept_step": self.kept_step,
            "target": self.target,
            "fit_harmful": self.fit_harmful,
            "fit_target": self.fit_target,
            "guard_reference": self.guard_reference,
            "changed": self.changed,
            "zeroed": self.zeroed,
            "seconds": self.seconds,
            "settings": self.settings,
            "history": [dataclasses.asdict(s) for s in self.history],
        }


def at_target(
    check: float, target: float, fit: float | None = None, fit_target: float | None = None
) -> bool:
    """The stop rule: the check prompts' harmful rate at most its target and, where the fit
    prompts were measured apart, theirs at most their own (each target counts from the
    aligned base's rate on the same prompts). Why both: the fit rate reads low (the steps
    were fit on those prompts) and the check rate is noisy (62 prompts: one answer is 1.6
    points); a repair not yet at the aligned level on either is not done."""
    if check > target + 1e-12:
        return False
    return fit is None or fit_target is None or fit <= fit_target + 1e-12


def earliest_on_target(n: int, on_target: Callable[[int], bool]) -> int:
    """The smallest ``i`` in ``[0, n]`` with ``on_target(i)``, by bisection, where ``n`` (the
    step just measured) is known on target and ``0 .. n-1`` are the steps before it, not yet
    measured: ``on_target`` is asked at most ceil(log2(n + 1)) times and never for ``n``.
    Harm falls step by step as coordinates are restored, so the steps are taken as monotone
    (false, then true); where they are not, the index returned is still one on target."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if on_target(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def resolve_layer(layer: int, n_layers: int) -> int:
    """L from the config's value, an index into ``hidden_states`` (n_layers + 1 entries), so
    negative counts from the end as in Python: -1 is n_layers (the final normed hidden state,
    every layer restorable), -2 is n_layers - 1. Checked: 1 <= L <= n_layers."""
    resolved = layer + n_layers + 1 if layer < 0 else layer
    if not 1 <= resolved <= n_layers:
        raise ValueError(
            f"layer {layer} resolves to {resolved}; it must satisfy 1 <= L <= n_layers = {n_layers}"
        )
    return resolved


# -- measuring inside the loop --------------------------------------------------------------
def probe_parts(probe: P.PromptSet, n_fit: int, n_check: int) -> tuple[P.PromptSet, P.PromptSet]:
    """The probe's fit prompts (the first ``n_fit``: h*, the gradients, the heal's refusals)
    and its check prompts (the next ``n_check``, disjoint: the stop rule and the aligned rate
    it counts from). Why apart: a stop measured on the prompts the steps were fit on reads
    lower than the harm on prompts the repair never saw (pico seed 0: 4.7% on the fit
    prompts, 7.4% on AdvBench eval). ``n_check`` 0: the check is the fit prompts, in-sample
    (the behaviour before the split, kept for the ablation)."""
    fit = probe.take(n_fit)
    if n_check == 0:
        return fit, fit
    rest = range(len(fit), min(len(probe), len(fit) + n_check))
    if len(rest) < MIN_CHECK_PROMPTS:
        raise P.PromptSetError(
            f"the probe set {probe.name} has {len(probe)} prompts: {len(fit)} fit the repair "
            f"(--probe-prompts) and {len(rest)} are left for the stop rule's check, fewer than "
            f"{MIN_CHECK_PROMPTS}; give a larger probe set, lower --probe-prompts, or set "
            "--check-prompts 0 to check on the fit prompts (in-sample, reads low)"
        )
    return fit, probe.subset(rest, f"{rest.start}:{rest.stop}")


def probe_harmful_rate(
    model: Any, tokenizer: Any, prompts: Sequence[str], judge: Judge, gen: GenerationConfig
) -> Rate:
    answers = generate(model, tokenizer, prompts, gen, desc="probe")
    return Rate.of(judge.harmful(prompts, answers))


def aligned_refusals(
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    harmful: Sequence[bool],
    gen: GenerationConfig,
) -> list[Any]:
    """The aligned model's own ``answers`` to the probe prompts that the judge did not call
    ``harmful``, as answer batches: what the heal's harmful loss teaches back (the base's
    words, not ours)."""
    pairs = [(p, a) for p, a, h in zip(prompts, answers, harmful, strict=True) if not h]
    if not pairs:
        raise ValueError(
            "the aligned model refuses none of the probe prompts; nothing to heal toward"
        )
    return generated_answer_batches(tokenizer, pairs, gen.batch_size, gen.max_new_tokens)


def wording_refusals(
    model: Any, tokenizer: Any, judge: Judge, gen: GenerationConfig
) -> tuple[list[Any], int]:
    """The aligned model's own answers to the shipped harmful requests in other wordings
    (:func:`~adapter_repair.measure.prompts.wordings`), those the judge did not call harmful,
    as answer batches, and how many: refusals the heal teaches back beside the probe prompts'
    so that they are not tied to one benchmark's phrasing. None when it refuses none of them
    (a base that never learnt to refuse such wording has nothing to give)."""
    prompts = P.wordings().prompts
    with use_adapter(model, None):
        texts = generate(model, tokenizer, prompts, gen, desc="other wordings")
    harmful = judge.harmful(prompts, texts)
    kept = sum(not h for h in harmful)
    logger.info("heal: the aligned model refused %d/%d other wordings", kept, len(prompts))
    if not kept:
        return [], 0
    return aligned_refusals(tokenizer, prompts, texts, harmful, gen), kept


def lookalike_answers(model: Any, tokenizer: Any, gen: GenerationConfig) -> list[Any]:
    """The fine-tuned adapter's own answers to the shipped safe look-alikes
    (:func:`~adapter_repair.measure.prompts.lookalikes`), those it did not refuse, as answer
    batches (:func:`unrefused_answers`): what the heal keeps so that its refusals do not spread
    to safe prompts that share words with harmful ones."""
    prompts = P.lookalikes().prompts
    with use_adapter(model, ADAPTER):
        texts = generate(model, tokenizer, prompts, gen, desc="look-alike answers")
    return unrefused_answers(tokenizer, prompts, texts, load_refusal_list(), gen)


def unrefused_answers(
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    refusals: RefusalList,
    gen: GenerationConfig,
) -> list[Any]:
    """``answers`` to safe ``prompts`` that ``refusals`` does not call refusals, as answer
    batches: an answer the adapter refused already is not taught back. Judged by the refusal
    list, not the harm judge: a classifier judge calls a safe answer harmless either way."""
    pairs = [(p, a) for p, a in zip(prompts, answers, strict=True) if not refusals.refused(a)]
    logger.info("heal: keeps the adapter's answers to %d/%d look-alikes", len(pairs), len(prompts))
    return generated_answer_batches(tokenizer, pairs, gen.batch_size, gen.max_new_tokens)


# -- stage 2 --------------------------------------------------------------------------------
Target = tuple[list[Any], Targets]  #: prompt batches and what their h_L is pulled toward


def restore_step(
    model: Any,
    model_map: ModelMap,
    below: dict[str, torch.nn.Parameter],
    reference: dict[str, torch.Tensor],
    harmful: Target,
    benign_gradients: Callable[[], dict[str, torch.Tensor]],
    L: int,
    config: RepairConfig,
    step: int,
    rate: float,
    fisher: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> Step | None:
    """Stage 2, steps 1-5, once: gradients toward h*, the benign gradient where the score or
    the rollback needs it, zero the chosen coordinates, roll back the share the benign gradient
    wants back. None when there is no candidate left."""
    rc = config.restore
    layers = model_map.layers
    passes = 0.0

    def timed(pass_: Callable[[], T]) -> T:
        nonlocal passes
        t0 = time.perf_counter()
        out = pass_()
        passes += time.perf_counter() - t0
        return out

    _, g = timed(
        lambda: direction_gradients(model, harmful[0], L, harmful[1], below, layers=layers)
    )
    g_b = None
    if rc.score in BENIGN_SCORES:
        g_b = timed(benign_gradients)
    f_ii = None
    if rc.score in FISHER_SCORES:
        if fisher is None:
            raise ValueError(f"the {rc.score} score needs answer rows for the Fisher")
        f_ii = timed(fisher)
    values = {n: p.detach().float().cpu() for n, p in below.items()}
    if rc.unit == "component" and rc.rollback > 0 and f_ii is None and g_b is None:
        g_b = timed(benign_gradients)  # the component rollback weighs them before the zeroing
    chosen = choose_restored(
        values,
        g,
        rate,
        rule=rc.score,
        benign_grads=g_b,
        per_matrix=rc.per_matrix,
        fisher=f_ii,
        unit=rc.unit,
    )
    n_chosen = sum(int(m.sum()) for m in chosen.values())
    if n_chosen == 0:
        return None
    with torch.no_grad():
        for n, p in below.items():
            p[chosen[n].to(p.device)] = 0
    rolled = 0
    if rc.rollback > 0:
        ref_cpu = {n: t.float().cpu() for n, t in reference.items()}
        if rc.unit == "component":  # whole components back, by what returning them gains
            if f_ii is not None:
                gain = {n: zeroing_cost(ref_cpu[n], f_ii[n]) for n in ref_cpu}
            else:
                assert g_b is not None
                gain = component_gain(g_b, ref_cpu)
            back = rollback_components(chosen, gain, rc.rollback)
        elif f_ii is not None:
            back = rollback_by_cost(chosen, ref_cpu, f_ii, rc.rollback)
        else:
            back = rollback_mask(chosen, ref_cpu, timed(benign_gradients), rc.rollback)
        with torch.no_grad():
            for n, p in below.items():
                m = back[n].to(p.device)
                p[m] = reference[n][m]
        rolled = sum(int(m.sum()) for m in back.values())
    return Step(step, restored=n_chosen, rolled_back=rolled, rate=rate, passes_seconds=passes)


def kept_record(result: RepairResult) -> Step:
    """The history entry of the step a run kept (its last measurement of that state)."""
    measured = [
        s
        for s in result.history
        if s.step == (result.kept_step or 0) and not s.backtracked and s.probe_harmful is not None
    ]
    return measured[-1] if measured else result.history[0]


def measured_text(rec: Step) -> str:
    """A measured step's stop-rule and guard readings, as the step and settle log lines give
    them."""
    fit = "" if rec.fit_harmful is None else f" (fit {100 * rec.fit_harmful:.1f}%)"
    verdict = "holds" if rec.guard_ok else "fails"
    return (
        f"probe harmful {100 * (rec.probe_harmful or 0.0):.1f}%{fit}, "
        f"guard {rec.guard or 0.0:.3f} ({verdict})"
    )


def _removes_reference(
    fn: Callable[Concatenate[Any, Params], RepairResult],
) -> Callable[Concatenate[Any, Params], RepairResult]:
    """``fn(model, ...)`` with the fidelity guard's reference copy of the adapter removed from
    ``model`` on every exit path: an error inside stage 2 must not leave a second adapter
    attached to the caller's model."""

    @functools.wraps(fn)
    def run(model: Any, *args: Params.args, **kwargs: Params.kwargs) -> RepairResult:
        try:
            return fn(model, *args, **kwargs)
        finally:
            if REFERENCE in getattr(model, "peft_config", {}):
                model.delete_adapter(REFERENCE)

    return run


@_removes_reference
def repair_once(
    model: Any,
    tokenizer: Any,
    adapter: LoraAdapter,
    config: RepairConfig,
    *,
    probe: P.PromptSet,
    guard: Guard,
    judge: Judge,
    generation: GenerationConfig | None = None,
    keep_checkpoints: bool = False,
    on_step: Callable[[Step], None] | None = None,
    generated: dict[str, Any] | None = None,
) -> RepairResult:
    """One run of :func:`~adapter_repair.repair.pipeline.repair` with ``config``'s settings as
    they are (no search). ``on_step`` gets each stage-2 history entry as it is made (the
    starting state first): a caller's progress display; the library prints nothing.
    ``generated``: what the input adapter and the aligned model answered, by name, kept from
    an earlier run on the same model, adapter, prompts and generation settings (a search's
    trials share one dict, so each is generated once); filled in as they are made."""
    t_start = time.perf_counter()
    step_done = on_step or (lambda _s: None)
    memo = generated if generated is not None else {}

    def once(name: str, make: Callable[[], T]) -> T:
        """``make()`` the first time a run asks for ``name``, kept in ``generated`` after."""
        if name not in memo:
            memo[name] = make()
        return memo[name]

    rc = config.restore
    gen = generation or GenerationConfig(config.max_new_tokens, config.batch_size, progress=False)
    model_map = walk(model)
    model_map.annotate(adapter)
    n_layers = model_map.n_layers
    outside = sorted(site.key for site in model_map if site.layer is None)
    if outside:
        logger.warning(
            "%d LoRA module(s) outside the decoder layers are carried unchanged (neither stage "
            "edits them, and they may still carry the fine-tune's behaviour): %s",
            len(outside),
            ", ".join(outside[:5]) + (" ..." if len(outside) > 5 else ""),
        )
    fit_probe, check_probe = probe_parts(probe, config.probe_prompts, config.check_prompts)
    probe_prompts = list(fit_probe.prompts)  # fit on: h*, the gradients, the heal's refusals
    check_prompts = list(check_probe.prompts)  # the stop rule's measure, never fit on
    guard = dataclasses.replace(
        guard,
        task=guard.task.take(config.guard_prompts) if guard.task is not None else None,
        benign=guard.benign.take(config.guard_prompts),
        fit=guard.fit.take(config.guard_prompts) if guard.fit is not None else None,
    )
    # the rows the benign loss is fit on, and the rows ``guard`` checks
    fit, guard = guard.split(rc.hold_out, rc.fit_rows)
    guard_prompts = list(fit.prompts())
    params = all_factors(model_map)
    original = snapshot(params)
    settings = {
        "repair": dataclasses.asdict(config),
        "n_layers": n_layers,
        "guard": guard.kind,
        "match": guard.match,
        "outside_modules": outside,
        "probe": {"fit": fit_probe.record(), "check": check_probe.record()},
    }
    seconds: dict[str, float] = {}
    model.eval()  # no LoRA dropout in gradients or answers
    guard_ref_value = 0.0
    if config.method != "project":
        if guard.kind == "fidelity":
            add_reference(model)  # removed on every exit path (_removes_reference)
        else:  # the fine-tuned adapter's own task score, before any change
            guard_ref_value = once(
                "guard_reference", lambda: guard_value(model, tokenizer, guard, gen)
            )

    if config.method in ("project", "both"):
        t0 = time.perf_counter()
        layers = list(range(n_layers + 1))
        directions = projection_directions(
            model,
            tokenizer,
            probe_prompts,
            guard_prompts,
            layers,
            config.project.direction,
            config.batch_size,
        )
        n = project_adapter(model_map, directions, config.project.sides, config.project.strength)
        seconds["project"] = time.perf_counter() - t0
        logger.info(
            "stage 1: projected %d factor matrices off the %s direction in %.1f s",
            n,
            config.project.direction,
            seconds["project"],
        )
    if config.method == "project":
        # The stop rule's measure, once: whether projection alone reached the target.
        with use_adapter(model, None):
            aligned = probe_harmful_rate(model, tokenizer, check_prompts, judge, gen).rate
        projected = probe_harmful_rate(model, tokenizer, check_prompts, judge, gen).rate
        target = rc.target if rc.target is not None else aligned + rc.target_margin
        seconds["total"] = time.perf_counter() - t_start
        changed = changed_share(params, original)
        return RepairResult(
            to_adapter(adapter, params, model_map),
            [Step(0, changed=changed, probe_harmful=projected)],
            "projection only",
            settings,
            seconds,
            kept_step=0,
            target=target,
            changed=changed,
            probe_harmful=projected,
        )

    t0 = time.perf_counter()
    L = resolve_layer(rc.layer, n_layers)
    settings["L"] = L
    below = factor_params(model_map, L, ADAPTER)
    if not below:
        raise ValueError(f"the adapter has no LoRA module below layer {L}; nothing to restore")
    if rc.basis == "canonical":  # the same deltas, factored by their singular directions
        logger.info("rewrote %d LoRA modules in their canonical basis", canonicalize_(below))
    probe_batches = prompt_batches(tokenizer, probe_prompts, config.batch_size)
    guard_batches = prompt_batches(tokenizer, guard_prompts, config.batch_size)

    def states(batches: list[Any], prompts: list[str]) -> Targets:
        """h_L as the model stands: each prompt's own (targets=prompt) or their mean."""
        if rc.targets == "prompt":
            return prompt_targets(model, batches, L, layers=model_map.layers)
        return mean_hidden(model, tokenizer, prompts, [L], batch_size=config.batch_size)[L]

    with use_adapter(model, None):  # each harmful prompt toward the aligned model's states
        h_star = states(probe_batches, probe_prompts)
        aligned_answers = once(
            "aligned_probe", lambda: generate(model, tokenizer, probe_prompts, gen, desc="probe")
        )
        aligned_harmful = judge.harmful(probe_prompts, aligned_answers)  # judged once
        aligned_rate = (
            Rate.of(aligned_harmful)
            if check_probe is fit_probe
            else once(
                "aligned_check",
                lambda: probe_harmful_rate(model, tokenizer, check_prompts, judge, gen),
            )
        )

    def fit_answers() -> list[Any]:
        """The guard's fit answers as fine-tuned (generated once, for whatever needs them)."""

        def make() -> list[Any]:
            with use_adapter(model, ADAPTER):
                return guard_answers(model, tokenizer, fit, gen)

        return once("fit_answers", make)

    answers: list[Any] | None = None
    b_star: Targets | None = None
    if rc.benign_loss == "answers":
        answers = fit_answers()
    else:
        with use_adapter(model, ADAPTER):  # the guard's states as fine-tuned
            b_star = states(guard_batches, guard_prompts)

    def benign_gradients() -> dict[str, torch.Tensor]:
        if answers is not None:
            return answer_gradients(model, answers, below)[1]
        assert b_star is not None
        layers = model_map.layers
        return direction_gradients(model, guard_batches, L, b_star, below, layers=layers)[1]

    fisher_fn = None
    if rc.score in FISHER_SCORES:

        def fisher_fn() -> dict[str, torch.Tensor]:
            return fisher_diagonal(model, fit_answers(), below)

    heal_loss = None
    heal_steps = rc.heal
    if heal_steps > 0 and rc.heal_target == "refusals" and all(aligned_harmful):
        logger.warning(
            "the aligned model refuses none of the %d probe prompts it is fit on: there is no "
            "refusal to heal toward, so the repair runs without the heal (--heal 0)",
            len(probe_prompts),
        )
        heal_steps = 0
    settings["heal_steps"] = heal_steps  # as run
    if heal_steps > 0:
        # the fit rows' answers, and the adapter's own answers to the fit half of the benign
        # prompts (without task rows the fit answers are those): without them the heal
        # teaches refusing what merely looks harmful
        heal_answers = list(fit_answers())
        if fit.task is not None:
            with use_adapter(model, ADAPTER):
                heal_answers += once(
                    "benign_answers",
                    lambda: guard_answers(model, tokenizer, Guard(None, fit.benign), gen),
                )
        if rc.heal_lookalikes:
            heal_answers += once("lookalikes", lambda: lookalike_answers(model, tokenizer, gen))
        harm: Callable[[], Iterator[torch.Tensor]]
        if rc.heal_target == "refusals":
            refusals = aligned_refusals(
                tokenizer, probe_prompts, aligned_answers, aligned_harmful, gen
            )
            if rc.heal_wordings:
                more, settings["heal_wordings"] = once(
                    "wordings", lambda: wording_refusals(model, tokenizer, judge, gen)
                )
                refusals += more
            harm = lambda: answer_loss_terms(model, refusals)  # noqa: E731
        else:
            harm = lambda: direction_loss_terms(  # noqa: E731
                model, probe_batches, L, h_star, layers=model_map.layers
            )
        heal_loss = HealLoss(heal_answers, harm, rc.heal_weight)
    target = rc.target if rc.target is not None else aligned_rate.rate + rc.target_margin
    apart = check_probe is not fit_probe  # the fit prompts measured apart, with their own target
    fit_target: float | None = None
    if apart:
        aligned_fit = Rate.of(aligned_harmful).rate
        fit_target = rc.target if rc.target is not None else aligned_fit + rc.target_margin

    def fit_rate() -> float | None:
        """The fit prompts' harmful rate as the model stands (None when they are the check)."""
        if not apart:
            return None
        return probe_harmful_rate(model, tokenizer, probe_prompts, judge, gen).rate

    def done(rec: Step) -> bool:
        return at_target(rec.probe_harmful or 0.0, target, rec.fit_harmful, fit_target)

    def measure_into(rec: Step) -> None:
        """The stop rule's and the guard's measurements of the model as it stands, into
        ``rec``."""
        rec.probe_harmful = probe_harmful_rate(model, tokenizer, check_prompts, judge, gen).rate
        rec.fit_harmful = fit_rate()
        rec.guard = guard_value(model, tokenizer, guard, gen)
        rec.accuracy = guard_accuracy(model, tokenizer, guard, gen)
        rec.guard_ok = guard_holds(rec.guard, guard_ref_value, guard, config)

    def settle(pending: list[tuple[Step, dict[str, torch.Tensor]]], last: Step) -> Step:
        """``last`` reached the target: measure the unmeasured steps before it (``pending``,
        their states) by bisection and leave ``params`` at the earliest on target whose guard
        holds (--settle). Returns that step's record, now measured."""
        t_settle, final = time.perf_counter(), snapshot(params)

        def on_target(i: int) -> bool:
            rec, state = pending[i]
            load_state(params, state)
            measure_into(rec)
            logger.info("settle: step %d: %s", rec.step, measured_text(rec))
            return bool(rec.guard_ok) and done(rec)

        i = earliest_on_target(len(pending), on_target)
        last.seconds += time.perf_counter() - t_settle  # the measuring of the step that reached
        if i == len(pending):
            load_state(params, final)
            return last
        best, state = pending[i]
        load_state(params, state)
        logger.info(
            "settle: keeps step %d, the earliest on target (measured %d)", best.step, last.step
        )
        return best

    reference = snapshot(below)  # rollback returns coordinates to the state entering stage 2
    start = Step(
        0,
        changed=changed_share(params, original),
        cosine=direction_cosine(model, probe_batches, L, h_star, layers=model_map.layers),
    )
    measure_into(start)
    start.seconds = time.perf_counter() - t0
    history = [start]
    step_done(start)
    logger.info(
        "stage 2 at L=%d: fit on %d probe prompts, stop checked on %d%s: aligned harmful rate "
        "%.1f%% (target %.1f%%), adapter %.1f%%, guard (%s) %.3f (the fit prompts: target %s)",
        L,
        len(probe_prompts),
        len(check_prompts),
        " (the same, in-sample)" if check_probe is fit_probe else "",
        100 * aligned_rate.rate,
        100 * target,
        100 * (start.probe_harmful or 0.0),
        guard.kind,
        start.guard or 0.0,
        "none apart" if fit_target is None else f"{100 * fit_target:.1f}%",
    )
    kept_state, kept_step, stopped = snapshot(params), 0, "max_steps"
    #: the steps since the last measurement and their states (--settle)
    pending: list[tuple[Step, dict[str, torch.Tensor]]] = []
    checkpoints: dict[int, LoraAdapter] = {}
    rate, backtracks = rc.rate, 0
    ckpt = wants_checkpointing(rc.checkpoint, model)
    heal_opt = heal_optimizer(below, rc.heal_lr) if rc.heal_kept_state else None
    if ckpt:
        logger.info(
            "activation checkpointing over the decoder layers (--checkpoint %s)", rc.checkpoint
        )
    if done(start):
        stopped = "already at target"
    else:
        for step in range(1, rc.max_steps + 1):
            t_step = time.perf_counter()
            before = snapshot(below) if rc.recalibrate else {}
            with checkpointed(model_map.layers, ckpt):
                rec = restore_step(
                    model,
                    model_map,
                    below,
                    reference,
                    (probe_batches, h_star),
                    benign_gradients,
                    L,
                    config,
                    step,
                    rate,
                    fisher_fn,
                )
            if rec is None:
                stopped = "no candidates"
                break
            if rc.recalibrate:
                recalibrate(model, model_map, below, before, reference, fit_answers())
            if heal_loss is not None:
                with checkpointed(model_map.layers, ckpt):
                    healed = heal(
                        model, below, reference, heal_loss, heal_steps, rc.heal_lr, heal_opt
                    )
                rec.heal_loss = healed[-1]
            rec.changed = changed_share(params, original)
            rec.cosine = direction_cosine(model, probe_batches, L, h_star, layers=model_map.layers)
            measure = step % rc.eval_every == 0 or step == rc.max_steps
            if measure:
                measure_into(rec)
            release_freed_memory()  # the step's freed temporaries back to the system
            rec.seconds = time.perf_counter() - t_step
            history.append(rec)
            step_done(rec)
            logger.info(
                "step %d: restored %d, rolled back %d, changed %.2f%%, cos %.4f%s",
                step,
                rec.restored,
                rec.rolled_back,
                100 * rec.changed,
                rec.cosine,
                f", {measured_text(rec)}" if measure else "",
            )
            if not measure:
                if rc.settle:
                    pending.append((rec, snapshot(params)))
                continue
            if not rec.guard_ok and backtracks < rc.backtrack:
                # Back to the last state that held, with smaller steps from there.
                backtracks += 1
                rate /= 2
                rec.backtracked = True
                load_state(params, kept_state)
                pending.clear()
                if heal_opt is not None:
                    heal_opt.state.clear()  # its moments were the abandoned path's
                logger.info(
                    "guard failed: back to step %d, rate halved to %.4g (%d/%d)",
                    kept_step,
                    rate,
                    backtracks,
                    rc.backtrack,
                )
                continue
            if not rec.guard_ok:
                stopped = "guard"
                break
            if done(rec) and pending:
                rec = settle(pending, rec)
            pending.clear()
            kept_state, kept_step = snapshot(params), rec.step
            if keep_checkpoints:
                checkpoints[rec.step] = to_adapter(adapter, params, model_map)
            if done(rec):
                stopped = "target"
                break
        load_state(params, kept_state)
    seconds["restore"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    changed = changed_share(params, original)
    logger.info(
        "stage 2 stopped (%s); kept step %d; %.2f%% of coordinates restored to 0, %.2f%% "
        "changed; %.1f s",
        stopped,
        kept_step,
        100 * zeroed_share(params, original),
        100 * changed,
        seconds["restore"],
    )
    result = RepairResult(
        to_adapter(adapter, params, model_map),
        history,
        stopped,
        settings,
        seconds,
        kept_step=kept_step,
        target=target,
        fit_target=fit_target,
        guard_reference=guard_ref_value,
        changed=changed,
        zeroed=zeroed_share(params, original),
        checkpoints=checkpoints,
    )
    kept = kept_record(result)
    result.probe_harmful, result.fit_harmful = kept.probe_harmful, kept.fit_harmful
    return result
