#!/usr/bin/env python3
"""Opens N keep-alive connections to HOST:PORT, makes one request on each, keeps them all open
and idle, and reports how much the server process PID's RSS grew. Bounded: 60 s at most.

Usage: idle_conns.py HOST PORT N PID [SOURCES]
SOURCES, comma-separated loopback addresses (127.0.0.2,127.0.0.3), spreads the connections over
several source addresses, each with its own range of ephemeral ports: one address gives at most
net.ipv4.ip_local_port_range connections to one HOST:PORT."""
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


async def one(host, port, source, sem, conns):
    async with sem:
        try:
            local = (source, 0) if source else None
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=local), 10)
            w.write(b"GET /idle HTTP/1.1\r\nHost: bench\r\n\r\n")
            await w.drain()
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await asyncio.wait_for(r.readexactly(length), 10)
            conns.append(w)
        except Exception:
            pass


async def main():
    host, port, n, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    sources = sys.argv[5].split(",") if len(sys.argv) > 5 and sys.argv[5] else [None]
    for s in sources:
        assert s is None or s.startswith("127."), "loopback sources only"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1024), hard))
    before = rss_kb(pid)
    conns = []
    sem = asyncio.Semaphore(500)
    deadline = time.time() + 60
    await asyncio.wait_for(asyncio.gather(*(one(host, port, sources[i % len(sources)], sem, conns)
                                          for i in range(n))),
                           max(1, deadline - time.time()))
    await asyncio.sleep(1)
    after = rss_kb(pid)
    print(f"opened {len(conns)}")
    print(f"added_kb {after - before}")
    for w in conns:
        w.close()


asyncio.run(main())
