"""Which work counts: the one rule the worker, the ledger, the payments group and a replay all apply.

Money moves only for what the gateway reserved. The gateway holds max_tokens x price on a client's account
(far_reservations) before it publishes a request; anyone who can write to a topic can publish a well-formed event,
so the reservation, not the event, is what is trusted:

- A worker runs a request only while its reservation is open and says what the request says (account, model,
  price, fee rate, no more tokens than were reserved, and the reply topic of the gateway that reserved it, so
  its tokens go to nobody else): `request_problem`.
- An outcome counts only when its money adds up exactly (`money_problem`), it names a client account, it matches
  its request's reservation (same account and model, the reserved price and fee rate, no more tokens than were
  reserved, so cost <= the reserved amount) and its contributions are exactly what the pricing rule gives for their
  spans (farmesh/billing/pricing.py `settlement`: the nodes' shares are recomputed, never trusted):
  `reservation_problem`. Anything else is rejected with its reason (the consumers dead-letter it) and moves nothing.

Which accepted outcome wins a request: the one a consumer group already recorded for it, else the first in log
order. Every consumer reads the sessions topic partition by partition in the same order, so normally all pick the
first; and the facts (db/views/acceptance.py) carry the winner either group recorded (the ledger's settlement, the
payments group's choice), so the second to judge a request follows the first even if they saw two acceptable
outcomes in different orders (an outcome keyed or partitioned apart from its request). A later acceptable outcome
(a redelivered request that ran again, the same event delivered again) is not rejected: it loses, and records
nothing. So the payments group pays exactly the work the ledger credits, and a replay rebuilds the same projections.

The states of a reservation, and what each admits:

- open: not settled yet. The first acceptable outcome wins.
- settled / released BY AN OUTCOME (settlement_txn: a completed outcome settles it; a failed, cancelled or expired
  one releases it, charged only the tokens it delivered, nothing for an expired one): that outcome is the winner;
  the payments group and a replay, which may judge it after the ledger closed the reservation, accept it (and
  only it).
- released with NO outcome (withdrawn: `farmesh keys release`, or the gateway could not queue the request): no
  outcome is accepted, unless a group had already recorded one as the winner while the reservation was still open
  (an outcome can be published before the release and reach one group before it and the other after it). Then
  that one wins for every consumer, as for any request with a recorded winner, so the groups never part ways; the
  ledger settles the reservation with it (the client pays for work that was done, within what was held). The row
  locks of db/views/acceptance.py make a release wait for a group that is judging the request.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Sequence
from uuid import UUID

from db.views.acceptance import Facts
from db.views.reservations import Reservation
from farmesh.billing.pricing import Work, fee_rate_units, platform_fee, session_cost, split
from schemas import money
from schemas.events import InferenceRequested, SessionOutcome


def money_problem(o: SessionOutcome) -> str | None:
    """Why an outcome's amounts do not add up (None when they do)."""
    try:
        price = money.to_base_units(o.price_per_token)
        cost = money.to_base_units(o.cost_far)
        fee = money.to_base_units(o.platform_fee_far)
        rate = fee_rate_units(o.platform_fee_rate)
        earnings = [money.to_base_units(c.earnings_far) for c in o.contributions]
    except ValueError as exc:
        return f"amount not exact: {exc}"
    if cost != session_cost(o.completion_tokens, price):
        return f"cost {o.cost_far} != {o.completion_tokens} tokens x {o.price_per_token}"
    work = [Work(c.peer_id, c.start_block, c.end_block, c.tokens_processed) for c in o.contributions]
    expected_fee = cost if sum(w.weight for w in work) == 0 else platform_fee(cost, rate)
    if fee != expected_fee:
        return f"platform fee {o.platform_fee_far} != floor({o.cost_far} x {o.platform_fee_rate})"
    if sum(earnings) + fee != cost:
        return f"earnings {money.text(money.to_far(sum(earnings)))} + fee {o.platform_fee_far} != cost {o.cost_far}"
    if any(c.end_block <= c.start_block for c in o.contributions):
        return "a contribution's end_block is not after its start_block"
    if len({c.contribution_id for c in o.contributions}) != len(o.contributions):
        return "two contributions share an id"
    if len({(c.peer_id, c.start_block, c.end_block) for c in o.contributions}) != len(o.contributions):
        return "two contributions of one peer over the same blocks"
    if o.status == "expired" and (o.completion_tokens or o.contributions):
        return "an expired request never ran: it delivers no tokens and no work"
    return None


def _terms_problem(what: str, request_id: str, r: Reservation, account_id: UUID, model: str, price: Decimal,
                   fee_rate: Decimal, tokens: int) -> str | None:
    """Why `what` (a request or an outcome of `request_id`) does not keep to the terms of its reservation."""
    if account_id != r.account_id:
        return f"request {request_id} was reserved by account {r.account_id}, not {account_id}"
    if model != r.model:
        return f"request {request_id} was reserved for model {r.model!r}, not {model!r}"
    # Exact decimals (the events' amounts are validated, the reservation's are NUMERIC(38,18)): equal as numbers,
    # however many trailing zeros either is written with.
    if price != r.price_per_token:
        return f"{what} price_per_token {money.text(price)} != the reserved {money.text(r.price_per_token)}"
    if fee_rate != r.platform_fee_rate:
        return f"{what} platform_fee_rate {money.text(fee_rate)} != the reserved {money.text(r.platform_fee_rate)}"
    if tokens > r.max_tokens:
        return f"{what} {tokens} tokens > the {r.max_tokens} reserved"
    return None


