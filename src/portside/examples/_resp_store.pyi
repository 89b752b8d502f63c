"""Types of the RESP example's compiled fast path (``_resp_store.pyx``), for type checkers."""

from portside.protocols._resp import RespFramer
from portside.protocols.framing import Buffer

Command = list[bytes]

class StoreFramer(RespFramer):
    store: dict[bytes, bytes]
    expires: dict[bytes, int]
    resp3: bool
    def __init__(self, store: dict[bytes, bytes], expires: dict[bytes, int],
                 max_bulk: int = ..., max_arguments: int = ..., max_request: int = ...,
                 max_inline: int = ...) -> None: ...
    def serve(self, data: Buffer, limit: int) -> tuple[bytes, Command | None]: ...
    def resume(self, data: Buffer, limit: int) -> tuple[bytes, Command | None]: ...
