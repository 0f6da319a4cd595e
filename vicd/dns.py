"""The embedded DNS server of user-defined networks (dockerd's 127.0.0.11).

One server per network, on a UDP socket the network's driver opens where
the network's containers reach it (the bridge's gateway address on
microvm). It answers A queries for the names of that network's endpoints
(container name, aliases, short id) and forwards everything else to the
host's resolvers, so containers on different networks never resolve each
other. Parsing and building messages is dnspython's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

log = logging.getLogger(__name__)

TTL = 600  # dockerd's embedded DNS answers with this TTL
FORWARD_TIMEOUT = 2.0


def host_resolvers(path: Path = Path("/etc/resolv.conf")) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    return [ln.split()[1] for ln in lines if ln.startswith("nameserver") and len(ln.split()) > 1]


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        asyncio.ensure_future(self.server.handle(data, addr, self))


class DNSServer:
    """Answers from ``names(client_ip)`` (lower-case name -> IPv4), forwards the rest."""

    def __init__(self, names: Callable[[str], dict[str, str]], forward: bool = True) -> None:
        self.names = names
        self.forward = forward
        self._transport: asyncio.DatagramTransport | None = None

    async def serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
        self._transport = transport

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def handle(self, data: bytes, addr: tuple[str, int], proto: _Protocol) -> None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return  # not DNS: drop, as a resolver does
        try:
            reply = await self.answer(query, addr[0])
        except Exception:  # a bad query must not take the server down
            log.exception("embedded DNS: query from %s failed", addr[0])
            reply = dns.message.make_response(query)
            reply.set_rcode(dns.rcode.SERVFAIL)
        if proto.transport is not None:
            proto.transport.sendto(reply.to_wire(), addr)

    async def answer(self, query: dns.message.Message, client: str) -> dns.message.Message:
        if len(query.question) != 1:
            return _rcode(query, dns.rcode.FORMERR)
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        table = self.names(client)
        if name in table:
            reply = dns.message.make_response(query)
            reply.flags |= dns.flags.RA
            if q.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
                reply.answer.append(dns.rrset.from_text(q.name, TTL, dns.rdataclass.IN,
                                                        dns.rdatatype.A, table[name]))
            return reply  # other types of a known name: an empty answer, like dockerd
        if not self.forward:
            return _rcode(query, dns.rcode.NXDOMAIN)
        for server in host_resolvers():
            try:
                resp = await dns.asyncquery.udp(query, server, timeout=FORWARD_TIMEOUT)
            except (dns.exception.DNSException, OSError):
                continue
            return resp
        return _rcode(query, dns.rcode.SERVFAIL)


def _rcode(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    reply = dns.message.make_response(query)
    reply.flags |= dns.flags.RA
    reply.set_rcode(rcode)
    return reply
