"""What one delivery costs at least: the sender's CPU for one small loopback TCP `send`.

In many-channels every delivery is a write of its own (a client gets a few events a second, too
few to share a write), so no server can spend less CPU per delivery than the kernel spends on one
`send` of a frame to one of many sockets. This measures that floor on this machine, outside any
server: a process on one core sends a frame-sized message round-robin over N sockets, as fast as
it can, while a reader process on the other core drains them; the sender's CPU time (user and
system, from /proc) per send is the floor, its Python loop included (a fraction of a µs).

    python -m bench.send_floor                  # 10,000 sockets, 300-byte messages
    python -m bench.send_floor --sockets 1000 --bytes 300 --sends 300000
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import sys
from typing import Final

from bench import procstat

SENDER_CPU: Final = 0
READER_CPU: Final = 1


def _read_all(port: int, sockets: int, expected_bytes: int) -> None:
    """The reader: connect `sockets` times, then drain every byte; runs in the child process."""
    os.sched_setaffinity(0, {READER_CPU})
    conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(sockets)]
    selector = selectors.DefaultSelector()
    for conn in conns:
        conn.setblocking(False)
        selector.register(conn, selectors.EVENT_READ)
    received = 0
    while received < expected_bytes:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            chunk = sock.recv(1 << 20)
            if not chunk:
                return
            received += len(chunk)


def measure(*, sockets: int, message_bytes: int, sends: int) -> float:
    """Sender CPU µs per `send` of `message_bytes` round-robin over `sockets` loopback sockets."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(min(sockets, 4096))
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        try:
            _read_all(port, sockets, sends * message_bytes)
        finally:
            os._exit(0)
    os.sched_setaffinity(0, {SENDER_CPU})
    peers = [listener.accept()[0] for _ in range(sockets)]
    for peer in peers:
        peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as aiohttp and eva-ws set it
    message = b"x" * message_bytes
    before = procstat.sample(os.getpid()).cpu_s
    for i in range(sends):
        peers[i % sockets].sendall(message)
    used_s = procstat.sample(os.getpid()).cpu_s - before
    os.waitpid(pid, 0)
    for peer in peers:
        peer.close()
    listener.close()
    return used_s / sends * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=10_000)
    parser.add_argument("--bytes", type=int, default=300, help="message size (an event frame is ~300 bytes)")
    parser.add_argument("--sends", type=int, default=500_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if os.cpu_count() is None or (os.cpu_count() or 0) < 2:
        print("needs two cores: the sender on one, the reader on the other", file=sys.stderr)
        return 1
    for run in range(1, args.runs + 1):
        us = measure(sockets=args.sockets, message_bytes=args.bytes, sends=args.sends)
        print(f"run {run}: {us:.2f} µs of sender CPU per send ({args.sockets} sockets, {args.bytes} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
