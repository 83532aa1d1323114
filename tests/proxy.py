"""A loopback TCP proxy that watches the client's POP3 commands on their way to a server.

``on_command(line)`` runs in the proxy's thread before the line is forwarded, so a test
can look at the world (the store, say) at the instant a command such as QUIT is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable


class CommandProxy:
    """Forwards 127.0.0.1:<port> to a target; calls ``on_command`` with each client line."""

    def __init__(
        self, target_port: int, on_command: Callable[[bytes], None], host: str = "127.0.0.1"
    ) -> None:
        self.target = (host, target_port)
        self.on_command = on_command
        self.port = 0
        self.commands: list[bytes] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CommandProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            await server.wait_closed()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def client_to_server() -> None:
            while line := await reader.readline():
                self.commands.append(line)
                self.on_command(line)
                up_writer.write(line)
                await up_writer.drain()
            up_writer.close()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        try:
            await asyncio.gather(client_to_server(), server_to_client())
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()
