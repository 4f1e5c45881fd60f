"""The adapter-repair command, through click's CliRunner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from adapter_repair import __version__
from adapter_repair.cli.main import cli
from tests.test_adapter import BAD_INPUTS, folder_digest


def run(*args: str) -> click.testing.Result:
    return CliRunner().invoke(cli, list(args))


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += _commands(cmd, (*prefix, name))
        else:
            out.append((*prefix, name))
    return out


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert __version__ in result.output


@pytest.mark.parametrize("path", _commands(cli), ids=lambda p: " ".join(p) or "adapter-repair")
def test_every_help_has_an_example(path: tuple[str, ...]) -> None:
    result = run(*path, "--help")
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert "adapter-repair " in result.output.split("Example", 1)[1]


def test_inspect_lists_modules(tiny_adapter_dir: Path) -> None:
    result = run("inspect", str(tiny_adapter_dir))
    assert result.exit_code == 0, result.output
    assert "21 modules" in result.output
    assert "model.layers.2.mlp.down_proj" in result.output


def test_inspect_over_the_base_shows_layers_and_roles_as_json(
    tiny_llama_dir: Path, tiny_adapter_dir: Path
) -> None:
    result = CliRunner().invoke(
        cli, ["-q", "inspect", str(tiny_adapter_dir), "--base", str(tiny_llama_dir), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = {r["module"]: r for r in report["modules"]}
    assert rows["model.layers.1.self_attn.o_proj"]["role"] == "write"
    assert rows["model.layers.1.self_attn.o_proj"]["layer"] == 1
    assert rows["model.layers.2.mlp.up_proj"]["role"] == "read"
    assert report["n_decoder_layers"] == 3


def test_inspect_walks_over_the_recorded_base(tiny_adapter_dir: Path) -> None:
    result = run("-q", "inspect", str(tiny_adapter_dir), "--walk")
    assert result.exit_code == 0, result.output
    assert "write" in result.stdout and "read" in result.stdout


def test_logs_go_to_stderr_and_quiet_silences_them(
    tiny_llama_dir: Path, tiny_adapter_dir: Path
) -> None:
    loud = CliRunner().invoke(cli, ["-v", "inspect", str(tiny_adapter_dir), "--json"])
    assert loud.exit_code == 0
    json.loads(loud.stdout)  # stdout holds the result only
    assert "loaded adapter" in loud.stderr
    quiet = CliRunner().invoke(cli, ["-q", "inspect", str(tiny_adapter_dir), "--json"])
    assert "loaded adapter" not in quiet.stderr


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_adapter_exits_2_with_a_fix_and_writes_nothing(
    tiny_adapter_dir: Path, tmp_path: Path, case: str
) -> None:
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, folder)
    BAD_INPUTS[case][0](folder)
    before = folder_digest(tmp_path)
    result = CliRunner().invoke(cli, ["inspect", str(folder)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ")
    assert "  fix: " in result.stderr
    assert "Traceback" not in result.output
    assert folder_digest(tmp_path) == before


def test_base_mismatch_exits_2(tiny_adapter_dir: Path, tmp_path: Path) -> None:
    from tests.models import tiny_model

    other = tmp_path / "wider"
    tiny_model("llama", intermediate_size=96).save_pretrained(other)
    result = CliRunner().invoke(cli, ["inspect", str(tiny_adapter_dir), "--base", str(other)])
    assert result.exit_code == 2
    assert "the base has 96 -> 64" in result.stderr


def test_bad_option_value_is_a_usage_error(tiny_adapter_dir: Path) -> None:
    result = run("inspect", str(tiny_adapter_dir), "--quant", "3bit")
    assert result.exit_code == 2
    assert "3bit" in result.output


# --- eval


def test_eval_table_and_json(tiny_chat_adapter_dir: Path, tmp_path: Path) -> None:
    task = tmp_path / "task.jsonl"
    task.write_text('{"prompt": "Say hi", "answer": "hi"}\n{"prompt": "Say yo", "answer": "yo"}\n')
    args = ["eval", str(tiny_chat_adapter_dir), "--limit", "6", "--max-new-tokens", "4"]
    table = CliRunner().invoke(cli, ["-q", *args, "--task", str(task)])
    assert table.exit_code == 0, table.output
    assert "harmful_rate" in table.stdout and "over_refusal" in table.stdout
    assert "task_score" in table.stdout
    result = CliRunner().invoke(cli, ["-q", *args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["measures"]["harmful_rate"]["n"] == 6
    assert len(report["samples"]["harmful"]) == 6
    assert report["model"]["adapter_enabled"] is True


def test_eval_no_adapter_and_reference(tiny_chat_dir: Path, tiny_chat_adapter_dir: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "-q",
            "eval",
            str(tiny_chat_adapter_dir),
            "--no-adapter",
            "--reference",
            str(tiny_chat_adapter_dir),
            "--limit",
            "3",
            "--max-new-tokens",
            "3",
            "--fidelity-prompts",
            "3",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"]["adapter_enabled"] is False
    assert report["measures"]["fidelity"]["n_prompts"] == 3
    base_only = CliRunner().invoke(
        cli,
        [
            "-q",
            "eval",
            "--no-adapter",
            "--base",
            str(tiny_chat_dir),
            "--limit",
            "2",
            "--max-new-tokens",
            "2",
        ],
    )
    assert base_only.exit_code == 0, base_only.output


@pytest.mark.parametrize(
    ("flag", "content", "extra", "needle"),
    [
        ("--harmful", "prompt\n", [], "is empty"),
        ("--task", "prompt\nx\n", [], "task file without answers"),
        ("--safe", "foo\nx\n", ["--prompt-column", "bar"], "no column 'bar'"),
    ],
)
def test_eval_bad_prompt_files_exit_2(
    tiny_chat_adapter_dir: Path,
    tmp_path: Path,
    flag: str,
    content: str,
    extra: list[str],
    needle: str,
) -> None:
    path = tmp_path / "set.csv"
    path.write_text(content)
    result = CliRunner().invoke(cli, ["eval", str(tiny_chat_adapter_dir), flag, str(path), *extra])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "fix:" in result.stderr


def test_eval_unloadable_judge_exits_2(tiny_chat_adapter_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["eval", str(tiny_chat_adapter_dir), "--judge", str(tmp_path / "missing-guard")]
    )
    assert result.exit_code == 2
    assert "cannot be loaded" in result.stderr


def test_eval_needs_an_adapter_or_no_adapter() -> None:
    assert run("eval").exit_code == 2
    assert run("eval", "--no-adapter").exit_code == 2


def test_fix_with_too_few_task_rows_says_so_before_loading_anything(
    tiny_chat_adapter_dir: Path, tmp_path: Path
) -> None:
    task = tmp_path / "task.jsonl"
    task.write_text("".join(f'{{"prompt": "q{i}", "answer": "a"}}\n' for i in range(12)))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["fix", str(tiny_chat_adapter_dir), "--out", str(out), "--task", str(task),
              "--base", str(tmp_path / "no-such-base")]
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "too few to split into fit, guard and score" in result.output
    assert not out.exists()
