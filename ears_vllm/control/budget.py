"""A deviation budget: at most B relaxed acceptances per verified position, held per request.

Terms: a request's *ledger* counts its verified positions V (every accepted draft and the first rejected one
of each step, on sampled requests) and its relaxed acceptances R (drafts accepted only because of the
relaxation). R / V is the request's added TV per position (exact for ears and relaxed_topk, a bound for fly),
so B is a budget of added TV. Its *slack* before a step is ``B * V - R``. Inside the step, the draft at
position j (0-based) may be accepted through the relaxation only if the relaxed acceptances before it in the
step, plus this one, fit in ``slack + B * (j + 1)``; otherwise it is rejected as the standard rule rejects it.
So ``R <= B * V`` holds after every verified position of every request: the realised rate of each request,
and of any run, is at or under B by construction.

While the ledger has slack the policy runs at its loosest (``BUDGETED_TOLERANCE``: EARS relaxes as far as
it goes), so each unit of budget is spent on the first rejection the relaxation can turn into an acceptance:
the request accepts as much as B allows. The tolerance thus moves online between "relax anything" and
"standard" with the slack, position by position.

Why per request, not per server: a request's ledger depends only on its own steps, so a seeded request gives
the same text whatever else the server runs (a server-wide ledger would spend one tenant's budget on
another's traffic and make seeded output depend on the load). The price is granularity: a request ends with
``R`` between ``B * V - 1`` and ``B * V``, so a short request at a small budget spends a little less than B.
"""

from __future__ import annotations

import dataclasses

# The tolerance a budgeted request runs with: the cap, not the tolerance, bounds its deviation.
BUDGETED_TOLERANCE = 1.0


@dataclasses.dataclass
class BudgetLedger:
    """One request's spending against its budget."""

    budget: float  # B: relaxed acceptances allowed per verified position
    verified: int = 0
    relaxed: int = 0

    @property
    def slack(self) -> float:
        """Relaxed acceptances still allowed before the next step's own positions add to the allowance."""
        return self.budget * self.verified - self.relaxed

    def record(self, verified: int, relaxed: int) -> None:
        self.verified += verified
        self.relaxed += relaxed
