"""HTTP/2 pings on the mesh's gRPC connections: how one service notices that a peer hangs.

A peer that stops answering without closing its connection (SIGSTOP, a stuck driver call, a
paused VM) keeps its TCP connection up: the kernel still acknowledges, no call fails, and a
gateway's stream waits for tokens that never come. Both ends of every internal connection ping
the other every PING_S seconds and close the connection when a ping stays unanswered for
PING_S; the calls on it fail with UNAVAILABLE (the gateway retries or migrates its requests, a
decode worker aborts the requests of a gateway that hung and frees their KV blocks).

    peer hangs ──(≤ PING_S)── next ping ──(PING_S unanswered)── connection closed, calls UNAVAILABLE

What gRPC does without these options (grpcio 1.85, measured by tests/unit/test_channel_options.py
and by hand): a ping's answer is waited for grpc.http2.ping_timeout_ms (60 s), whatever
keepalive_timeout_ms says; a client sends at most two pings until it writes data again
(max_pings_without_data), so a gateway reading a long answer stopped pinging; and a server
answers a client that pings more often than every 5 minutes while the server writes nothing with
GOAWAY "too_many_pings" on the third ping, which cut idle streams.

Being busy is not hanging: pings are answered by gRPC's own threads, whatever the Python threads
do (a server whose event loop held the GIL for 25 s kept its connection; a 400-request flood on a
2-core machine timed no ping out).
"""

from __future__ import annotations

PING_S = 10
"""Seconds between pings, and how long one may go unanswered."""

_PING = (
    ("grpc.keepalive_time_ms", PING_S * 1000),
    ("grpc.keepalive_timeout_ms", PING_S * 1000),
    ("grpc.http2.ping_timeout_ms", PING_S * 1000),
    ("grpc.http2.max_pings_without_data", 0),  # 0: no limit
)

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = _PING
"""Every internal channel's (MeshSecurity.channel adds them)."""

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    *_PING,
    ("grpc.http2.min_ping_interval_without_data_ms", PING_S * 1000 // 2),
    ("grpc.http2.max_ping_strikes", 0),  # 0: a client pinging too often is never sent away
)
"""Every internal server's: pings its clients and accepts theirs."""

PUBLIC_SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.http2.min_ping_interval_without_data_ms", PING_S * 1000),
)
"""The gateway's public gRPC server: accepts clients' keepalive pings every PING_S or slower
while they wait for a long answer (gRPC's default sends them away after three within 5 minutes)."""
