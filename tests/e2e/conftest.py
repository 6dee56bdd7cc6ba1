"""End-to-end tests run on the session-wide loopback swarm: the `swarm` fixture of tests/conftest.py
(tests/support/swarm.py), shared with the fault drills in tests/chaos."""
