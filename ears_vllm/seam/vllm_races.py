"""ERSD in vLLM: every token of a keyed request, drafted or emitted, is a race winner on the request's keys.

V1 first; Model Runner V2 at the end.

Installed only when the server's policy is ``ersd`` (:attr:`ears_vllm.policies.PolicySpec.keyed`). A request's
*key seed* is its ``seed``, or a random 63-bit one drawn when it is first seen (kept on vLLM's state of the
request); a key's *position* is that of the input token whose logits choose the token (MRV2's ``pos``: the chosen
token's index in the sequence minus one), read from the positions vLLM feeds the target (so it is right under
chunked prefill and asynchronous scheduling alike). With MRV2's convention, a seed gives the same keys on both
runners.

Patched:

- ``GPUModelRunner._sample`` (through :mod:`ears_vllm.seam.vllm_requests`'s wrapper): the rows' keys for the
  step (:func:`sample_keyed`); afterwards, the positions the drafter's next proposal starts from.
- the runner's sampler's ``topk_topp_sampler.forward`` (the instance the rejection sampler holds, which is also
  the runner's own sampler): keyed rows take the race winner of vLLM's processed logits (penalties, temperature,
  top-k/top-p already applied) instead of its draw. It samples the first token after the prompt and the bonus
  token of a verification step; other rows keep vLLM's draw.
- ``SpecDecodeBaseProposer._sample_from_logits``: the drafter's draws for keyed rows become race winners of its q
  on the same keys, at the positions they draft (the runner drafts right after it samples, in the same call, so the
  keys :func:`sample_keyed` leaves for it are this step's).

The verifier (:func:`ears_vllm.verify` with ``race_keys``) emits the target's winners; so a seeded request's text
depends on its seed, the target and the sampling settings, not on the drafter or k.

On Model Runner V2 (:func:`install_mrv2`) the sampler and the drafter already draw race winners on these keys; the
one patch is the MRV2 speculators' ``gumbel_sample``, so that the drafter races on the sampler's keys (its position
salt removed), and :func:`ears_vllm.seam.vllm_mrv2.verify_races_mrv2` verifies.
"""

from __future__ import annotations

import contextvars
import dataclasses
import secrets
from collections.abc import Callable
from typing import Any

import torch

from ears_vllm.policies.races import compiled_race_winners, race_winners
from ears_vllm.seam import patches
from ears_vllm.seam.hooks import bound, find_class

PROPOSER_MODULE = "vllm.v1.spec_decode.llm_base_proposer"
# Model Runner V2's speculators, which sample their drafts with ``gumbel_sample(..., is_drafting=True)``.
MRV2_SPECULATOR_MODULES = (
    "vllm.v1.worker.gpu.spec_decode.speculator",
    "vllm.v1.worker.gpu.spec_decode.dspark.speculator",
)


@dataclasses.dataclass
class RowKeys:
    """The keys of a batch's rows (input batch order)."""

    seed: torch.Tensor  # [batch] int64 key seeds (0 on rows that are not keyed)
    first_pos: torch.Tensor  # [batch] int64: key position of the first token the step chooses (its first draft, or
    #                          the token a non-speculative row samples)
    keyed: torch.Tensor  # [batch] bool: the row draws from its keys (a sampled request of a keyed policy)
    draft_step: int = 0  # drafter: the drafts proposed so far in this proposal


_sampling: contextvars.ContextVar[tuple[RowKeys, torch.Tensor] | None] = contextvars.ContextVar(
    "ears_vllm_sample_keys", default=None
)  # the rows' keys and the positions the runner's sampler chooses now
_drafting: contextvars.ContextVar[RowKeys | None] = contextvars.ContextVar("ears_vllm_draft_keys", default=None)


def key_seed(params: Any) -> int:
    """A request's key seed: its own seed, or a fresh random one (its text is then random, as vLLM's)."""
    seed = getattr(params, "seed", None)
    return int(seed) if seed is not None else secrets.randbits(63)


def draft_problem(spec_config: Any, runner: str = "V1") -> str | None:
    """Why this speculative config's drafter cannot race on keys on ``runner`` (None: it can)."""
    method = getattr(spec_config, "method", None)
    sampling = getattr(spec_config, "draft_sample_method", "greedy")
    if sampling != "probabilistic":
        return (
            f"policy 'ersd' needs a drafter that samples, and draft_sample_method is {sampling!r}: add "
            '"draft_sample_method": "probabilistic" to --speculative-config'
        )
    if runner == "MRV2":
        found = [m for m in _importable(MRV2_SPECULATOR_MODULES) if hasattr(m, "gumbel_sample")]
        return None if found else f"the drafter's sampling moved: none of {MRV2_SPECULATOR_MODULES} has gumbel_sample"
    proposer, problem = find_class(PROPOSER_MODULE, "SpecDecodeBaseProposer", "_sample_from_logits")
    if proposer is None:
        return f"the drafter's sampling moved: {problem}"
    if method in ("ngram", "suffix", "medusa", "custom_class", None):
        return f"policy 'ersd' needs a model drafter that samples (draft_model, eagle, mtp); method is {method!r}"
    return None


