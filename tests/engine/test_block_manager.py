"""Exact block ids through allocation, prefix reuse, eviction and freeing."""

from services.engine.block_manager import BlockManager, block_hash


def _fill(bm: BlockManager, rid: str, tokens: list[int]) -> list[int]:
    bm.allocate(rid, len(tokens), bm.match_prefix(tokens))
    bm.cache_full_blocks(rid, tokens, len(tokens))
    return bm.block_table(rid)


def test_allocates_lowest_free_ids_and_grows_tables():
    bm = BlockManager(num_blocks=6, block_size=4)
    assert bm.allocate("a", 5) == [0, 1]
    assert bm.allocate("b", 1) == [2]
    assert bm.allocate("a", 8) == []  # still fits in two blocks
    assert bm.allocate("a", 9) == [3]
    assert bm.block_table("a") == [0, 1, 3]
    assert bm.num_free_blocks == 2
    assert not bm.can_allocate("b", 13)  # would need 3 more blocks
    assert bm.can_allocate("b", 12)


def test_prefix_hits_share_blocks_and_never_cover_the_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = list(range(10))
    assert _fill(bm, "a", a) == [0, 1, 2]
    assert bm.match_prefix(a) == [0, 1]  # 10 tokens: two full blocks; the third is partial
    assert bm.match_prefix(a[:8]) == [0]  # 8 tokens: the last token's block is never a hit
    assert bm.match_prefix([99] + a[1:]) == []  # a different first token changes every hash
    b = a[:8] + [50, 51, 52]
    assert _fill(bm, "b", b) == [0, 1, 3]
    bm.free("a")
    assert bm.num_free_blocks == 8 - 3  # 0 and 1 still used by b; 2 cached (evictable)
    bm.free("b")
    assert bm.num_free_blocks == 8
    assert bm.num_cached_blocks == 2  # blocks 0, 1 hold full prefixes; 2 and 3 are partial


def test_eviction_takes_free_blocks_first_then_least_recently_released():
    bm = BlockManager(num_blocks=5, block_size=2)
    assert _fill(bm, "a", [1, 2, 3, 4, 5]) == [0, 1, 2]  # 0, 1 full and cached; 2 partial
    assert _fill(bm, "b", [7, 8, 9]) == [3, 4]
    bm.free("a")  # released tail first: 2 (free), 1, 0 (evictable, in this order)
    assert bm.allocate("c", 2) == [2]  # the uncached free block goes first
    assert bm.allocate("c", 4) == [1]  # then the least recently released cached block: a's tail
    assert bm.match_prefix([1, 2, 3, 4, 5]) == [0]  # a's head is still cached
    assert bm.allocate("c", 6) == [0]
    assert bm.match_prefix([1, 2, 3, 4, 5]) == []


def test_reviving_an_evictable_block_counts_against_free_space():
    bm = BlockManager(num_blocks=3, block_size=2)
    _fill(bm, "a", [1, 2, 3, 4, 9])
    bm.free("a")  # 3 blocks free, two of them cached
    hits = bm.match_prefix([1, 2, 3, 4, 5, 6, 7])
    assert hits == [0, 1]
    assert bm.can_allocate("b", 6, hits)  # 2 hits + 1 new block
    assert not bm.can_allocate("b", 8, hits)  # 2 hits + 2 new > 3 blocks
    bm.allocate("b", 6, hits)
    assert bm.block_table("b") == [0, 1, 2]


def test_duplicate_content_keeps_the_first_copy_cached():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 3)
    bm.allocate("b", 3)
    bm.cache_full_blocks("a", [1, 2, 3], 3)
    bm.cache_full_blocks("b", [1, 2, 3], 3)
    assert bm.num_cached_blocks == 1
    bm.free("b")
    bm.free("a")
    assert bm.match_prefix([1, 2, 3]) == [0]


def test_hash_chain_depends_on_parent_and_salt():
    h1 = block_hash(None, [1, 2])
    assert block_hash(h1, [3, 4]) != block_hash(block_hash(None, [9, 2]), [3, 4])
    assert block_hash(None, [1, 2], b"model-a") != block_hash(None, [1, 2], b"model-b")
    assert block_hash(None, [1, 2]) == h1


def test_reset_prefix_cache_forgets_unused_content():
    bm = BlockManager(num_blocks=4, block_size=2)
    _fill(bm, "a", [1, 2, 3])
    bm.free("a")
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.match_prefix([1, 2, 3]) == []
    assert bm.num_free_blocks == 4
