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


# --- fix: help, settings checked first, recipes, the run on a terminal


def test_fix_help_shows_the_common_options_first_and_groups_the_rest() -> None:
    result = CliRunner().invoke(cli, ["fix", "--help"], terminal_width=100)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    first_group = next(i for i, line in enumerate(lines) if line == "Repair:")
    assert first_group <= 50, "\n".join(lines[:first_group])
    common = "\n".join(lines[:first_group])
    for flag in (
        "--out",
        "--task",
        "--pr",
        "--push-to",
        "--dry-run",
        "--quant",
        "--json",
        "--config",
    ):
        assert f"  {flag} " in common, flag
    headings = [line for line in lines if line.endswith(":") and not line.startswith(" ")]
    assert headings[:2] == ["Common options:", "Task rows and output:"]
    assert "Stage 1, projection (runs only with --method project or both):" in headings
    assert "Stage 2, restoration (runs with --method restore, the default, or both):" in headings


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--rate", "-1"], "--rate must be in (0, 1]"),
        (["--max-steps", "0", "--eval-every", "0"], "--max-steps and --eval-every must be"),
        (["--dry-run"], "--dry-run shows what a push would send"),
    ],
)
def test_a_bad_setting_is_said_at_once_naming_its_option_before_torch_loads(
    args: list[str], needle: str, tmp_path: Path
) -> None:
    """A fresh interpreter: the check runs before torch (or the Hub client) is imported."""
    import subprocess
    import sys

    code = (
        "import sys; from click.testing import CliRunner; "
        "from adapter_repair.cli.main import cli; "
        f"r = CliRunner().invoke(cli, ['fix', 'me/lora', *{args!r}]); "
        "print(r.exit_code); print(r.stderr); "
        "print('torch' in sys.modules, 'huggingface_hub' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True
    ).stdout.splitlines()
    assert out[0] == "2"
    assert out[1].startswith("error: ") and needle in out[1]
    assert out[2].startswith("  fix: ")
    assert out[-1] == "False False"


def test_out_equal_to_the_input_says_so_at_once(
    tiny_chat_adapter_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_chat_adapter_dir, src)
    before = folder_digest(src)
    for extra in ([], ["--overwrite"]):
        result = CliRunner().invoke(cli, ["fix", str(src), "--out", str(src), *extra])
        assert result.exit_code == 2, result.output
        assert "refusing to write over the input adapter" in result.stderr
        assert "already exists" not in result.stderr
    assert folder_digest(src) == before


def _recipe_run(src: Path | None, out: Path, *args: str) -> dict:
    source = [str(src)] if src is not None else []
    result = CliRunner().invoke(cli, ["-q", "fix", *source, "--out", str(out), *args, "--json"])
    assert result.exit_code in (0, 3), result.output
    return json.loads(result.stdout)


TINY_FIX = ("--no-measure", "--probe-prompts", "8", "--guard-prompts", "8", "--quant", "none",
            "--max-new-tokens", "4", "--layer", "3", "--eval-every", "1", "--max-kl", "1e9")  # fmt: skip


def test_a_recipe_file_sets_what_the_command_line_leaves_and_flags_win(
    tiny_chat_adapter_dir: Path, tmp_path: Path
) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        "[repair]\nmethod = 'restore'\n[repair.restore]\nmax_steps = 2\nrate = 0.05\n"
        "[evaluation]\nmatch = 'exact'\n"
    )
    report = _recipe_run(tiny_chat_adapter_dir, tmp_path / "a", *TINY_FIX, "--config", str(recipe),
                         "--rate", "0.1")  # fmt: skip
    restore = report["config"]["repair"]["restore"]
    assert restore["max_steps"] == 2 and restore["rate"] == 0.1  # the flag won over the file
    assert report["config"]["evaluation"]["match"] == "exact"
    yaml_recipe = tmp_path / "recipe.yaml"
    yaml_recipe.write_text("max_steps: 3\nbogus_setting: 1\n")
    bad = CliRunner().invoke(cli, ["fix", str(tiny_chat_adapter_dir), "--config", str(yaml_recipe)])
    assert bad.exit_code == 2 and "unknown setting bogus_setting" in bad.stderr
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("method = 'sideways'\n")
    bad = CliRunner().invoke(cli, ["fix", str(tiny_chat_adapter_dir), "--config", str(wrong)])
    assert bad.exit_code == 2 and "method = 'sideways'" in bad.stderr


