"""Schemathesis against the gateway's OpenAPI document (bounded): whatever it sends, no 5xx.

The gateway runs with a funded key, a scripted worker and the ledger on a real broker and PostgreSQL, so
accepted requests are generated and settled for real; afterwards the ledger audit must still be clean.

The native API (/api/...) is fuzzed once more on its own, harder: valid and invalid data (schemathesis' negative
mode), every refusal's status and content type documented and its body matching its schema, invalid data always
refused (negative_data_rejection: "10", true or 2.0 is no integer). Its key has no credit, so each valid request
goes through every check (key, model, prompt tokens) to its 402, and nothing is reserved, published or charged.
"""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from farmesh.billing import accounts
from farmesh.runtime.settings import Settings
from producers.gateway.app import create_app
from schemas import topics
from tests.integration.test_openai_api import env, settled, start  # noqa: F401 (env is a fixture)
from tests.support.kafka import read_all
from tests.support.money import audit_breaks
from tests.support.services import serve

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 25  # per operation; with the fixed seed below the run takes well under a minute here


async def schemathesis(url: str, key: str, cwd: Path, *options: str) -> subprocess.CompletedProcess:
    st = Path(sys.executable).with_name("st")
    # A thread, not asyncio's subprocess API: that needs a child watcher, which uvloop's policy (set by other
    # tests' servers) does not provide.
    return await asyncio.to_thread(
        subprocess.run,
        [str(st), "run", f"{url}/openapi.json", "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic",
         "--request-timeout", "30", "--workers", "1", "--header", f"Authorization: Bearer {key}", *options],
        cwd=cwd, capture_output=True, text=True, timeout=400, env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )


async def test_the_openapi_document_is_complete_and_fuzzing_it_yields_no_5xx(env, tiny_model_dir, tmp_path):  # noqa: F811
    async with await start(env, tiny_model_dir, gateways=1, workers=1, concurrency=2, delay=0) as mesh:
        url = mesh.urls[0]
        async with httpx.AsyncClient(base_url=url) as http:
            document = (await http.get("/openapi.json")).json()
        paths = set(document["paths"])
        assert {"/api/inference/generate", "/v1/completions", "/v1/chat/completions", "/v1/models",
                "/api/sessions/{request_id}", "/api/nodes", "/health"} <= paths
        for path in ("/v1/completions", "/v1/chat/completions", "/api/inference/generate"):
            assert {"400" if path.startswith("/v1") else "422", "401", "402", "404", "429"} <= \
                set(document["paths"][path]["post"]["responses"]), path
        for path, shape in (("/v1/completions", "Completion"), ("/v1/chat/completions", "ChatCompletion")):
            ok = document["paths"][path]["post"]["responses"]["200"]["content"]
            assert ok["application/json"]["schema"]["$ref"].endswith(f"/{shape}") and "text/event-stream" in ok
            assert document["paths"][path]["post"]["responses"]["429"]["content"]["application/json"]["schema"][
                "$ref"].endswith("/ErrorBody")

        process = await schemathesis(url, mesh.key, tmp_path, "--checks",
                                     "not_a_server_error,response_schema_conformance",
                                     "--exclude-path", "/status")  # an HTML page (rendered by a browser test)
        report = process.stdout + process.stderr
        assert process.returncode == 0, report[-6000:]
        await settled(env)
        # The documented examples reached generation: fuzzing did not stop at validation.
        generated = await env.pool.fetchval("SELECT count(*) FROM far_mesh_sessions WHERE account_id = $1",
                                            mesh.account_id)
        assert generated > 0, report[-3000:]
    assert await audit_breaks(env.pool) == []


async def test_fuzzing_the_native_api_with_invalid_data_yields_documented_refusals_only(env, tiny_model_dir,  # noqa: F811
                                                                                      tmp_path):
    settings = Settings(kafka_bootstrap=env.bootstrap, database_url=env.database_url, dht_prefix="tiny",
                        model=str(tiny_model_dir), max_new_tokens=64, gateway_id="gw-fuzz-native")

    async def route_check() -> bool:
        return True

    async with env.pool.acquire() as conn:  # no credit: every valid request ends in its 402
        issued = await accounts.create_client(conn, "fuzz-native", 0)
    before = set(await read_all(env.bootstrap, topics.REQUESTS.name))
    async with serve(create_app(settings, route_check)) as url:
        process = await schemathesis(
            url, issued.key, tmp_path, "--include-path-regex", "^/api/", "--mode", "all",
            # the account and admin APIs have their own runs (tests/integration/test_account_api.py)
            "--exclude-path-regex", "^/api/(account|usage|admin)",
            "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance,"
                        "content_type_conformance,negative_data_rejection")
    report = process.stdout + process.stderr
    assert process.returncode == 0, report[-6000:]
    tested = re.search(r"Tested: (\d+)", report)  # generate, sessions, nodes, one node, swarm, heartbeats
    assert tested and int(tested.group(1)) == 6, report[-3000:]
    assert await env.pool.fetchval("SELECT count(*) FROM far_reservations WHERE account_id = $1",
                                   issued.account_id) == 0
    assert set(await read_all(env.bootstrap, topics.REQUESTS.name)) == before  # nothing published
    assert await accounts.balance(env.pool, issued.account_id) == (0, 0)
    assert await audit_breaks(env.pool) == []
