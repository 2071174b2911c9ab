"""A policy made V1-only for the tests of what happens to one that Model Runner V2 cannot run.

Every registered policy runs on MRV2 or is meant to (issue 26), so the refusals (at startup, per request, in
``doctor``) are tested on ``typical`` with its registry entry's runners narrowed to V1 for the test: the messages are
the ones a V1-only policy gets, whichever policies the registry has left on V1 alone."""

from __future__ import annotations

import dataclasses

import pytest

from ears_vllm.policies import POLICIES

V1_ONLY = "typical"  # the policy the refusal tests name


def make_v1_only(monkeypatch: pytest.MonkeyPatch, name: str = V1_ONLY) -> None:
    """``name``'s registry entry runs on V1 only (and a budget nowhere else) until the test ends."""
    spec = POLICIES[name]
    narrowed = dataclasses.replace(
        spec, runners=("V1",), budget_runners=tuple(r for r in spec.budget_runners if r == "V1")
    )
    monkeypatch.setitem(POLICIES, name, narrowed)
