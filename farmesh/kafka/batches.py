"""A consumer batch of the sessions topic, parsed: the outcomes to judge, and a dead letter for each record that
is no session event."""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from farmesh.kafka import messaging
from schemas.events import NodeContribution, SessionOutcome, session_event_adapter


async def outcomes_of(broker: Any, group: str, message: Any) -> tuple[list[Any], list[SessionOutcome], list[Any]]:
    """A consumer batch of the sessions topic: (records, session outcomes, the record of each outcome).

    Records that are no session event go to the dead-letter topic; NodeContribution events are skipped
    because every contribution also travels inside its outcome.
    """
    raw = message.raw_message
    records = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    outcomes: list[SessionOutcome] = []
    sources: list[Any] = []
    for record in records:
        try:
            event = session_event_adapter.validate_json(record.value)
        except (ValidationError, ValueError) as exc:
            await messaging.send_dead_letter(broker, group, record, f"invalid session event: {exc}")
            continue
        if not isinstance(event, NodeContribution):
            outcomes.append(event)
            sources.append(record)
    return records, outcomes, sources
