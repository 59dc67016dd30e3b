#!/usr/bin/env python3
"""Opens N stock streams (GET PATH, HTTP/1.1, as a browser's EventSource does) to HOST:PORT,
reads each one's head and first event, keeps them all open and idle, and reports how much the
server process PID's RSS grew. Bounded: 90 s at most.

    python3 bench/sse_subscribers.py 127.0.0.1 8080 10000 "$FGPID" /api/flash/tee/events [1.0]

With `1.0` the streams are asked for over HTTP/1.0: flashgate then streams them through hyper
instead of detaching them (see src/server/detach.rs), which shows what detaching saves.
"""
import asyncio
import resource
import sys
import time


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def one(host, port, path, version, sem, streams, failures):
    async with sem:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            w.write(f"GET {path} HTTP/{version}\r\nHost: bench\r\n"
                    "Accept: text/event-stream\r\n\r\n".encode())
            await w.drain()
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            if b" 200 " not in head.split(b"\r\n")[0] + b" ":
                raise RuntimeError(head.split(b"\r\n")[0].decode(errors="replace"))
            # The first event: `data: {...}\n\n` (in a chunk on HTTP/1.1).
            end = b"\n\n\r\n" if version == "1.1" else b"\n\n"
            first = await asyncio.wait_for(r.readuntil(end), 10)
            if b'"remaining"' not in first:
                raise RuntimeError(f"no event: {first!r}")
            streams.append((r, w))
        except Exception as e:  # noqa: BLE001 - reported as a count
            failures.append(str(e))


async def main():
    host, port, n, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    path = sys.argv[5] if len(sys.argv) > 5 else "/api/flash/tee/events"
    version = sys.argv[6] if len(sys.argv) > 6 else "1.1"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1024), hard))
    before = rss_kb(pid)
    streams, failures = [], []
    sem = asyncio.Semaphore(500)
    deadline = time.time() + 90
    await asyncio.wait_for(
        asyncio.gather(*(one(host, port, path, version, sem, streams, failures) for _ in range(n))),
        max(1, deadline - time.time()))
    await asyncio.sleep(2)
    after = rss_kb(pid)
    print(f"opened {len(streams)}")
    print(f"failed {len(failures)}{(' (first: ' + failures[0] + ')') if failures else ''}")
    print(f"rss_before_kb {before}")
    print(f"added_kb {after - before}")
    for _, w in streams:
        w.close()


asyncio.run(main())