def install(sampler: Any, runner_problem: str | None) -> str:
    """Key the drafter and ``sampler`` (the runner's, shared with its rejection sampler); the startup line's
    ``keys=`` value. Called only after the plan checked :func:`draft_problem`; ``runner_problem``: why the runner's
    ``_sample`` hook, which computes the keys, could not be installed (then the server must not start: races on
    missing keys would repeat across positions)."""
    _, problem = find_class(PROPOSER_MODULE, "SpecDecodeBaseProposer", "_sample_from_logits")
    topk_topp = getattr(sampler, "topk_topp_sampler", None)
    if problem is None and not hasattr(topk_topp, "forward"):
        problem = "vLLM's sampler has no topk_topp_sampler"
    problem = runner_problem or problem
    if problem is not None:
        raise RuntimeError(f"ears-vllm: policy 'ersd' cannot key vLLM's sampling here: {problem}")
    if not torch.cuda.is_available():  # compile the CPU race now, not in the first request's step
        compiled_race_winners()
    patches.install("ersd.v1.sampler", owner=topk_topp)
    patches.install("ersd.v1.drafter")
    return "on (drafter, bonus and first tokens race on each request's keys)"


def install_mrv2() -> str:
    """Model Runner V2: its sampler and its drafter already draw race winners on these keys, but its drafter adds
    ``1 << 30`` to the position; draw the drafts on the sampler's own keys instead, so that the drafts race the
    target on the same keys and the text is MRV2's non-speculative text. The startup line's ``keys=`` value."""
    patches.install("ersd.mrv2")  # each of MRV2_SPECULATOR_MODULES the release has
    return "on (MRV2's own keys; the drafter's salt removed)"


def _importable(names: tuple[str, ...]) -> list[Any]:
    import importlib

    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except Exception:  # an import error of any kind: that speculator is not there
            continue
    return modules


def unsalted(original: Callable[..., Any]) -> Callable[..., Any]:
    def gumbel_sample(*args: Any, is_drafting: bool = False, **kwargs: Any) -> Any:
        return original(*args, is_drafting=False, **kwargs)

    return gumbel_sample


def row_keys(runner: Any, seeds: list[int | None], num_draft_tokens: list[int]) -> tuple[RowKeys, torch.Tensor]:
    """The keys of the runner's current batch, ``seeds`` per row (None: not keyed), from the positions vLLM fed the
    target: each row's last input token's position is the key position of the token the runner's sampler chooses
    (the bonus token, or a non-speculative row's token); its drafts' start that many rows earlier. Returns the keys
    and those sampler positions [batch]."""
    positions = runner.mrope_positions.gpu[0] if getattr(runner, "uses_mrope", False) else runner.positions
    batch = len(seeds)
    sample_pos = positions[runner.query_start_loc.gpu[1 : batch + 1].long() - 1].long()
    drafts = torch.as_tensor(num_draft_tokens, dtype=torch.long).to(positions.device, non_blocking=True)
    keyed = torch.tensor([s is not None for s in seeds]).to(positions.device, non_blocking=True)
    seed = torch.tensor([s or 0 for s in seeds], dtype=torch.long).to(positions.device, non_blocking=True)
    return RowKeys(seed, sample_pos - drafts, keyed), sample_pos


def sample_keyed(sample: Callable[[], Any], keys: RowKeys, sample_pos: torch.Tensor) -> Any:
    """Run the runner's ``_sample`` with the keys bound (``sample_pos`` [batch]: the key positions its sampler
    chooses at). Keeps where the drafter's next proposal starts: after the tokens each row emitted."""
    with bound(_sampling, (keys, sample_pos)):
        output = sample()
    emitted = (output.sampled_token_ids >= 0).sum(dim=1).long()
    _drafting.set(RowKeys(keys.seed, keys.first_pos + emitted, keys.keyed))  # read by this step's drafting
    return output


def sampling_keys() -> RowKeys | None:
    """The keys of the verification step in progress (its draft rows start at ``first_pos``)."""
    bound_keys = _sampling.get()
    return None if bound_keys is None else bound_keys[0]


def winners(
    logits: torch.Tensor,  # [n, V] after temperature; masked entries -inf
    seed: torch.Tensor,  # [n] int64
    pos: torch.Tensor,  # [n] int64
) -> torch.Tensor:  # [n] int64
    """Race winners on the device: the Triton kernel on a GPU, PyTorch elsewhere (compiled on a CPU)."""
    from ears_vllm import kernels

    if kernels.unusable_reason(logits.device.type) is None and logits.device.type == "cuda":
        return kernels.race_winners_triton(logits, seed, pos)
    return race_winners(logits, seed, pos)


def keyed_topk_topp(original: Callable[..., Any]) -> Callable[..., Any]:
    def forward(logits: torch.Tensor, generators: Any, k: Any, p: Any) -> Any:
        bound_keys = _sampling.get()
        if bound_keys is None or logits.shape[0] != bound_keys[0].seed.shape[0]:
            return original(logits, generators, k, p)
        keys, pos = bound_keys
        from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

        masked = apply_top_k_top_p(logits.clone(), k, p)  # vLLM may mask ``logits`` in place
        sampled, processed = original(logits, generators, k, p)
        return torch.where(keys.keyed, winners(masked, keys.seed, pos), sampled.long()).to(sampled.dtype), processed

    return forward


def wrap_sample_from_logits(original: Callable[..., Any]) -> Callable[..., Any]:
    def _sample_from_logits(self: Any, logits: torch.Tensor, sampling_metadata: Any) -> Any:
        draft_ids, draft_probs = original(self, logits, sampling_metadata)
        keys = _drafting.get()
        if keys is None or draft_probs is None or logits.shape[0] != keys.seed.shape[0]:
            return draft_ids, draft_probs  # greedy drafting, or parallel drafting's rows: vLLM's draws (lossless)
        pos = keys.first_pos + keys.draft_step
        keys.draft_step += 1
        keyed = winners(draft_probs.float().log(), keys.seed, pos)
        return torch.where(keys.keyed, keyed, draft_ids.long()).to(draft_ids.dtype), draft_probs

    return _sample_from_logits
