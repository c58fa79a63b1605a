"""On-disk format of one chunk: one Arrow IPC file (random-access "file" format) per chunk.

    <directory>/<key hex, 32 chars>.arrow        a complete, renamed-into-place chunk
    <directory>/.<key hex>.<random hex>.tmp      being written (or left by a crash: deleted on start)

Inside the file: a schema with a single non-nullable ``uint8`` column ``payload`` and one
record batch whose rows are the chunk's payload bytes, uncompressed, in the order
[layer, k|v, token, kv_head, head_dim], elements little-endian (bfloat16/float8 as raw bits).
The schema metadata (UTF-8 strings) describes the chunk:

    tandem.kvchunk.version   "1"
    key                      chunk key, 32 hex chars (equals the file name)
    model_fingerprint, num_layers, num_kv_heads, head_dim, dtype, chunk_tokens, block_size
    payload_nbytes           payload length in bytes (decimal)
    checksum                 crc32 of the payload bytes, 8 hex chars

The schema is repeated in the footer, so :func:`read_chunk_meta` reads only the end of
the file. :func:`read_chunk_file` reads the whole file and verifies the checksum;
:func:`map_chunk_file` maps it copy-on-write without reading (for evicted chunks that are
most likely dropped unread). Errors: ``OSError`` for I/O trouble, :class:`CorruptChunkFile`
for a file that is not an intact chunk.
"""

from __future__ import annotations

import mmap
import os
import secrets
import zlib
from dataclasses import dataclass

import pyarrow as pa
import torch

from kvstore.chunk import KEY_BYTES, Chunk, KVLayout, payload_bytes

SUFFIX = ".arrow"
TEMP_SUFFIX = ".tmp"
_VERSION = "1"
_LAYOUT_INT_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "chunk_tokens", "block_size")


class CorruptChunkFile(Exception):
    """A chunk file that is truncated, damaged or inconsistent with its name."""


@dataclass(frozen=True)
class ChunkFileMeta:
    """The schema metadata of a chunk file."""

    key: bytes
    """Chunk key."""
    layout: KVLayout
    """Layout of the payload."""
    payload_nbytes: int
    """Payload length in bytes (always ``layout.chunk_nbytes``)."""
    checksum: int
    """crc32 of the payload bytes."""


def chunk_file_name(key: bytes) -> str:
    return key.hex() + SUFFIX


def temp_file_name(key: bytes) -> str:
    return f".{key.hex()}.{secrets.token_hex(8)}{TEMP_SUFFIX}"


def key_of_file_name(name: str) -> bytes | None:
    """The key a complete chunk file's name encodes; None for any other name."""
    stem = name[: -len(SUFFIX)]
    if not name.endswith(SUFFIX) or len(stem) != 2 * KEY_BYTES:
        return None
    try:
        return bytes.fromhex(stem)
    except ValueError:
        return None


def write_chunk_file(path: str, chunk: Chunk, fsync: bool) -> int:
    """Write ``chunk`` to ``path`` (a temp name; the caller renames it into place); the file size."""
    raw = payload_bytes(chunk.payload)  # [nbytes] uint8, host memory
    layout = chunk.layout
    metadata = {"tandem.kvchunk.version": _VERSION, "key": chunk.key.hex(),
                "model_fingerprint": layout.model_fingerprint, "dtype": layout.dtype,
                "payload_nbytes": str(raw.size), "checksum": f"{zlib.crc32(raw):08x}"}
    metadata.update({field: str(getattr(layout, field)) for field in _LAYOUT_INT_FIELDS})
    schema = pa.schema([pa.field("payload", pa.uint8(), nullable=False)], metadata=metadata)
    column = pa.Array.from_buffers(pa.uint8(), raw.size, [None, pa.py_buffer(raw)])
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch([column], schema=schema))
    if fsync:
        fsync_path(path)
    return os.path.getsize(path)


