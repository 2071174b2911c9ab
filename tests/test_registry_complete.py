"""The registry is complete: every policy it declares has the rest, and nothing outside it re-decides a policy.

Adding a policy means its :class:`~ears_vllm.policies.PolicySpec` entry (``ears_vllm/policies/registry.py``),
its rule (``ears_vllm/policies/rules.py``), its branch in the fused kernel (``ears_vllm/kernels/verify_kernel.py``;
and the MRV2 walk, ``ears_vllm/kernels/split_stats_accept.py``, when it runs on MRV2), its row in the README's
policy table, and a loose setting in ``tests/test_masked_drafts.py``'s ``LOOSE``. This file walks the registry
and fails for a policy added without one of them, and for code that compares a policy's name instead of reading
its spec.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import typing
from pathlib import Path

import pytest
import torch

from ears_vllm import EarsConfig, verify
from ears_vllm.bench.steps import verify_batch
from ears_vllm.policies import POLICIES, PolicySpec, get_policy
from ears_vllm.policies.registry import KernelInput
from tests.test_masked_drafts import LOOSE
from tests.triton_cpu import triton_interpreter

with triton_interpreter():  # the kernel module's jitted functions must be created under the interpreter
    importlib.import_module("ears_vllm.kernels.verify_kernel")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ears_vllm"
RUNNERS = {"V1", "MRV2"}
# PolicySpec's behaviour fields: each must be read somewhere outside ears_vllm/policies (else it decides nothing).
BEHAVIOUR = (
    "vllms_rule",
    "kernel_inputs",
    "cuts_drafts",
    "patches_drafter",
    "learnt",
    "keyed",
    "greedy_rows",
    "only_adds_acceptances",
    "kernel_id",
    "runners",
    "recovery",
)


def loose(name: str) -> EarsConfig:
    """The policy's first loose setting (one that relaxes as far as it goes) in tests/test_masked_drafts.py."""
    return next(config for config in LOOSE.values() if config.policy == name)


def package_sources() -> dict[Path, ast.Module]:
    """Every module of the package outside ears_vllm/policies, parsed."""
    return {
        path: ast.parse(path.read_text(), str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
        if "policies" not in path.relative_to(PACKAGE).parts
    }


def policy_name_comparisons(trees: dict[Path, ast.Module], names: set[str]) -> list[str]:
    """``file:line: code`` of each comparison (``==``, ``!=``, ``in``, ``match``) with a policy name literal."""

    def literals(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [value for element in node.elts for value in literals(element)]
        return []

    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            sides = []
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
            elif isinstance(node, ast.MatchValue):
                sides = [node.value]
            if any(literals(side) for side in sides):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


# ---------------------------------------------------------------- each policy has the rest


@pytest.mark.parametrize("name", POLICIES)
def test_each_policy_has_its_rule_closed_form_and_startup_requirements(name):
    spec = POLICIES[name]
    assert spec.name == name and get_policy(name) is spec
    assert callable(spec.rule) and spec.rule.__module__.startswith("ears_vllm.policies."), "its rule, in policies/"
    # A closed form, or a documented reason there is none.
    assert (spec.accept_probability is None) == bool(spec.no_closed_form), spec.no_closed_form
    assert spec.runners and set(spec.runners) <= RUNNERS
    assert set(spec.budget_runners) <= set(spec.runners)
    assert bool(spec.budget_runners) == spec.only_adds_acceptances, "a budget runs where only acceptances are added"
    assert spec.min_speculative_tokens >= 1
    assert not (spec.vllms_rule and not spec.lossless({})), "vLLM's own rule is lossless at every setting"
    # Each host input feeds one kernel branch; a learnt policy keeps state per request (AdaSD's).
    assert set(spec.kernel_inputs) <= set(typing.get_args(KernelInput)), "inputs the kernels know"
    assert not spec.cuts_drafts or spec.learnt, "the drafter cuts at a threshold the request learns"


def test_kernel_ids_are_distinct_and_contiguous():
    ids = sorted(spec.kernel_id for spec in POLICIES.values())
    assert ids == list(range(len(POLICIES)))
    assert sum(spec.vllms_rule for spec in POLICIES.values()) == 1, "one policy is vLLM's own rule"


def test_every_policy_has_a_loose_setting_in_the_shared_test_table():
    assert {config.policy for config in LOOSE.values()} == set(POLICIES)


@pytest.mark.parametrize("name", POLICIES)
def test_each_policy_is_in_the_readme_policy_table_with_its_parameters(name):
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(f"| `{name}` |")]
    assert len(rows) == 1, f"README.md's policy table has no row (or several) for {name!r}"
    missing = [param for param in POLICIES[name].params if f"`{param}`" not in rows[0]]
    assert not missing, f"README.md's row for {name!r} does not name {missing}"


@pytest.mark.parametrize("name", POLICIES)
def test_each_policy_has_its_kernel_branch(name, monkeypatch):
    """The fused kernel equals the reference on a step where the policy departs from the standard rule, so a
    kernel id the kernel does not branch on (it would run another rule) fails here."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec, config = POLICIES[name], loose(name)
    num_draft_tokens = [4, 3, 4, 2, 4, 4]
    step = verify_batch(num_draft_tokens, 64, seed=3, full_draft=True)
    batch = len(num_draft_tokens)
    extra = dict(
        is_greedy=torch.zeros(batch, dtype=torch.bool),
        race_keys=torch.stack([torch.arange(batch) + 1, torch.arange(batch) * 100], dim=1),
        tolerance=torch.ones(batch, dtype=torch.float64) if spec.learnt else None,  # a learnt threshold of 1
    )
    reference = verify(**step, **extra, config=config, backend="torch")
    kernel = verify(**step, **extra, config=config, backend="triton")
    for field in ("token_ids", "num_accepted", "num_relaxed"):
        assert torch.equal(getattr(kernel, field), getattr(reference, field)), field
    if not spec.vllms_rule:
        standard = verify(**step, **extra, config=EarsConfig(), backend="torch")
        assert not torch.equal(reference.token_ids, standard.token_ids), "the step must tell the rule from standard"


# ---------------------------------------------------------------- nothing outside the registry re-decides a policy


def test_no_policy_name_is_compared_outside_the_registry():
    found = policy_name_comparisons(package_sources(), set(POLICIES))
    assert not found, "read the policy's PolicySpec instead:\n" + "\n".join(found)


def test_the_scan_finds_a_comparison():
    tree = ast.parse(
        'if config.policy == "fly" or policy in ("adasd", "ersd"):\n    pass\nmatch p:\n    case "ears": pass'
    )
    assert len(policy_name_comparisons({PACKAGE / "x.py": tree}, set(POLICIES))) == 3


@pytest.mark.parametrize("field", BEHAVIOUR)
def test_each_behaviour_field_is_read_outside_the_registry(field):
    assert field in {f.name for f in dataclasses.fields(PolicySpec)} or isinstance(
        getattr(PolicySpec, field, None), property
    )
    read = [
        path
        for path, tree in package_sources().items()
        if any(isinstance(node, ast.Attribute) and node.attr == field for node in ast.walk(tree))
    ]
    assert read, f"PolicySpec.{field} is read nowhere outside ears_vllm/policies"


def test_the_registry_docstring_lists_what_adding_a_policy_takes():
    doc = re.sub(r"\s+", " ", importlib.import_module("ears_vllm.policies.registry").__doc__)
    for part in ("its rule", "its kernel branch", "README", "tests/test_masked_drafts.py"):
        assert part in doc, part
