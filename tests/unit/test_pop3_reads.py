"""How the POP3 connection reads its socket: in 64 KiB reads, over one reader per socket."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import threading
import time

from mailingest.pop3 import wire


def test_a_reply_already_received_is_taken_in_one_64_kib_read_not_8_kib_ones() -> None:
    body = b"+OK\r\n" + b"x" * 98 + b"\r\n"
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sent = threading.Event()
        go = threading.Event()

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"+OK ready\r\n")
                go.wait(10)
                conn.sendall(body * 1000)  # 100 KB
                sent.set()

        server = threading.Thread(target=serve)
        server.start()
        pop = wire.PlainPOP3("127.0.0.1", listener.getsockname()[1], timeout=10)
        try:
            assert pop.welcome == b"+OK ready"
            go.set()
            assert sent.wait(10)
            deadline = time.monotonic() + 10
            while _queued(pop.sock) < len(body) * 1000 and time.monotonic() < deadline:
                time.sleep(0.01)  # in the kernel's receive queue before the read
            assert len(pop.file.peek(1)) > 8192  # io's default buffer would stop at 8 KiB
            assert pop.file.read(len(body)) == body
        finally:
            pop.close()
            server.join(10)


def _queued(sock: socket.socket) -> int:
    """Bytes waiting in the socket's receive queue."""
    return int(struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0])
