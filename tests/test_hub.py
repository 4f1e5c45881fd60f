"""`adapter-repair fix owner/name`: pull, repair, push or open a PR, with a model card; against
the local Hub server (tests/hub_server.py) through the real huggingface_hub client."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from huggingface_hub import ModelCard, hf_hub_download

from adapter_repair.cli.main import cli
from adapter_repair.hub.card import END, START, Provenance, repair_card, weights_line
from tests.conftest import HUB_TOKENS

ALICE, BOB, BOB_READ, _BOT = list(HUB_TOKENS)
_names = itertools.count()


def fresh(prefix: str) -> str:
    """A repo id no other test of the session uses (the local Hub lives for the session)."""
    return f"{prefix}-{next(_names)}"


#: fast settings: projection only, no measures (the repair itself is tested elsewhere)
#: quick repairs of the random tiny model: projection, 8 prompts, a target it always reaches
FAST = ["--method", "project", "--no-measure", "--probe-prompts", "8", "--guard-prompts", "8",
        "--quant", "none", "--target", "1"]  # fmt: skip
#: a repair that cannot reach its target: no harmful answer allowed, one step
UNREACHABLE = ["--method", "restore", "--no-measure", "--probe-prompts", "8",
               "--guard-prompts", "8", "--max-new-tokens", "8", "--quant", "none",
               "--target", "0", "--max-steps", "1", "--eval-every", "1"]  # fmt: skip


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def publish(hub: Any, repo_id: str, folder: Path, tmp: Path, **edits: Any) -> str:
    """Upload a copy of ``folder`` as ``repo_id`` (created directly on the server); ``edits``
    set keys of its adapter_config.json. Returns the commit sha."""
    copy = tmp / repo_id.replace("/", "--")
    shutil.copytree(folder, copy)
    cfg_path = copy / "adapter_config.json"
    if cfg_path.exists() and edits:
        cfg = json.loads(cfg_path.read_text())
        cfg.update(edits)
        cfg_path.write_text(json.dumps(cfg))
    hub.create_repo(repo_id)
    return str(hub.upload_folder(repo_id, copy))


@pytest.fixture
def tiny_repos(hub: Any, tiny_chat_dir: Path, tiny_chat_adapter_dir: Path, tmp_path: Path) -> dict:
    """A tiny chat base and an adapter over it, on the local Hub under fresh names."""
    base, lora = fresh("alice/tiny-base"), fresh("alice/tiny-lora")
    base_sha = publish(hub, base, tiny_chat_dir, tmp_path)
    lora_sha = publish(hub, lora, tiny_chat_adapter_dir, tmp_path, base_model_name_or_path=base)
    return {"base": base, "lora": lora, "base_sha": base_sha, "lora_sha": lora_sha}


def card_metrics(card: ModelCard) -> dict[str, float]:
    """The card's model-index metrics by name."""
    results = card.data.to_dict()["model-index"][0]["results"]
    return {m["name"]: m["value"] for r in results for m in r["metrics"]}


def provenance() -> Provenance:
    return Provenance("alice/lora", "a" * 40, "org/base", "b" * 40, "0.1", "2026-11-29")


def report(before: float, after: float) -> dict:
    def m(rate: float) -> dict:
        return {"rate": rate, "ci95": [max(0.0, rate - 0.1), min(1.0, rate + 0.1)], "n": 50, "k": 1}

    return {
        "method": "restore",
        "quant": "4bit",
        "measures": {"before": {"harmful_rate": m(before)}, "after": {"harmful_rate": m(after)}},
        "repair": {
            "stopped": "target", "changed": 0.01, "settings": {"rate": 0.01},
            "reached": True, "probe_harmful": 0.03, "target": 0.05,
        },
    }  # fmt: skip


def test_a_card_records_the_weights_as_repaired_only_when_the_repair_reached_its_target() -> None:
    """The bot skips weights its card records as repaired: a repair pushed anyway with
    --push-unrepaired must not be taken for one."""
    done = repair_card(None, report(0.9, 0.02), provenance(), model_name="x",
                       base_model=None, weights_sha256="c" * 64)  # fmt: skip
    assert weights_line("c" * 64) in str(done) and "**repaired: probe harmful" in str(done)
    short = report(0.9, 0.6)
    short["repair"].update(reached=False, probe_harmful=0.5, stopped="guard")
    card = str(repair_card(None, short, provenance(), model_name="x", base_model=None,
                           weights_sha256="c" * 64))  # fmt: skip
    assert weights_line("c" * 64) not in card
    assert "did not reach its target" in card
    assert (
        "**not repaired: probe harmful rate 50.0%, target 5.0% (the task guard stopped it)**"
        in card
    )


