"""Streaming HTTP content codecs for the ClickHouse front (request and response bodies).

clickhouse-connect compresses every insert block as its own frame (one LZ4 frame or one zstd
frame per block), so decoders must accept a body made of many concatenated frames.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Protocol

import lz4.frame
import zstandard

try:  # brotli is optional: used only when installed
    import brotli
except ImportError:  # pragma: no cover - depends on the environment
    brotli = None


class UnsupportedEncodingError(ValueError):
    """The client used a Content-Encoding this server cannot decode."""


class _FrameDecoder(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes) -> bytes: ...


class Decoder:
    """Incremental decoder that restarts after each complete frame (concatenated frames)."""

    def __init__(self, factory: Callable[[], _FrameDecoder], framed: bool = True) -> None:
        self._factory = factory
        self._current = factory()
        self._framed = framed
        self._pending = False  # True while a frame is started but not finished

    def decompress(self, data: bytes) -> bytes:
        out: list[bytes] = []
        while data:
            out.append(self._current.decompress(data))
            self._pending = True
            if self._current.eof:
                data = self._current.unused_data
                self._current = self._factory()
                self._pending = False
            else:
                data = b""
        return b"".join(out)

    def finish(self) -> None:
        """Raise if the body ended in the middle of a frame (a truncated upload)."""
        if self._framed and self._pending:
            raise ValueError("compressed request body is truncated (incomplete frame)")


class _Identity:
    eof = False
    unused_data = b""

    def decompress(self, data: bytes) -> bytes:
        return data


class _Brotli:
    def __init__(self) -> None:
        self._d = brotli.Decompressor()
        self.unused_data = b""

    @property
    def eof(self) -> bool:
        return self._d.is_finished()

    def decompress(self, data: bytes) -> bytes:
        return self._d.process(data)


def _zstd_frame() -> _FrameDecoder:
    return zstandard.ZstdDecompressor().decompressobj()


_DECODERS: dict[str, Callable[[], _FrameDecoder]] = {
    "gzip": lambda: zlib.decompressobj(wbits=16 + zlib.MAX_WBITS),
    "x-gzip": lambda: zlib.decompressobj(wbits=16 + zlib.MAX_WBITS),
    "deflate": lambda: zlib.decompressobj(wbits=zlib.MAX_WBITS),
    "lz4": lz4.frame.LZ4FrameDecompressor,
    "zstd": _zstd_frame,
}
if brotli is not None:
    _DECODERS["br"] = _Brotli


def request_decoder(content_encoding: str | None) -> Decoder:
    """Decoder for a request body sent with the given Content-Encoding header."""
    name = (content_encoding or "").strip().lower()
    if name in ("", "identity", "none"):
        return Decoder(_Identity, framed=False)
    factory = _DECODERS.get(name)
    if factory is None:
        supported = ", ".join(sorted(_DECODERS))
        raise UnsupportedEncodingError(
            f"Unknown Content-Encoding '{content_encoding}'; supported: {supported}"
        )
    return Decoder(factory)


class Encoder(Protocol):
    def compress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class _ZlibEncoder:
    def __init__(self, wbits: int) -> None:
        self._c = zlib.compressobj(level=3, wbits=wbits)

    def compress(self, data: bytes) -> bytes:
        # Z_SYNC_FLUSH so each result chunk reaches the client now, not at the end.
        return self._c.compress(data) + self._c.flush(zlib.Z_SYNC_FLUSH)

    def flush(self) -> bytes:
        return self._c.flush()


class _Lz4Encoder:
    """One LZ4 frame for the whole response (clients decode a single frame); auto_flush
    makes every chunk leave at once instead of waiting for a full block."""

    def __init__(self) -> None:
        self._c = lz4.frame.LZ4FrameCompressor(auto_flush=True)
        self._head = self._c.begin()

    def compress(self, data: bytes) -> bytes:
        head, self._head = self._head, b""
        return head + self._c.compress(data)

    def flush(self) -> bytes:
        head, self._head = self._head, b""
        return head + self._c.flush()


class _ZstdEncoder:
    def __init__(self) -> None:
        self._c = zstandard.ZstdCompressor(level=1).compressobj()

    def compress(self, data: bytes) -> bytes:
        return self._c.compress(data) + self._c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def flush(self) -> bytes:
        return self._c.flush()


_ENCODERS: dict[str, Callable[[], Encoder]] = {
    "lz4": _Lz4Encoder,
    "zstd": _ZstdEncoder,
    "gzip": lambda: _ZlibEncoder(16 + zlib.MAX_WBITS),
    "deflate": lambda: _ZlibEncoder(zlib.MAX_WBITS),
}


def choose_response_encoding(accept_encoding: str | None) -> str | None:
    """First encoding in the client's Accept-Encoding list that we can produce, else None."""
    for item in (accept_encoding or "").split(","):
        name = item.split(";")[0].strip().lower()
        if name in _ENCODERS:
            return name
    return None


def response_encoder(name: str) -> Encoder:
    return _ENCODERS[name]()