def test_a_report_reruns_its_repair_to_the_same_adapter_bytes(
    tiny_chat_adapter_dir: Path, tmp_path: Path
) -> None:
    """`fix --config repair_report.json` takes the source, the settings and the task file
    from the report: on CPU the rerun writes the same adapter bytes."""
    task = tmp_path / "task.jsonl"
    task.write_text("".join(
        json.dumps({"prompt": f"Is {i} even?", "answer": "yes" if i % 2 == 0 else "no"}) + "\n"
        for i in range(60)
    ))  # fmt: skip
    first = _recipe_run(tiny_chat_adapter_dir, tmp_path / "first", *TINY_FIX, "--max-steps", "2",
                        "--rate", "0.05", "--task", str(task), "--max-rise", "100", "--target", "0")  # fmt: skip
    assert first["provenance"]["task"]["path"] == str(task.resolve())
    again = _recipe_run(None, tmp_path / "again", "--config",
                        str(tmp_path / "first" / "repair_report.json"))  # fmt: skip
    assert again["config"] == first["config"]
    assert again["repair"]["settings"]["guard"] == "task"
    weights = "adapter_model.safetensors"
    assert (tmp_path / "again" / weights).read_bytes() == (
        tmp_path / "first" / weights
    ).read_bytes()
    original = (tiny_chat_adapter_dir / weights).read_bytes()
    assert (tmp_path / "first" / weights).read_bytes() != original  # the repair changed something


def test_on_a_terminal_the_run_is_one_progress_bar_and_no_info_lines(
    tiny_chat_adapter_dir: Path, tmp_path: Path
) -> None:
    """stderr is a pseudo-terminal (so tqdm draws): one bar, whose description walks through
    the phases and the stage-2 steps, no INFO lines without -v; with --json, stdout is one
    JSON document."""
    import os
    import pty
    import subprocess
    import sys

    def run_on_tty(*args: str) -> tuple[str, str, int]:
        leader, follower = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "adapter_repair.cli.main", *args],
            stdout=subprocess.PIPE, stderr=follower, cwd=tmp_path,
        )  # fmt: skip
        os.close(follower)
        chunks = []
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:  # the terminal closed: the process ended
                break
            if not data:
                break
            chunks.append(data)
        stdout = proc.stdout.read().decode() if proc.stdout else ""
        proc.wait(timeout=300)
        os.close(leader)
        return stdout, b"".join(chunks).decode(errors="replace"), proc.returncode

    args = ["fix", str(tiny_chat_adapter_dir), "--limit", "4", "--max-steps", "2", "--rate",
            "0.05", "--target", "0", *TINY_FIX[1:]]  # fmt: skip
    stdout, stderr, code = run_on_tty(*args, "--out", str(tmp_path / "a"), "--json")
    assert code in (0, 3), stderr
    report = json.loads(stdout)  # one JSON document, nothing else on stdout
    assert report["repair"]["history"]
    assert "INFO" not in stderr
    assert "stage 2 step 2/2" in stderr and "probe harm" in stderr
    assert "measuring the repaired adapter" in stderr
    # one bar: tqdm moves the cursor up only to draw a second bar; none per generated set or
    # loaded weight file
    assert "\x1b[A" not in stderr
    assert "Loading weights" not in stderr
    assert "prompt/s" not in stderr  # no bar per generated set
    _, loud, _ = run_on_tty("-v", *args, "--out", str(tmp_path / "b"))
    assert "INFO" in loud
    _, quiet, _ = run_on_tty("-q", *args, "--out", str(tmp_path / "c"))
    assert "stage 2 step" not in quiet
    assert "Loading weights" not in quiet and "prompt/s" not in quiet  # -q: no bar of theirs


def test_demo_says_it_builds_the_pico_world_on_its_first_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty cache: the message comes before the build (here the cache is a file, so the
    build fails at once instead of training for a minute)."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("ADAPTER_REPAIR_CACHE", str(blocker))
    result = CliRunner().invoke(cli, ["-q", "demo"])
    assert result.exit_code != 0
    assert "building the pico world first (once: about a minute" in result.stderr
    assert str(blocker) in result.stderr


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("missing.toml", None, "no such file"),
        ("settings.ini", "max_steps = 2\n", "unknown file type .ini"),
        ("broken.toml", "max_steps = = 2\n", "could not be read"),
        ("list.yaml", "- max_steps\n", "holds no mapping of settings"),
        ("nosource.toml", "max_steps = 2\n", "no SOURCE"),
    ],
)
def test_a_recipe_that_cannot_be_used_is_a_clear_error_before_anything_is_written(
    tmp_path: Path, name: str, text: str | None, needle: str
) -> None:
    recipe = tmp_path / name
    if text is not None:
        recipe.write_text(text)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["fix", "--config", str(recipe), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and needle in result.stderr
    assert "  fix: " in result.stderr
    assert not out.exists()
