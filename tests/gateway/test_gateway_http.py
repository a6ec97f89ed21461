"""The gateway over real HTTP against recording stand-ins: keys and limits, request ids, the PD
fields each node receives, /workers, /metrics, /health. What real nodes answer is checked in
test_gateway_nodes.py; here it is what the gateway itself sends and says."""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx

from .conftest import Harness
from .servers import wait_until

COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 3}
ERROR_KEYS = {"message", "type", "param", "code"}


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and error["message"]
    return error


def test_pd_request_reaches_both_nodes_with_the_same_body(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=1, decode=1)
    with h.client() as c:
        r = c.post("/v1/completions", json=COMPLETION, headers={"X-Request-Id": "req-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    assert r.json()["node"] == "d0"  # the decode node's answer is the client's
    wait_until(lambda: h.prefill[0].received, what="the prefill request")
    (p,), (d,) = h.prefill[0].received, h.decode[0].received
    assert p.body == d.body
    assert p.body["rid"] == "req-42" and p.headers["x-request-id"] == "req-42"
    assert d.headers["x-request-id"] == "req-42"
    assert p.body["bootstrap_host"] == "127.0.0.1" and p.body["bootstrap_port"] == 8998
    assert isinstance(p.body["bootstrap_room"], int) and 0 <= p.body["bootstrap_room"] < 2**63
    assert {k: p.body[k] for k in COMPLETION} == COMPLETION


def test_request_id_is_generated_when_absent(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=0, decode=1)
    with h.client() as c:
        r = c.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}})
        bad = c.post("/generate", json={"text": "hi"}, headers={"X-Request-Id": "bad id\t!"})
    rid = r.headers["x-request-id"]
    assert len(rid) == 32
    (first, second) = h.decode[0].received
    assert first.body["rid"] == rid and first.headers["x-request-id"] == rid
    assert "bootstrap_room" not in first.body  # colocated: no PD fields
    assert bad.headers["x-request-id"] == second.body["rid"] != "bad id\t!"


def test_batched_generate_gets_one_room_per_item(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=1, decode=1)
    with h.client() as c:
        assert c.post("/generate", json={"text": ["a", "b"]}).status_code == 200
    body = h.decode[0].received[0].body
    assert body["bootstrap_host"] == ["127.0.0.1"] * 2 and body["bootstrap_port"] == [8998] * 2
    assert len(set(body["bootstrap_room"])) == 2


def test_prompt_logprob_requests_go_to_the_decode_alone(harness: Callable[..., Harness]) -> None:
    """lm-eval's echo with logprobs, vLLM's prompt_logprobs and SGLang's logprob_start_len
    reach the decode instance without PD fields (it prefills them: only it sees every prompt
    position's logits); other requests stay PD, and none counts as a prefill fallback."""
    h = harness(prefill=1, decode=1)
    bootstrap = {"bootstrap_host", "bootstrap_port", "bootstrap_room"}
    asking = [
        ("/v1/completions", {**COMPLETION, "echo": True, "logprobs": 1, "max_tokens": 1}),
        ("/v1/completions", {**COMPLETION, "prompt": ["a", "b"], "n": 2, "prompt_logprobs": 0}),
        ("/v1/chat/completions",
         {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 2}),
        ("/generate", {"text": "hi", "return_logprob": True, "logprob_start_len": 0}),
    ]  # fmt: skip
    with h.client() as c:
        for route, body in asking:
            assert c.post(route, json=body).status_code == 200, (route, body)
        assert h.prefill[0].received == []
        assert all(not bootstrap & b.keys() for b in h.decode[0].bodies())
        h.decode[0].behavior.after = h.prefill
        plain = {"text": "hi", "return_logprob": True}  # no logprob_start_len: none of the prompt
        assert c.post("/generate", json=plain).status_code == 200
    assert len(h.prefill[0].received) == 1 and h.decode[0].bodies()[-1].keys() >= bootstrap
    assert h.gw.metrics.prefill_fallbacks == 0


