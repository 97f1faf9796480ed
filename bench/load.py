"""A small HTTP load generator (used when `wrk` is not installed), run as its own process:

    python -m bench.load URL --seconds 10 --threads 4 [--header "Authorization: Bearer ..."]

Each thread keeps one connection alive and sends GETs back to back; prints one JSON line with
requests/s, the latency median and p99, and the count of non-2xx answers.
"""

from __future__ import annotations

import json
import statistics
import threading
import time

import httpx

from bench.common import headers_of, http_arguments


def main() -> None:
    parser = http_arguments("python -m bench.load")
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    headers = headers_of(args)
    latencies: list[list[float]] = [[] for _ in range(args.threads)]
    errors = [0] * args.threads
    deadline = time.perf_counter() + args.seconds

    def hammer(i: int) -> None:
        with httpx.Client(headers=headers, timeout=10) as client:
            while (start := time.perf_counter()) < deadline:
                status = client.get(args.url).status_code
                latencies[i].append(time.perf_counter() - start)
                errors[i] += not 200 <= status < 300

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(args.threads)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    every = sorted(x for xs in latencies for x in xs)
    print(
        json.dumps(
            {
                "requests_per_s": len(every) / elapsed,
                "p50_ms": statistics.median(every) * 1e3,
                "p99_ms": every[min(len(every) - 1, int(len(every) * 0.99))] * 1e3,
                "non_2xx": sum(errors),
                "tool": f"bench.load ({args.threads} threads, httpx)",
            }
        )
    )


if __name__ == "__main__":
    main()
