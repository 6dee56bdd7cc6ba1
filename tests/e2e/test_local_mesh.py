"""`farmesh up` and `farmesh demo` as a user runs them: real processes, stopped by pid."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import pytest

from farmesh.billing import accounts
from farmesh.dev.local_services import pid_alive
from tests.support.kafka import test_broker
from tests.support.money import farmesh

pytestmark = pytest.mark.e2e
PIDS = re.compile(r"\(pid (\d+)\)")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMESH_")}
    return {**env, "FARMESH_DATA_DIR": str(tmp_path / "data"),
            "FARMESH_LOG_LEVEL": "WARNING", **extra}


def _stop_leftovers(pids: list[int]) -> list[int]:
    alive = [p for p in pids if pid_alive(p)]
    for pid in alive:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return alive


@pytest.mark.skipif(os.environ.get("FARMESH_TEST_KAFKA_BOOTSTRAP") is not None, reason="up starts its own broker")
async def test_up_serves_the_plan_request_and_stops_every_process(tmp_path, empty_database_url):
    database_url = empty_database_url  # `up` migrates it itself
    up = subprocess.Popen(
        [sys.executable, "-m", "farmesh.cli", "up", "--gateway-port", "0", "--model", "tiny"],
        env=_env(tmp_path, FARMESH_DATABASE_URL=database_url, FARMESH_BROKER=test_broker()),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    child_pids: list[int] = []
    try:
        line = up.stdout.readline()  # blocks until ready (or exit)
        assert line.startswith("ready gateway=http://127.0.0.1:"), (line, up.stderr.read() if up.poll() else "")
        gateway = line.split("=", 1)[1].split()[0]
        api_key = re.search(r" api_key=(\S+)", line)[1]  # `up` creates a demo key with credit
        body = {"prompt": "Hello, how are you?", "max_tokens": 100, "request_id": "test-001"}
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {api_key}"}) as client:
            async with client.stream("POST", f"{gateway}/api/inference/generate", json=body) as r:
                lines = [x async for x in r.aiter_lines()]
            assert r.status_code == 200
            assert sum(x == "event: token" for x in lines) == 100 and "event: done" in lines
            conn = await asyncpg.connect(database_url)
            try:  # the mesh knows test-001 scoped by the demo key's account
                rid = await _mesh_id(conn, api_key, "test-001")
                for _ in range(100):
                    if await conn.fetchval("SELECT count(*) FROM far_session_contributions WHERE request_id=$1", rid) == 2 \
                            and await conn.fetchval("SELECT count(*) FROM far_payment_items WHERE request_id=$1", rid) == 2:
                        break  # recorded by the ledger and by the payments group
                    time.sleep(0.1)
                session = await conn.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = $1", rid)
                rows = await conn.fetch("SELECT * FROM far_session_contributions WHERE request_id = $1", rid)
                reservation = await conn.fetchrow("SELECT * FROM far_reservations WHERE request_id = $1", rid)
            finally:
                await conn.close()
        assert session["status"] == "completed" and session["completion_tokens"] == 100
        assert len(rows) == 2 and len({r["peer_id"] for r in rows}) == 2
        assert sum(r["earnings"] for r in rows) == session["cost"] == 100 * session["price_per_token"]
        assert reservation["status"] == "settled" and reservation["charged"] == session["cost"]
        await _openai_checks(gateway, api_key, database_url, tmp_path / "data" / "tiny-model")
        audit = await farmesh("ledger", "audit", "--database-url", database_url)
        assert audit.exit_code == 0, audit.output
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            _, err = up.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            up.kill()
            _, err = up.communicate()
        child_pids = [int(p) for p in PIDS.findall(err)]
        leftovers = _stop_leftovers(child_pids)
    assert up.returncode == 0, err[-3000:]
    assert len(child_pids) >= 6  # broker, dht, 2 nodes, ledger, worker, gateway (PostgreSQL is external here)
    assert leftovers == [], f"processes left running: {leftovers}"


async def _mesh_id(conn: asyncpg.Connection, api_key: str, request_id: str) -> str:
    """The mesh's id of the key's account's request `request_id` (request ids are private to an account)."""
    client = await accounts.authenticate(conn, f"Bearer {api_key}")
    return accounts.mesh_request_id(client.account_id, request_id)


