"""The ``ears-vllm`` command as users run it: every subcommand through its real entry point, and the package as
``pip install .`` ships it (not editable)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ears_vllm import cli

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Every leaf command of the parser, and the test that runs it through ``cli.main`` (or the console script).
COMMANDS = {
    "demo": "test_demo_through_the_console_script_prints_the_standard_vs_ears_table",
    "doctor": "tests/test_plugin.py::test_doctor_says_per_runner_whether_ears_vllm_verifies",
    "models fetch": "test_models_fetch_help (a real fetch needs the Qwen pair: tests/test_models.py)",
    "sweep": "tests/test_bench.py::test_sweep_runs_a_two_cell_grid_on_local_ray_and_resumes",
    "bench synthetic": "test_bench_synthetic_prints_every_policy",
    "bench e2e": "tests/test_bench.py::test_e2e_bench_pairs_policies_resumes_and_plots",
    "bench speed": "tests/test_bench.py::test_bench_speed_interleaves_the_policies_engines_round_by_round",
    "bench acceptance": "tests/test_bench.py::test_bench_acceptance_on_tiny_models",
    "bench kernel": "tests/test_bench.py::test_kernel_bench_writes_every_implementation_it_can_run",
    "bench load": "tests/test_vllm_serve.py::test_a_load_run_loses_nothing_and_its_counters_agree",
    "gpu-check bundle": "tests/test_gpu_check.py (both tests; the 0.33 one in make test-vllm033)",
    "gpu-check run": "tests/test_gpu_check.py::test_gpu_check_runs_from_a_bundle_of_vllm_033_sources (via make)",
}


def _leaf_commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        return [prefix.strip()]
    return [leaf for name, sub in subparsers[0].choices.items() for leaf in _leaf_commands(sub, f"{prefix} {name}")]


def test_every_command_has_a_test_through_the_command_line():
    """A new subcommand fails this until a test runs it through ``cli.main`` and is listed in COMMANDS."""
    assert sorted(_leaf_commands(cli.build_parser())) == sorted(COMMANDS)


def test_demo_is_bench_e2e_with_the_demo_defaults():
    parser = cli.build_parser()
    demo = vars(parser.parse_args(["demo"]))
    preset = [f"--{key.replace('_', '-')}={value}" for key, value in cli.DEMO_PRESET.items()]
    e2e = vars(parser.parse_args(["bench", "e2e", *preset]))
    assert demo.pop("run") is cli._demo and e2e.pop("run") is cli._bench_e2e
    assert demo.pop("command") == "demo" and (e2e.pop("command"), e2e.pop("bench")) == ("bench", "e2e")
    assert demo == e2e
    assert demo["policies"] == "standard,ears:0.1,ears:0.3" and demo["max_model_len"] is None


def test_bench_synthetic_prints_every_policy(capsys):
    assert cli.main(["bench", "synthetic", "--batch", "8", "--k", "2", "--vocab", "64"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| ") and "standard" in table and "ears" in table


def test_models_fetch_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["models", "fetch", "--help"])
    assert exit_info.value.code == 0 and "ears-vllm models fetch" in capsys.readouterr().out


def test_a_draft_model_run_with_a_target_needs_a_draft(capsys):
    with pytest.raises(SystemExit, match="--draft is required"):
        cli.main(["bench", "e2e", "--target", "some/model"])


def test_bench_acceptance_refuses_a_policy_without_a_closed_form():
    with pytest.raises(SystemExit, match=r"\['adasd'\] learn their thresholds"):
        cli.main(["bench", "acceptance", "--policies", "standard,adasd"])


@pytest.mark.slow
def test_demo_through_the_console_script_prints_the_standard_vs_ears_table(tmp_path, tiny_pair):
    """What `make demo` runs (`.venv/bin/ears-vllm demo`), on tiny models and sizes."""
    target, draft = tiny_pair
    done = subprocess.run(
        [
            str(VENV_BIN / "ears-vllm"),
            "demo",
            "--target",
            str(target),
            "--draft",
            str(draft),
            "--num-prompts",
            "1",
            "--max-tokens",
            "8",
            "--out",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| gsm8k |")]
    assert [row.split(" | ")[2] for row in rows] == ["standard", "ears-0.1", "ears-0.3"]  # baseline first
    assert all(row.split(" | ")[1] == "0.9" for row in rows)
    spec = json.loads((tmp_path / "demo" / "gsm8k__standard.json").read_text())["spec"]
    assert (spec["max_tokens"], len(spec["answers"]), spec["max_model_len"]) == (8, 1, -1)  # -1: the model's own


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a clean copy of the source (a build/ folder left in the checkout would hide a
    module that packaging leaves out)."""
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"
    shutil.copytree(REPO / "ears_vllm", source / "ears_vllm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(source),
        ],
        check=True,
        cwd=out,
    )
    (wheel,) = out.glob("ears_vllm-*.whl")
    return wheel


def test_the_wheel_holds_every_module_of_the_package(wheel):
    source = {str(p.relative_to(REPO)) for p in (REPO / "ears_vllm").rglob("*.py")}
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    assert source - shipped == set(), "modules missing from the wheel"
    names = zipfile.ZipFile(wheel).namelist()
    assert {"ears_vllm/bench/data/gsm8k/test.jsonl", "ears_vllm/bench/data/mt_bench/question.jsonl"} <= set(names)
    assert {name.split("/")[0] for name in shipped} == {"ears_vllm"}, "nothing outside ears_vllm ships"
    entry_points = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "ears-vllm = ears_vllm.cli:main" in text and "ears = ears_vllm.plugin:register" in text


def test_the_installed_wheel_runs_help_and_doctor(wheel, tmp_path):
    """A non-editable install, alone on the path before the project's environment (which gives it its
    dependencies: torch, pyyaml, vllm)."""
    scratch = tmp_path / "scratch"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(scratch), str(wheel)],
        check=True,
    )
    env = dict(os.environ, PYTHONPATH=str(scratch))
    command = [sys.executable, str(scratch / "bin" / "ears-vllm")]
    for argv in (["--help"], ["bench", "e2e", "--help"], ["doctor"]):
        done = subprocess.run([*command, *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, (argv, done.stderr[-2000:])
    doctor = done.stdout
    assert f"installed at {scratch / 'ears_vllm'}" in doctor, "ran the wheel's copy, not the source tree"
    assert "verification" in doctor
