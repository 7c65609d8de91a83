"""The lab clients' own logic, without a lab."""

import socket

from synproxy.lab.clients import free_port


def test_a_steered_source_port_an_earlier_socket_holds_is_skipped():
    """The kernel's ephemeral ports share the steered blocks: a port still held (by an earlier
    connection's TIME_WAIT in the lab, by a bound socket here) is passed over, not failed on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        held = holder.getsockname()[1]
        ports = iter(range(held, held + 3))
        assert free_port(ports, "127.0.0.1") == held + 1
        assert free_port(ports, "127.0.0.1") == held + 2
    assert free_port(None, "::1") is None
