"""Schemathesis against the gateway's OpenAPI document (bounded): whatever it sends, no 5xx.

The gateway runs with a funded key, a scripted worker and the ledger on a real broker and PostgreSQL, so
accepted requests are generated and settled for real; afterwards the ledger audit must still be clean.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.test_openai_api import env, settled, start  # noqa: F401 (env is a fixture)
from tests.support.money import audit_breaks

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 25  # per operation; with the fixed seed below the run takes well under a minute here


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

        st = Path(sys.executable).with_name("st")
        # A thread, not asyncio's subprocess API: that needs a child watcher, which uvloop's policy (set by other
        # tests' servers) does not provide.
        process = await asyncio.to_thread(
            subprocess.run,
            [str(st), "run", f"{url}/openapi.json", "--checks", "not_a_server_error,response_schema_conformance",
             "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic", "--request-timeout", "30",
             "--workers", "1", "--header", f"Authorization: Bearer {mesh.key}",
             "--exclude-path", "/status"],  # an HTML page (rendered by a browser test)
            cwd=tmp_path, capture_output=True, text=True, timeout=400, env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        )
        report = process.stdout + process.stderr
        assert process.returncode == 0, report[-6000:]
        await settled(env)
        # The documented examples reached generation: fuzzing did not stop at validation.
        generated = await env.pool.fetchval("SELECT count(*) FROM far_mesh_sessions WHERE account_id = $1",
                                            mesh.account_id)
        assert generated > 0, report[-3000:]
    assert await audit_breaks(env.pool) == []
