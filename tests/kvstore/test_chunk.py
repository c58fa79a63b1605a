"""Chain hashing, layouts and the wire format: exact keys, bit-exact round trips, damage detected."""

import hashlib
import struct

import pytest
import torch

from kvstore.chunk import (Chunk, ChunkFormatError, KVLayout, chunk_hash_chain, decode, encode, payload_from_blocks,
                           payload_to_blocks)
from tests.kvstore.helpers import TINY, make_chunk, same_bits


def test_equal_prefixes_give_equal_keys_and_a_difference_changes_every_later_key():
    salt = TINY.salt()
    a = list(range(100))
    b = a[:40] + [7] + a[41:]  # differs in chunk 2 (tokens 32..47)
    keys_a, keys_b = chunk_hash_chain(a, 16, salt), chunk_hash_chain(b, 16, salt)
    assert len(keys_a) == len(keys_b) == 6
    assert keys_a[:2] == keys_b[:2]
    assert all(x != y for x, y in zip(keys_a[2:], keys_b[2:]))
    assert len(set(keys_a)) == 6 and all(len(k) == 16 for k in keys_a)


def test_only_full_chunks_get_keys():
    salt = TINY.salt()
    tokens = list(range(64))
    assert chunk_hash_chain(tokens[:63], 16, salt) == chunk_hash_chain(tokens, 16, salt)[:3]
    assert len(chunk_hash_chain(tokens, 16, salt)) == 4
    assert chunk_hash_chain(tokens[:15], 16, salt) == []
    assert chunk_hash_chain([], 16, salt) == []


def test_keys_follow_the_documented_formula_and_are_stable():
    layout = KVLayout("model-a", 2, 2, 4, "bfloat16", chunk_tokens=16, block_size=16)
    salt = layout.salt()
    keys = chunk_hash_chain(list(range(32)), 16, salt)
    # key_i = blake2b-128(salt || key_{i-1} || int64 little-endian token ids), key_{-1} = 16 zero bytes
    first = hashlib.blake2b(salt + bytes(16) + struct.pack("<16q", *range(16)), digest_size=16).digest()
    second = hashlib.blake2b(salt + first + struct.pack("<16q", *range(16, 32)), digest_size=16).digest()
    assert keys == [first, second]
    # pinned values: the same in every process (no PYTHONHASHSEED dependence) and on every machine
    assert salt.hex() == "2275ead44bbda549b31edd709791f124"
    assert [k.hex() for k in keys] == ["880df254751f6c75d2c6baceeaf41226", "95741fd3b62619524113ca45a66ee17d"]


def test_a_different_model_or_layout_never_matches():
    base = KVLayout("model-a", 2, 2, 4, "bfloat16", chunk_tokens=32, block_size=16)
    variants = [base,
                KVLayout("model-b", 2, 2, 4, "bfloat16", chunk_tokens=32, block_size=16),
                KVLayout("model-a", 3, 2, 4, "bfloat16", chunk_tokens=32, block_size=16),
                KVLayout("model-a", 2, 1, 4, "bfloat16", chunk_tokens=32, block_size=16),
                KVLayout("model-a", 2, 2, 8, "bfloat16", chunk_tokens=32, block_size=16),
                KVLayout("model-a", 2, 2, 4, "float16", chunk_tokens=32, block_size=16),
                KVLayout("model-a", 2, 2, 4, "bfloat16", chunk_tokens=32, block_size=32)]
    tokens = list(range(96))
    chains = [chunk_hash_chain(tokens, 32, layout.salt()) for layout in variants]
    all_keys = [key for chain in chains for key in chain]
    assert len(all_keys) == 7 * 3 and len(set(all_keys)) == 21


def test_layout_validation_and_shape():
    assert TINY.chunk_shape == (2, 2, 16, 2, 4)
    assert TINY.chunk_nbytes == 2 * 2 * 16 * 2 * 4 * 2
    with pytest.raises(ValueError, match="multiple of block_size"):
        KVLayout("m", 2, 2, 4, "bfloat16", chunk_tokens=24, block_size=16)
    with pytest.raises(ValueError, match="unsupported KV dtype"):
        KVLayout("m", 2, 2, 4, "int8")
    with pytest.raises(ValueError, match="num_layers"):
        KVLayout("m", 0, 2, 4, "float32")