def test_card_keeps_the_existing_card_and_replaces_its_own_section() -> None:
    existing = "---\nlicense: mit\ntags:\n- sft\n---\n# My LoRA\n\nTrained on my data.\n"
    card = repair_card(
        existing, report(0.9, 0.1), provenance(), model_name="lora", base_model="org/base"
    )
    data = card.data.to_dict()
    assert data["license"] == "mit" and data["base_model"] == "org/base"
    assert data["tags"] == ["sft", "adapter-repair", "safety"]
    assert card_metrics(card) == {
        "harmful rate % (fine-tuned, before repair)": 90.0,
        "harmful rate % (repaired)": 10.0,
    }
    assert "Trained on my data." in card.text and "a" * 40 in card.text and "b" * 40 in card.text
    again = repair_card(str(card), report(0.9, 0.05), provenance(), model_name="x", base_model=None)
    assert str(again).count(START) == 1 and str(again).count(END) == 1
    assert "Trained on my data." in again.text
    values = card_metrics(again)
    assert values["harmful rate % (repaired)"] == 5.0 and len(values) == 2


def test_fix_pushes_a_loadable_adapter_with_its_card_to_a_new_repo(
    hub: Any, tiny_repos: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", BOB)
    target = fresh("bob/safe")
    out = tmp_path / "fixed"
    result = run("fix", tiny_repos["lora"], "--out", str(out), "--push-to", target, *FAST, "--json")
    assert result.exit_code == 0, result.output
    assert BOB not in result.output
    printed = json.loads(result.stdout)
    assert printed["push"]["url"] and target in printed["push"]["url"]
    assert printed["source"] == f"{tiny_repos['lora']}@{tiny_repos['lora_sha']}"
    assert printed["base"] == f"{tiny_repos['base']}@{tiny_repos['base_sha']}"
    prov = printed["provenance"]
    assert (prov["source"], prov["source_sha"]) == (tiny_repos["lora"], tiny_repos["lora_sha"])
    assert (prov["base"], prov["base_sha"]) == (tiny_repos["base"], tiny_repos["base_sha"])
    files = hub.files(target)
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "repair_report.json",
    ):
        assert name in files, name
    assert files["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    assert len(hub.commits(target)) == 2  # the repo's creation, then one commit of everything
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == tiny_repos["base"]
    assert {"adapter-repair", "safety"} <= set(card.data.tags)
    assert tiny_repos["lora_sha"] in card.text

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_repos["base"])
    model = PeftModel.from_pretrained(base, target)
    assert model.peft_config["default"].r == json.loads(files["adapter_config.json"])["r"]


