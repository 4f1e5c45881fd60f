"""Which rows bench/repair.py makes: the adapters, our methods, the comparison methods and
the ablation's variants, each variant by the settings it moves. Outside the rows' code digest
(bench/repair_runs.py): every row's key holds its resolved settings, so adding a variant adds
rows and changing one reruns exactly its rows, and the rest stay.
"""

from __future__ import annotations

from typing import Any

#: the adapters every comparison method and ablation variant runs on (ours runs on all ten)
COMPARE_ADAPTERS = ("k100-r8", "k250-r16", "k25-r16")
METHODS = ("project", "restore", "both")  #: ours
OURS = ("restore",)  #: what runs on every zoo adapter by default
#: for comparison (bench/baselines.py), on COMPARE_ADAPTERS
BASELINES = (
    "published",
    "safelora",
    "safelora-0.5",  # shares of modules projected: ours against it at equal task score
    "safelora-0.25",
    "dense",
    "irr",
    "oneshot",
)
#: the published method moved to adapter rank: its score, loss and stop, every lever off
PUBLISHED: dict[str, Any] = {
    "score": "grad",
    "targets": "mean",
    "benign_loss": "direction",
    "backtrack": 0,
    "heal": 0,
}
#: the ablation: restore with one lever moved from repair_config's settings
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "restore-ratio": ("score ratio (|g| / |g_b|)", {"score": "ratio"}),
    "restore-grad": ("score grad (|g|, published)", {"score": "grad"}),
    "restore-fisher": (
        "score fisher (g x value against 1/2 F value^2, F the per-row task Fisher)",
        {"score": "fisher"},
    ),
    "restore-no-rollback": ("no rollback", {"rollback": 0.0}),
    "restore-mean": ("targets mean (published loss)", {"targets": "mean"}),
    "restore-per-matrix": ("scores normalised per factor matrix", {"per_matrix": True}),
    "restore-canonical": ("canonical basis (U sqrt(S), sqrt(S) V^T)", {"basis": "canonical"}),
    "restore-components": (
        "whole singular components restored (canonical basis, unit component)",
        {"basis": "canonical", "unit": "component"},
    ),
    "restore-recalibrate": (
        "OBS recalibration of the kept coordinates after each step",
        {"recalibrate": True},
    ),
    "restore-heal": ("heal 5 (masked steps on kept coordinates, aligned refusals)", {"heal": 5}),
    "restore-rate0.005": ("rate 0.005 a step (up to 40 steps)", {"rate": 0.005}),
    "restore-steps20": ("at most 20 steps (the default until 66462e2)", {"max_steps": 20}),
    "restore-heal1": ("heal 1 (one masked step after each restoration step)", {"heal": 1}),
    "restore-no-heal": ("no heal (restoration steps alone, as published)", {"heal": 0}),
    "restore-no-lookalikes": (
        "heal 1 without the safe look-alikes among the answers it keeps",
        {"heal": 1, "heal_lookalikes": False},
    ),
    "restore-no-wordings": (
        "heal 1 without the refusals to the harmful requests in other wordings",
        {"heal": 1, "heal_wordings": False},
    ),
    "restore-kept-state": (
        "the heal's Adam moments kept across the restoration steps (the default: a fresh Adam"
        " each step)",
        {"heal_kept_state": True},
    ),
    "restore-no-settle": (
        "no settle: the step measured on target is kept, not the earliest on target since the"
        " last measurement",
        {"settle": False},
    ),
    "restore-heal1-every1": (
        "heal 1, the probe rate checked every step (stops at the first step on target: the"
        " heal reached it by step 5 and overshot the aligned base's refusals)",
        {"heal": 1, "eval_every": 1},
    ),
    "restore-heal1-lr1e-4": (
        "heal 1 at learning rate 1e-4 (3e-4)",
        {"heal": 1, "heal_lr": 1e-4},
    ),
    "restore-heal1-w0.3": (
        "heal 1, its harmful loss weighted 0.3 (1.0) against the answers it keeps",
        {"heal": 1, "heal_weight": 0.3},
    ),
    "restore-heal-w0.3": (
        "heal 5, its harmful loss weighted 0.3 against the answers it keeps",
        {"heal": 5, "heal_weight": 0.3},
    ),
    "restore-check0": (
        "stop measured on the probe prompts stage 2 fits (in-sample; before the fit / check split)",
        {"check_prompts": 0},
    ),
    "restore-margin0.02": (
        "target margin 0.02 (one probe answer more than the aligned base's; the default until"
        " 66462e2)",
        {"target_margin": 0.02},
    ),
}
#: the variants a plain run measures: one per lever the issue names (second-order score, OBS
#: recalibration, canonical basis, singular components, no heal, targets mean, per-matrix
#: top-k, a smaller rate) and one per lever added since (the heal without its look-alikes or
#: without its other wordings, no settle). Each costs about 40-55 min per adapter here (a
#: restoration step about 4-5 min, two thirds of it the heal's pass over the answers it keeps;
#: profiled with py-spy on k25-r16), so the rest run when named (--variants all): heal (5 heal
#: steps a restoration step: about 2.5 h per adapter), check0 and margin0.02 (the stop's
#: earlier defaults), heal1-every1, heal1-lr1e-4, heal1-w0.3, heal-w0.3, kept-state, ratio,
#: grad, no-rollback, heal1 (the default), and steps20 (fewer steps: the same as the default
#: wherever the default stops before step 20, as it did on k100-r8 and k250-r16 at adf2af55e326)
DEFAULT_VARIANTS = (
    "restore-fisher",
    "restore-recalibrate",
    "restore-canonical",
    "restore-components",
    "restore-no-heal",
    "restore-mean",
    "restore-per-matrix",
    "restore-rate0.005",
    "restore-no-lookalikes",
    "restore-no-wordings",
    "restore-no-settle",
)
