"""consumers.inference.generation._record_server_sessions: records every server session, and never keeps the session alive."""
from __future__ import annotations

import gc
import weakref

from consumers.inference.generation import _record_server_sessions


class FakeSession:
    """The one method of petals' InferenceSession the recorder wraps."""

    def _enter_server_sessions(self, chosen_spans):
        return [f"server session for {span}" for span in chosen_spans]


def test_records_every_server_session_the_session_creates():
    session, into = FakeSession(), []
    _record_server_sessions(session, into)
    assert session._enter_server_sessions(["0:2", "2:4"]) == ["server session for 0:2", "server session for 2:4"]
    session._enter_server_sessions(["2:4"])  # a replacement after a server failure
    assert into == ["server session for 0:2", "server session for 2:4", "server session for 2:4"]


def test_the_recorder_makes_no_reference_cycle():
    # A cycle would leave the session to the cyclic collector, which may run on Petals' event-loop thread,
    # where a session's __del__ deadlocks.
    gc.disable()
    try:
        session = FakeSession()
        _record_server_sessions(session, [])
        gone = weakref.ref(session)
        del session
        assert gone() is None  # freed by reference counting alone
    finally:
        gc.enable()
