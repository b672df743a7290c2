import pytest

from elasticserve.core.prefix_hash import block_hashes, hash_block


def test_hash_is_deterministic_and_sequence_type_agnostic() -> None:
    assert hash_block(None, [1, 2, 3]) == hash_block(None, (1, 2, 3))
    assert hash_block(7, range(1, 4)) == hash_block(7, [1, 2, 3])


def test_hash_depends_on_parent_and_tokens() -> None:
    root = hash_block(None, [1, 2])
    assert hash_block(root, [3, 4]) != hash_block(hash_block(None, [9, 9]), [3, 4])
    assert hash_block(root, [3, 4]) != hash_block(root, [4, 3])
    # A first block must not equal a block whose parent hash happens to be 0.
    assert hash_block(None, [5]) != hash_block(0, [5])


def test_block_hashes_covers_full_blocks_only_and_chains() -> None:
    tokens = list(range(10))
    hashes = block_hashes(tokens, 4)
    assert len(hashes) == 2
    assert hashes[0] == hash_block(None, tokens[0:4])
    assert hashes[1] == hash_block(hashes[0], tokens[4:8])
    assert block_hashes(tokens[:3], 4) == []
    assert block_hashes(tokens[:8], 4) == hashes


def test_block_hashes_shared_prefix_gives_shared_hashes() -> None:
    a = block_hashes([1, 2, 3, 4, 5, 6], 2)
    b = block_hashes([1, 2, 3, 4, 7, 8], 2)
    assert a[:2] == b[:2] and a[2] != b[2]


def test_block_hashes_rejects_bad_block_size() -> None:
    with pytest.raises(ValueError):
        block_hashes([1, 2], 0)
