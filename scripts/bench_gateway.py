"""The gateway alone: streamed requests/s and the latency it adds, in front of stand-in nodes.

The nodes here are stand-ins, not pdserve nodes: one small raw-asyncio HTTP/1.1 process serves
every stand-in instance (one port each). A decode stand-in answers a streamed `/v1/completions`
or `/v1/chat/completions` at once with `--tokens` SSE events in the node's OpenAI chunk shape
(built with `api.openai`'s models) and `[DONE]`, each event with its token-id comment line when
the gateway asks for them, as our nodes do; a prefill stand-in answers with a small JSON.
So the benchmark measures the gateway (and the wire), never a model.

Three processes: the stand-ins, the gateway (`gateway.server.run`, as `pdserve gateway` serves
it), and this one, the load generator (uvloop, raw sockets, HTTP/1.1 keep-alive, one connection
per concurrent client). With `--pin` (the default on a 2-core machine) the gateway gets CPU 0 to
itself and the stand-ins and the load generator share CPU 1.

Phases, each reported:
  client    the load generator straight at a decode stand-in, at `--concurrency`: the most the
            client and a stand-in can do, so it shows the client is not the bottleneck
  direct    one request at a time straight to the decode stand-in: latency without a gateway
  gateway1  one request at a time through the gateway: added latency = gateway1 - direct
  gateway   `--concurrency` clients through the gateway: streamed requests/s, latency under
            load, and the gateway's CPU time per request and CPU share (CPU seconds per second,
            from /proc). On a shared machine requests/s follows whatever else runs there; CPU
            time per request hardly does, and a share well under 1.0 says the gateway was
            starved, not saturated (1e6 / cpu_us_per_request is what one free core serves).

Every response is checked: HTTP 200, `--tokens` events, then `[DONE]`. `--profile FILE` samples
the gateway with py-spy during the last phase (collapsed stacks). The last printed line is JSON.

    python scripts/bench_gateway.py --tokens 16 --concurrency 64 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import uvloop

MODEL = "bench"
HEAD_END = b"\r\n\r\n"
CHUNKED_END = b"0\r\n\r\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16, help="events each decode stand-in streams")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per load phase")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds discarded before that")
    p.add_argument("--latency-requests", type=int, default=2000, help="per one-at-a-time phase")
    p.add_argument(
        "--route", choices=("/v1/completions", "/v1/chat/completions"), default="/v1/completions"
    )
    p.add_argument("--prefill", type=int, default=1, help="prefill stand-ins (0: colocated)")
    p.add_argument("--decode", type=int, default=1, help="decode stand-ins")
    p.add_argument("--prefill-policy", default="cache_aware")
    p.add_argument("--decode-policy", default="least_load")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--profile", help="py-spy the gateway in the load phase into this raw file")
    return p.parse_args()


# ---- stand-in nodes ----


def stream_events(route: str, tokens: int, tagged: bool = False) -> list[bytes]:
    """The SSE events of one streamed answer, `{rid}` where the node writes the request id;
    `tagged`: each with its token id's comment line first, as our nodes send them when the
    gateway asks (api/resume.py)."""
    from api.openai_responses import (
        ChatChunkChoice,
        ChatCompletionChunk,
        CompletionChoice,
        CompletionChunk,
        DeltaMessage,
    )
    from api.resume import ids_comment
    from api.sse import DONE, encode_event

    events = []
    for i in range(tokens):
        reason = "length" if i == tokens - 1 else None
        if route == "/v1/chat/completions":
            delta = DeltaMessage(role="assistant" if i == 0 else None, content=f" tok{i}")
            choice: Any = ChatChunkChoice(index=0, delta=delta, finish_reason=reason)
            chunk: Any = ChatCompletionChunk(id="{rid}", created=0, model=MODEL, choices=[choice])
        else:
            choice = CompletionChoice(index=0, text=f" tok{i}", finish_reason=reason)
            chunk = CompletionChunk(id="{rid}", created=0, model=MODEL, choices=[choice])
        event = encode_event(chunk.model_dump(exclude_none=True))
        events.append(ids_comment([1000 + i], reason is not None) + event if tagged else event)
    return [*events, DONE]


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def json_response(payload: Any, status: bytes = b"200 OK") -> bytes:
    body = json.dumps(payload).encode()
    head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    return head % (status, len(body)) + body


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


@dataclass
class StandInNode:
    """What one stand-in instance answers (every answer is written at once, in one piece)."""

    role: str
    tokens: int
    # (route, tagged) -> stream template
    events: dict[tuple[str, bool], list[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for route in ("/v1/completions", "/v1/chat/completions"):
            for tagged in (False, True):
                self.events[route, tagged] = stream_events(route, self.tokens, tagged)

    def answer(self, method: bytes, path: str, body: bytes) -> bytes:
        if method == b"GET" and path == "/health":
            return json_response({"status": "ok"})
        if method == b"GET" and path == "/v1/models":
            return json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        if path == "/abort_request":
            return json_response({"ok": True})
        if (path, False) not in self.events and path != "/generate":
            return json_response({"error": {"message": f"no route {path}"}}, b"404 Not Found")
        request = json.loads(body)
        rid = str(request.get("rid", "bench")).encode()
        if self.role == "prefill" or not request.get("stream") or path == "/generate":
            return json_response({"id": rid.decode(), "object": "prefill", "rid": rid.decode()})
        template = self.events[path, request.get("pd_token_ids") is True]
        parts = [http_chunk(event.replace(b"{rid}", rid)) for event in template]
        return STREAM_HEAD + b"".join(parts) + CHUNKED_END


class StandInProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive server side: Content-Length request bodies, pipelining tolerated."""

    def __init__(self, node: StandInNode) -> None:
        self.node = node
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(HEAD_END)
            if end < 0:
                return
            head = self.buffer[:end]
            total = end + 4 + content_length(head)
            if len(self.buffer) < total:
                return
            body, self.buffer = self.buffer[end + 4 : total], self.buffer[total:]
            method, target, _ = head.split(b" ", 2)
            assert self.transport is not None
            self.transport.write(self.node.answer(method, target.decode(), body))