def fsync_path(path: str) -> None:
    """fsync a file or directory by name (a directory after a rename makes the rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_chunk_meta(path: str) -> ChunkFileMeta:
    """Metadata from the file's footer, without reading the payload."""
    with pa.OSFile(path) as f:
        try:
            schema = pa.ipc.open_file(f).schema
        except OSError:
            raise
        except Exception as e:  # anything the Arrow reader rejects is damage
            raise CorruptChunkFile(f"{path}: not an Arrow IPC file: {e}") from e
    return _parse_meta(schema.metadata, path)


def read_chunk_file(path: str, expected_key: bytes) -> Chunk:
    """The whole chunk, checksum verified; the payload lives in a private buffer."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = bytearray(size)
        got = f.readinto(data)
    if got != size:
        raise CorruptChunkFile(f"{path}: read {got} of {size} bytes")
    return _chunk_from_buffer(data, path, expected_key, verify=True)


def map_chunk_file(path: str) -> mmap.mmap:
    """Map the file copy-on-write (nothing is read yet); the mapping outlives an unlink of ``path``."""
    with open(path, "rb") as f:
        try:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except ValueError as e:  # an empty file cannot be mapped
            raise CorruptChunkFile(f"{path}: {e}") from e


def chunk_from_mapping(mapped: mmap.mmap, path: str, expected_key: bytes) -> Chunk:
    """The chunk backed by ``mapped`` (pages are read when touched); checksum NOT verified."""
    return _chunk_from_buffer(mapped, path, expected_key, verify=False)


def _chunk_from_buffer(data: bytearray | mmap.mmap, path: str, expected_key: bytes, verify: bool) -> Chunk:
    try:
        whole = pa.py_buffer(data)
        reader = pa.ipc.open_file(whole)
        meta = _parse_meta(reader.schema.metadata, path)
        if reader.num_record_batches != 1:
            raise CorruptChunkFile(f"{path}: {reader.num_record_batches} record batches, expected 1")
        column = reader.get_batch(0).column(0)
        values = column.buffers()[1]
        offset = values.address - whole.address + column.offset
    except CorruptChunkFile:
        raise
    except Exception as e:  # parsing untrusted bytes: whatever fails is damage
        raise CorruptChunkFile(f"{path}: unreadable Arrow IPC data: {e}") from e
    layout = meta.layout
    if meta.key != expected_key:
        raise CorruptChunkFile(f"{path}: holds key {meta.key.hex()}, expected {expected_key.hex()}")
    if column.type != pa.uint8() or len(column) != meta.payload_nbytes or column.null_count:
        raise CorruptChunkFile(f"{path}: payload column {column.type}[{len(column)}] does not match metadata")
    if not 0 <= offset <= len(data) - meta.payload_nbytes or offset % layout.torch_dtype.itemsize:
        raise CorruptChunkFile(f"{path}: payload at offset {offset} is outside the file or misaligned")
    count = meta.payload_nbytes // layout.torch_dtype.itemsize
    payload = torch.frombuffer(data, dtype=layout.torch_dtype, count=count, offset=offset).view(layout.chunk_shape)
    if verify and zlib.crc32(payload_bytes(payload)) != meta.checksum:
        raise CorruptChunkFile(f"{path}: checksum mismatch")
    return Chunk(meta.key, layout, payload)


def _parse_meta(metadata: dict[bytes, bytes] | None, path: str) -> ChunkFileMeta:
    try:
        fields = {k.decode(): v.decode() for k, v in (metadata or {}).items()}
        if fields["tandem.kvchunk.version"] != _VERSION:
            raise CorruptChunkFile(f"{path}: unsupported version {fields['tandem.kvchunk.version']!r}")
        layout = KVLayout(model_fingerprint=fields["model_fingerprint"], dtype=fields["dtype"],
                          **{field: int(fields[field]) for field in _LAYOUT_INT_FIELDS})
        meta = ChunkFileMeta(bytes.fromhex(fields["key"]), layout, int(fields["payload_nbytes"]),
                             int(fields["checksum"], 16))
    except (KeyError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise CorruptChunkFile(f"{path}: bad metadata: {e!r}") from e
    if len(meta.key) != KEY_BYTES or meta.payload_nbytes != layout.chunk_nbytes:
        raise CorruptChunkFile(f"{path}: key or payload length inconsistent with the layout")
    return meta
