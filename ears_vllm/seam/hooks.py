"""Checking that a vLLM hook is where, and what, an adapter expects before anything is patched."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, TypeVar

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


def vllm_version() -> str:
    """The installed vLLM's version, as vLLM reports it (``unknown`` when it cannot be read)."""
    try:
        import vllm

        return str(getattr(vllm, "__version__", "unknown"))
    except Exception:
        return "unknown"


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