def content_length(head: bytes) -> int:
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    end = lower.find(b"\r\n", at + 2)
    return int(lower[at + 17 : end if end >= 0 else None])


def serve_standins(roles: list[str], tokens: int, cpus: set[int] | None, ready: Any) -> None:
    """Child process: one port per stand-in; sends back [(role, port)] once listening."""
    if cpus:
        os.sched_setaffinity(0, cpus)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ports = []
        for role in roles:
            node = StandInNode(role, tokens)
            server = await loop.create_server(
                lambda node=node: StandInProtocol(node), "127.0.0.1", 0, backlog=4096
            )
            ports.append((role, server.sockets[0].getsockname()[1]))
        ready.send(ports)
        await asyncio.Event().wait()

    uvloop.run(main())


# ---- the gateway ----


def serve_gateway(settings: Any, cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    from gateway.server import run

    run(settings)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- the load generator ----


class Connection(asyncio.Protocol):
    """One keep-alive client connection; `request` returns one whole response's bytes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None
        self.body_at = -1  # where the body starts; -1 until the head is in
        self.length = -1  # Content-Length, or -1 for a chunked body

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.body_at < 0 and not self._read_head():
            return
        if self.length >= 0:
            done = len(self.buffer) >= self.body_at + self.length
        else:
            done = self.buffer.endswith(CHUNKED_END) and (
                self.buffer.endswith(b"\r\n" + CHUNKED_END) or len(self.buffer) == self.body_at + 5
            )
        if done and self.waiter is not None:
            response, self.buffer, self.body_at = bytes(self.buffer), bytearray(), -1
            self.waiter.set_result(response)

    def _read_head(self) -> bool:
        end = self.buffer.find(HEAD_END)
        if end < 0:
            return False
        head = bytes(self.buffer[:end]).lower()
        self.body_at = end + 4
        self.length = -1 if b"transfer-encoding: chunked" in head else content_length(head)
        return True

    async def request(self, raw: bytes) -> bytes:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


def request_bytes(port: int, route: str, tokens: int, prompt: str) -> bytes:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": tokens, "stream": True}
    if route == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    data = json.dumps(body).encode()
    head = (
        f"POST {route} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


def check_response(response: bytes, tokens: int) -> bool:
    """HTTP 200, `tokens` events and `[DONE]` (the event count is taken over the raw bytes)."""
    return (
        response.startswith(b"HTTP/1.1 200")
        and response.count(b"data: ") == tokens + 1
        and b"data: [DONE]\n\n" in response
    )


@dataclass
class PhaseResult:
    name: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: dict[str, float] = field(default_factory=dict)
    cpu_share: dict[str, float] = field(default_factory=dict)  # CPU seconds per second


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def connect(port: int) -> Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(Connection, "127.0.0.1", port)
    return conn


async def run_phase(
    name: str,
    port: int,
    args: argparse.Namespace,
    concurrency: int,
    stop_after: Callable[[int, float], bool],
    warmup_s: float,
    cpu_of: dict[str, Callable[[], float]],
) -> PhaseResult:
    """`concurrency` clients loop until `stop_after(done, elapsed)`; results after warmup count."""
    conns = [await connect(port) for _ in range(concurrency)]
    raws = [
        request_bytes(port, args.route, args.tokens, f"Hello from client {i}, tell me a story")
        for i in range(concurrency)
    ]
    latencies: list[float] = []
    errors = 0
    started = time.perf_counter()
    measured_from = started + warmup_s
    cpu_start: dict[str, float] = {}

    async def client(i: int) -> None:
        nonlocal errors
        conn, raw = conns[i], raws[i]
        while not stop_after(len(latencies), time.perf_counter() - measured_from):
            t0 = time.perf_counter()
            response = await conn.request(raw)
            t1 = time.perf_counter()
            if t0 >= measured_from:
                if not cpu_start:
                    cpu_start.update({k: f() for k, f in cpu_of.items()})
                latencies.append(t1 - t0)
                errors += not check_response(response, args.tokens)

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - max(measured_from, started)
    for conn in conns:
        assert conn.transport is not None
        conn.transport.close()
    cpu_s = {k: f() - cpu_start.get(k, 0.0) for k, f in cpu_of.items()}
    ms = [v * 1e3 for v in latencies]
    return PhaseResult(
        name,
        concurrency,
        len(latencies),
        errors,
        round(elapsed, 3),
        round(len(latencies) / elapsed, 1),
        round(percentile(ms, 0.50), 3),
        round(percentile(ms, 0.99), 3),
        {k: round(v * 1e6 / max(1, len(latencies)), 1) for k, v in cpu_s.items()},
        {k: round(v / elapsed, 2) for k, v in cpu_s.items()},
    )


def process_cpu_s(pid: int) -> Callable[[], float]:
    """CPU seconds (user + system, all threads) of process `pid` so far."""
    tick = os.sysconf("SC_CLK_TCK")

    def read() -> float:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    return read


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def wait_healthy(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    raw = f"GET /health HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n\r\n".encode()
    while True:
        try:
            conn = await connect(port)
            response = await conn.request(raw)
            assert conn.transport is not None
            conn.transport.close()
            if response.startswith(b"HTTP/1.1 200"):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway on port {port} did not become healthy")
        await asyncio.sleep(0.1)


async def measure(args: argparse.Namespace, gw_port: int, decode_port: int, pids: dict) -> list:
    await wait_healthy(gw_port)
    cpu_of = {name: process_cpu_s(pid) for name, pid in pids.items()}
    cpu_of["loadgen"] = own_cpu_s
    n, duration = args.latency_requests, args.duration

    def by_count(done: int, _: float) -> bool:
        return done >= n

    def by_time(_: int, elapsed: float) -> bool:
        return elapsed >= duration

    results = [
        await run_phase(
            "client", decode_port, args, args.concurrency, by_time, args.warmup, cpu_of
        ),
        await run_phase("direct", decode_port, args, 1, by_count, 0.5, cpu_of),
        await run_phase("gateway1", gw_port, args, 1, by_count, 0.5, cpu_of),
        await profiled(
            args.profile,
            pids["gateway"],
            run_phase("gateway", gw_port, args, args.concurrency, by_time, args.warmup, cpu_of),
        ),
    ]
    for r in results:
        print(
            f"{r.name:9s} c={r.concurrency:<3d} {r.rps:9.1f} req/s  p50 {r.p50_ms:7.3f} ms  "
            f"p99 {r.p99_ms:7.3f} ms  errors {r.errors}/{r.requests}  "
            f"cpu us/req {r.cpu_us_per_request}  cpu share {r.cpu_share}",
            flush=True,
        )
    return results


async def profiled(path: str | None, pid: int, phase: Awaitable[PhaseResult]) -> PhaseResult:
    """`phase`, with py-spy sampling process `pid` meanwhile into `path` (collapsed stacks)."""
    if not path:
        return await phase
    spy = await asyncio.create_subprocess_exec(
        *("py-spy", "record", "--format", "raw", "--rate", "500", "--nonblocking"),
        *("--pid", str(pid), "--output", path),
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        return await phase
    finally:
        spy.send_signal(signal.SIGINT)
        await spy.wait()


def cpu_plan(pin: bool | None) -> tuple[set[int] | None, set[int] | None]:
    """(gateway CPUs, stand-in + load generator CPUs) when pinning, else (None, None)."""
    cpus = sorted(os.sched_getaffinity(0))
    if pin is False or len(cpus) < 2 or (pin is None and len(cpus) > 2):
        return None, None
    return {cpus[0]}, set(cpus[1:])


def main() -> None:
    args = parse_args()
    ctx = mp.get_context("spawn")
    gateway_cpus, other_cpus = cpu_plan(args.pin)
    roles = ["prefill"] * args.prefill + ["decode"] * args.decode
    ours, theirs = ctx.Pipe()
    standins = ctx.Process(
        target=serve_standins, args=(roles, args.tokens, other_cpus, theirs), daemon=True
    )
    standins.start()
    ports = ours.recv()
    from api.settings import GatewaySettings, Instance

    gw_port = free_port()
    settings = GatewaySettings(
        port=gw_port,
        prefill=tuple(Instance(f"http://127.0.0.1:{p}", 8998) for r, p in ports if r == "prefill"),
        decode=tuple(Instance(f"http://127.0.0.1:{p}") for r, p in ports if r == "decode"),
        prefill_policy=args.prefill_policy,
        decode_policy=args.decode_policy,
    )
    gateway = ctx.Process(target=serve_gateway, args=(settings, gateway_cpus), daemon=True)
    gateway.start()
    if other_cpus:
        os.sched_setaffinity(0, other_cpus)
    decode_port = next(p for r, p in ports if r == "decode")
    pids = {"gateway": gateway.pid, "standins": standins.pid}
    try:
        results = uvloop.run(measure(args, gw_port, decode_port, pids))
    finally:
        gateway.terminate()
        standins.terminate()
        gateway.join(10)
        standins.join(10)
    report(args, results, gateway_cpus, other_cpus)


def report(args: argparse.Namespace, results: list[PhaseResult], gw_cpus: Any, other: Any) -> None:
    by_name = {r.name: r for r in results}
    direct, one, loaded = by_name["direct"], by_name["gateway1"], by_name["gateway"]
    gw_cpu = loaded.cpu_us_per_request.get("gateway", float("nan"))
    summary = {
        "bench": "gateway",
        "route": args.route,
        "tokens": args.tokens,
        "concurrency": args.concurrency,
        "prefill": args.prefill,
        "decode": args.decode,
        "policies": [args.prefill_policy, args.decode_policy],
        "pinned": {"gateway": sorted(gw_cpus), "others": sorted(other)} if gw_cpus else None,
        "rps": loaded.rps,
        "client_rps": by_name["client"].rps,
        "added_p50_ms": round(one.p50_ms - direct.p50_ms, 3),
        "added_p99_ms": round(one.p99_ms - direct.p99_ms, 3),
        "loaded_p50_ms": loaded.p50_ms,
        "loaded_p99_ms": loaded.p99_ms,
        "gateway_cpu_us_per_request": gw_cpu,
        "gateway_cpu_share": loaded.cpu_share.get("gateway"),
        "load_average": os.getloadavg()[0],
        "errors": sum(r.errors for r in results),
        "phases": [asdict(r) for r in results],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
