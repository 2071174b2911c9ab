"""Every change the plugin makes to vLLM, in one registry (after ArcticInference's patch classes).

A patch replaces one attribute of a vLLM module or class. The registry keeps the original, refuses a
second patch of the same attribute (so registering twice, or two samplers asking for the same swap,
patches once) and logs each patch it applies. :func:`describe` lists what is patched in this process,
for ``doctor`` and for tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ears_vllm._log import get_logger

logger = get_logger()


@dataclasses.dataclass(frozen=True)
class Patch:
    target: str  # "module.Class.attribute" or "module.function"
    original: Any
    replacement: Any
    why: str


_applied: dict[tuple[int, str], Patch] = {}


def _qualified(owner: Any, name: str) -> str:
    module = getattr(owner, "__module__", None) if isinstance(owner, type) else None
    prefix = f"{module}.{owner.__qualname__}" if module else getattr(owner, "__name__", repr(owner))
    return f"{prefix}.{name}"


def apply(owner: Any, name: str, make_replacement: Callable[[Any], Any], why: str) -> Patch:
    """Replace ``owner.name`` by ``make_replacement(original)``; a second call for the same attribute
    returns the first patch and changes nothing."""
    key = (id(owner), name)
    if key in _applied and getattr(owner, name) is _applied[key].replacement:
        return _applied[key]
    original = getattr(owner, name)
    patch = Patch(_qualified(owner, name), original, make_replacement(original), why)
    setattr(owner, name, patch.replacement)
    _applied[key] = patch
    logger.debug("ears-vllm: patched %s (%s)", patch.target, why)
    return patch


def original(owner: Any, name: str) -> Any:
    """The attribute as vLLM had it before any patch (the current one when unpatched)."""
    patch = _applied.get((id(owner), name))
    return patch.original if patch is not None else getattr(owner, name)


def is_patched(owner: Any, name: str) -> bool:
    patch = _applied.get((id(owner), name))
    return patch is not None and getattr(owner, name) is patch.replacement


def describe() -> list[str]:
    """One line per patch in force in this process."""
    return [f"{p.target}: {p.why}" for p in _applied.values()]
