"""Header blocks: decoding with one persistent HPACK decoder, stateless encoding.

Design: the gateway advertises SETTINGS_HEADER_TABLE_SIZE = 0 on both hops but keeps a 4096-byte
decoding table, because a peer may index into its table before it applies (or acknowledges) the
setting (grpc-go does). There is one `HeaderDecoder` per connection direction and every block is
decoded, even of streams already reset, so the table stays in step with the peer.

Encoding never touches a dynamic table: each field is a static-table index when the whole pair is
in the static table, else a literal "without indexing" (with an indexed name when the name is in
the static table). A block encoded this way means the same whatever the receiver's table holds,
so a stream's headers can be encoded early, held, and sent in any order on any connection.
Header lists are raw bytes pairs, kept in order with repeated names as separate fields.
"""

from __future__ import annotations

from collections.abc import Iterable

import hpack
from hpack.table import HeaderTable

from gateway.h2.frames import COMPRESSION_ERROR, ProtocolError

Headers = list[tuple[bytes, bytes]]

_STATIC_PAIR: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _i, (_n, _v) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_PAIR.setdefault((_n, _v), _i)
    _STATIC_NAME.setdefault(_n, _i)


class HeaderDecoder:
    """Decodes the header blocks of one direction of one connection.

    `max_header_list_size` bounds every decoded list (RFC 9113 size: names, values and 32 per
    field). With `max_expansion`, a block may also decode to at most that many times its own
    size, but never less than `floor`: an HPACK bomb (a few KB of references to one large
    table entry) stops there, with its cost to the gateway bounded by its own size, while
    honest lists (literals, at most about 1.6 times larger decoded) pass. Decoding stops at
    the bound; the table is then out of step, so exceeding it is a connection error.
    """

    __slots__ = ("_decoder", "_expansion", "_floor", "_max")

    def __init__(self, *, max_header_list_size: int, max_expansion: int = 0,
                 floor: int = 0) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=max_header_list_size)
        self._max = max_header_list_size
        self._expansion = max_expansion
        self._floor = floor

    def decode(self, block: bytes) -> Headers:
        if self._expansion:
            self._decoder.max_header_list_size = min(
                self._max, max(self._floor, self._expansion * len(block)))
        try:
            pairs = self._decoder.decode(block, raw=True)
        except hpack.OversizedHeaderListError as exc:
            raise ProtocolError(COMPRESSION_ERROR, f"header list too large: a block of "
                                f"{len(block)} bytes decodes to more than "
                                f"{self._decoder.max_header_list_size}") from exc
        except (hpack.HPACKError, ValueError, IndexError) as exc:
            raise ProtocolError(COMPRESSION_ERROR, f"undecodable header block: {exc}") from exc
        return [(bytes(n), bytes(v)) for n, v in pairs]


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes) -> bytes:
    return _integer(len(data), 7, 0x00) + data


def encode(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Stateless HPACK encoding (RFC 7541: indexed static fields, literals without indexing)."""
    out: list[bytes] = []
    for name, value in headers:
        index = _STATIC_PAIR.get((name, value))
        if index is not None:
            out.append(_integer(index, 7, 0x80))
            continue
        name_index = _STATIC_NAME.get(name)
        if name_index is not None:
            out.append(_integer(name_index, 4, 0x00))
        else:
            out.append(b"\x00" + _string(name))
        out.append(_string(value))
    return b"".join(out)


def list_size(headers: Headers) -> int:
    """A header list's size as SETTINGS_MAX_HEADER_LIST_SIZE counts it (RFC 9113 6.5.2)."""
    return sum(len(n) + len(v) + 32 for n, v in headers)


def get(headers: Headers, name: bytes) -> bytes | None:
    """The first value of `name`, or None."""
    for n, v in headers:
        if n == name:
            return v
    return None


def get_all(headers: Headers, name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]
