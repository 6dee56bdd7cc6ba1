"""Clients and operators over HTTP (/api/account, /api/usage, /api/admin/, per-key limits, the /account page) on a
real broker and PostgreSQL: two gateways with an admin token, a scripted worker and the ledger."""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import uuid

import httpx
import pytest
from prometheus_client import CollectorRegistry

from consumers.inference import consumer as worker
from consumers.inference.repository import PostgresReservations
from consumers.ledger import consumer as ledger
from farmesh.billing import accounts
from farmesh.kafka import messaging
from farmesh.runtime.settings import Settings
from producers.gateway.app import create_app
from schemas import money, topics
from tests.integration.test_openai_api import EchoGenerator
from tests.support import browser
from tests.support.kafka import wait_caught_up
from tests.support.money import audit_breaks, farmesh, money_env
from tests.support.services import serve
from tests.support.sse import read_events

pytestmark = pytest.mark.integration
MODEL = "tiny"
TOKEN = "admin-token-" + "x" * 20
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
async def env(tmp_path_factory, postgres_admin_url):
    async with money_env(tmp_path_factory.mktemp("account-api"), postgres_admin_url) as e:
        yield e


@pytest.fixture(scope="module")
async def mesh(env, tiny_model_dir):
    """Two gateways (admin token set), one worker (4 generations at once), the ledger: their URLs."""
    brokers = []
    b = messaging.create_broker(env.bootstrap, topics.GROUP_INFERENCE, CollectorRegistry())
    worker.register(b, EchoGenerator(0.001), MODEL, CollectorRegistry(), reservations=PostgresReservations(env.pool),
                    concurrency=4)
    brokers.append(b)
    b = messaging.create_broker(env.bootstrap, topics.GROUP_LEDGER, CollectorRegistry())
    ledger.register(b, env.pool, CollectorRegistry())
    brokers.append(b)

    async def route_check() -> bool:
        return True

    async with contextlib.AsyncExitStack() as stack:
        for b in brokers:
            await b.start()
            stack.push_async_callback(b.stop)
        urls = []
        for i in range(2):
            settings = Settings(kafka_bootstrap=env.bootstrap, database_url=env.database_url, dht_prefix=MODEL,
                                model=str(tiny_model_dir), max_new_tokens=64, gateway_id=f"gw-acct-{i}",
                                admin_token=TOKEN)
            urls.append(await stack.enter_async_context(serve(create_app(settings, route_check))))
        yield urls


async def settled(env) -> None:
    await wait_caught_up(env.bootstrap, topics.GROUP_INFERENCE, topics.REQUESTS.name, timeout=60)
    await wait_caught_up(env.bootstrap, topics.GROUP_LEDGER, topics.SESSIONS.name, timeout=60)


