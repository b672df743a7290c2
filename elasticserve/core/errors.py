"""Exceptions shared by the allocation core (re-exported by ``block_pool``)."""


class NoFreeBlocksError(RuntimeError):
    """An allocation could not be satisfied; no state was changed."""


class IntegrityError(RuntimeError):
    """``check_integrity`` found inconsistent bookkeeping (a bug, never user error)."""
