"""The patch manifest and registry (ears_vllm.seam.patches): the original kept, a second patch refused, every patch
listed, and docs/vllm-seam.md's "What is patched" table the same list as the manifest."""

from __future__ import annotations

import ast
import re
import types
from pathlib import Path

import pytest

from ears_vllm.control import metrics
from ears_vllm.seam import patches, vllm_races, vllm_v1


class Target:
    def greet(self) -> str:
        return "vLLM"


def test_a_patch_keeps_the_original_and_a_second_patch_of_the_same_attribute_changes_nothing():
    original = Target.greet

    def wrap(greet):
        return lambda self: f"ears-vllm around {greet(self)}"

    first = patches.apply(Target, "greet", wrap, "test")
    second = patches.apply(Target, "greet", wrap, "test again")
    assert second is first and Target().greet() == "ears-vllm around vLLM"  # not wrapped twice
    assert patches.original(Target, "greet") is original and patches.is_patched(Target, "greet")
    assert f"{__name__}.Target.greet: test" in patches.describe()

    Target.greet = original  # undone from outside (a test's monkeypatch): the next apply patches again
    assert not patches.is_patched(Target, "greet")
    assert patches.apply(Target, "greet", wrap, "test").replacement is Target.greet
    Target.greet = original


def test_install_applies_a_group_of_the_manifest_once_on_the_owner_the_adapter_holds(monkeypatch):
    module = types.SimpleNamespace(rejection_sample=lambda: "vLLM")
    first = patches.install("v1.verifies", owner=module)
    assert [p.replacement for p in first] == [
        vllm_v1.rejection_sample
    ] and module.rejection_sample is vllm_v1.rejection_sample
    assert patches.install("v1.verifies", owner=module) == first  # a second install changes nothing
    assert patches.original(module, "rejection_sample")() == "vLLM"
    with pytest.raises(KeyError, match="no patch group"):
        patches.install("no-such-group")
    with pytest.raises(ValueError, match="several owners"):  # AdaSD patches the runner and the proposer
        patches.install("adasd", owner=module)


def test_an_added_attribute_has_no_original_and_is_added_once():
    owner = types.SimpleNamespace()
    patch = patches.apply(owner, "ears_vllm_stats", lambda original: metrics.worker_stats, "test")
    assert patch.original is None and owner.ears_vllm_stats is metrics.worker_stats
    assert patches.apply(owner, "ears_vllm_stats", lambda original: None, "again") is patch


@pytest.mark.parametrize("spec", patches.MANIFEST, ids=lambda spec: spec.target)
def test_every_manifest_entry_names_a_vllm_target_and_an_ears_function_that_exists(spec):
    assert spec.module.startswith("vllm.") and spec.path and spec.when and spec.why
    assert spec.make.startswith("ears_vllm.seam.") or spec.make.startswith("ears_vllm.control.")
    assert callable(spec.factory())


def test_the_manifest_lists_each_mrv2_speculator_the_races_adapter_knows():
    listed = {spec.module for spec in patches.MANIFEST if spec.group == "ersd.mrv2"}
    assert listed == set(vllm_races.MRV2_SPECULATOR_MODULES)


def seam_doc_table() -> dict[str, str]:
    """docs/vllm-seam.md's "What is patched" table: its targets (first column, in backticks) and their rows."""
    text = (Path(__file__).parent.parent / "docs" / "vllm-seam.md").read_text()
    section = text.split("## What is patched", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {re.match(r"\| `([^`]+)`", row).group(1): row for row in rows}


def test_the_seam_doc_lists_every_patch_of_the_manifest_and_no_other():
    table = seam_doc_table()
    manifest = {spec.target: spec for spec in patches.MANIFEST}
    assert not set(manifest) - set(table), (
        f"patches missing from docs/vllm-seam.md: {sorted(set(manifest) - set(table))}"
    )
    assert not set(table) - set(manifest), (
        f"docs/vllm-seam.md lists patches not in the manifest: {sorted(set(table) - set(manifest))}"
    )
    for target, spec in manifest.items():
        assert spec.when in table[target], f"{target}: the doc's 'when' is not the manifest's ({spec.when!r})"


def test_doctor_prints_the_manifest(capsys):
    from ears_vllm.cli import main

    main(["doctor"])
    out = capsys.readouterr().out
    for spec in patches.MANIFEST:
        assert re.search(
            rf"patch +{re.escape(spec.target)} \[when: {re.escape(spec.when)}\]: {re.escape(spec.why)}", out
        )


def test_apply_is_the_only_code_that_sets_attributes_through_setattr_or_calls_apply():
    """Outside ``seam/patches.py`` nothing calls ``patches.apply`` or ``setattr``: every change to vLLM goes through
    the manifest. Two exceptions set no attribute of vLLM's code: a request's control kept on vLLM's state of the
    request (``vllm_requests.control_of``: data), and the plugin's own counters adding a step's counts by name
    (``stats.VerifyStats.record``: an object of ours)."""
    package = Path(__file__).parent.parent / "ears_vllm"
    allowed = {("seam/patches.py", "setattr"), ("seam/vllm_requests.py", "setattr"), ("stats.py", "setattr")}
    found = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            called = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            owner = getattr(node.func, "value", None)
            sets = called == "setattr" or (called == "apply" and getattr(owner, "id", None) == "patches")
            if sets and (relative, called) not in allowed:
                found.append(f"ears_vllm/{relative}:{node.lineno} calls {called}")
    assert not found, "attributes set outside the patch manifest:\n" + "\n".join(found)
