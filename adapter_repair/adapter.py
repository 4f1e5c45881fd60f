"""A PEFT LoRA adapter folder as a typed object, loaded with validation and saved atomically.

Why its own model instead of a PeftModel: the repair stages are pure functions over the
adapter factors (A, B), and the checks on bad input must run before any model is loaded, so a
7B base is never loaded only to learn that the adapter file is truncated.

Only safetensors are read: a pickle-only adapter (``adapter_model.bin``) is refused, since
unpickling runs arbitrary code.

One module though over 400 lines: the folder format is one contract (config keys, tensor
names, ranks and their patterns, carried files) that reading, validating and writing must
agree on.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapter_repair.errors import AdapterFormatError, UnsupportedAdapterError

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
#: PEFT prefixes every saved key with this; the rest is the module path in the base model.
PEFT_PREFIX = "base_model.model."
REQUIRED_CONFIG_KEYS = ("peft_type", "r", "lora_alpha")
#: Other files of an adapter folder (card, tokenizer, chat template) are carried through a
#: repair unchanged, up to this size each; larger ones are left behind with a warning.
MAX_CARRIED_FILE_BYTES = 64 * 2**20

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>A|B)\.weight$")
#: What a QLoRA adapter's folder says of the base it was trained over. PEFT's model card
#: lists "The following `bitsandbytes` quantization config was used during training:" with
#: ``load_in_4bit: True``; TRL, Axolotl and Unsloth cards carry the same keys or name a
#: pre-quantized ``*-bnb-4bit`` base.
_CARD_4BIT = re.compile(r"load_in_4bit\W{0,4}true", re.IGNORECASE)
_CARD_8BIT = re.compile(r"load_in_8bit\W{0,4}true", re.IGNORECASE)
_BASE_4BIT = re.compile(r"bnb[-_]?4bit|[-_](?:nf4|4bit)(?:$|[-_])", re.IGNORECASE)


class Role(str, enum.Enum):
    """How a LoRA module meets the residual stream."""

    READ = "read"  #: input is the (normalised) residual stream: q, k, v, gate, up
    WRITE = "write"  #: output is added to the residual stream: o, down
    READ_WRITE = "read_write"  #: both (a single linear from stream to stream)
    INTERNAL = "internal"  #: neither, inside a decoder layer
    OUTSIDE = "outside"  #: not inside any decoder layer (e.g. lm_head)


@dataclass
class LoraModule:
    """One LoRA module: the update ``scaling * B @ A`` added to a base linear layer.

    ``layer`` (decoder layer index) and ``role`` (how it meets the residual stream) are not
    stored in the adapter file; :meth:`adapter_repair.model.walk.ModelMap.annotate` fills them from
    the model the adapter is attached to.
    """

    key: str  #: PEFT module path, e.g. ``base_model.model.model.layers.0.self_attn.q_proj``
    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    alpha: float
    scaling: float
    layer: int | None = None
    role: Role | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.A.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.B.shape[0])

    @property
    def base_name(self) -> str:
        """The module's path in the base model (what PEFT's patterns are matched against)."""
        return self.key.removeprefix(PEFT_PREFIX)

    def delta(self) -> torch.Tensor:
        """The dense update ``s B A``, (d_out, d_in). For tests and small models only."""
        return self.scaling * (self.B.float() @ self.A.float())


@dataclass
class LoraAdapter:
    """A LoRA adapter: its config as saved, its modules, and everything else it carries."""

    config: dict[str, Any]
    modules: dict[str, LoraModule]
    #: Tensors that are not LoRA factors (``modules_to_save`` copies), carried through as-is.
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    #: The safetensors header metadata.
    metadata: dict[str, str] = field(default_factory=dict)
    #: Other small files of the folder (model card, tokenizer files), by name.
    files: dict[str, bytes] = field(default_factory=dict)
    source: Path | None = None

    @property
    def rank(self) -> int:
        """The config's default rank ``r`` (modules may differ through ``rank_pattern``)."""
        return int(self.config["r"])

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def base_model_name_or_path(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return str(value) if value else None

    def trained_quant(self) -> tuple[str | None, str]:
        """The precision of the base this adapter was trained over, as its folder records it:
        ``("4bit" | "8bit" | None, why)``. An adapter is used over the base it was trained on
        (a QLoRA adapter over the 4-bit base), and its refusals differ between precisions, so
        the repair measures at this one unless told otherwise."""
        card = self.files.get("README.md", b"").decode("utf-8", "replace")
        # a card dumps the whole BitsAndBytesConfig (bnb_4bit_* keys even for 8-bit): only
        # the load_in_* flags say which
        if _CARD_8BIT.search(card):
            return "8bit", "its model card records a bitsandbytes 8-bit config"
        if _CARD_4BIT.search(card):
            return "4bit", "its model card records a bitsandbytes 4-bit config (QLoRA)"
        base = self.base_model_name_or_path or ""
        if _BASE_4BIT.search(base):
            return "4bit", f"its base {base!r} is a 4-bit checkpoint (QLoRA)"
        return None, "its folder records no quantized training (no bitsandbytes config)"

    def __iter__(self) -> Iterator[LoraModule]:
        return iter(self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)

    def n_parameters(self) -> int:
        """Number of adapter coordinates (entries of every A and B)."""
        return sum(m.A.numel() + m.B.numel() for m in self)

    def clone(self) -> LoraAdapter:
        """A deep copy of the tensors, so a repair never touches the caller's adapter."""
        return LoraAdapter(
            config=json.loads(json.dumps(self.config)),
            modules={
                k: replace(m, A=m.A.detach().clone(), B=m.B.detach().clone())
                for k, m in self.modules.items()
            },
            extra_tensors={k: v.detach().clone() for k, v in self.extra_tensors.items()},
            metadata=dict(self.metadata),
            files=dict(self.files),
            source=self.source,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors under PEFT's saved names, ready for ``adapter_model.safetensors``."""
        out: dict[str, torch.Tensor] = {}
        for m in self:
            out[f"{m.key}.lora_A.weight"] = m.A
            out[f"{m.key}.lora_B.weight"] = m.B
        out.update(self.extra_tensors)
        return out


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: the first key K such that the module
    path matches ``(.*\\.)?K$`` wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def module_scaling(config: Mapping[str, Any], base_name: str, rank: int) -> tuple[float, float]:
    """(alpha, scaling) of one module as PEFT computes it: ``alpha / r``, or ``alpha / sqrt(r)``
    with rsLoRA, honouring ``alpha_pattern``."""
    alpha = float(
        _pattern_value(config.get("alpha_pattern") or {}, base_name, config["lora_alpha"])
    )
    if config.get("use_rslora"):
        return alpha, alpha / math.sqrt(rank)
    return alpha, alpha / rank


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise AdapterFormatError(
            f"{folder} has no {CONFIG_NAME}: it is not a PEFT adapter folder.",
            "Point at the folder that PeftModel.save_pretrained wrote "
            f"(it holds {CONFIG_NAME} and {WEIGHTS_NAME}).",
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(
            f"{path} is not valid JSON ({e}).",
            "Restore the file from the adapter's source, or re-save the adapter with PEFT.",
        ) from e
    if not isinstance(config, dict):
        raise AdapterFormatError(
            f"{path} holds a JSON {type(config).__name__}, not an object.",
            "Restore the file from the adapter's source, or re-save the adapter with PEFT.",
        )
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise AdapterFormatError(
            f"{path} lacks required key(s) {', '.join(missing)}.",
            "Re-save the adapter with PEFT's save_pretrained, which writes a complete config.",
        )
    if str(config["peft_type"]).upper() != "LORA":
        raise UnsupportedAdapterError(
            f"{path} describes a {config['peft_type']} adapter; adapter-repair repairs LoRA only.",
            "Use a LoRA adapter (peft_type LORA).",
        )
    for key in ("r", "lora_alpha"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise AdapterFormatError(
                f"{path}: {key} must be a positive number, got {value!r}.",
                "Restore the config from the adapter's source.",
            )
    if config.get("use_dora"):
        raise UnsupportedAdapterError(
            f"{path}: this is a DoRA adapter (use_dora: true), which adapter-repair does not "
            "repair yet.",
            "Repair a plain LoRA adapter, or merge the DoRA magnitudes first.",
        )
    if config.get("lora_bias"):
        raise UnsupportedAdapterError(
            f"{path}: lora_bias is set; adapters with a bias on lora_B are not supported yet.",
            "Retrain without lora_bias, or repair a plain LoRA adapter.",
        )
    if config.get("target_parameters"):
        raise UnsupportedAdapterError(
            f"{path}: target_parameters (LoRA on raw parameters such as MoE experts) is not "
            "supported yet.",
            "Repair an adapter on linear modules (target_modules).",
        )
    return config


def _read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        if (folder / PICKLE_WEIGHTS_NAME).is_file():
            raise AdapterFormatError(
                f"{folder} holds only {PICKLE_WEIGHTS_NAME}, a pickle: loading it could run "
                "arbitrary code, so adapter-repair reads safetensors only.",
                "Convert it where you trust the file: load it with PeftModel.from_pretrained and "
                f"save_pretrained(..., safe_serialization=True) to get {WEIGHTS_NAME}.",
            )
        raise AdapterFormatError(
            f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}.",
            "Copy the adapter's weights file next to its config.",
        )
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                tensors[key] = f.get_tensor(key)
    except Exception as e:  # safetensors raises SafetensorError, OSError or ValueError
        raise AdapterFormatError(
            f"{path} is truncated or corrupt and cannot be read ({type(e).__name__}: {e}).",
            "Download or copy the adapter again and check its size against the source.",
        ) from e
    return tensors, metadata


def _read_files(folder: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for p in sorted(folder.iterdir()):
        if p.name in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME) or not p.is_file():
            continue
        if p.stat().st_size > MAX_CARRIED_FILE_BYTES:
            logger.warning(
                "not carrying %s (%d bytes) into the repaired adapter", p.name, p.stat().st_size
            )
            continue
        files[p.name] = p.read_bytes()
    return files


def _build_modules(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path
) -> tuple[dict[str, LoraModule], dict[str, torch.Tensor]]:
    factors: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if "lora_embedding_" in key:
            raise UnsupportedAdapterError(
                f"{path} holds LoRA on an embedding ({key}), which adapter-repair does not "
                "repair yet.",
                "Repair an adapter whose target_modules are linear layers only.",
            )
        if "lora_magnitude_vector" in key:
            raise UnsupportedAdapterError(
                f"{path} holds DoRA magnitudes ({key}); DoRA is not supported yet.",
                "Repair a plain LoRA adapter.",
            )
        m = _LORA_KEY.match(key)
        if m is None:
            extra[key] = t
            continue
        factors.setdefault(m["module"], {})[m["side"]] = t
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterFormatError(
                f"{path}: tensor {key} holds {bad} NaN or Inf value(s).",
                "The fine-tune diverged or the file is damaged: use an earlier checkpoint.",
            )
    if not factors:
        raise AdapterFormatError(
            f"{path} holds no LoRA factors (no '*.lora_A.weight' / '*.lora_B.weight' tensors).",
            "Check that this is the adapter file PEFT wrote, not a merged model.",
        )
    if extra:
        logger.warning(
            "adapter carries %d non-LoRA tensor(s) (modules_to_save?): they pass through the "
            "repair unchanged: %s",
            len(extra),
            ", ".join(sorted(extra)[:5]) + (" ..." if len(extra) > 5 else ""),
        )
    modules: dict[str, LoraModule] = {}
    for name, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise AdapterFormatError(
                f"{path}: module {name} has no lora_{missing}.weight.",
                "The file is incomplete: download or copy the adapter again.",
            )
        A, B = pair["A"], pair["B"]  # (r, d_in), (d_out, r)
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise AdapterFormatError(
                f"{path}: module {name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                "which do not form a rank-r product (expect A (r, d_in), B (d_out, r)).",
                "The file is damaged or not a linear LoRA: download the adapter again.",
            )
        r, d_in, d_out = A.shape[0], A.shape[1], B.shape[0]
        if r > min(d_in, d_out):
            raise AdapterFormatError(
                f"{path}: module {name} has rank {r}, larger than its dimensions "
                f"(d_in {d_in}, d_out {d_out}); such a factorisation is degenerate.",
                f"Retrain with r <= {min(d_in, d_out)} for this module (rank_pattern can set it).",
            )
        base_name = name.removeprefix(PEFT_PREFIX)
        want_r = int(_pattern_value(config.get("rank_pattern") or {}, base_name, config["r"]))
        if want_r != r:
            raise AdapterFormatError(
                f"{path}: module {name} has rank {r} in the weights but {want_r} in the config "
                "(r / rank_pattern).",
                "The config and weights come from different adapters: keep them together.",
            )
        alpha, scaling = module_scaling(config, base_name, r)
        modules[name] = LoraModule(key=name, A=A, B=B, alpha=alpha, scaling=scaling)
    return modules, extra


def load_adapter(path: str | os.PathLike[str]) -> LoraAdapter:
    """Load and validate a PEFT LoRA adapter folder, without touching it.

    Raises:
        AdapterFormatError: missing or malformed config, pickle-only or corrupt weights,
            NaN/Inf values, inconsistent shapes or ranks.
        UnsupportedAdapterError: DoRA, LoRA on embeddings, lora_bias, non-LoRA PEFT types.
    """
    folder = Path(path)
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "not found"
        raise AdapterFormatError(
            f"adapter path {folder} is {what}.",
            "Pass the adapter folder (the one holding adapter_config.json).",
        )
    config = _read_config(folder)
    tensors, metadata = _read_tensors(folder)
    modules, extra = _build_modules(config, tensors, folder / WEIGHTS_NAME)
    logger.info("loaded adapter %s: %d LoRA modules, rank %s", folder, len(modules), config["r"])
    return LoraAdapter(
        config=config,
        modules=modules,
        extra_tensors=extra,
        metadata=metadata,
        files=_read_files(folder),
        source=folder.resolve(),
    )


def same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that exists (unless ``overwrite``) or is a file: called before
    long work, so that it fails in a second rather than after the repair."""
    if out.exists() and not overwrite:
        raise AdapterFormatError(
            f"output folder {out} already exists.",
            "Choose a new --out folder, or pass --overwrite to replace it.",
        )
    if out.exists() and not out.is_dir():
        raise AdapterFormatError(f"output path {out} is a file.", "Choose a folder path for --out.")


def write_folder_atomically(
    out: Path, write: Callable[[Path], None], *, overwrite: bool = False
) -> Path:
    """Write a folder by calling ``write(tmp_dir)`` on a temporary sibling, then renaming it.

    A crash or an error inside ``write`` leaves ``out`` as it was: no half-written folder.
    With ``overwrite``, an existing ``out`` is replaced only once the new one is complete.
    """
    out = Path(out)
    check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_adapter(
    adapter: LoraAdapter,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    also: Callable[[Path], object] | None = None,
) -> Path:
    """Save ``adapter`` as a PEFT folder at ``out``, atomically; never over its own source.

    The config is written as loaded (so a round trip gives an equal config), the tensors
    contiguous in their original dtypes, and the folder's other files carried over. ``also``
    writes more files into the same folder before it appears (a report), so that the adapter
    and its report land together or not at all.
    """
    out_path = Path(out)
    if adapter.source is not None and same_path(out_path, adapter.source):
        raise AdapterFormatError(
            f"refusing to write over the input adapter {adapter.source}.",
            "Choose a different output folder; the input is never modified.",
        )

    def write(tmp: Path) -> None:
        for name, data in adapter.files.items():
            (tmp / name).write_bytes(data)
        (tmp / CONFIG_NAME).write_text(
            json.dumps(adapter.config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
        metadata = dict(adapter.metadata) or {"format": "pt"}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        if also is not None:
            also(tmp)

    path = write_folder_atomically(out_path, write, overwrite=overwrite)
    logger.info("saved adapter to %s", path)
    return path