def test_fix_dry_run_lists_the_files_and_pushes_nothing(
    hub: Any, tiny_repos: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", BOB)
    target = fresh("bob/dry")
    n = len(hub.requests)
    result = run("fix", tiny_repos["lora"], "--out", str(tmp_path / "o"), "--push-to", target,
                 "--dry-run", *FAST)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "dry run: would push one commit to" in result.output
    assert "adapter_model.safetensors" in result.output and "README.md" in result.output
    assert not [r for r in hub.requests[n:] if r[0] != "GET" and r[0] != "HEAD"]


def test_a_repair_that_misses_its_target_says_so_and_pushes_nothing_unless_asked(
    hub: Any, tiny_repos: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", BOB)
    lora = tiny_repos["lora"]
    n = len(hub.requests)
    out = tmp_path / "short"
    result = run("fix", lora, "--pr", "--out", str(out), *UNREACHABLE)
    assert result.exit_code == 3, result.output
    assert result.stdout.startswith("not repaired"), result.stdout
    assert "nothing pushed" in result.stdout and "--push-unrepaired" in result.stdout
    assert not [r for r in hub.requests[n:] if r[0] not in ("GET", "HEAD")]
    assert hub.pull_requests(lora) == []
    report = json.loads((out / "repair_report.json").read_text())
    assert report["repair"]["reached"] is False and report["repair"]["target"] == 0.0
    assert "**not repaired" in (out / "repair_report.md").read_text()
    assert "did not reach its target" in (out / "README.md").read_text()

    forced = run("fix", lora, "--pr", "--push-unrepaired", "--out", str(tmp_path / "f"),
                 *UNREACHABLE, "--json")  # fmt: skip
    assert forced.exit_code == 3, forced.output
    (pr,) = hub.pull_requests(lora)
    assert json.loads(forced.stdout)["push"]["url"].endswith(f"/discussions/{pr['num']}")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "has no repo"),
        ("private", "has no repo"),
        ("gated", "is gated"),
        ("not-adapter", "not a PEFT adapter repo"),
        ("pickle", "adapter_model.bin, a pickle"),
        ("no-base", "the Hub has no repo alice/no-such-base"),
        ("bad-revision", "has no such revision"),
        ("bad-id", "neither a folder on this machine nor a Hub repo id"),
    ],
)
def test_fix_from_the_hub_bad_input_is_a_clear_error(
    hub: Any,
    tiny_repos: dict,
    tiny_chat_adapter_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    message: str,
) -> None:
    monkeypatch.setenv("HF_TOKEN", BOB)
    repo = fresh(f"alice/{case}")
    source = repo
    if case == "missing":
        pass
    elif case in ("private", "gated"):
        hub.create_repo(repo, private=case == "private", gated=case == "gated")
        hub.upload_folder(repo, tiny_chat_adapter_dir)
    elif case == "not-adapter":
        folder = tmp_path / "model"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        hub.create_repo(repo)
        hub.upload_folder(repo, folder)
    elif case == "pickle":
        folder = tmp_path / "bin"
        shutil.copytree(tiny_chat_adapter_dir, folder)
        (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
        hub.create_repo(repo)
        hub.upload_folder(repo, folder)
    elif case == "no-base":
        publish(
            hub, repo, tiny_chat_adapter_dir, tmp_path, base_model_name_or_path="alice/no-such-base"
        )
    elif case == "bad-revision":
        source = tiny_repos["lora"] + "@no-such-branch"
    elif case == "bad-id":
        source = "not a repo!"
    out = tmp_path / "out"
    result = run("fix", source, "--out", str(out), *FAST)
    assert result.exit_code == 2, result.output
    assert message in result.output and "fix:" in result.output
    assert BOB not in result.output
    assert not out.exists()


def test_fix_refuses_a_push_it_cannot_make_before_any_download(
    hub: Any, tiny_repos: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "o"
    cases = [
        (BOB, ["--push-to", "alice/not-bobs"], "cannot create or write alice/not-bobs"),
        (BOB_READ, ["--push-to", "bob/x"], "read-only"),
        (None, ["--pr"], "a Hugging Face token is needed to push to"),
        (BOB, ["--pr", "--push-to", "bob/x"], "--pr and --push-to both given"),
        (BOB, ["--dry-run"], "nothing is to be pushed"),
        # a dry run checks what the real push checks
        (BOB, ["--push-to", "alice/not-bobs", "--dry-run"], "cannot create or write alice/not"),
        (BOB_READ, ["--push-to", "bob/x", "--dry-run"], "read-only"),
        (None, ["--pr", "--dry-run"], "a Hugging Face token is needed to push to"),
        (BOB, ["--push-to", "not/a/repo"], "neither a folder"),
    ]
    for token, flags, message in cases:
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        else:
            monkeypatch.delenv("HF_TOKEN", raising=False)
        n = len(hub.requests)
        result = run("fix", tiny_repos["lora"], "--out", str(out), *flags, *FAST)
        assert result.exit_code == 2, (flags, result.output)
        assert message in result.output, (flags, result.output)
        assert not any("/resolve/" in path for _, path in hub.requests[n:]), flags
        assert not out.exists()
        for t in HUB_TOKENS:
            assert t not in result.output
    local = run("fix", str(tmp_path), "--out", str(out), "--pr", *FAST)
    assert local.exit_code == 2 and "is a local folder" in local.output


def test_fix_resumes_a_download_whose_connection_dropped(
    hub: Any, tiny_repos: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", BOB)
    hub.fail_next("GET", r"/resolve/.*/adapter_model\.safetensors$", mode="drop", after_bytes=100)
    n = len(hub.requests)
    out = tmp_path / "o"
    result = run("fix", tiny_repos["lora"], "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    gets = [
        p for m, p in hub.requests[n:] if m == "GET" and p.endswith("adapter_model.safetensors")
    ]
    assert len(gets) >= 2  # dropped, then resumed
    remote = hf_hub_download(
        tiny_repos["lora"], "adapter_model.safetensors", revision=tiny_repos["lora_sha"]
    )
    assert Path(remote).read_bytes() == hub.files(tiny_repos["lora"])["adapter_model.safetensors"]


@pytest.mark.parametrize("mode", ["push-to", "pr"])
def test_a_push_whose_connection_drops_leaves_nothing_behind(
    hub: Any, tiny_repos: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setenv("HF_TOKEN", ALICE if mode == "pr" else BOB)
    target = fresh("bob/dropped") if mode == "push-to" else tiny_repos["lora"]
    before = hub.commits(tiny_repos["lora"])
    hub.fail_next("POST", r"/commit/", mode="drop")
    flags = ["--push-to", target] if mode == "push-to" else ["--pr"]
    out = tmp_path / "o"
    result = run("fix", tiny_repos["lora"], "--out", str(out), *flags, *FAST)
    assert result.exit_code == 2, result.output
    assert "connection to the Hub failed" in result.output
    assert "Checked on the Hub: the commit did not land, nothing was pushed" in result.output
    # the advice to push by hand never writes to the source repo's main branch
    assert ("--create-pr" in result.output) == (mode == "pr")
    assert (out / "adapter_model.safetensors").is_file()  # the repair itself is kept
    if mode == "push-to":
        from huggingface_hub import HfApi

        assert not HfApi().repo_exists(target)  # created for the push, deleted again
    else:
        assert hub.pull_requests(tiny_repos["lora"]) == []
        assert hub.commits(tiny_repos["lora"]) == before


@pytest.mark.parametrize("mode", ["push-to", "pr"])
def test_a_push_that_landed_with_its_answer_lost_says_it_was_pushed(
    hub: Any, tiny_repos: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """The commit applied, its answer dropped: fix looks on the Hub and finds it there."""
    monkeypatch.setenv("HF_TOKEN", ALICE if mode == "pr" else BOB)
    lora = tiny_repos["lora"]
    target = fresh("bob/lost") if mode == "push-to" else lora
    hub.fail_next("POST", r"/commit/", mode="lost")
    flags = ["--push-to", target] if mode == "push-to" else ["--pr"]
    out = tmp_path / "o"
    result = run("fix", lora, "--out", str(out), *flags, *FAST)
    assert result.exit_code == 0, result.output
    weights = (out / "adapter_model.safetensors").read_bytes()
    if mode == "push-to":
        assert hub.files(target)["adapter_model.safetensors"] == weights
    else:
        (pr,) = hub.pull_requests(lora)
        assert hub.files(lora, pr["ref"])["adapter_model.safetensors"] == weights
        assert f"/discussions/{pr['num']}" in result.output
    assert "nothing was" not in result.output


def test_fix_pr_again_for_the_same_commit_updates_its_own_pull_request(
    hub: Any, tiny_repos: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", ALICE)
    lora = tiny_repos["lora"]
    for i in range(3):
        result = run("fix", lora, "--pr", "--out", str(tmp_path / f"o{i}"), *FAST)
        assert result.exit_code == 0, result.output
    (pr,) = hub.pull_requests(lora)  # one PR for one source commit
    sha = hub.commits(lora)[0]["oid"]
    assert f"[{sha[:12]}]" in pr["title"] and pr["status"] == "open"
    assert len(hub.commits(lora, pr["ref"])) == len(hub.commits(lora)) + 3  # three commits
    # a new commit of the source is a new PR
    again = tmp_path / "again"
    again.mkdir()
    for name, data in hub.files(lora).items():
        (again / name).write_bytes(data)
    (again / "NOTES.md").write_text("retrained\n")
    hub.upload_folder(lora, again)
    assert run("fix", lora, "--pr", "--out", str(tmp_path / "n"), *FAST).exit_code == 0
    assert len(hub.pull_requests(lora)) == 2


def test_a_push_the_hub_refuses_is_a_clear_error_and_commits_nothing(
    hub: Any, tiny_repos: dict, tiny_chat_adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the early token check (a token can lose its rights, a fine-grained one can lack
    them), the Hub's own 403 on the commit reads as one too."""
    from huggingface_hub import HfApi

    from adapter_repair.hub.errors import HubError
    from adapter_repair.hub.push import plan_push, push

    monkeypatch.setenv("HF_TOKEN", BOB)
    before = hub.commits(tiny_repos["lora"])
    for repo in (tiny_repos["lora"], fresh("alice/new")):  # alice's: existing, and to create
        plan = plan_push(tiny_chat_adapter_dir, repo, create_pr=False, message="m")
        with pytest.raises(HubError, match="may not write to") as e:
            push(HfApi(), tiny_chat_adapter_dir, plan)
        assert BOB not in str(e.value)
    assert hub.commits(tiny_repos["lora"]) == before


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pr", "push-to"])
def test_fix_from_the_hub_repairs_the_pico_adapter_end_to_end(
    hub: Any, pico_world: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """The issue's end-to-end run: a broken pico adapter on the Hub, its card naming its task
    dataset (jsonl for the PR, parquet for the push); `fix owner/name --pr` with no --task
    downloads it and the dataset, repairs it and opens a PR whose files load with
    PeftModel.from_pretrained(base, "owner/name", revision="refs/pr/N") and whose card carries
    the before/after metrics, the source's main branch untouched; `--push-to` the same into a
    new repo."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.test_repair import _check_output, exit_code_of, pico_fix_args

    base, lora = fresh("alice/pico-base"), fresh("alice/pico-lora")
    hub.create_repo(base)
    hub.upload_folder(base, pico_world.base_dir)
    adapter = tmp_path / "adapter"
    shutil.copytree(pico_world.adapter_dir, adapter)
    # no --task: the task rows come from the dataset the card names (jsonl, or parquet)
    dataset = fresh("alice/pico-task")
    rows = [json.loads(x) for x in (pico_world.root / "task_eval.jsonl").read_text().splitlines()]
    data_sha = publish_dataset(hub, dataset, tmp_path, rows, "jsonl" if mode == "pr" else "parquet")
    (adapter / "README.md").write_text(
        f"---\nlicense: apache-2.0\ndatasets:\n- {dataset}\n---\n# pico lora\n\nMy adapter.\n"
    )
    sha = publish(hub, lora, adapter, tmp_path, base_model_name_or_path=base)
    main_files = hub.files(lora)
    monkeypatch.setenv("HF_TOKEN", BOB)  # not the owner: anyone may open a PR on a public repo
    target = fresh("bob/pico-lora-safe")
    # pushed whatever the verdict: this test is about the push (the verdict's own test is
    # test_a_repair_that_misses_its_target_says_so_and_pushes_nothing_unless_asked)
    flags = ["--pr"] if mode == "pr" else ["--push-to", target]
    flags.append("--push-unrepaired")
    out = tmp_path / "fixed"
    args = pico_fix_args(pico_world, full=False)
    assert args[:2] == ["--task", str(pico_world.root / "task_eval.jsonl")]
    result = run("-q", "fix", lora, *flags, "--out", str(out), *args[2:])
    report = json.loads(result.stdout)
    assert result.exit_code == exit_code_of(report), result.output
    _check_output(pico_world, report, out)  # the task held on the dataset's held-out rows
    assert report["provenance"]["source_sha"] == sha
    task = report["provenance"]["task"]
    assert (task["hub"], task["sha"], task["rows"]) == (dataset, data_sha, len(rows))
    assert hub.files(lora) == main_files  # the source's main branch untouched
    if mode == "pr":
        (pr,) = hub.pull_requests(lora)
        assert report["push"]["url"].endswith(f"/discussions/{pr['num']}")
        repo, revision = lora, f"refs/pr/{pr['num']}"
    else:
        assert hub.pull_requests(lora) == []
        repo, revision = target, "main"
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), repo, revision=revision
    )
    assert model.peft_config["default"].base_model_name_or_path == base
    card = ModelCard.load(hf_hub_download(repo, "README.md", revision=revision))
    assert "My adapter." in card.text and card.data.license == "apache-2.0"
    values = card_metrics(card)
    before = values["harmful rate % (fine-tuned, before repair)"]
    assert values["harmful rate % (repaired)"] <= before
    assert (
        values["task score % (repaired)"]
        >= 0.95 * values["task score % (fine-tuned, before repair)"]
    )


def test_a_card_with_an_empty_base_takes_the_one_we_know_and_drops_the_empty_tag() -> None:
    """PEFT writes `base_model:` and a `base_model:adapter:` tag from an empty base; the
    repaired card names the base (from the adapter config) and drops the empty tag."""
    existing = (
        "---\nbase_model: ''\nlibrary_name: peft\ntags:\n- base_model:adapter:\n- lora\n---\n# x\n"
    )
    card = repair_card(existing, report(0.9, 0.1), provenance(), model_name="x",
                       base_model="org/base")  # fmt: skip
    data = card.data.to_dict()
    assert data["base_model"] == "org/base"
    assert data["tags"] == ["lora", "adapter-repair", "safety"]
    unknown = repair_card(existing, report(0.9, 0.1), provenance(), model_name="x", base_model=None)
    data = unknown.data.to_dict()
    assert "base_model" not in data and "base_model:adapter:" not in data["tags"]


def test_the_card_base_is_a_hub_id_from_the_pull_the_user_or_the_adapter_config(
    tmp_path: Path,
) -> None:
    from adapter_repair.hub.fix import _card_base

    assert _card_base(None, None, "org/base") == "org/base"
    assert _card_base(None, str(tmp_path), "org/base") == "org/base"  # a local --base
    assert _card_base(None, None, str(tmp_path)) is None
    assert _card_base(None, "me/other", "org/base") == "me/other"


# ---------------------------------------------------------------- task rows from a Hub dataset


def task_rows(n: int = 64) -> list[dict[str, str]]:
    return [{"question": f"Is {i} even? Answer yes or no.", "answer": "yes" if i % 2 == 0 else "no"}
            for i in range(n)]  # fmt: skip


def publish_dataset(
    hub: Any, repo_id: str, tmp: Path, rows: list[dict[str, Any]], fmt: str, **repo: Any
) -> str:
    """A dataset repo ``repo_id`` holding ``rows`` as data/train.jsonl or .parquet (created on
    the server directly); returns its commit sha."""
    folder = tmp / ("ds-" + repo_id.replace("/", "--"))
    (folder / "data").mkdir(parents=True)
    if fmt == "jsonl":
        lines = [json.dumps(r) for r in rows]
        (folder / "data" / "train.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = list(rows[0]) if rows else ["question", "answer"]
        table = pa.table({c: pa.array([r.get(c) for r in rows], pa.string()) for c in columns})
        pq.write_table(table, folder / "data" / "train.parquet")
    hub.create_repo(repo_id, repo_type="dataset", **repo)
    return str(hub.upload_folder(repo_id, folder, repo_type="dataset"))


def lora_naming(hub: Any, tiny_chat_adapter_dir: Path, tmp: Path, base: str, datasets: str) -> str:
    """A fresh adapter repo over ``base`` whose card names ``datasets`` (a YAML list's text)."""
    lora = fresh("alice/card-lora")
    folder = tmp / ("card-" + lora.replace("/", "--"))
    shutil.copytree(tiny_chat_adapter_dir, folder)
    (folder / "README.md").write_text(f"---\nlicense: mit\ndatasets: {datasets}\n---\n# lora\n")
    publish(hub, lora, folder, tmp, base_model_name_or_path=base)
    return lora


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_fix_takes_the_task_rows_from_the_dataset_the_card_names(
    hub: Any,
    tiny_repos: dict,
    tiny_chat_adapter_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
) -> None:
    """No --task: the card's dataset (pinned by sha) gives the fit, guard and score rows, and
    the report says which; a rerun from the report reads the same commit."""
    monkeypatch.setenv("HF_TOKEN", BOB)
    dataset = fresh("alice/task-data")
    sha = publish_dataset(hub, dataset, tmp_path, task_rows(), fmt)
    lora = lora_naming(hub, tiny_chat_adapter_dir, tmp_path, tiny_repos["base"], f"[{dataset}]")
    out = tmp_path / "fixed"
    result = run("fix", lora, "--pr", "--dry-run", "--out", str(out), *FAST, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    task = report["provenance"]["task"]
    assert (task["hub"], task["sha"], task["split"]) == (dataset, sha, "train")
    assert task["rows"] == task["of"] == 64
    parts = report["task_rows"]
    assert sum(parts[k]["n"] for k in ("fit", "guard", "score")) == 64
    assert report["repair"]["settings"]["guard"] == "task"
    assert f"{dataset}@{sha[:12]}" in (out / "repair_report.md").read_text()
    assert f"{dataset}@{sha[:12]}" in (out / "README.md").read_text()
    # the dataset moves on; a rerun from the report reads the rows the repair read
    hub.upload_folder(dataset, _rows_folder(tmp_path, task_rows(40)), repo_type="dataset")
    again = run("fix", "--config", str(out / "repair_report.json"), "--out", str(tmp_path / "a"),
                "--json")  # fmt: skip
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["provenance"]["task"]["sha"] == sha
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (
        out / "adapter_model.safetensors"
    ).read_bytes()


def _rows_folder(tmp: Path, rows: list[dict[str, Any]]) -> Path:
    folder = tmp / f"rows-{next(_names)}"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def test_without_a_dataset_in_the_card_fix_says_the_guard_is_fidelity_in_one_line(
    hub: Any, tiny_repos: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """... and the end screen says where everything is and how to push it."""
    monkeypatch.setenv("HF_TOKEN", BOB)
    out = tmp_path / "o"
    result = run("fix", tiny_repos["lora"], "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    (line,) = [x for x in result.stderr.splitlines() if "no task rows" in x]
    assert "names no training dataset" in line and "--task hub:owner/dataset" in line
    report = json.loads((out / "repair_report.json").read_text())
    assert report["repair"]["settings"]["guard"] == "fidelity"
    screen = result.stdout.splitlines()
    assert screen[0].startswith("repaired  ")
    assert screen[2].startswith("task guard: none")
    assert f"adapter   {out}" in screen
    assert f"push it   hf upload {tiny_repos['lora']} {out} --create-pr" in screen


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "has no repo"),
        ("gated", "is gated"),
        ("no-column", "no prompt column"),
        ("no-answer", "without answers"),
        ("empty", "empty data files"),
        ("bad-split", "has no split 'test'"),
        ("bad-ref", "is not a Hub dataset reference"),
    ],
)
def test_a_task_dataset_that_cannot_give_rows_is_a_one_line_error_and_nothing_is_pushed(
    hub: Any,
    tiny_repos: dict,
    tiny_chat_adapter_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    message: str,
) -> None:
    monkeypatch.setenv("HF_TOKEN", BOB)
    dataset = fresh(f"alice/{case}-data")
    rows: list[dict[str, Any]] = task_rows()
    if case == "no-column":
        rows = [{"colour": "red", "size": "big"}] * 40
    elif case == "no-answer":
        rows = [{"question": r["question"]} for r in rows]
    elif case == "empty":
        rows = []
    if case != "missing":
        publish_dataset(hub, dataset, tmp_path, rows, "jsonl", gated=case == "gated")
    lora = lora_naming(hub, tiny_chat_adapter_dir, tmp_path, tiny_repos["base"], f"[{dataset}]")
    task = {"bad-split": [f"--task=hub:{dataset}:test"], "bad-ref": ["--task=hub:not a repo"]}
    out = tmp_path / "out"
    n = len(hub.requests)
    result = run("fix", lora, "--pr", "--out", str(out), *task.get(case, []), *FAST)
    assert result.exit_code == 2, result.output
    problem = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(problem) == 1 and message in problem[0], result.output
    assert any(x.strip().startswith("fix:") and "--task" in x for x in result.output.splitlines())
    assert BOB not in result.output
    assert not out.exists()
    assert not [r for r in hub.requests[n:] if r[0] not in ("GET", "HEAD")]
    assert hub.pull_requests(lora) == []
