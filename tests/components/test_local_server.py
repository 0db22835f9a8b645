"""The local policy server's port: a free one, or the one asked for, refused in one line when taken."""

from __future__ import annotations

import socket

import pytest

from vaops.components.evaluate.local_server import claim_port, free_port


def test_a_taken_port_is_refused_and_a_free_one_is_kept():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {taken} is taken"):
            claim_port(taken)
    port = free_port()
    assert claim_port(port) == port
