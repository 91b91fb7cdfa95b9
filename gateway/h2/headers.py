"""Header blocks: decoding and encoding with one persistent HPACK table per direction.

Design: peers may use a dynamic table of the default 4,096 bytes (SETTINGS_HEADER_TABLE_SIZE is
left as it is), so a client's repeated headers arrive as one-byte indexes. There is one
`HeaderDecoder` per connection direction and every block is decoded, even of streams already
reset, so the table stays in step with the peer.

`HeaderEncoder` keeps a dynamic table in step with one peer's decoder, for blocks encoded in the
order they go on the wire: requests toward a replica (each HEADERS frame is queued as it is
encoded), and responses toward a client (the send scheduler encodes a response's headers and
trailers when it writes them, after their stream's data: h2/flow.py). Repeated fields then cost
the peer a one-byte index each instead of a literal (a gRPC request block: about 10 bytes
instead of about 225; a response's headers and trailers: 2 bytes each).
Header lists are raw bytes pairs, kept in order with repeated names as separate fields.
"""

from __future__ import annotations

import hpack
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

from gateway.h2.frames import COMPRESSION_ERROR, ProtocolError

Headers = list[tuple[bytes, bytes]]

_STATIC_PAIR: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _i, (_n, _v) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_PAIR.setdefault((_n, _v), _i)
    _STATIC_NAME.setdefault(_n, _i)


DEFAULT_TABLE_SIZE = 4096
"""SETTINGS_HEADER_TABLE_SIZE's default (RFC 9113), which the gateway leaves as it is."""

_STATIC: tuple[tuple[bytes, bytes], ...] = tuple(HeaderTable.STATIC_TABLE)
_STATIC_COUNT = len(_STATIC)
_MAX_INT_BYTES = 5  # continuation bytes of an HPACK integer: up to 2^35, far above any limit

_MEMO_ENTRIES = 64  # blocks remembered per decoder or encoder
_MEMO_LONGEST = 256  # longer blocks are never remembered

_HUFFMAN_MEMO: dict[bytes, bytes] = {}
_HUFFMAN_MEMO_ENTRIES = 4096
_HUFFMAN_MEMO_LONGEST = 256  # longer strings are decoded each time, never kept


class _Undecodable(Exception):
    pass


class _Oversized(Exception):
    pass


def _int(data: bytes, pos: int, mask: int) -> tuple[int, int]:
    """An HPACK integer with a `mask`-bit prefix at `pos`: (value, position after it)."""
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    for _ in range(_MAX_INT_BYTES):
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise _Undecodable("integer too long")


def _str(data: bytes, pos: int) -> tuple[bytes, int]:
    """An HPACK string literal at `pos`: (bytes, position after it)."""
    huffman = data[pos] & 0x80
    length, pos = _int(data, pos, 0x7F)
    stop = pos + length
    if stop > len(data):
        raise _Undecodable("string beyond the block's end")
    raw = data[pos:stop]
    if not huffman:
        return raw, stop
    text = _HUFFMAN_MEMO.get(raw)
    if text is None:
        text = decode_huffman(raw)
        if length <= _HUFFMAN_MEMO_LONGEST:
            if len(_HUFFMAN_MEMO) >= _HUFFMAN_MEMO_ENTRIES:
                _HUFFMAN_MEMO.clear()  # bounded; a client sending endless new strings only
                #                        makes the memo useless, never larger
            _HUFFMAN_MEMO[raw] = text
    return text, stop