async def generate(http: httpx.AsyncClient, key: str, rid: str, prompt: str = "one two three",
                   max_tokens: int = 3) -> tuple[int, object, httpx.Headers]:
    async with http.stream("POST", "/api/inference/generate", headers={"Authorization": f"Bearer {key}"},
                           json={"prompt": prompt, "max_tokens": max_tokens, "request_id": rid}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, r.json(), r.headers
        return 200, await read_events(r), r.headers


async def create_key(http: httpx.AsyncClient, name: str, credit: str = "1", **limits) -> dict:
    r = await http.post("/api/admin/keys", headers=ADMIN, json={"name": name, "credit_far": credit, "limits": limits})
    assert r.status_code == 201, r.text
    return r.json()


async def fresh_minute(margin: float = 15.0) -> None:
    """Wait for a new minute when this one has less than `margin` s left (the limits count fixed minutes)."""
    now = dt.datetime.now(dt.timezone.utc)
    if now.second + now.microsecond / 1e6 > 60 - margin:
        await asyncio.sleep(60.5 - now.second - now.microsecond / 1e6)


async def snapshot(env) -> dict[str, int]:
    tables = ("far_reservations", "far_ledger_transactions", "far_credits", "far_admin_audit", "far_accounts",
              "far_api_keys", "far_rate_counters")
    return {t: await env.pool.fetchval(f"SELECT count(*) FROM {t}") for t in tables}


async def test_a_key_with_a_2_rpm_limit_spends_reads_its_account_and_usage_then_gets_429(env, mesh):
    await fresh_minute()
    async with httpx.AsyncClient(base_url=mesh[0], timeout=60) as http, \
            httpx.AsyncClient(base_url=mesh[1], timeout=60) as other:
        created = await create_key(http, "two-rpm", "1", requests_per_minute=2)
        key, auth = created["key"], {"Authorization": f"Bearer {created['key']}"}
        assert created["limits"] == {"requests_per_minute": 2, "tokens_per_minute": None, "monthly_budget_far": None}
        assert (await generate(http, key, "r1"))[0] == 200
        assert (await generate(other, key, "r2"))[0] == 200  # the other gateway counts in the same minute
        status, body, headers = await generate(http, key, "r3")
        assert status == 429 and body["error"] == "rate_limited" and body["limit"] == "requests_per_minute"
        assert 1 <= int(headers["retry-after"]) <= 60
        v1 = await other.post("/v1/completions", headers=auth, json={"model": MODEL, "prompt": "a b", "max_tokens": 2})
        assert v1.status_code == 429 and v1.json()["error"]["code"] == "rate_limit_exceeded"
        assert v1.json()["error"]["type"] == "rate_limit_error" and int(v1.headers["retry-after"]) >= 1
        account_id = uuid.UUID(created["account_id"])
        # nothing reserved (or published) for the refused ones
        assert await env.pool.fetchval("SELECT count(*) FROM far_reservations WHERE account_id = $1", account_id) == 2
        await settled(env)

        account = (await http.get("/api/account", headers=auth)).json()
        have, reserved = await accounts.balance(env.pool, account_id)
        assert account["balance_far"] == money.text(money.to_far(have))
        assert (account["balance_far"], account["reserved_far"], account["available_far"]) == \
            ("0.9994", "0", "0.9994")  # 1 FAR - 2 x 3 tokens x 0.0001
        assert reserved == 0
        assert account["key"]["prefix"] == created["prefix"] and account["key"]["usage"]["requests_this_minute"] == 2
        assert account["key"]["usage"]["spent_this_month_far"] == "0.0006"
        assert [c["amount_far"] for c in account["credits"]] == ["1"]
        assert account["limits"]["requests_per_minute"] == 2

        for group_by, group in (("day", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")), ("model", MODEL),
                                ("key", created["prefix"])):
            usage = (await other.get("/api/usage", headers=auth, params={"group_by": group_by})).json()
            assert usage["rows"] == [{"group": group, "sessions": 2, "prompt_tokens": usage["rows"][0]["prompt_tokens"],
                                      "completion_tokens": 6, "spent_far": "0.0006"}], usage
            assert usage["total"]["spent_far"] == "0.0006"
        # what the ledger says: credits - balance = what usage reports spent
        debits = await env.pool.fetchval(
            "SELECT sum(amount) FROM far_ledger_entries WHERE account_id = $1 AND side = 'debit'", account_id)
        assert str(debits.normalize()) == "0.0006"
        sessions = (await http.get("/api/account/sessions", headers=auth)).json()["sessions"]
        assert sorted(s["request_id"] for s in sessions) == ["r1", "r2"]
        assert {s["cost_far"] for s in sessions} == {"0.0003"}
    assert await audit_breaks(env.pool) == []
    result = await farmesh("ledger", "audit", "--database-url", env.database_url)
    assert result.exit_code == 0, result.output


async def test_limits_refuse_the_right_requests_of_20_concurrent_over_2_gateways(env, mesh):
    await fresh_minute(25)
    async with httpx.AsyncClient(base_url=mesh[0], timeout=60) as a, httpx.AsyncClient(base_url=mesh[1], timeout=60) as b:
        rpm = await create_key(a, "rpm-5", "1", requests_per_minute=5)
        tpm = await create_key(a, "tpm-30", "1", tokens_per_minute=30)
        ten = " ".join(f"w{i}" for i in range(10))  # 10 words: each request delivers all of its max_tokens 10
        results = await asyncio.gather(*(generate((a, b)[i % 2], rpm["key"], f"c{i}") for i in range(20)),
                                       *(generate((a, b)[i % 2], tpm["key"], f"t{i}", ten, 10) for i in range(20)))
        rpm_statuses = [r[0] for r in results[:20]]
        tpm_statuses = [r[0] for r in results[20:]]
        assert sorted(rpm_statuses) == [200] * 5 + [429] * 15
        assert sorted(tpm_statuses) == [200] * 3 + [429] * 17  # 3 x max_tokens 10 = 30
        assert {r[1]["limit"] for r in results[20:] if r[0] == 429} == {"tokens_per_minute"}
        for issued, n in ((rpm, 5), (tpm, 3)):
            assert await env.pool.fetchval("SELECT count(*) FROM far_reservations WHERE account_id = $1",
                                           uuid.UUID(issued["account_id"])) == n

        # Counted on max_tokens at admission, corrected to the tokens delivered at settlement.
        short = await create_key(a, "tpm-30-short", "1", tokens_per_minute=30)
        assert (await generate(a, short["key"], "s0", "w1 w2", 10))[0] == 200  # delivers 2 of its 10
        await settled(env)
        counted = "SELECT requests, tokens FROM far_rate_counters c JOIN far_api_keys k USING (key_id) WHERE k.prefix = $1"
        assert tuple(await env.pool.fetchrow(counted, short["prefix"])) == (1, 2)
        assert tuple(await env.pool.fetchrow(counted, tpm["prefix"])) == (3, 30)
        more = await asyncio.gather(*(generate((a, b)[i % 2], short["key"], f"s{i + 1}", ten, 10) for i in range(3)))
        assert sorted(m[0] for m in more) == [200, 200, 429]  # 2 + 10 + 10 <= 30 < 2 + 30
    await settled(env)
    assert await audit_breaks(env.pool) == []


async def test_a_monthly_budget_refuses_what_would_pass_it(env, mesh):
    async with httpx.AsyncClient(base_url=mesh[0], timeout=60) as http:
        issued = await create_key(http, "budget", "1", monthly_budget_far="0.0005")
        assert (await generate(http, issued["key"], "b1"))[0] == 200  # holds 0.0003
        status, body, headers = await generate(http, issued["key"], "b2")  # 0.0003 + 0.0003 > 0.0005
        assert status == 429 and body["limit"] == "monthly_budget" and int(headers["retry-after"]) >= 1
    await settled(env)


async def test_a_retried_credit_is_posted_once(env, mesh):
    async with httpx.AsyncClient(base_url=mesh[0], timeout=60) as http:
        issued = await create_key(http, "credited", "0")
        account = issued["account_id"]
        body = {"credit_id": "inv-1", "amount_far": "2.5"}
        replies = await asyncio.gather(*(http.post(f"/api/admin/accounts/{account}/credits", headers=ADMIN, json=body)
                                         for _ in range(10)))
        assert sorted(r.status_code for r in replies) == [200] * 9 + [201]
        assert {r.json()["txn_id"] for r in replies} == {replies[0].json()["txn_id"]}
        assert await accounts.balance(env.pool, uuid.UUID(account)) == (25 * 10**17, 0)
        before = await snapshot(env)
        conflict = await http.post(f"/api/admin/accounts/{account}/credits", headers=ADMIN,
                                   json={"credit_id": "inv-1", "amount_far": "3"})
        assert conflict.status_code == 409 and "inv-1" in conflict.json()["detail"]
        assert await snapshot(env) == before
        client = (await http.get("/api/account", headers={"Authorization": f"Bearer {issued['key']}"})).json()
        assert client["balance_far"] == "2.5" and [c["credit_id"] for c in client["credits"]] == ["inv-1"]
    assert await audit_breaks(env.pool) == []


async def test_bad_input_is_refused_naming_the_field_and_writes_nothing(env, mesh, tiny_model_dir):
    async with httpx.AsyncClient(base_url=mesh[0], timeout=60) as http:
        alice = await create_key(http, "alice-acct", "1")
        bob = await create_key(http, "bob-acct", "1")
        before = await snapshot(env)
        no_token = await http.post("/api/admin/keys", json={"name": "x"})
        assert no_token.status_code == 401 and no_token.json()["error"] == "unauthorized"
        wrong = await http.get("/api/admin/accounts", headers={"Authorization": "Bearer " + "y" * 32})
        assert wrong.status_code == 403
        assert (await http.post("/api/admin/keys", headers={"Authorization": "Bearer nope"},
                                content=b"{not json")).status_code == 403  # the token before the body
        account = alice["account_id"]
        cases = [
            ("POST", "/api/admin/keys", {"name": "n1", "credit_far": "-1"}, "credit_far"),
            ("POST", "/api/admin/keys", {"name": "n2", "credit_far": 5}, "credit_far"),
            ("POST", "/api/admin/keys", {"name": "n3", "credit_far": "99999999999999"}, "credit_far"),
            ("POST", "/api/admin/keys", {"name": "n4", "limits": {"requests_per_minute": -2}}, "requests_per_minute"),
            ("POST", "/api/admin/keys", {"name": "n5", "limits": {"tokens_per_minute": 10**12}}, "tokens_per_minute"),
            ("POST", "/api/admin/keys", {"name": ""}, "name"),
            ("POST", f"/api/admin/accounts/{account}/credits", {"credit_id": "c", "amount_far": "0"}, "amount_far"),
            ("POST", f"/api/admin/accounts/{account}/credits", {"credit_id": "c", "amount_far": "1e3"}, "amount_far"),
            ("POST", "/api/admin/accounts/not-a-uuid/credits", {"credit_id": "c", "amount_far": "1"}, "account_id"),
            ("PUT", f"/api/admin/keys/{alice['prefix']}/limits", {"monthly_budget_far": "-5"}, "monthly_budget_far"),
            ("GET", "/api/admin/accounts?limit=0", None, "limit"),
            ("GET", "/api/admin/accounts?limit=100000", None, "limit"),
            ("GET", f"/api/admin/accounts/{account}/usage?since=yesterday", None, "since"),
            ("GET", "/api/admin/audit?limit=-1", None, "limit"),
        ]
        for method, path, body, field in cases:
            r = await http.request(method, path, headers=ADMIN, json=body)
            assert r.status_code == 422 and field in r.json()["detail"], (path, body, r.text)
        for method, path in (("POST", "/api/admin/keys/fmk_AAAAAAAA/revoke"),
                             ("GET", f"/api/admin/accounts/{uuid.uuid4()}/usage")):
            assert (await http.request(method, path, headers=ADMIN)).status_code == 404
        assert (await http.post(f"/api/admin/accounts/{uuid.uuid4()}/credits", headers=ADMIN,
                                json={"credit_id": "c", "amount_far": "1"})).status_code == 404
        assert (await http.post("/api/admin/keys", headers=ADMIN, json={"name": "alice-acct"})).status_code == 409

        a = {"Authorization": f"Bearer {alice['key']}"}
        for params, field in (({"since": "2026-13-01"}, "since"), ({"group_by": "week"}, "group_by"),
                              ({"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "since"),
                              ({"since": "1900-01-01T00:00:00Z"}, "since"), ({"key": "nope"}, "key")):
            r = await http.get("/api/usage", headers=a, params=params)
            assert r.status_code == 422 and field in r.json()["detail"], (params, r.text)
        for limit in ("0", "201", "x"):
            r = await http.get("/api/account/sessions", headers=a, params={"limit": limit})
            assert r.status_code == 422 and "limit" in r.json()["detail"]
        other = await http.get("/api/usage", headers=a, params={"key": bob["prefix"]})
        assert other.status_code == 404  # another account's key: as unknown
        for headers in ({}, {"Authorization": f"Bearer {accounts.new_key()}"}, {"Authorization": "Basic x"}):
            assert (await http.get("/api/account", headers=headers)).status_code == 401
            assert (await http.get("/api/usage", headers=headers)).status_code == 401
        assert await snapshot(env) == before  # nothing written by any refusal
        revoked = await http.post(f"/api/admin/keys/{bob['prefix']}/revoke", headers=ADMIN)
        assert revoked.json() == {"prefix": bob["prefix"], "revoked": True}
        r = await http.get("/api/account", headers={"Authorization": f"Bearer {bob['key']}"})
        assert r.status_code == 401 and "revoked" in r.json()["detail"]

    # Without FARMESH_ADMIN_TOKEN the admin API is off: 404, with or without a token.
    settings = Settings(kafka_bootstrap=env.bootstrap, database_url=env.database_url, dht_prefix=MODEL,
                        model=str(tiny_model_dir), gateway_id="gw-acct-off")
    async with serve(create_app(settings, lambda: asyncio.sleep(0, True))) as url, \
            httpx.AsyncClient(base_url=url, timeout=60) as off:
        for headers in ({}, ADMIN):
            r = await off.get("/api/admin/accounts", headers=headers)
            assert r.status_code == 404 and r.json()["error"] == "not_found"


async def test_the_audit_table_lists_every_admin_action(env, mesh):
    async with httpx.AsyncClient(base_url=mesh[1], timeout=60) as http:
        marker = {"X-Forwarded-For": "203.0.113.7", "User-Agent": "audit-test"}
        h = {**ADMIN, **marker}
        created = (await http.post("/api/admin/keys", headers=h, json={"name": "audited", "credit_far": "1"})).json()
        await http.put(f"/api/admin/keys/{created['prefix']}/limits", headers=h, json={"requests_per_minute": 9})
        await http.post(f"/api/admin/accounts/{created['account_id']}/credits", headers=h,
                        json={"credit_id": "aud-1", "amount_far": "1"})
        await http.get(f"/api/admin/accounts/{created['account_id']}/usage", headers=h)
        await http.get("/api/admin/accounts", headers=h)
        await http.post(f"/api/admin/keys/{created['prefix']}/revoke", headers=h)
        actions = (await http.get("/api/admin/audit", headers=h)).json()["actions"]
    mine = [a for a in actions if a["forwarded_for"] == "203.0.113.7"]
    assert [a["action"] for a in reversed(mine)] == ["create_key", "set_limits", "credit", "read_usage",
                                                     "list_accounts", "revoke_key"]
    # uvicorn trusts a local proxy's X-Forwarded-For: the peer is then the forwarded address
    assert all(a["remote_addr"] in ("127.0.0.1", "203.0.113.7") and a["user_agent"] == "audit-test" and a["at"] for a in mine)
    assert mine[-1]["target"] == created["prefix"] and mine[-1]["detail"]["credit_far"] == "1"
    rows = await env.pool.fetchval("SELECT count(*) FROM far_admin_audit WHERE forwarded_for = '203.0.113.7'")
    assert rows == 7  # and reading the audit is an action too


@pytest.mark.skipif(not browser.available(), reason="needs a headless browser: apt-get install -y chromium")
async def test_the_account_page_shows_the_spend_and_a_chart_in_a_browser(env, mesh, tmp_path):
    async with httpx.AsyncClient(base_url=mesh[0], timeout=60) as http:
        issued = await create_key(http, "page-user", "1")
        for i in range(3):
            assert (await generate(http, issued["key"], f"p{i}"))[0] == 200
    await settled(env)

    def look() -> dict:
        b = browser.Browser()
        try:
            b.open(f"{mesh[0]}/account")
            assert b.eval("document.getElementById('account').hidden") is True  # nothing shown without a key
            b.eval("document.getElementById('key').focus()")
            b.type(issued["key"])  # typed in, as a person would
            b.eval("document.getElementById('show').click()")
            b.wait("document.querySelectorAll('#usage-chart rect[data-spent]:not([data-spent=\"0\"])').length > 0")
            b.wait("document.querySelectorAll('#sessions tr').length > 3")
            facts = b.eval("""({
                balance: document.querySelector('#balance b').textContent,
                spent: document.querySelector('#spent b').textContent,
                sessions: [...document.querySelectorAll('#sessions tr')].slice(1).map(r => r.children[0].textContent),
                costs: [...document.querySelectorAll('#sessions tr')].slice(1).map(r => r.children[4].textContent),
                day: document.querySelector('#usage-chart rect[data-spent]:not([data-spent="0"])').dataset.spent,
                input: document.getElementById('key').value, href: location.href,
                stored: localStorage.length + sessionStorage.length + document.cookie.length,
                chart: (() => { const r = document.getElementById('usage-chart').getBoundingClientRect();
                                return [r.left, r.top, r.width, r.height].map(Math.round); })(),
                scale: window.devicePixelRatio})""")
            facts["png"] = b.screenshot()
            return facts
        finally:
            b.close()

    facts = await asyncio.to_thread(look)
    assert facts["balance"] == "0.9991" and facts["spent"] == "0.0009" and facts["day"] == "0.0009"
    assert sorted(facts["sessions"]) == ["p0", "p1", "p2"] and set(facts["costs"]) == {"0.0003"}
    assert facts["input"] == "" and issued["key"] not in facts["href"] and facts["stored"] == 0  # memory only
    (tmp_path / "account.png").write_bytes(facts["png"])
    width, height, rows = browser.png_pixels(facts["png"])
    left, top, w, h = (int(v * facts["scale"]) for v in facts["chart"])
    assert w > 200 and h > 100 and top + h <= height, (facts["chart"], width, height)

    def near(px: bytes, rgb: tuple[int, int, int]) -> bool:
        return all(abs(px[i] - rgb[i]) <= 12 for i in range(3))

    spend = tokens = 0
    for y in range(top, top + h):
        row = rows[y]
        for x in range(left, min(left + w, width)):
            px = row[3 * x:3 * x + 3]
            spend += near(px, (0x2F, 0x6F, 0xDB))
            tokens += near(px, (0xE8, 0xA3, 0x3D))
    # Today's bars are drawn: a full-height bar of each series is thousands of pixels in the chart's box.
    assert spend > 500 and tokens > 500, (spend, tokens)


async def test_fuzzing_the_account_and_admin_apis_yields_no_5xx_and_responses_match_their_schemas(env, mesh, tmp_path):
    from tests.integration.test_openapi_fuzz import schemathesis

    async with httpx.AsyncClient(base_url=mesh[0], timeout=60) as http:
        issued = await create_key(http, "fuzzed", "1", requests_per_minute=1000)
        assert (await generate(http, issued["key"], "f1"))[0] == 200
        document = (await http.get("/openapi.json")).json()
    await settled(env)
    paths = document["paths"]
    assert {"/api/account", "/api/usage", "/api/account/sessions", "/api/admin/keys", "/api/admin/accounts",
            "/api/admin/keys/{prefix}/revoke", "/api/admin/keys/{prefix}/limits",
            "/api/admin/accounts/{account_id}/credits", "/api/admin/accounts/{account_id}/usage",
            "/api/admin/audit"} <= set(paths)
    assert paths["/api/admin/keys"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    for path, method in (("/api/admin/keys", "post"), ("/api/admin/accounts", "get"), ("/api/account", "get")):
        assert {"401", "422"} <= set(paths[path][method]["responses"]), path
    checks = "not_a_server_error,response_schema_conformance"
    for regex, token, operations in (("^/api/(account|usage)", issued["key"], 3), ("^/api/admin/", TOKEN, 7)):
        process = await schemathesis(mesh[0], token, tmp_path, "--include-path-regex", regex, "--checks", checks)
        report = process.stdout + process.stderr
        assert process.returncode == 0, report[-6000:]
        tested = re.search(r"Tested: (\d+)", report)
        assert tested and int(tested.group(1)) == operations, report[-3000:]
    assert await audit_breaks(env.pool) == []
