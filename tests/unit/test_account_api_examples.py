"""Every route of the account and admin APIs is documented with an example, and each example is a valid answer."""
from __future__ import annotations

import asyncio

import pytest

from farmesh.runtime.settings import Settings
from producers.gateway import account_api, admin_api
from producers.gateway.app import create_app

RESPONSES = [account_api.AccountOut, account_api.UsageOut, account_api.SessionsOut, admin_api.AccountsOut,
             admin_api.Revoked, admin_api.AuditOut, admin_api.CreatedKey, admin_api.LimitsSet, admin_api.Credited]


@pytest.mark.parametrize("model", RESPONSES, ids=lambda m: m.__name__)
def test_each_example_is_a_valid_response(model) -> None:
    examples = model.model_json_schema().get("examples") or []
    assert examples, f"{model.__name__} has no example"
    for example in examples:
        model.model_validate(example)


def test_every_account_and_admin_route_has_an_example(tmp_path) -> None:
    from farmesh.dev.tiny_model import write_tiny_model

    app = create_app(Settings(model=str(write_tiny_model(tmp_path / "tiny")), admin_token="t" * 32),
                     route_check=lambda: asyncio.sleep(0, True))
    document = app.openapi()
    schemas = document["components"]["schemas"]
    missing = []
    for path, operations in document["paths"].items():
        if not path.startswith(("/api/account", "/api/usage", "/api/admin")):
            continue
        for method, operation in operations.items():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
            answer = operation["responses"].get("200") or operation["responses"].get("201")
            ref = answer["content"]["application/json"]["schema"].get("$ref", "")
            documented = "examples" in body or "examples" in schemas.get(ref.rsplit("/", 1)[-1], {})
            if not documented:
                missing.append(f"{method.upper()} {path}")
    assert missing == []
