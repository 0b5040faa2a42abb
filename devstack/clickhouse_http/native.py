"""Native output for clients that send `client_protocol_version` (placeholder: passed through)."""

from __future__ import annotations


class NativeUpgrade:
    def __init__(self, client_protocol_version: int) -> None:
        self.version = client_protocol_version

    def block(self, data: bytes) -> bytes:
        return data
