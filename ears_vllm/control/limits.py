"""Operator limits on per-request settings: the ears config key ``request_limits`` (docs/operator-limits.md).

A request's ``vllm_xargs`` (:mod:`ears_vllm.control.requests`) may ask for another policy, tolerance or budget
than the server's. What it may ask is the operator's to grant:

* ``request_limits: false``: no per-request ears settings at all (any ``ears_*`` key is a 400).
* ``request_limits: {policies, max_tolerance, max_budget}``, each optional:
    ``policies``: the policies a request may choose besides the server's own and ``standard`` (always allowed);
    ``max_tolerance``: the largest ``ears_tolerance`` a request may ask (unset: the server's tolerance);
    ``max_budget``: the largest ``ears_budget`` (unset: the server's budget, none when it has none; 0: none).

Unset, a request may make verification stricter than the server's own settings, never looser: a server that never
asked for per-request control does not grant lossy overrides silently. A request whose settings make it lossless
(``standard``, or ``ears`` at tolerance 0) is always within the limits, as nothing verifies stricter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ears_vllm.policies.registry import POLICIES, Param

KEY = "request_limits"
MAX_TOLERANCE = Param(
    f"{KEY}.max_tolerance", None, 0.0, 1.0, optional=True, doc="the largest ears_tolerance a request may ask"
)
MAX_BUDGET = Param(
    f"{KEY}.max_budget", None, 0.0, 1.0, optional=True, doc="the largest ears_budget a request may ask (0: none)"
)
LIMIT_KEYS = ("policies", "max_tolerance", "max_budget")
_ALLOWED = f"false (no per-request settings), or a mapping with any of the keys {list(LIMIT_KEYS)}"


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """The limits as the operator wrote them; None: unset (the default, stricter-only, applies)."""

    overrides: bool = True  # False: ``request_limits: false``
    policies: tuple[str, ...] | None = None
    max_tolerance: float | None = None
    max_budget: float | None = None

    @classmethod
    def from_value(cls, value: Any) -> RequestLimits:
        """Validate the config value of ``request_limits`` (ValueError naming the key, the value, what is allowed)."""
        if value is None:
            return cls()
        if value is False:
            return cls(overrides=False)
        if not isinstance(value, Mapping):
            raise ValueError(
                f"ears config key {KEY!r} = {value!r} has type {type(value).__name__}; allowed: {_ALLOWED}"
            )
        unknown = sorted((k for k in value if k not in LIMIT_KEYS), key=str)
        if unknown:
            raise ValueError(
                f"ears config key {KEY!r} has unknown key(s) {unknown} (values {[value[k] for k in unknown]!r}); "
                f"allowed keys: {list(LIMIT_KEYS)}"
            )
        return cls(
            policies=_policies(value.get("policies")),
            max_tolerance=MAX_TOLERANCE.validate(value.get("max_tolerance")),
            max_budget=MAX_BUDGET.validate(value.get("max_budget")),
        )

    def to_value(self) -> bool | dict[str, Any]:
        """The config value that gives these limits back (:meth:`from_value`)."""
        if not self.overrides:
            return False
        value = {"policies": list(self.policies) if self.policies is not None else None}
        return value | {"max_tolerance": self.max_tolerance, "max_budget": self.max_budget}

    def granted(self, policy: str, tolerance: float, budget: float | None) -> GrantedLimits:
        """What a request may ask of a server with ``policy``, ``tolerance`` and ``budget``."""
        named = {policy, "standard", *(self.policies or ())}
        return GrantedLimits(
            overrides=self.overrides,
            policies=tuple(name for name in POLICIES if name in named),
            max_tolerance=tolerance if self.max_tolerance is None else self.max_tolerance,
            max_budget=budget if self.max_budget is None else (self.max_budget or None),
            set_keys=tuple(key for key in LIMIT_KEYS if getattr(self, key) is not None),
        )


@dataclasses.dataclass(frozen=True)
class GrantedLimits:
    """The limits in force on one server: the operator's, the server's own settings where unset."""

    overrides: bool
    policies: tuple[str, ...]  # in registry order
    max_tolerance: float
    max_budget: float | None  # None: a request may ask no budget
    set_keys: tuple[str, ...]  # the limits the operator set (the others are the defaults)

    @property
    def summary(self) -> str:
        """One line, for the startup line and ``ears-vllm doctor``."""
        if not self.overrides:
            return "none (request_limits: false, every ears_* key is refused)"
        values = {
            "policies": ",".join(self.policies),
            "max_tolerance": f"{self.max_tolerance:g}",
            "max_budget": "none" if self.max_budget is None else f"{self.max_budget:g}",
        }
        return " ".join(f"{key}={values[key]} ({'set' if key in self.set_keys else 'default'})" for key in LIMIT_KEYS)

    def source(self, key: str) -> str:
        """Where limit ``key`` comes from, for an error message."""
        if key in self.set_keys:
            return f"ears config key '{KEY}.{key}'"
        default = {
            "policies": "the server's policy and 'standard'",
            "max_tolerance": "the server's tolerance",
            "max_budget": "the server's budget, none when it has none",
        }[key]
        return f"ears config key '{KEY}.{key}', unset: {default}"


def _policies(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    key, allowed = f"{KEY}.policies", f"a list of policies, each one of {list(POLICIES)}"
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"ears config key {key!r} = {value!r} has type {type(value).__name__}; allowed: {allowed}")
    unknown = [name for name in value if not isinstance(name, str) or name not in POLICIES]
    if unknown:
        raise ValueError(
            f"ears config key {key!r} = {list(value)!r} names unknown policies {unknown!r}; allowed: {allowed}"
        )
    return tuple(value)
