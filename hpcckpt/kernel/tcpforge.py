"""One forged TCP segment, as if from a connection's peer, delivered to a local socket.

TCP_REPAIR can rebuild a connection's queues but not the FIN it received, nor the peer's
acknowledgement of the FIN it sent: a half-closed connection is restored as established
and then given those by a segment the peer "sends" (what CRIU's soccr does with libnet).
It goes out of a raw socket (IP header included, the peer's address as source) to the
local address, through loopback into the restored socket. It carries the network lock's
mark (netlock.MARK), which the lock lets through while holding back everything else.
"""
import ipaddress
import socket
import struct

from ..errors import KernelError

SO_MARK = 36
FIN, ACK = 0x01, 0x10


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def segment(src: tuple[str, int], dst: tuple[str, int], seq: int, ack: int, flags: int,
            window: int) -> tuple[int, bytes, str]:
    """(family, IP packet, destination address) of a 20-byte TCP header from `src` to `dst`."""
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if s.version == 6 and s.ipv4_mapped and d.version == 6 and d.ipv4_mapped:
        s, d = s.ipv4_mapped, d.ipv4_mapped                      # an IPv6 socket's IPv4 peer
    tcp = struct.pack("!HHIIBBHHH", src[1], dst[1], seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags,
                      min(window, 0xFFFF), 0, 0)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP, 0,
                         s.packed, d.packed)
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        return socket.AF_INET, ip + tcp, str(d)
    pseudo = s.packed + d.packed + struct.pack("!I3xB", len(tcp), socket.IPPROTO_TCP)
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), socket.IPPROTO_TCP, 64, s.packed, d.packed)
    return socket.AF_INET6, ip + tcp, str(d)


def send(src: tuple[str, int], dst: tuple[str, int], seq: int, ack: int, flags: int, window: int,
         mark: int) -> None:
    """Deliver the segment (to a socket of our network namespace)."""
    family, packet, to = segment(src, dst, seq, ack, flags, window)
    try:
        with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as r:
            r.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            r.sendto(packet, (to, 0))
    except OSError as e:
        raise KernelError(f"cannot send the segment that restores a half-closed TCP connection "
                          f"{dst[0]}:{dst[1]} <- {src[0]}:{src[1]}: {e.strerror}") from None
