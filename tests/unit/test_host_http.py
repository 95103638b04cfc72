"""The local host's HTTP side through Flask's test client: routing, keys, request and response mapping."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest

from devstack import host

FUNCTION_KEY = "unit-function-key"
MASTER_KEY = "unit-master-key"


def build_app() -> func.FunctionApp:
    app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)

    @app.route(route="echo/{name}", methods=["GET", "POST"], auth_level=func.AuthLevel.ANONYMOUS)
    def echo(req: func.HttpRequest) -> func.HttpResponse:
        body = {"method": req.method, "url": req.url, "params": dict(req.params),
                "route": dict(req.route_params), "header": req.headers.get("x-test"),
                "body": req.get_body().decode()}
        return func.HttpResponse(json.dumps(body), status_code=201, headers={"X-Echo": "yes"},
                                 mimetype="application/json")

    @app.route(route="secret")
    def secret(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("secret")

    @app.route(route="admin-only", auth_level=func.AuthLevel.ADMIN)
    def admin_only(req: func.HttpRequest) -> str:
        return "admin"

    @app.route(route="boom", auth_level=func.AuthLevel.ANONYMOUS)
    def boom(req: func.HttpRequest) -> func.HttpResponse:
        raise RuntimeError("boom")

    @app.route(route="slow-async", auth_level=func.AuthLevel.ANONYMOUS)
    async def slow_async(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("async")

    @app.route(route="whoami", auth_level=func.AuthLevel.ANONYMOUS)
    def whoami(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
        return func.HttpResponse(json.dumps({"id": context.invocation_id, "name": context.function_name}))

    @app.route(route="users/profile", auth_level=func.AuthLevel.ANONYMOUS)
    def literal(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("literal")

    @app.route(route="users/{id}", auth_level=func.AuthLevel.ANONYMOUS)
    def by_id(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("param")

    @app.timer_trigger(arg_name="timer", schedule="%MISSING_SCHEDULE%")
    def broken_timer(timer: Any) -> None:
        pass

    return app


@pytest.fixture
def local_host(tmp_path: Path) -> Iterator[host.Host]:
    environ = {"LOCAL_FUNCTION_KEY": FUNCTION_KEY, "LOCAL_MASTER_KEY": MASTER_KEY}
    instance = host.Host(host.HostOptions(app_object=build_app(), script_root=tmp_path), environ=environ)
    yield instance
    instance.invoker.close()


@pytest.fixture
def client(local_host: host.Host) -> Any:
    return host.create_http_app(local_host).test_client()


def test_request_is_mapped_and_response_comes_back(client: Any) -> None:
    response = client.post("/api/echo/ada?x=1&y=2", data=b"payload", headers={"X-Test": "t"})
    assert response.status_code == 201
    assert response.headers["X-Echo"] == "yes"
    assert response.headers["Content-Type"] == "application/json"
    body = response.get_json()
    assert body["method"] == "POST"
    assert body["url"] == "http://localhost/api/echo/ada?x=1&y=2"
    assert body["params"] == {"x": "1", "y": "2"}
    assert body["route"] == {"name": "ada"}
    assert body["header"] == "t"
    assert body["body"] == "payload"


def test_routes_ignore_case_and_prefer_literal_segments(client: Any) -> None:
    assert client.get("/api/ECHO/x").status_code == 201
    assert client.get("/api/users/profile").data == b"literal"
    assert client.get("/api/users/42").data == b"param"


def test_unknown_route_and_wrong_method_are_404_like_the_host(client: Any) -> None:
    assert client.get("/api/nothing-here").status_code == 404
    assert client.delete("/api/echo/x").status_code == 404


@pytest.mark.parametrize(
    ("headers", "query", "status"),
    [
        ({}, "", 401),
        ({"x-functions-key": "wrong"}, "", 401),
        ({"x-functions-key": FUNCTION_KEY}, "", 200),
        ({}, f"?code={FUNCTION_KEY}", 200),
        ({"x-functions-key": MASTER_KEY}, "", 200),
    ],
)
def test_function_level_needs_a_key(client: Any, headers: dict[str, str], query: str, status: int) -> None:
    response = client.get(f"/api/secret{query}", headers=headers)
    assert response.status_code == status
    if status == 200:
        assert response.data == b"secret"
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    else:
        assert response.data == b""


def test_admin_level_needs_the_master_key(client: Any) -> None:
    assert client.get("/api/admin-only", headers={"x-functions-key": FUNCTION_KEY}).status_code == 401
    response = client.get("/api/admin-only", headers={"x-functions-key": MASTER_KEY})
    assert (response.status_code, response.data) == (200, b"admin")


def test_unhandled_exception_is_a_500_with_no_detail(client: Any) -> None:
    response = client.get("/api/boom")
    assert (response.status_code, response.data) == (500, b"")


def test_async_function_runs_on_the_worker_loop(client: Any) -> None:
    assert client.get("/api/slow-async").data == b"async"


def test_context_is_passed_when_declared(client: Any) -> None:
    body = client.get("/api/whoami").get_json(force=True)
    assert body["name"] == "whoami"
    assert len(body["id"]) == 36


def test_status_needs_the_master_key_and_lists_errors(client: Any) -> None:
    assert client.get("/admin/host/status").status_code == 401
    status = client.get("/admin/host/status", headers={"x-functions-key": MASTER_KEY}).get_json()
    assert status["state"] == "Initialized"
    assert "broken_timer" not in status["functions"]
    assert any("'%MISSING_SCHEDULE%' does not resolve to a value" in error for error in status["errors"])
    assert client.get("/admin/host/ping").status_code == 200


def test_admin_invoke_checks_key_name_and_trigger(client: Any) -> None:
    headers = {"x-functions-key": MASTER_KEY}
    assert client.post("/admin/functions/secret", json={"input": ""}).status_code == 401
    assert client.post("/admin/functions/nope", json={"input": ""}, headers=headers).status_code == 404
    http_function = client.post("/admin/functions/secret", json={"input": ""}, headers=headers)
    assert http_function.status_code == 400
    assert "call HTTP functions through their route" in http_function.get_json()["error"]
    broken = client.post("/admin/functions/broken_timer", json={"input": ""}, headers=headers)
    assert broken.status_code == 400


def test_functions_listing_shows_resolved_bindings(client: Any) -> None:
    listing = client.get("/admin/functions", headers={"x-functions-key": MASTER_KEY}).get_json()
    echo = next(f for f in listing if f["name"] == "echo")
    trigger = next(b for b in echo["bindings"] if b["type"] == "httpTrigger")
    assert trigger["route"] == "echo/{name}"
