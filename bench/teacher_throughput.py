"""Benchmark: teacher requests per second through `ask_teacher` at concurrency 8 vs 1.

The loopback OpenAI-compatible test server (tests/openai_server.py) answers every chat request
after a fixed latency (100 ms by default), like a remote model would; the client runs in live
mode (no recordings), so every request crosses HTTP. With the latency dominating, concurrency 8
should be close to 8 times as fast. Goal: ratio >= 6.

The server runs in a process of its own by default, as a remote teacher would: in the client's
process it takes a share of the one interpreter lock that the client needs (`--server thread`
shows that case).

    python bench/teacher_throughput.py [--requests 80] [--latency-ms 100] [--concurrency 8]
                                       [--server process|thread]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from openai_server import openai_server  # noqa: E402  (the test server lives beside the tests)

from tuneline.augment.teacher import ask_teacher  # noqa: E402
from tuneline.recipe import TeacherSpec  # noqa: E402

GOAL = 6.0


def serve(latency_ms: float, connection) -> None:
    """Child process: run the server, send its URL, and its most in-flight requests when told to stop."""
    with openai_server(latency_ms=latency_ms) as server:
        connection.send(server.base_url)
        connection.recv()
        connection.send(server.max_in_flight)


@contextmanager
def running_server(latency_ms: float, where: str) -> Iterator[tuple[str, list[int]]]:
    """The server's base URL, and a list that holds its most in-flight requests once it stopped."""
    most_in_flight: list[int] = []
    if where == "thread":
        with openai_server(latency_ms=latency_ms) as server:
            yield server.base_url, most_in_flight
            most_in_flight.append(server.max_in_flight)
        return
    ours, theirs = multiprocessing.Pipe()
    child = multiprocessing.get_context("spawn").Process(target=serve, args=(latency_ms, theirs), daemon=True)
    child.start()
    try:
        yield ours.recv(), most_in_flight
        ours.send("stop")
        most_in_flight.append(ours.recv())
    finally:
        child.join(10)


def measure(base_url: str, requests: int, concurrency: int, recordings: str) -> tuple[float, int]:
    """Requests per second for one batch at the given concurrency, and how many replies failed."""
    spec = TeacherSpec(
        base_url=base_url, model="teacher", mode="live", concurrency=concurrency, recordings=recordings
    )
    conversations = [[{"role": "user", "content": f"Write question {n} as JSON."}] for n in range(requests)]
    started = time.perf_counter()
    replies = ask_teacher(spec, conversations)
    elapsed = time.perf_counter() - started
    return requests / elapsed, sum(reply.error is not None for reply in replies)


def main() -> None:
    """Run the two batches against one server and print requests/s of each and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=80, help="requests per batch")
    parser.add_argument("--latency-ms", type=float, default=100, help="server latency per request")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrency compared with 1")
    parser.add_argument("--server", choices=["process", "thread"], default="process", help="where it runs")
    args = parser.parse_args()

    with (
        running_server(args.latency_ms, args.server) as (base_url, in_flight),
        tempfile.TemporaryDirectory() as scratch,
    ):
        measure(base_url, 4, 4, scratch)  # warm-up: imports, first connections
        serial, serial_failed = measure(base_url, args.requests, 1, scratch)
        parallel, parallel_failed = measure(base_url, args.requests, args.concurrency, scratch)
    most_in_flight = in_flight[0]

    ratio = parallel / serial
    print(
        f"server: loopback ({args.server}), {args.latency_ms:g} ms latency; {args.requests} requests a batch"
    )
    print(f"machine: {os.cpu_count()} CPUs, load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"concurrency 1:  {serial:7.2f} requests/s ({serial_failed} failed)")
    print(
        f"concurrency {args.concurrency}: {parallel:7.2f} requests/s ({parallel_failed} failed; "
        f"server saw at most {most_in_flight} in flight)"
    )
    verdict = "met" if ratio >= GOAL else "NOT met"
    print(f"ratio {args.concurrency} / 1: {ratio:.2f}   (goal >= {GOAL:g}: {verdict})")


if __name__ == "__main__":
    main()