class HeaderDecoder:
    """Decodes the header blocks of one direction of one connection (RFC 7541).

    A lean decoder of the gateway's own (the `hpack` library's decoder costs about 50 us for a
    gRPC request's literal block, 18 us for a fully indexed one; this one about a tenth):
    indexed fields are a list lookup, literals slices, and Huffman-coded strings are decoded
    once per distinct encoding (a bounded, process-wide memo: gRPC clients send the same paths,
    content types and user agents over and over). The dynamic table holds at most
    `table_size` bytes (the SETTINGS_HEADER_TABLE_SIZE the gateway advertises); a size update
    above it, or after the block's first field, is a decoding error.

    `max_header_list_size` bounds every decoded list (RFC 9113 size: names, values and 32 per
    field). With `max_expansion`, a block may also decode to at most that many times its own
    size, but never less than `floor`: an HPACK bomb (a few KB of references to one large
    table entry) stops there, with its cost to the gateway bounded by its own size, while
    honest lists pass. Decoding stops at the bound; the table is then out of step, so
    exceeding it, like any decoding error, is a connection error (COMPRESSION_ERROR).
    """

    __slots__ = ("_expansion", "_floor", "_generation", "_max", "_max_table", "_memo",
                 "_table", "_table_limit", "_table_size", "size")

    def __init__(self, *, max_header_list_size: int, max_expansion: int = 0,
                 floor: int = 0, table_size: int = DEFAULT_TABLE_SIZE) -> None:
        self._max = max_header_list_size
        self._expansion = max_expansion
        self._floor = floor
        self._max_table = table_size  # what the peer may set its table to
        self._table_limit = table_size  # the table's current maximum size
        self._table: list[tuple[bytes, bytes]] = []  # newest last
        self._table_size = 0
        self._generation = 0  # changes with every change of the dynamic table
        # block -> (generation, headers, size): blocks that left the table as it was
        self._memo: dict[bytes, tuple[int, Headers, int]] = {}
        self.size = 0  # the RFC 9113 size of the list decoded last (list_size)

    def decode(self, block: bytes) -> Headers:
        """The header list of `block`. A block seen before that did not change the dynamic
        table decodes to what it did then while the table has not changed since (gRPC peers
        send the same indexed block call after call): that list is returned again, so the
        lists returned must not be modified."""
        hit = self._memo.get(block)
        if hit is not None and hit[0] == self._generation:
            self.size = hit[2]
            return hit[1]
        limit = self._max
        if self._expansion:
            limit = min(limit, max(self._floor, self._expansion * len(block)))
        generation = self._generation
        try:
            headers = self._decode(bytes(block), limit)
        except _Oversized:
            raise ProtocolError(COMPRESSION_ERROR, f"header list too large: a block of "
                                f"{len(block)} bytes decodes to more than {limit}") from None
        except (_Undecodable, IndexError, hpack.HPACKDecodingError) as exc:
            raise ProtocolError(COMPRESSION_ERROR,
                                f"undecodable header block: {exc}") from None
        if generation == self._generation and len(block) <= _MEMO_LONGEST:
            memo = self._memo
            if len(memo) >= _MEMO_ENTRIES:
                memo.clear()
            memo[bytes(block)] = (generation, headers, self.size)
        return headers

    def _decode(self, data: bytes, limit: int) -> Headers:
        out: Headers = []
        size = 0
        pos = 0
        end = len(data)
        while pos < end:
            byte = data[pos]
            if byte & 0x80:  # indexed field
                index, pos = _int(data, pos, 0x7F)
                field = self._field(index)
            elif byte & 0x40:  # literal with incremental indexing
                index, pos = _int(data, pos, 0x3F)
                if index:
                    name = self._field(index)[0]
                else:
                    name, pos = _str(data, pos)
                value, pos = _str(data, pos)
                field = (name, value)
                self._add(field)
            elif byte & 0x20:  # dynamic table size update
                if out:
                    raise _Undecodable("table size update after a field")
                new_size, pos = _int(data, pos, 0x1F)
                if new_size > self._max_table:
                    raise _Undecodable(f"table size {new_size} above {self._max_table}")
                self._table_limit = new_size
                self._generation += 1
                self._evict(0)
                continue
            else:  # literal without indexing (0000) or never indexed (0001)
                index, pos = _int(data, pos, 0x0F)
                if index:
                    name = self._field(index)[0]
                else:
                    name, pos = _str(data, pos)
                value, pos = _str(data, pos)
                field = (name, value)
            size += len(field[0]) + len(field[1]) + 32
            if size > limit:
                raise _Oversized
            out.append(field)
        self.size = size
        return out

    def _field(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= _STATIC_COUNT:
            return _STATIC[index - 1]
        dynamic = index - _STATIC_COUNT
        if index == 0 or dynamic > len(self._table):
            raise _Undecodable(f"invalid table index {index}")
        return self._table[-dynamic]

    def _add(self, field: tuple[bytes, bytes]) -> None:
        self._generation += 1
        entry = len(field[0]) + len(field[1]) + 32
        if entry > self._table_limit:  # RFC 7541 4.4: the table is emptied, nothing added
            self._table.clear()
            self._table_size = 0
            return
        self._evict(entry)
        self._table.append(field)
        self._table_size += entry

    def _evict(self, room: int) -> None:
        table = self._table
        while table and self._table_size + room > self._table_limit:
            name, value = table.pop(0)
            self._table_size -= len(name) + len(value) + 32


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


def _literal(name: bytes, value: bytes, prefix_bits: int, first: int) -> bytes:
    """A literal field (RFC 7541 6.2): its name a static-table index when the name is there,
    else a string; `prefix_bits` and `first` give the kind (4, 0x00: without indexing; 4, 0x10:
    never indexed; 6, 0x40: with incremental indexing)."""
    name_index = _STATIC_NAME.get(name)
    if name_index is not None:
        return _integer(name_index, prefix_bits, first) + _string(value)
    return bytes((first,)) + _string(name) + _string(value)


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


# Fields never put in the dynamic table: values that change on every call (a deadline, trace
# ids, a timestamp) would only push out the ones that repeat; credentials go as "never indexed"
# (RFC 7541 7.1.3), which also tells intermediaries not to index them. An error's message is
# indexed only when empty: the one value of it that repeats.
_NOT_INDEXED = frozenset({b"grpc-timeout", b"traceparent", b"tracestate", b"grpc-trace-bin",
                          b"content-length", b"buildkit-current-timestamp"})
_INDEXED_ONLY_EMPTY = frozenset({b"grpc-message"})
_NEVER_INDEXED = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})