def reservation_problem(o: SessionOutcome, r: Reservation | None, taken: Collection[UUID] = ()) -> str | None:
    """Why an outcome (whose money adds up) does not match what the gateway reserved for its request, or must not
    settle it; None when it may. `taken`: the outcomes a consumer group already recorded for the request."""
    if r is None:
        return f"no reservation for request {o.request_id} (the gateway reserves every request before queueing it)"
    problem = _terms_problem("outcome", o.request_id, r, o.account_id, o.model, o.price_per_token,
                             o.platform_fee_rate, o.completion_tokens)
    if problem is not None:
        return problem
    if o.cost_far > r.amount:  # follows from the tokens and the price; kept as the rule's own words
        return f"cost {money.text(o.cost_far)} > the reserved {money.text(r.amount)}"
    # money_problem checked cost = tokens x price and fee = the fee rule at the outcome's price and rate, now known
    # to be the reserved ones (pricing.settlement's debit and fee): what is left of the settlement is the split.
    work = [Work(c.peer_id, c.start_block, c.end_block, c.tokens_processed) for c in o.contributions]
    if sum(w.weight for w in work):  # (no work: the platform kept the whole cost, every share is 0)
        shares = split(money.to_base_units(o.cost_far) - money.to_base_units(o.platform_fee_far), work)
        if [money.to_base_units(c.earnings_far) for c in o.contributions] != shares:
            return ("contributions are not the pricing rule's split of their spans: earnings "
                    f"{[money.text(c.earnings_far) for c in o.contributions]} != "
                    f"{[money.text(money.to_far(s)) for s in shares]}")
    if r.withdrawn and not taken:  # (had a group taken an outcome before the release, that one wins: see judge)
        return (f"the reservation of request {o.request_id} was released without an outcome"
                f"{f' ({r.reason})' if r.reason else ''}: nothing may settle it")
    return None


def request_problem(request: InferenceRequested, r: Reservation | None) -> str | None:
    """Why a worker must not run `request` (None when it may): it matches no open reservation."""
    if r is None:
        return f"no reservation for request {request.request_id} (the gateway reserves every request before queueing it)"
    if r.status != "open":
        return (f"the reservation of request {request.request_id} is {r.status}"
                f"{f' ({r.reason})' if r.reason else ''}: it is not run again")
    problem = _terms_problem("request", request.request_id, r, request.account_id, request.model,
                             request.price_per_token, request.platform_fee_rate, request.max_tokens)
    if problem is not None:
        return problem
    # The tokens go where the gateway that reserved them reads them, not to a topic a forged request names.
    if r.reply_topic is not None and request.reply_topic != r.reply_topic:
        return f"request reply_topic {request.reply_topic!r} != the reserved {r.reply_topic!r}"
    try:
        most = session_cost(request.max_tokens, money.to_base_units(request.price_per_token))
    except ValueError as exc:
        return f"amount not exact: {exc}"
    if most > money.to_base_units(r.amount):
        return f"request may cost {money.text(money.to_far(most))} > the reserved {money.text(r.amount)}"
    return None


def contribution_conflict(o: SessionOutcome, owners: dict[UUID, str]) -> str | None:
    """A contribution id that already belongs to another request; else records the outcome's ids in `owners`."""
    for c in o.contributions:
        owner = owners.get(c.contribution_id)
        if owner is not None and owner != o.request_id:
            return f"contribution {c.contribution_id} already belongs to request {owner}"
    owners.update({c.contribution_id: o.request_id for c in o.contributions})
    return None


@dataclass
class Verdict:
    """A batch judged: why each rejected outcome (by index) must not be recorded (the consumers dead-letter those),
    and the acceptable outcomes that lose to the winner a group already recorded (ignored, like a duplicate)."""

    rejected: dict[int, str] = field(default_factory=dict)
    losers: set[int] = field(default_factory=set)

    def accepted(self, outcomes: Sequence[SessionOutcome]) -> list[SessionOutcome]:
        """The outcomes to hand to the recording (where the first of a request wins)."""
        return [o for i, o in enumerate(outcomes) if i not in self.rejected and i not in self.losers]


def outcome_problem(o: SessionOutcome, facts: Facts) -> str | None:
    """Why one outcome must not be recorded, on the batch's facts (contribution ids aside)."""
    problem = money_problem(o)
    if problem is None and o.account_id not in facts.clients:
        problem = f"unknown client account {o.account_id}"
    if problem is None:
        problem = reservation_problem(o, facts.reservations.get(o.request_id), facts.taken.get(o.request_id, ()))
    return problem


def judge(outcomes: Sequence[SessionOutcome], facts: Facts) -> Verdict:
    """The rule over a batch, in order (`facts.owners` gains the contribution ids of the outcomes kept)."""
    verdict = Verdict()
    for i, o in enumerate(outcomes):
        problem = outcome_problem(o, facts)
        if problem is None:
            problem = contribution_conflict(o, facts.owners)
        if problem is not None:
            verdict.rejected[i] = problem
        elif (won := facts.taken.get(o.request_id)) and o.event_id not in won:
            verdict.losers.add(i)
    return verdict
