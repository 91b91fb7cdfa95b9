"""Expected errors and how each reaches a client: one class per situation, one gRPC code each.

The relay turns a `GatewayError` into a gRPC trailers-only response (or trailers, once response
headers went out) with the class's status code and the instance's message; nothing else in the
gateway chooses status codes.
"""

from __future__ import annotations

from urllib.parse import quote

# gRPC status codes used by the gateway.
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
INTERNAL = 13
UNAVAILABLE = 14

CODE_NAMES = {
    0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
    13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}


def result_name(code: int) -> str:
    """A build's result for logs and metrics: "ok" or the lower-case gRPC code name."""
    return CODE_NAMES.get(code, "unknown").lower()


class GatewayError(Exception):
    code = UNKNOWN
    result = ""  # the build result it gives; default: result_name(code)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def build_result(self) -> str:
        return self.result or result_name(self.code)


class NoReplica(GatewayError):
    """No ready replica can take the call."""

    code = UNAVAILABLE


class ReplicaUnreachable(GatewayError):
    """Connecting to the chosen replica failed."""

    code = UNAVAILABLE


class ReplicaLost(GatewayError):
    """The replica's connection broke while the call was open."""

    code = UNAVAILABLE
    result = "replica_lost"


class ReplicaReset(GatewayError):
    """The replica reset the call's stream (RST_STREAM): it is stopping or failing."""

    code = UNAVAILABLE
    result = "replica_reset"


class QueueFull(GatewayError):
    """The pool's admission queue is at --max-queue."""

    code = RESOURCE_EXHAUSTED


class QueueTimeout(GatewayError):
    """A build waited --queue-timeout for a free replica."""

    code = RESOURCE_EXHAUSTED


class NotFound(GatewayError):
    """A history call names a build no replica knows."""

    code = NOT_FOUND


class BadRequest(GatewayError):
    """A request the gateway must read could not be decoded."""

    code = INVALID_ARGUMENT


class RequestHeadersTooLarge(GatewayError):
    """A client's request headers exceed --max-request-header-list."""

    code = RESOURCE_EXHAUSTED


class NotAllowed(GatewayError):
    """The client may not build in this pool (its allow list)."""

    code = PERMISSION_DENIED


class TenantQueueFull(GatewayError):
    """The client already has --tenant-max-queue builds waiting."""

    code = RESOURCE_EXHAUSTED


class ShuttingDown(GatewayError):
    """The gateway is stopping and takes no new builds."""

    code = UNAVAILABLE


def grpc_message(message: str) -> bytes:
    """Percent-encodes a status message for the grpc-message header (gRPC HTTP/2 spec)."""
    return quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()


def trailers(code: int, message: str, *, headers_sent: bool) -> list[tuple[bytes, bytes]]:
    """Trailers for a failed call; a trailers-only response when no headers went out yet."""
    fields: list[tuple[bytes, bytes]] = []
    if not headers_sent:
        fields += [(b":status", b"200"), (b"content-type", b"application/grpc")]
    fields += [(b"grpc-status", str(code).encode()), (b"grpc-message", grpc_message(message))]
    return fields