class HeaderEncoder:
    """Encodes the header blocks of one direction of one connection with a dynamic table.

    Invariant: the blocks reach the peer in the order `encode` returned them, and the peer's
    decoder applies each one, so both tables hold the same entries. A field already in the
    table is sent as its index; one that may repeat is sent as a literal "with incremental
    indexing" and added (the oldest entries are evicted to make room); values that change call
    after call (`_NOT_INDEXED`, and non-empty `_INDEXED_ONLY_EMPTY`) or are credentials
    (`_NEVER_INDEXED`) and entries larger than a quarter of the table are sent as literals and
    never added.

    The table holds at most `limit` bytes: 4,096 (the protocol's initial
    SETTINGS_HEADER_TABLE_SIZE) until the peer's SETTINGS say less (`peer_limit`), which the
    next block starts with as a dynamic table size update. A raised setting is not followed:
    using less than the peer allows is always valid.

    Cost: a block of a list seen before, encoded while the table has not changed since (the
    steady state of a gRPC client's calls), is one dictionary lookup.
    """

    __slots__ = ("_inserted", "_memo", "_numbers", "_pending", "_size", "_table", "limit")

    def __init__(self, *, limit: int = DEFAULT_TABLE_SIZE) -> None:
        self.limit = limit
        self._table: list[tuple[tuple[bytes, bytes], int]] = []  # (field, number), oldest 1st
        self._numbers: dict[tuple[bytes, bytes], int] = {}  # field -> its newest entry's number
        self._inserted = 0  # entries ever added: the next entry's number
        self._size = 0
        self._pending = False  # a size update leads the next block
        self._memo: dict[tuple[tuple[bytes, bytes], ...], bytes] = {}  # while the table holds

    def peer_limit(self, value: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE: the table shrinks to it if it is less."""
        if value < self.limit:
            self.limit = value
            self._evict(0)
            self._pending = True
            self._memo.clear()

    def encode(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        """The block of `headers`, to be sent before any block encoded after it."""
        key = tuple(headers)
        block = self._memo.get(key)
        if block is not None:
            return block
        inserted = self._inserted
        out: list[bytes] = []
        update = self._pending
        if update:
            out.append(_integer(self.limit, 5, 0x20))
            self._pending = False
        numbers = self._numbers
        for field in headers:
            number = numbers.get(field)
            if number is not None:
                out.append(_integer(_STATIC_COUNT + self._inserted - number, 7, 0x80))
                continue
            index = _STATIC_PAIR.get(field)
            if index is not None:
                out.append(_integer(index, 7, 0x80))
                continue
            name, value = field
            entry = len(name) + len(value) + 32
            if (name in _NOT_INDEXED or name in _NEVER_INDEXED or entry > self.limit // 4
                    or (value and name in _INDEXED_ONLY_EMPTY)):
                out.append(_literal(name, value, 4, 0x10 if name in _NEVER_INDEXED else 0x00))
                continue
            out.append(_literal(name, value, 6, 0x40))
            self._add(field, entry)
        block = b"".join(out)
        if self._inserted != inserted:
            self._memo.clear()  # every remembered block's indexes moved
        elif not update and len(block) <= _MEMO_LONGEST:
            if len(self._memo) >= _MEMO_ENTRIES:
                self._memo.clear()
            self._memo[key] = block
        return block

    def _add(self, field: tuple[bytes, bytes], entry: int) -> None:
        self._evict(entry)
        self._table.append((field, self._inserted))
        self._numbers[field] = self._inserted
        self._inserted += 1
        self._size += entry

    def _evict(self, room: int) -> None:
        table = self._table
        evicted = 0
        while evicted < len(table) and self._size + room > self.limit:
            (name, value), number = table[evicted]
            evicted += 1
            self._size -= len(name) + len(value) + 32
            if self._numbers.get((name, value)) == number:
                del self._numbers[(name, value)]
        if evicted:
            del table[:evicted]
