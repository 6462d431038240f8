"""A TCP relay on 127.0.0.1 that counts the bytes passing through it (TLS or not).

The SuperNodes connect to the relay instead of the SuperLink; it forwards every byte unchanged
(TLS is end to end: the relay sees only ciphertext) and counts what goes each way, so the cost
of TLS and of SecAgg+ can be read on the wire, framing and handshakes included.
"""

from __future__ import annotations

import socket
import threading


class ByteCounter:
    """Forward connections on a free port of 127.0.0.1 to ``target_port``, counting bytes."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = self.down = 0                 # SuperNodes -> SuperLink, SuperLink -> SuperNodes
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def snapshot(self) -> tuple[int, int]:
        """``(up, down)`` bytes so far."""
        with self.lock:
            return self.up, self.down

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target)
            except OSError:
                return
            with self.lock:
                self.sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                with self.lock:
                    if upward:
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        """Stop accepting and close every relayed connection."""
        self.closed = True
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                s.close()
