"""The KV store's unit: a chunk of ``chunk_tokens`` tokens of KV for every layer.

A chunk is addressed by its chain hash (:func:`chunk_hash_chain`): the key of chunk i
covers every token of chunks 0..i and the salt, so equal keys mean equal prefixes under
the same model and KV layout, hence equal KV. Different models or layouts never share keys.

Payload layout (one contiguous tensor per chunk, in memory, on the wire and on disk)::

    payload[layer, 0 = key | 1 = value, token, kv_head, head_dim]

Token t of the chunk is token ``chunk_index * chunk_tokens + t`` of the sequence. The
engine's paged layout ``kv[layer, k|v, block, offset_in_block, kv_head, head_dim]`` maps
onto it by merging (block, offset_in_block): ``token = block * block_size + offset``
(:func:`payload_from_blocks`, :func:`payload_to_blocks`).

Wire format (:func:`encode` / :func:`decode`), all integers little-endian::

    offset size  field
         0    4  magic b"TKVC"
         4    2  format version (1)
         6    1  compression (0 none, 1 zstd, 2 lz4 frame)
         7    1  dtype code (see _DTYPE_CODES)
         8   16  chunk key
        24    4  num_layers
        28    4  num_kv_heads
        32    4  head_dim
        36    4  chunk_tokens
        40    4  block_size
        44    8  payload length, uncompressed (bytes)
        52    8  stored payload length, as it follows (bytes)
        60    4  crc32 of header (this field zeroed) + fingerprint + uncompressed payload
        64    2  fingerprint length n
        66    n  model fingerprint, UTF-8
      66+n  ...  payload bytes (compressed when compression != 0)

Chunks are immutable once built: tiers share payload tensors with callers, nobody writes them.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import pyarrow as pa
import torch

KEY_BYTES = 16
"""Length of a chunk key (blake2b digest size)."""
DEFAULT_CHUNK_TOKENS = 256
_ROOT_PARENT = bytes(KEY_BYTES)  # the "parent" of a sequence's first chunk

_MAGIC = b"TKVC"
_VERSION = 1
_HEADER = struct.Struct("<4sHBB16sIIIIIQQIH")
_CHECKSUM_OFFSET = 60
_DTYPE_CODES = {"float32": 1, "float16": 2, "bfloat16": 3, "float8_e4m3fn": 4, "float8_e5m2": 5}
_DTYPE_NAMES = {code: name for name, code in _DTYPE_CODES.items()}


class ChunkFormatError(ValueError):
    """Bytes that do not decode to a valid chunk (bad magic/version, length, checksum, layout)."""


class Compression(str, Enum):
    """Lossless payload compression on the wire (pyarrow codecs; no extra dependency)."""

    NONE = "none"
    ZSTD = "zstd"
    LZ4 = "lz4"  # LZ4 frame format


_COMPRESSION_CODES = {Compression.NONE: 0, Compression.ZSTD: 1, Compression.LZ4: 2}
_COMPRESSIONS = {code: compression for compression, code in _COMPRESSION_CODES.items()}


def chunk_hash_chain(token_ids: Sequence[int], chunk_tokens: int, salt: bytes) -> list[bytes]:
    """Keys of the FULL chunks of ``token_ids``; a partial trailing chunk gets no key.

    key_i = blake2b-128(salt || key_{i-1} || token ids of chunk i as int64 little-endian),
    with key_{-1} = 16 zero bytes. Deterministic across processes and machines.
    """
    assert chunk_tokens > 0, chunk_tokens
    ids = np.asarray(token_ids, dtype="<i8")
    keys: list[bytes] = []
    parent = _ROOT_PARENT
    for start in range(0, len(ids) - chunk_tokens + 1, chunk_tokens):
        h = hashlib.blake2b(digest_size=KEY_BYTES)
        h.update(salt)
        h.update(parent)
        h.update(ids[start : start + chunk_tokens].tobytes())
        parent = h.digest()
        keys.append(parent)
    return keys


@dataclass(frozen=True)
class KVLayout:
    """What a chunk's payload is: which model, which shape, which dtype."""

    model_fingerprint: str
    """Checkpoint id of the model that computed the KV; part of every key's salt."""
    num_layers: int
    """Transformer layers (the payload's first dimension)."""
    num_kv_heads: int
    """KV heads per layer (after any tensor-parallel split this store does not know about)."""
    head_dim: int
    """Elements per head."""
    dtype: str
    """torch dtype name of the KV cache: float32, float16, bfloat16, float8_e4m3fn, float8_e5m2."""
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    """Tokens per chunk; a multiple of ``block_size``."""
    block_size: int = 16
    """The engine's KV block size in tokens."""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_CODES:
            raise ValueError(f"unsupported KV dtype {self.dtype!r}; one of {sorted(_DTYPE_CODES)}")
        for field in ("num_layers", "num_kv_heads", "head_dim", "chunk_tokens", "block_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.chunk_tokens % self.block_size:
            raise ValueError(f"chunk_tokens {self.chunk_tokens} is not a multiple of block_size {self.block_size}")
        if len(self.model_fingerprint.encode()) > 0xFFFF:
            raise ValueError("model_fingerprint longer than 65535 bytes")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def chunk_shape(self) -> tuple[int, int, int, int, int]:
        """[num_layers, 2, chunk_tokens, num_kv_heads, head_dim]."""
        return (self.num_layers, 2, self.chunk_tokens, self.num_kv_heads, self.head_dim)

    @property
    def chunk_nbytes(self) -> int:
        return int(np.prod(self.chunk_shape)) * self.torch_dtype.itemsize

    def salt(self) -> bytes:
        """Hash salt from the model fingerprint and every layout field (16 bytes)."""
        fields = ("tandem.kvchunk.v1", self.model_fingerprint, self.num_layers, self.num_kv_heads,
                  self.head_dim, self.dtype, self.chunk_tokens, self.block_size)
        return hashlib.blake2b(repr(fields).encode(), digest_size=KEY_BYTES).digest()


@dataclass(frozen=True, eq=False)
class Chunk:
    """One chunk of KV: its chain key, its layout and its payload (never written after creation)."""

    key: bytes
    """Chain hash from :func:`chunk_hash_chain` (16 bytes)."""
    layout: KVLayout
    """Shape, dtype and model of ``payload``."""
    payload: torch.Tensor
    """[num_layers, 2, chunk_tokens, num_kv_heads, head_dim], contiguous, any device."""

    def __post_init__(self) -> None:
        assert len(self.key) == KEY_BYTES, f"chunk key must be {KEY_BYTES} bytes, got {len(self.key)}"
        assert tuple(self.payload.shape) == self.layout.chunk_shape, (tuple(self.payload.shape), self.layout)
        assert self.payload.dtype == self.layout.torch_dtype, (self.payload.dtype, self.layout.dtype)
        assert self.payload.is_contiguous()

    @property
    def nbytes(self) -> int:
        return self.layout.chunk_nbytes


def payload_from_blocks(kv_blocks: torch.Tensor) -> torch.Tensor:
    """[L, 2, blocks, block_size, Hkv, D] (the engine's layout) -> [L, 2, blocks*block_size, Hkv, D].

    Always a new tensor, so the result can be handed to the store while the engine reuses its blocks.
    """
    layers, two, blocks, block_size, heads, head_dim = kv_blocks.shape
    assert two == 2
    return kv_blocks.reshape(layers, 2, blocks * block_size, heads, head_dim).clone()


def payload_to_blocks(payload: torch.Tensor, block_size: int) -> torch.Tensor:
    """[L, 2, tokens, Hkv, D] -> [L, 2, tokens // block_size, block_size, Hkv, D] (a view)."""
    layers, two, tokens, heads, head_dim = payload.shape
    assert two == 2 and tokens % block_size == 0, (payload.shape, block_size)
    return payload.view(layers, 2, tokens // block_size, block_size, heads, head_dim)


def payload_bytes(payload: torch.Tensor) -> np.ndarray:
    """The payload's raw bytes (host memory, uint8, 1-D); a view when it already is on the CPU.

    Going through uint8 keeps every dtype bit-exact (bfloat16 and float8 have no numpy type).
    """
    return payload.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy()


def payload_from_bytes(data, layout: KVLayout) -> torch.Tensor:
    """A new CPU tensor of ``layout.chunk_shape`` holding a copy of ``data`` (any buffer)."""
    src = np.frombuffer(data, dtype=np.uint8)
    assert src.size == layout.chunk_nbytes, (src.size, layout.chunk_nbytes)
    out = torch.empty(layout.chunk_nbytes, dtype=torch.uint8)
    out.numpy()[:] = src
    return out.view(layout.torch_dtype).view(layout.chunk_shape)


def encode(chunk: Chunk, compression: Compression | str = Compression.NONE) -> bytes:
    """The chunk in the wire format (module docstring); ``compression`` is lossless."""
    compression = Compression(compression)
    layout = chunk.layout
    raw = payload_bytes(chunk.payload)
    stored = raw if compression is Compression.NONE else _compress(raw, compression)
    fingerprint = layout.model_fingerprint.encode()
    header = _pack_header(chunk.key, layout, compression, len(stored), 0, len(fingerprint))
    checksum = zlib.crc32(raw, zlib.crc32(fingerprint, zlib.crc32(header)))
    header = _pack_header(chunk.key, layout, compression, len(stored), checksum, len(fingerprint))
    return b"".join([header, fingerprint, stored])


def decode(data: bytes | bytearray | memoryview, expected: KVLayout | None = None) -> Chunk:
    """Parse and verify wire bytes; the payload is a new CPU tensor.

    Raises :class:`ChunkFormatError` for anything that is not an intact chunk, or a chunk
    whose layout differs from ``expected`` when given.
    """
    view = memoryview(data).cast("B")
    if len(view) < _HEADER.size:
        raise ChunkFormatError(f"{len(view)} bytes is shorter than the {_HEADER.size}-byte header")
    (magic, version, compression_code, dtype_code, key, num_layers, num_kv_heads, head_dim, chunk_tokens,
     block_size, payload_len, stored_len, checksum, fingerprint_len) = _HEADER.unpack_from(view)
    if magic != _MAGIC:
        raise ChunkFormatError(f"bad magic {bytes(magic)!r}")
    if version != _VERSION:
        raise ChunkFormatError(f"unsupported chunk format version {version}")
    body = _HEADER.size + fingerprint_len
    if len(view) != body + stored_len:
        raise ChunkFormatError(f"length {len(view)} != header + fingerprint + payload = {body + stored_len}")
    try:
        compression = _COMPRESSIONS[compression_code]
        layout = KVLayout(bytes(view[_HEADER.size : body]).decode(), num_layers, num_kv_heads, head_dim,
                          _DTYPE_NAMES[dtype_code], chunk_tokens, block_size)
    except (KeyError, ValueError) as e:
        raise ChunkFormatError(f"bad layout fields: {e}") from e
    if payload_len != layout.chunk_nbytes:
        raise ChunkFormatError(f"payload length {payload_len} != {layout.chunk_nbytes} for {layout}")
    if expected is not None and layout != expected:
        raise ChunkFormatError(f"layout {layout} is not the expected {expected}")
    stored = view[body:]
    raw = stored if compression is Compression.NONE else _decompress(stored, payload_len, compression)
    header = bytearray(view[: _HEADER.size])
    header[_CHECKSUM_OFFSET : _CHECKSUM_OFFSET + 4] = bytes(4)
    if zlib.crc32(raw, zlib.crc32(view[_HEADER.size : body], zlib.crc32(header))) != checksum:
        raise ChunkFormatError("checksum mismatch")
    return Chunk(bytes(key), layout, payload_from_bytes(raw, layout))


def _pack_header(key: bytes, layout: KVLayout, compression: Compression, stored_len: int, checksum: int,
                 fingerprint_len: int) -> bytes:
    return _HEADER.pack(_MAGIC, _VERSION, _COMPRESSION_CODES[compression], _DTYPE_CODES[layout.dtype], key,
                        layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.chunk_tokens,
                        layout.block_size, layout.chunk_nbytes, stored_len, checksum, fingerprint_len)


def _compress(raw: np.ndarray, compression: Compression) -> bytes:
    return pa.compress(raw, codec=compression.value, asbytes=True)


def _decompress(stored: memoryview, size: int, compression: Compression) -> pa.Buffer:
    try:
        return pa.decompress(stored, decompressed_size=size, codec=compression.value)
    except (OSError, pa.ArrowException) as e:
        raise ChunkFormatError(f"{compression.value} payload does not decompress: {e}") from e
