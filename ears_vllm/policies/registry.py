"""The policy registry: every acceptance policy declared once.

A :class:`PolicySpec` names a policy's parameters (validated by their :class:`Param`), its PyTorch rule
(:mod:`ears_vllm.policies.rules`), how the emitted token is chosen on rejection, its closed-form acceptance
where one exists (:mod:`ears_vllm.policies.closed_form`), its branch id in the fused kernel, the vLLM
runners whose verifier can run it, and its behaviour: the host inputs its kernel branch needs, what it needs
at startup (the drafter patched, a number of speculative tokens, the runners where a budget runs). Config
parsing, the reference, the kernels, the adapters, the benchmarks and every error message read this table; no
code outside ``ears_vllm.policies`` compares a policy's name. A policy's settings are resolved by
:func:`settings_for` alone.

Adding a policy means: its entry here; its rule in ``rules.py`` (and its closed form, or why there is none);
its kernel branch in ``ears_vllm/kernels/verify_kernel.py`` (and in the MRV2 walk,
``ears_vllm/kernels/split_stats_accept.py``, if it runs on MRV2); its row in the README's policy table; a
loose setting in ``tests/test_masked_drafts.py``'s ``LOOSE``; its name in the pinned list of
``tests/test_policies.py``. ``tests/test_registry_complete.py`` walks the registry and fails for a policy added
without one of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

from ears_vllm.policies import rules

# A policy's rule: (positions, its settings) -> [n] bool, before the accepted prefix is taken.
Rule = Callable[["rules.DraftPositions", Mapping[str, Any]], torch.Tensor]
# Its closed form: (p [n, m], q [n, m], target row [n, V], standard min(1, p/q) [n, m], settings) -> P(accept) [n, m].
AcceptProbability = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Mapping[str, Any]], torch.Tensor]

# How the token emitted at the first rejected position is chosen.
#   residual           sample norm(max(p - q, 0)) (the lossless rule's; a one-hot q removes the draft from p)
#   one_hot_residual   sample p with the rejected draft removed, whatever q is (a target-only verifier)
#   argmax             the target's argmax (deterministic)
#   race               the target's race winner on the request's keys (ERSD: the token it would have emitted anyway)
Recovery = Literal["residual", "one_hot_residual", "argmax", "race"]

# What a policy's relaxed acceptances per verified position say about the total-variation distance it adds to the
# output distribution, i.e. what a benchmark may print them as (:func:`relaxed_rate_label`):
#   exact           the added TV per position, whatever the drafter: the rule accepts whatever the standard test
#                   (same u) accepts, decides each position alone and recovers with the standard residual, so the
#                   emitted distribution moves by exactly the probability of a relaxed acceptance
#   exact_one_hot   the same with one-hot drafts (greedy drafting, n-gram); with sampled drafts the rule also
#                   rejects drafts the standard test keeps, and its added TV is larger than its relaxed rate
#   sequence_bound  a bound on the deviation of the whole sequence only (coupling with the standard rule on the same
#                   randoms: TV <= P(any relaxed acceptance)); per position there is no such identity
#   rate_only       neither: the rule also rejects drafts the standard test keeps and recovers otherwise, so the
#                   relaxed rate neither equals nor bounds its added TV (``bench acceptance`` gives the exact TV)
RelaxedRate = Literal["exact", "exact_one_hot", "sequence_bound", "rate_only"]

# A per-row input the host computes for a policy's kernel branch (``PolicySpec.kernel_inputs``):
#   top_logits         the k largest logits of each row, [num_tokens, k] (FLy's entropy, fused kernel)
#   fly_entropy        FLy's top-k entropy of each row, as vLLM's MRV2 computes it (MRV2 walk)
#   draft_rank         how many logits lie above the draft's, per vocabulary split (relaxed_topk, fused kernel)
#   js_relax           JS(p, q) <= the request's learnt threshold (AdaSD, fused kernel; the MRV2 walk computes it)
#   margin_logits      the two largest logits of each row, [num_tokens, 2] (MARS's ratio z2 / z1, fused kernel)
#   block_entropy      each vocabulary block's sum exp(l - max) (l - max), beside MRV2's max and sum-exp, so the walk
#                      merges H(p) (typical, MRV2 walk: ears_vllm.kernels.split_stats, launched instead of vLLM's)
#   block_runner_up    each vocabulary block's second-largest logit, so the walk merges the two largest (MARS, MRV2
#                      walk: the same launch)
KernelInput = Literal[
    "top_logits", "fly_entropy", "draft_rank", "js_relax", "margin_logits", "block_entropy", "block_runner_up"
]


@dataclasses.dataclass(frozen=True)
class Param:
    """One setting of the ears config: its default and the values allowed."""

    name: str
    default: float | int | None
    low: float
    high: float = math.inf
    low_open: bool = False  # the low end itself is not allowed
    integer: bool = False
    optional: bool = False  # None allowed (a default resolved later, e.g. from k)
    doc: str = ""

    @property
    def allowed(self) -> str:
        kind = "an integer" if self.integer else "a number"
        high = "inf)" if math.isinf(self.high) else f"{self.high:g}]"
        text = f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {high}"
        return text + (" or null" if self.optional else "")

    def validate(self, value: Any) -> float | int | None:
        """The value as stored (float or int), or ValueError naming the key, the value and what is allowed."""
        if value is None and self.optional:
            return None
        bad = f"ears config key {self.name!r} = {value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{bad} has type {type(value).__name__}; allowed: {self.allowed}")
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"{bad} is not a finite number; allowed: {self.allowed}")
        if self.integer and value != int(value):
            raise ValueError(f"{bad} is not an integer; allowed: {self.allowed}")
        if not ((value > self.low if self.low_open else value >= self.low) and value <= self.high):
            raise ValueError(f"{bad} is out of range; allowed: {self.allowed}")
        return int(value) if self.integer else float(value)


PARAMS: dict[str, Param] = {
    p.name: p
    for p in (
        Param("tolerance", 0.0, 0.0, 1.0, doc="EARS beta: relaxation beta * (1 - max p)"),
        Param("min_ratio", 0.01, 0.0, 1.0, doc="EARS rho_min: floor of the relaxed threshold"),
        Param("typical_eps", 0.09, 0.0, 1.0, low_open=True, doc="typical acceptance posterior threshold"),
        Param("typical_delta", 0.3, 0.0, 1.0, low_open=True, doc="typical acceptance entropy-scaled threshold"),
        Param(
            "fly_window_size",
            None,
            1,
            integer=True,
            optional=True,
            doc="FLy: native acceptances that must follow a deferred rejection; default min(6, k - 1), < k",
        ),
        Param("fly_entropy_threshold", 0.3, 0.0, doc="FLy: top-k target entropy (nats) at which a rejection defers"),
        Param("fly_entropy_top_k", 3, 1, integer=True, doc="FLy: target probabilities in its entropy"),
        Param("accept_threshold_single", 1.0, 0.0, 1.0, doc="SGLang: accept any draft with p(d) >= this"),
        Param("accept_threshold_acc", 1.0, 0.0, 1.0, doc="SGLang: accept a draft when u <= p(d) / this"),
        Param("relaxed_topk", 10, 1, integer=True, doc="TensorRT-LLM: candidates are the target's top-k"),
        Param("relaxed_delta", 0.6, 0.0, 1.0, doc="TensorRT-LLM: a candidate needs p >= max p - delta"),
        Param(
            "mars_threshold",
            0.9,
            0.0,
            1.0,
            doc="MARS theta: the target's runner-up is accepted where its logit ratio z2 / z1 > theta",
        ),
        Param(
            "frontier_window",
            2,
            0,
            integer=True,
            doc="frontier rule: native acceptances that must follow a relaxed one (docs/frontier-rule.md)",
        ),
        Param(
            "frontier_scale",
            1.0,
            1.0,
            doc="frontier rule: multiplies EARS's relaxation tolerance * (1 - max p) (large: every unmasked draft "
            "whose window passes, FLy's pure window; docs/frontier-rule.md)",
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """One acceptance policy.

    Attributes:
        name: the ``policy`` value users write.
        summary: one line, for ``--help``, errors and docs.
        params: the :data:`PARAMS` it reads.
        rule: its PyTorch rule (:mod:`ears_vllm.policies.rules`).
        accept_probability: its closed form per candidate draft token, averaged over u (None: the decision looks
            at other positions, FLy; see :func:`ears_vllm.policies.closed_form.fly_chain`).
        kernel_id: its branch in the fused kernel (``ears_vllm.kernels.verify_kernel``).
        runners: the vLLM runners whose verification ears-vllm can run with it.
        recovery: how the token at the first rejected position is chosen (greedy rows: always the argmax).
        greedy_rows: the source applies the rule to greedy requests too (vLLM's FLy, TensorRT-LLM's relaxed
            acceptance, which is greedy-only); otherwise greedy rows are verified by argmax match.
        lossless: the settings under which every step equals vLLM's standard rule.
        keyed: the drafter and the verifier draw from the request's keys (``ears_vllm.keys``): the verifier needs
            each request's key seed and positions, and the drafter must sample (vLLM ``draft_sample_method``
            "probabilistic") by the same races.
        learnt: the decision reads state the request learns during the run (AdaSD's thresholds), so it has no
            closed form (``bench acceptance`` refuses it).
        only_adds_acceptances: the rule accepts whatever the native test (same u) accepts and recovers as the
            standard rule does, so its relaxed acceptances are its whole deviation from the target; a deviation
            budget (``EarsConfig.budget``) can then cap them.
        relaxed_rate: what its relaxed acceptances per verified position are as a measure of added TV
            (:data:`RelaxedRate`); every benchmark label reads it through :func:`relaxed_rate_label`.

        The behaviour the rest of the package reads (no code outside ``ears_vllm.policies`` compares a policy's
        name; ``tests/test_registry_complete.py`` checks):

        kernel_inputs: what the host computes per row for its kernel branch (:data:`KernelInput`): FLy's top
            target logits and entropy gate, TensorRT-LLM's draft rank (fused kernel; the MRV2 walk tests the
            candidate itself), AdaSD's relaxation flag from the Jensen-Shannon distance against the request's learnt
            threshold.
        vllms_rule: the rule is vLLM's own (standard): lossless at every setting, so a server on it is left to
            vLLM (the plugin does not verify, takes no per-request settings) and a budget has nothing to cap.
        cuts_drafts: the drafter is patched (``ears_vllm.seam.vllm_drafter``) so that each request stops
            drafting at a threshold it learns (AdaSD's draft length).
        budget_runners: the runners on which a deviation budget can cap it (empty: no budget; a budget needs
            ``only_adds_acceptances``).
        min_speculative_tokens: vLLM refuses the policy at startup with fewer speculative tokens (its FLy: 2).
        no_closed_form: why ``accept_probability`` is None (required then; empty otherwise).
        source: where the rule comes from.
    """

    name: str
    summary: str
    params: tuple[str, ...]
    rule: Rule
    accept_probability: AcceptProbability | None
    kernel_id: int
    runners: tuple[str, ...]
    recovery: Recovery = "residual"
    greedy_rows: bool = False
    lossless: Callable[[Mapping[str, Any]], bool] = lambda settings: False
    only_adds_acceptances: bool = False
    relaxed_rate: RelaxedRate = "rate_only"
    learnt: bool = False
    keyed: bool = False
    # Behaviour read outside the registry (see the docstring); one block, kept together.
    vllms_rule: bool = False
    cuts_drafts: bool = False
    budget_runners: tuple[str, ...] = ()
    min_speculative_tokens: int = 1
    no_closed_form: str = ""
    kernel_inputs: tuple[KernelInput, ...] = ()
    source: str = ""

    # The named constexprs the kernels branch on, derived from the fields above.
    @property
    def kernel_flags(self) -> dict[str, int | bool]:
        """The constexprs of the policy's branch in the fused kernel (``_accept_kernel``): its id (checked against
        the kernel's branches at launch), whether greedy rows take the rule, whether every acceptance is exact (none
        counts as relaxed: a keyed race), and how the token at the first rejection is chosen."""
        return dict(
            POLICY=self.kernel_id,
            GREEDY_ROWS=self.greedy_rows,
            EXACT_ACCEPTANCES=self.keyed,
            ARGMAX_RECOVERY=self.recovery == "argmax",
            RACE_RECOVERY=self.recovery == "race",
        )

    @property
    def patches_drafter(self) -> bool:
        """The drafter is patched when the server starts (AdaSD's draft length, ERSD's keyed drafts), so a request
        may ask for the policy only on a server started with it."""
        return self.cuts_drafts or self.keyed


_POLICY_LIST = (
    PolicySpec(
        name="standard",
        summary="lossless rejection sampling (Leviathan/Chen), vLLM's own rule",
        params=(),
        rule=rules.rule_standard,
        accept_probability=rules.probability_standard,
        kernel_id=0,
        runners=("V1", "MRV2"),
        lossless=lambda settings: True,
        relaxed_rate="exact",
        vllms_rule=True,
        source="vLLM vllm/v1/sample/rejection_sampler.py",
    ),
    PolicySpec(
        name="ears",
        summary="EARS: accept iff p/q >= min(u, max(u - tolerance * (1 - max p), min_ratio))",
        params=("tolerance", "min_ratio"),
        rule=rules.rule_ears,
        accept_probability=rules.probability_ears,
        kernel_id=1,
        runners=("V1", "MRV2"),
        lossless=lambda settings: settings["tolerance"] == 0.0,
        only_adds_acceptances=True,
        relaxed_rate="exact",
        budget_runners=("V1", "MRV2"),
        source="Sun et al. 2025, Efficient Adaptive Rejection Sampling",
    ),
    PolicySpec(
        name="typical",
        summary="typical acceptance: p(d) > min(typical_eps, typical_delta * exp(-H(p))), the argmax on rejection",
        params=("typical_eps", "typical_delta"),
        rule=rules.rule_typical,
        accept_probability=rules.probability_typical,
        kernel_id=2,
        runners=("V1", "MRV2"),  # MRV2: the entropy merged from our statistics launch (kernels.split_stats)
        recovery="argmax",
        kernel_inputs=("block_entropy",),
        source="Medusa; vLLM V0 TypicalAcceptanceSampler",
    ),
    PolicySpec(
        name="fly",
        summary="vLLM 0.33's FLy: a rejection whose top-k target entropy >= fly_entropy_threshold is deferred when "
        "the next fly_window_size drafts pass the native test",
        params=("fly_window_size", "fly_entropy_threshold", "fly_entropy_top_k"),
        rule=rules.rule_fly,
        accept_probability=None,
        kernel_id=3,
        runners=("V1", "MRV2"),
        greedy_rows=True,
        only_adds_acceptances=True,
        relaxed_rate="sequence_bound",
        kernel_inputs=("top_logits", "fly_entropy"),
        budget_runners=("V1", "MRV2"),  # MRV2: capped where the walk defers (it confirms the deferral later)
        min_speculative_tokens=2,
        no_closed_form="the decision reads the next fly_window_size positions; closed_form.fly_chain chains it",
        source="vLLM 0.33 vllm/v1/spec_decode/fly.py; MRV2 rejection_sampler_utils._rejection_kernel",
    ),
    PolicySpec(
        name="sglang",
        summary="SGLang's target-only rule: accept iff u <= p(d) / accept_threshold_acc or p(d) >= "
        "accept_threshold_single; q is not read; on rejection, p without the draft",
        params=("accept_threshold_single", "accept_threshold_acc"),
        rule=rules.rule_sglang,
        accept_probability=rules.probability_sglang,
        kernel_id=4,
        runners=("V1", "MRV2"),
        recovery="one_hot_residual",
        relaxed_rate="exact_one_hot",
        source="sgl-kernel csrc/speculative/speculative_sampling.cuh TreeSpeculativeSamplingTargetOnly",
    ),
    PolicySpec(
        name="relaxed_topk",
        summary="TensorRT-LLM's MTP relaxed acceptance, on every position: the native test, or d among the target's "
        "relaxed_topk with p(d) >= max p - relaxed_delta",
        params=("relaxed_topk", "relaxed_delta"),
        rule=rules.rule_relaxed_topk,
        accept_probability=rules.probability_relaxed_topk,
        kernel_id=5,
        runners=("V1", "MRV2"),  # MRV2: the candidate test made in the walk, one pass over a rejected row
        greedy_rows=True,
        only_adds_acceptances=True,
        relaxed_rate="exact",
        kernel_inputs=("draft_rank",),
        budget_runners=("V1", "MRV2"),
        source="TensorRT-LLM cpp/tensorrt_llm/kernels/speculativeDecoding/mtpKernels.cu mtpRelaxedAcceptanceKernel",
    ),
    PolicySpec(
        name="adasd",
        summary="AdaSD (our formulation, docs/adasd.md): the native test, or JS(p, q) <= a threshold each request "
        "learns from its own verified positions; with the drafter patched, a request stops drafting past a "
        "learnt draft-entropy threshold. No hyperparameter",
        params=(),
        rule=rules.rule_adasd,
        accept_probability=None,  # its threshold is learnt during the run
        kernel_id=6,
        runners=("V1", "MRV2"),  # MRV2: the thresholds in the request slots on the device, learnt in the walk
        only_adds_acceptances=True,
        learnt=True,
        relaxed_rate="exact",
        kernel_inputs=("js_relax",),
        cuts_drafts=True,
        budget_runners=("V1", "MRV2"),
        no_closed_form="its JS threshold is learnt by each request during the run",
        source="Lu, Hong, Liu 2025, arXiv 2512.11280 (abstract only); formulation ours",
    ),
    PolicySpec(
        name="mars",
        summary="MARS: the native test, or d is the target's top-2 where its logits' ratio z2 / z1 > mars_threshold "
        "(a low-margin position)",
        params=("mars_threshold",),
        rule=rules.rule_mars,
        accept_probability=rules.probability_mars,
        kernel_id=8,
        runners=("V1", "MRV2"),  # MRV2: the top-2 merged from our statistics launch (kernels.split_stats)
        greedy_rows=True,  # the paper's rule is a greedy verifier's (docs/frontier-rule.md, "MARS")
        lossless=lambda settings: settings["mars_threshold"] >= 1.0,
        only_adds_acceptances=True,
        relaxed_rate="exact",
        kernel_inputs=("draft_rank", "margin_logits", "block_runner_up"),
        budget_runners=("V1", "MRV2"),
        source="Song et al. 2026, arXiv 2601.15498 (MARS); authors' code 5SSjw/MARS mars/model/utils.py",
    ),
    PolicySpec(
        name="frontier",
        summary="frontier rule (ours, docs/frontier-rule.md): EARS's relaxed test at a natively rejected draft, "
        "taken only when the next frontier_window drafts pass the native test",
        params=("tolerance", "min_ratio", "frontier_window", "frontier_scale"),
        rule=rules.rule_frontier,
        accept_probability=None,
        kernel_id=9,
        runners=("V1", "MRV2"),  # MRV2: FLy's pending-window state machine in the walk
        lossless=lambda settings: settings["tolerance"] == 0.0,
        only_adds_acceptances=True,
        relaxed_rate="sequence_bound",
        budget_runners=("V1", "MRV2"),  # MRV2: capped where the walk makes the rejection pending, as FLy's
        no_closed_form="the decision reads the next frontier_window positions; closed_form.frontier_chain chains it",
        source="ours (docs/frontier-rule.md): EARS's test (Sun et al. 2025) gated by FLy's window (vLLM 0.33)",
    ),
    PolicySpec(
        name="ersd",
        summary="ERSD: drafter and target race on shared keys; accept while the draft is the target's race winner, "
        "then emit the target's winner. Lossless; the text does not depend on the drafter",
        params=(),
        rule=rules.rule_ersd,
        accept_probability=rules.probability_ersd,
        kernel_id=7,
        runners=("V1", "MRV2"),  # MRV2: on its own keys, its drafter's salt removed (seam.vllm_races)
        recovery="race",  # lossless in distribution, but not step for step vLLM's rule (``lossless`` stays False)
        keyed=True,
        relaxed_rate="exact",
        source="Kobus and Gunduz 2025, arXiv 2504.15475 (speculative sampling via exponential races)",
    ),
)
POLICIES: dict[str, PolicySpec] = {spec.name: spec for spec in _POLICY_LIST}


RELAXED_RATE_LABELS = {"added_tv": "added TV", "bound": "sequence-level bound on added TV", "rate": "relaxed rate"}


def relaxed_rate_label(policy: str, one_hot_drafts: bool) -> str:
    """What ``policy``'s relaxed acceptances per verified position may be printed as, for drafts that are one-hot
    (vLLM's greedy drafting, n-gram) or sampled: "added TV" only where the two are equal (the policy's
    ``relaxed_rate`` says where), else a bound (FLy) or just the relaxed rate (typical; sglang with sampled
    drafts). The only place a benchmark decides whether a figure is an added TV."""
    meaning = get_policy(policy).relaxed_rate
    if meaning == "exact" or (meaning == "exact_one_hot" and one_hot_drafts):
        return RELAXED_RATE_LABELS["added_tv"]
    return RELAXED_RATE_LABELS["bound" if meaning == "sequence_bound" else "rate"]


def get_policy(name: str) -> PolicySpec:
    """The spec of ``name``, or ValueError naming it and the policies there are."""
    spec = POLICIES.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"ears config key 'policy' = {name!r} is not one of {list(POLICIES)}")
    return spec


def settings_for(policy: str, values: Mapping[str, Any], k: int | None = None) -> dict[str, Any]:
    """The parameters ``policy`` reads out of a config's ``values`` (``EarsConfig.params``): the one place a
    policy's settings are resolved. With ``k`` (the number of speculative tokens, or a step's longest draft), the
    defaults that depend on it are filled in: FLy's window, when not configured, is vLLM's min(6, k - 1), and 1
    for k < 2 (a step of at most one draft defers nothing, whatever the window). Without ``k`` they stay as
    configured (None), as logs and ``doctor`` show them. A server checks ``k`` first
    (:func:`settings_at_startup`): vLLM refuses FLy with fewer than 2 speculative tokens, and so does ears-vllm."""
    settings = {name: values[name] for name in get_policy(policy).params}
    if k is not None and settings.get("fly_window_size", 0) is None:
        settings["fly_window_size"] = max(1, min(6, k - 1))
    return settings


def settings_at_startup(policy: str, values: Mapping[str, Any], num_speculative_tokens: int) -> dict[str, Any]:
    """:func:`settings_for` ``num_speculative_tokens``, after the checks vLLM makes when it starts: ValueError for
    fewer speculative tokens than the policy needs (FLy: 2) or a FLy window that is not smaller than them."""
    spec, k = get_policy(policy), num_speculative_tokens
    if k < spec.min_speculative_tokens:
        raise ValueError(
            f"policy {policy!r} needs at least {spec.min_speculative_tokens} speculative tokens "
            f"(num_speculative_tokens = {k})"
        )
    window = values.get("fly_window_size") if "fly_window_size" in spec.params else None
    if window is not None and window >= k:
        raise ValueError(
            f"ears config key 'fly_window_size' = {window} must be smaller than num_speculative_tokens ({k})"
        )
    return settings_for(policy, values, k)


def budget_refusal(policy: str, runner: str) -> str | None:
    """Why a deviation budget with ``policy`` cannot run on ``runner`` (None: it can, or the runner does not run
    the policy at all, which the plan says first); the one place "FLy + budget is V1-only" is decided (read by the
    sampler's plan, ``seam.verification``, and the per-request check, ``seam.vllm_requests``)."""
    spec = get_policy(policy)
    if runner not in spec.runners or runner in spec.budget_runners or not spec.only_adds_acceptances:
        return None
    return (
        f"a deviation budget with policy {policy!r} runs on the {' and '.join(spec.budget_runners)} runner only "
        f"(not on {runner})"
    )


def request_policy_refusal(server_policy: str, policy: str, runner: str) -> str | None:
    """Why a request on a server of ``server_policy`` verifying on ``runner`` cannot be verified with ``policy``
    (None: it can); the one place that decides which policies a request may switch to on a runner (read by the
    per-request check, ``seam.vllm_requests``, and MRV2's slots, ``seam.vllm_mrv2``). MRV2 verifies a batch
    in one walk that reads each row's policy, so a request may take any policy whose ``runners`` name MRV2; but a
    keyed server (ERSD) races its whole batch on the request keys, so its requests keep its policy there."""
    if policy == server_policy:
        return None
    spec = get_policy(policy)
    if runner not in spec.runners:
        return f"policy {policy!r} is not available on the {runner} runner (it is on {list(spec.runners)})"
    if runner == "MRV2" and get_policy(server_policy).keyed:
        return f"a server of policy {server_policy!r} races every request of a batch on its keys on {runner}"
    return None