def test_api_key(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=0, decode=1, api_key="sk-test")
    with h.client() as c:
        error = assert_openai_error(c.post("/v1/completions", json=COMPLETION), 401)
        assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]
        wrong = {"Authorization": "Bearer nope"}
        assert_openai_error(c.post("/v1/completions", json=COMPLETION, headers=wrong), 401)
        assert_openai_error(c.get("/v1/models"), 401)
        ok = c.post("/v1/completions", json=COMPLETION, headers={"Authorization": "Bearer sk-test"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200  # health and metrics stay open
        assert c.get("/metrics").status_code == 200


def test_body_limit_and_bad_json(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=0, decode=1, max_body_bytes=1000)
    with h.client() as c:
        big = {**COMPLETION, "prompt": "x" * 2000}
        assert_openai_error(c.post("/v1/completions", json=big), 413)
        chunked = c.post("/v1/completions", content=iter([b"{" + b" " * 600, b" " * 600 + b"}"]))
        assert_openai_error(chunked, 413)
        assert (
            "JSON"
            in assert_openai_error(c.post("/v1/completions", content=b"{nope"), 400)["message"]
        )
        assert_openai_error(c.post("/v1/completions", content=b"[1, 2]"), 400)
        error = assert_openai_error(c.post("/v1/completions", json={**COMPLETION, "n": -1}), 400)
        assert error["param"] == "n"
    assert not h.decode[0].received  # nothing bad reached a node


def test_max_tokens_limit_and_unknown_model(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=0, decode=1, max_tokens_limit=64)
    with h.client() as c:
        wait_until(lambda: h.gw.models, what="model ids from the first health round")
        error = assert_openai_error(
            c.post("/v1/completions", json={**COMPLETION, "max_tokens": 65}), 400
        )
        assert error["param"] == "max_tokens"
        error = assert_openai_error(
            c.post("/v1/completions", json={**COMPLETION, "model": "x"}), 404
        )
        assert error["code"] == "model_not_found"
        assert c.post("/v1/completions", json=COMPLETION).status_code == 200


def test_max_inflight_answers_429_with_retry_after(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=0, decode=1, max_inflight=1)
    h.decode[0].behavior.mode = "hang"
    results: list[httpx.Response | Exception] = []

    def slow_request() -> None:
        with h.client(timeout=1.5) as c:  # gives up while we check
            try:
                results.append(c.post("/v1/completions", json=COMPLETION))
            except httpx.HTTPError as exc:
                results.append(exc)

    thread = threading.Thread(target=slow_request)
    thread.start()
    wait_until(lambda: h.gw.metrics.inflight == 1, what="the hanging request")
    with h.client() as c:
        r = c.post("/v1/completions", json=COMPLETION)
    error = assert_openai_error(r, 429)
    assert r.headers["retry-after"] == "1" and error["code"] == "rate_limit_exceeded"
    thread.join(10)
    wait_until(lambda: h.gw.metrics.inflight == 0, what="the slot to be released")


def test_workers_admin(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=1, decode=1, admin_key="admin")
    auth = {"Authorization": "Bearer admin"}
    with h.client() as c:
        assert_openai_error(c.get("/workers"), 401)
        assert_openai_error(c.get("/workers", headers={"Authorization": "Bearer x"}), 401)
        listing = c.get("/workers", headers=auth).json()["workers"]
        assert [(w["role"], w["bootstrap_port"]) for w in listing] == [
            ("prefill", 8998),
            ("decode", None),
        ]
        assert {"url", "healthy", "outstanding", "breaker"} <= set(listing[0])
        new = {"role": "prefill", "url": "http://127.0.0.1:1/", "bootstrap_port": 9100}
        added = c.post("/workers", json=new, headers=auth)
        assert added.status_code == 201 and added.json()["url"] == "http://127.0.0.1:1"
        assert_openai_error(c.post("/workers", json=new, headers=auth), 409)
        assert_openai_error(c.post("/workers", json={**new, "role": "x"}, headers=auth), 400)
        assert_openai_error(c.post("/workers", json={**new, "url": "ftp://h"}, headers=auth), 400)
        portless = {"role": "prefill", "url": "http://127.0.0.1:2"}  # decode could not fetch
        error = assert_openai_error(c.post("/workers", json=portless, headers=auth), 400)
        assert error["param"] == "bootstrap_port" and "bootstrap_port" in error["message"]
        gone = c.request("DELETE", "/workers", json={"url": "http://127.0.0.1:1"}, headers=auth)
        assert gone.status_code == 200
        decode_url = h.url_of(h.decode[0])
        assert c.delete(f"/workers/{decode_url}", headers=auth).status_code == 200
        assert_openai_error(c.delete(f"/workers/{decode_url}", headers=auth), 404)
        assert len(c.get("/workers", headers=auth).json()["workers"]) == 1
        error = assert_openai_error(c.post("/v1/completions", json=COMPLETION), 503)
        assert "decode" in error["message"]


def test_unknown_routes_answer_in_openai_shape(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=0, decode=1)
    with h.client() as c:
        assert "/v1/completions" in assert_openai_error(c.get("/v1/engines"), 404)["message"]
        assert_openai_error(c.get("/v1/completions"), 405)


def test_unknown_routes_and_methods_carry_string_codes(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=0, decode=1)
    with h.client() as c:
        missing = assert_openai_error(c.get("/v1/engines", headers={"X-Request-Id": "r404"}), 404)
        wrong = c.get("/v1/completions")
    assert missing["code"] == "not_found"
    assert assert_openai_error(wrong, 405)["code"] == "method_not_allowed"
    assert wrong.headers["x-request-id"]  # these answers carry a request id too


def test_admin_routes_are_off_without_an_admin_key(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=0, decode=1)
    with h.client() as c:
        error = assert_openai_error(c.get("/workers", headers={"Authorization": "Bearer x"}), 403)
        assert "admin_key" in error["message"]


def test_added_decode_instance_takes_traffic(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=0, decode=1, admin_key="k", decode_policy="round_robin")
    other = harness(prefill=0, decode=1)  # borrow its upstream as a new instance
    auth = {"Authorization": "Bearer k"}
    with h.client() as c:
        url = other.url_of(other.decode[0])
        assert (
            c.post("/workers", json={"role": "decode", "url": url}, headers=auth).status_code == 201
        )
        nodes = {c.post("/v1/completions", json=COMPLETION).json()["node"] for _ in range(4)}
    assert len(h.decode[0].received) == 2 and len(other.decode[0].received) == 2
    assert nodes == {"d0"}


def test_an_added_instance_routes_once_healthy_and_only_serving_the_same_model(
    harness: Callable[..., Harness],
) -> None:
    h = harness(prefill=0, decode=1, admin_key="k")
    live, elsewhere = harness(prefill=0, decode=1), harness(prefill=0, decode=1)
    elsewhere.decode[0].model = "another-model"
    auth, dead = {"Authorization": "Bearer k"}, "http://127.0.0.1:1"
    with h.client() as c:
        wait_until(lambda: h.gw.models, what="model ids from the first health round")
        added = c.post("/workers", json={"role": "decode", "url": dead}, headers=auth)
        assert added.status_code == 201 and added.json()["healthy"] is False  # out until up
        url = live.url_of(live.decode[0])
        added = c.post("/workers", json={"role": "decode", "url": url}, headers=auth)
        assert added.status_code == 201 and added.json()["healthy"] is True
        wrong = elsewhere.url_of(elsewhere.decode[0])
        refused = c.post("/workers", json={"role": "decode", "url": wrong}, headers=auth)
        error = assert_openai_error(refused, 409)
        assert error["code"] == "model_mismatch" and "another-model" in error["message"]
        listing = c.get("/workers", headers=auth).json()["workers"]
        assert {w["url"]: w["healthy"] for w in listing} == {
            h.url_of(h.decode[0]): True,
            dead: False,
            url: True,
        }
        for _ in range(4):
            assert c.post("/v1/completions", json=COMPLETION).status_code == 200
    assert len(h.decode[0].received) + len(live.decode[0].received) == 4


def test_models_health_and_metrics(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=1, decode=2)
    with h.client() as c:
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["available"] == {
            "prefill": 1,
            "decode": 2,
        }
        c.post("/v1/completions", json=COMPLETION)
        c.post("/v1/completions", json={**COMPLETION, "n": 0})
        # the prefill answer may trail the decode one the client got
        wait_until(lambda: not any(w.outstanding for w in h.gw.pool.all()), what="idle nodes")
        text = c.get("/metrics").text
    assert 'pdserve_gateway_requests_total{route="/v1/completions",status="200"} 1' in text
    assert 'pdserve_gateway_requests_total{route="/v1/completions",status="400"} 1' in text
    assert "pdserve_gateway_request_duration_seconds_count 2" in text
    assert "pdserve_gateway_inflight_requests 0" in text
    for role, standin in (("prefill", h.prefill[0]), ("decode", h.decode[1])):
        labels = f'{{role="{role}",url="{h.url_of(standin)}"}}'
        assert f"pdserve_gateway_instance_outstanding_requests{labels} 0" in text
        assert f"pdserve_gateway_instance_healthy{labels} 1" in text
