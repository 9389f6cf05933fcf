"""The daemon's control socket: JSON requests and replies over a Unix stream socket.

One JSON object per line each way. A request is ``{"op": NAME, ...arguments}``;
the reply is ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": TEXT}``.
A malformed or failing request gets an error reply and nothing else happens:
the daemon keeps running. The socket is created mode 0600 in the run directory,
so only its owner (and root) can talk to it.

Operations: ``status``, ``stats`` (port), ``set`` (port, key, value: YAML text as
in a topology file, "none" deletes), ``add_vm`` (vm, spec: YAML text of the VM's
mapping), ``remove_vm`` (vm), ``capture_start`` (port, path), ``capture_status``
(id), ``capture_stop`` (id), ``down``.
"""
from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import traceback

log = logging.getLogger("hvnet.daemon")
MAX_REQUEST = 1 << 20


class ControlError(RuntimeError):
    """The daemon answered with an error, or could not be reached."""


class ControlServer:
    def __init__(self, path, handlers: dict):
        self.path = str(path)
        self.handlers = handlers
        self.sel = selectors.DefaultSelector()
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.lsock.bind(self.path)
        finally:
            os.umask(old)
        self.lsock.listen(16)
        self.lsock.setblocking(False)
        self.sel.register(self.lsock, selectors.EVENT_READ, None)
        self.stopping = False

    def serve(self, stop) -> None:
        """Answer requests until ``stop`` is set (checked at least twice a second)."""
        while not stop.is_set() and not self.stopping:
            for key, _ in self.sel.select(0.5):
                if key.data is None:
                    try:
                        conn, _ = self.lsock.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(False)
                    self.sel.register(conn, selectors.EVENT_READ, bytearray())
                else:
                    self._readable(key.fileobj, key.data)

    def _readable(self, conn, buf: bytearray) -> None:
        try:
            chunk = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn)
            return
        buf += chunk
        if len(buf) > MAX_REQUEST:
            self._reply(conn, {"ok": False, "error": f"request over {MAX_REQUEST} bytes"})
            self._drop(conn)
            return
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            self._reply(conn, self.handle(line))

    def handle(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
        except ValueError as e:
            return {"ok": False, "error": f"bad request: not JSON ({e})"}
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            return {"ok": False, "error": "bad request: expected an object with an 'op' string"}
        op = req.pop("op")
        fn = self.handlers.get(op)
        if fn is None:
            return {"ok": False, "error": f"unknown op {op!r}; ops are {sorted(self.handlers)}"}
        try:
            return {"ok": True, "result": fn(**req)}
        except TypeError as e:
            return {"ok": False, "error": f"{op}: bad arguments: {e}"}
        except (ValueError, RuntimeError, LookupError, OSError) as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:                     # a bug: log it, keep serving
            log.error("request %s failed:\n%s", op, traceback.format_exc())
            return {"ok": False, "error": f"{op}: internal error {type(e).__name__}: {e}"}

    def _reply(self, conn, msg: dict) -> None:
        data = (json.dumps(msg, default=str) + "\n").encode()
        try:
            conn.setblocking(True)
            conn.settimeout(5)
            conn.sendall(data)
            conn.setblocking(False)
        except OSError:
            self._drop(conn)

    def _drop(self, conn) -> None:
        try:
            self.sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            if key.fileobj is not self.lsock:
                self._drop(key.fileobj)
        self.sel.close()
        self.lsock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def call(sock_path, op: str, timeout: float = 30.0, **args):
    """Send one request and return its result; ControlError on any failure."""
    path = sock_path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock_path))
            s.sendall((json.dumps({"op": op, **args}) + "\n").encode())
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
    except FileNotFoundError:
        raise ControlError(f"no control socket at {path}: is the topology up?") from None
    except ConnectionRefusedError:
        raise ControlError(f"nothing listens on {path}: the daemon is gone "
                           "('hvnet clean' removes what it left)") from None
    except OSError as e:
        raise ControlError(f"control socket {path}: {e}") from None
    try:
        reply = json.loads(buf)
    except ValueError:
        raise ControlError(f"the daemon closed the connection without a reply to {op!r}") \
            from None
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "unknown error"))
    return reply.get("result")
