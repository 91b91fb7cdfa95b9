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
    """Decodes the header blocks of one direction of one connection."""

    __slots__ = ("_decoder",)

    def __init__(self, *, max_header_list_size: int) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=max_header_list_size)

    def decode(self, block: bytes) -> Headers:
        try:
            pairs = self._decoder.decode(block, raw=True)
        except hpack.OversizedHeaderListError as exc:
            raise ProtocolError(COMPRESSION_ERROR, f"header list too large: {exc}") from exc
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


def get(headers: Headers, name: bytes) -> bytes | None:
    """The first value of `name`, or None."""
    for n, v in headers:
        if n == name:
            return v
    return None


def get_all(headers: Headers, name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]