async def _openai_checks(gateway: str, api_key: str, database_url: str, model_dir: Path) -> None:
    """The issue's check: the official openai client (base_url = the gateway, the demo key) streams a chat
    completion; two concurrent streams don't mix; an aborted stream is charged only its delivered tokens."""
    import openai
    from transformers import AutoTokenizer

    from producers.gateway.chat import ChatMessage, default_prompt
    from tests.support.reference import greedy_ids

    client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key=api_key, max_retries=0, timeout=120)
    model = (await client.models.list()).data[0].id
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.clean_up_tokenization_spaces = False

    async def chat(question: str) -> str:
        stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                      max_tokens=15, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    questions = ["What is the mesh?", "Who pays the nodes?"]
    got = await asyncio.gather(*(chat(q) for q in questions))
    expected = [tokenizer.decode(greedy_ids(model_dir, default_prompt([ChatMessage(role="user", content=q)]), 15),
                                 skip_special_tokens=True) for q in questions]
    assert list(got) == expected

    key = "abort-001"
    stream = await client.completions.create(model=model, prompt="Tell me a long story", max_tokens=300,
                                             stream=True, extra_headers={"Idempotency-Key": key})
    received = ""
    async for chunk in stream:
        received += chunk.choices[0].text if chunk.choices else ""
        if len(received) >= 10:
            break
    await stream.close()
    conn = await asyncpg.connect(database_url)
    try:
        mesh_id = await _mesh_id(conn, api_key, key)
        for _ in range(300):
            session = await conn.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = $1", mesh_id)
            if session is not None:
                break
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    assert session is not None and session["status"] == "cancelled"
    assert 0 < session["completion_tokens"] < 300
    assert session["cost"] == session["completion_tokens"] * session["price_per_token"]


def test_demo_runs_on_embedded_defaults(tmp_path):
    """`make demo`: SmolLM2 (imported from its package into the data dir), the embedded noida-db and PostgreSQL,
    whatever FARMESH_TEST_BROKER says (the `up` tests above run on its broker). A real answer in English to the
    plan's prompt, then "Paris" through the OpenAI-compatible API."""
    demo = subprocess.run(
        [sys.executable, "-m", "farmesh.cli", "demo", "--max-tokens", "40"], env=_env(tmp_path),
        capture_output=True, text=True, timeout=600,
    )
    child_pids = [int(p) for p in PIDS.findall(demo.stderr)]
    assert _stop_leftovers(child_pids) == []
    assert demo.returncode == 0, demo.stderr[-3000:]
    out = demo.stdout
    print(f"\n{out}")
    assert "embedded PostgreSQL" in demo.stderr and "embedded Kafka-protocol broker" in demo.stderr
    assert (tmp_path / "data" / "models" / "smollm2-135m-instruct" / "model.safetensors").exists()
    answer, after = out.split("--- streamed text ---\n", 1)[1].split("\n--- ", 1)
    assert re.search(r"\b(I|I'm|you|am|are|fine|well|hello|hi|help|thank)\b", answer, re.I), answer
    done = json.loads(after.splitlines()[0])
    assert done["event"] == "done" and 0 < done["usage"]["completion_tokens"] <= 40
    assert done["finish_reason"] == "stop" or done["usage"]["completion_tokens"] == 40
    assert "far_session_contributions:" in out
    assert re.search(r"^  request_id\s+test-001$", out, re.M), out  # the client's own id, as it named it
    assert re.search(r"^  model\s+smollm2-135m-instruct$", out, re.M), out
    table = out.split("far_session_contributions:")[1].splitlines()[2:]
    rows = [ln.split() for ln in table if ln.startswith("  Qm")]
    assert [r[1] for r in rows] == ["0:15", "15:30"] and all(int(r[2]) == int(rows[0][2]) > 20 for r in rows)
    chat = out.split("--- streamed answer ---\n", 1)[1].split("\n--- ", 1)[0]
    assert "Paris" in chat, chat