@pytest.mark.parametrize("compression", ["none", "zstd", "lz4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip_is_bit_exact(dtype, compression):
    layout = KVLayout("m", 2, 2, 4, dtype, chunk_tokens=16, block_size=16)
    chunk = make_chunk("x", layout)  # random bit patterns: NaNs, infinities, subnormals, -0
    data = encode(chunk, compression)
    back = decode(data, expected=layout)
    assert back.key == chunk.key and back.layout == layout
    assert same_bits(back.payload, chunk.payload)
    assert back.payload.is_contiguous() and back.payload.device.type == "cpu"


def test_wire_header_fields_are_where_the_docstring_says():
    chunk = make_chunk("x")
    data = encode(chunk)
    assert data[:4] == b"TKVC"
    assert struct.unpack_from("<H", data, 4)[0] == 1
    assert data[8:24] == chunk.key
    assert struct.unpack_from("<5I", data, 24) == (2, 2, 4, 16, 16)
    assert struct.unpack_from("<QQ", data, 44) == (1024, 1024)
    assert struct.unpack_from("<H", data, 64)[0] == len(b"tiny-model")
    assert data[66:76] == b"tiny-model"
    assert len(data) == 66 + 10 + 1024


def _flip(data: bytes, offset: int) -> bytes:
    damaged = bytearray(data)
    damaged[offset] ^= 0x01
    return bytes(damaged)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_damage_is_detected(compression):
    data = encode(make_chunk("x"), compression)
    with pytest.raises(ChunkFormatError, match="checksum|decompress"):
        decode(_flip(data, len(data) - 10))  # payload
    with pytest.raises(ChunkFormatError, match="checksum"):
        decode(_flip(data, 10))  # key
    with pytest.raises(ChunkFormatError, match="checksum"):
        decode(_flip(data, 70))  # fingerprint
    with pytest.raises(ChunkFormatError, match="length"):
        decode(data[:-1])
    with pytest.raises(ChunkFormatError, match="magic"):
        decode(b"XKVC" + data[4:])
    with pytest.raises(ChunkFormatError, match="shorter"):
        decode(data[:20])


def test_block_size_damage_is_caught_by_the_checksum():
    data = encode(make_chunk("x"))
    damaged = bytearray(data)
    struct.pack_into("<I", damaged, 40, 8)  # block_size 16 -> 8: still a valid layout
    with pytest.raises(ChunkFormatError, match="checksum"):
        decode(bytes(damaged))


def test_decode_refuses_an_unexpected_layout():
    other = KVLayout("another-model", 2, 2, 4, "bfloat16", chunk_tokens=16, block_size=16)
    with pytest.raises(ChunkFormatError, match="expected"):
        decode(encode(make_chunk("x")), expected=other)


def test_chunk_rejects_a_payload_that_does_not_match_its_layout():
    with pytest.raises(AssertionError):
        Chunk(make_chunk("x").key, TINY, torch.zeros(TINY.chunk_shape, dtype=torch.float32))
    with pytest.raises(AssertionError):
        Chunk(b"short", TINY, make_chunk("x").payload)


def test_blocks_and_chunk_payload_address_the_same_tokens():
    blocks = torch.arange(2 * 2 * 3 * 4 * 1 * 2, dtype=torch.float32).view(2, 2, 3, 4, 1, 2)  # block_size 4
    payload = payload_from_blocks(blocks)
    assert payload.shape == (2, 2, 12, 1, 2)
    for token in range(12):
        assert torch.equal(payload[:, :, token], blocks[:, :, token // 4, token % 4])
    assert payload.data_ptr() != blocks.data_ptr()  # a copy the engine may not overwrite
    assert torch.equal(payload_to_blocks(payload, 4), blocks)
