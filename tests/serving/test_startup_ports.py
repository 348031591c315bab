"""The start-up port check: a port left in TIME_WAIT by a server that died is free to reuse
(its replacement must start on the same port, behind a balancer that knows that port), a
port someone listens on is not."""

from __future__ import annotations

import socket

import pytest
from socialrec.serving.supervisor import StartupError, _port_free


def _time_wait_port() -> int:
    """A loopback port whose server side closed first: its connection is in TIME_WAIT."""
    lst = socket.create_server(("127.0.0.1", 0))
    port = lst.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = lst.accept()
    conn.close()  # the server closes first, as a killed server's kernel does
    client.recv(1)  # sees the FIN
    client.close()
    lst.close()
    return port


def test_a_port_in_time_wait_is_free_for_a_replacement() -> None:
    port = _time_wait_port()
    # what the check did before: bind without SO_REUSEADDR
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))
    _port_free("127.0.0.1", port, "gRPC port")  # no StartupError


def test_a_port_with_a_listener_is_taken() -> None:
    with socket.create_server(("127.0.0.1", 0)) as lst:
        port = lst.getsockname()[1]
        with pytest.raises(StartupError, match=f"gRPC port 127.0.0.1:{port} is not available"):
            _port_free("127.0.0.1", port, "gRPC port")
