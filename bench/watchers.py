"""SSE watchers as a separate process: `python -m bench.watchers URL --count 200 --seconds 10 --header ...`.

Opens `count` concurrent streams of the URL (asyncio + httpx), reads them for `seconds`, and
prints one JSON line: how many connected (HTTP 200) and how many events they received in all.
"""

from __future__ import annotations

import asyncio
import json

import httpx

from bench.common import headers_of, http_arguments


async def watch(client: httpx.AsyncClient, url: str, connected: list[int], events: list[int]) -> None:
    async with client.stream("GET", url) as response:
        if response.status_code != 200:
            return
        connected[0] += 1
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                events[0] += 1


async def main_async(url: str, count: int, seconds: float, headers: dict[str, str]) -> dict[str, int]:
    connected, events = [0], [0]
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(30, read=None)) as client:
        tasks = [asyncio.create_task(watch(client, url, connected, events)) for _ in range(count)]
        await asyncio.sleep(seconds)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"connected": connected[0], "events": events[0]}


def main() -> None:
    parser = http_arguments("python -m bench.watchers")
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args.url, args.count, args.seconds, headers_of(args)))), flush=True)


if __name__ == "__main__":
    main()
