"""A deviation budget: at most B relaxed acceptances per verified position, held per request or per server.

Terms: a request's *ledger* counts its verified positions V (every accepted draft and the first rejected one
of each step, on sampled requests) and its relaxed acceptances R (drafts accepted only because of the
relaxation). R / V is the request's relaxed rate. For ears, relaxed_topk and adasd it is the added TV per
position (``PolicySpec.relaxed_rate``), so there B is a budget of added TV per position. For fly it is not: FLy
emits the drafts of a confirmed window conditioned on their passing the native test, a deviation it never
counts, so per position its TV may exceed R / V; what R bounds is the deviation of the request's whole text
(run FLy and the standard rule on the same randoms: the texts coincide until the first relaxed acceptance, so
their TV is at most P(R > 0) <= E[R] <= B * E[V]). For fly, B caps that, not a per-position TV. Its *slack*
before a step is ``B * V - R``. Inside the step, the draft at
position j (0-based) may be accepted through the relaxation only if the relaxed acceptances before it in the
step, plus this one, fit in ``slack + B * (j + 1)``; otherwise it is rejected as the standard rule rejects it.
So ``R <= B * V`` holds after every verified position of every request: the realised rate of each request,
and of any run, is at or under B by construction.

Sampled requests only. A greedy request has no ledger, so where the policy relaxes greedy rows too (fly and
relaxed_topk, as their sources do: ``PolicySpec.greedy_rows``) those relaxed acceptances are not capped by any
budget, on any path (``ears_vllm.verify`` gives greedy rows budget 0, the vLLM adapters make no ledger for greedy
requests); they are counted apart (``VerifyStats.greedy_relaxed``). Capping them would need a ledger for greedy
requests in every path, the reference, the kernels and both runners' adapters; it is stated here and in
docs/serving.md instead.

While the ledger has slack the policy runs at its loosest (``BUDGETED_TOLERANCE``: EARS relaxes as far as
it goes), so each unit of budget is spent on the first rejection the relaxation can turn into an acceptance:
the request accepts as much as B allows. The tolerance thus moves online between "relax anything" and
"standard" with the slack, position by position.

Scope (config key ``budget_scope``). ``"request"`` (the default): each request holds its own ledger, which
depends only on its own steps, so a seeded request gives the same text whatever else the server runs. The price
is granularity: relaxed acceptances are whole, so a request spends at most ``floor(B * V)``; at B = 0.01 a
request of 170 verified positions may relax once (0.006). ``"server"``: the requests that run the server's
budget share one ledger (a *pool*), so the fractions add up across requests and the realised rate of the run
comes within one acceptance of ``B * V``; the price is that a seeded request's text then depends on the
traffic it shared the pool with. A request's own ``ears_budget`` always holds its own ledger.

Before each step the pool's slack is dealt to the rows that share it by :func:`share_slack`, and each row is
capped by its share as above, so the step cannot overspend the pool.
"""

from __future__ import annotations

import dataclasses

import torch

# The tolerance a budgeted request runs with: the cap, not the tolerance, bounds its deviation.
BUDGETED_TOLERANCE = 1.0


@dataclasses.dataclass
class BudgetLedger:
    """One request's spending against its budget."""

    budget: float  # B: relaxed acceptances allowed per verified position
    verified: int = 0
    relaxed: int = 0
    shared: bool = False  # the server's pool (budget_scope "server"), dealt out by share_slack each step
    steps: int = 0  # steps the pool was dealt out in (where the deal's rotation starts)

    @property
    def slack(self) -> float:
        """Relaxed acceptances still allowed before the next step's own positions add to the allowance."""
        return self.budget * self.verified - self.relaxed

    def record(self, verified: int, relaxed: int) -> None:
        self.verified += verified
        self.relaxed += relaxed


def share_slack(
    slack: torch.Tensor,  # [] float64: the pool's slack
    pooled: torch.Tensor,  # [num_rows] bool: the rows that share the pool
    start: int,  # the rotation: which pooled row is dealt to first
) -> torch.Tensor:  # [num_rows] float64: each pooled row's share (0 elsewhere), summing to ``slack``
    """Deal the pool's slack to the rows that share it: whole units one row at a time, starting at pooled row
    ``start mod n`` and wrapping around, then the fraction to the next row in turn.

    Whole units because a row can relax only with a whole relaxed acceptance of slack (an even split would
    strand the pool until every row held one); a rotating start so that no row waits for its turn for long.
    Device tensors in, device tensor out: no host synchronisation (MRV2 deals on the GPU)."""
    count = pooled.sum().clamp_min(1)
    turn = (pooled.cumsum(0) - 1 - start) % count  # each pooled row's place in this step's deal
    units = slack.clamp_min(0).floor()
    whole = torch.div(units, count, rounding_mode="floor") + (turn < units % count).to(slack.dtype)
    fraction = (turn == units % count).to(slack.dtype) * (slack.clamp_min(0) - units)
    return torch.where(pooled, whole + fraction, torch.zeros_like(whole))
