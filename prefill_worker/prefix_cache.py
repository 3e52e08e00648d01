"""The prefill worker's prefix cache: a radix tree over prompt tokens whose nodes own KV pages.

Each node below the root holds one full page: its key is the cache keys of that page's
`page_size` tokens, its page holds their latents, computed after the tokens of its ancestors. A
prompt's longest cached prefix is the path its keys follow from the root, so two prompts share a
page only when every token before and in it is the same. A token's key is its id, except inside
an image: a placeholder token is keyed by `(content hash of the image, row in the image)`
(`prompt_keys`), so two prompts with different images at the same place share nothing from the
first image on.

States of a node: locked (`lock_ref > 0`: a running job reads its page, so does every job whose
prefix runs through it: locks are taken on whole paths) or evictable. Eviction frees the least
recently used unlocked leaves first, which keeps the tree a tree: a parent becomes a leaf, and
evictable, only after its children are gone.

Page accounting: the cache takes pages from a `PageAllocator` (`allocate`, evicting when short)
and adopts pages the caller allocated (`insert`); a page is owned by the allocator's free list,
by a running job, or by exactly one node. `num_evictable` pages can be had at any time, so
operators see `allocator.num_free + num_evictable` as free.

Not thread-safe: one engine thread drives it; other threads may read the counters.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

from shared.kv_cache import PageAllocator

TokenKey = int | tuple[str, int]  # a token id, or (image content hash, row) for a placeholder


class CacheNode:
    __slots__ = ("key", "page", "parent", "children", "lock_ref", "last_access")

    def __init__(self, key: tuple, page: int, parent: CacheNode | None, tick: int) -> None:
        self.key = key
        self.page = page
        self.parent = parent
        self.children: dict[tuple, CacheNode] = {}
        self.lock_ref = 0
        self.last_access = tick


def prompt_keys(
    token_ids: Sequence[int], placeholder_id: int, images: Sequence[tuple[str, int]]
) -> list[TokenKey]:
    """Each token's cache key; `images` lists (content hash, placeholder tokens) in prompt
    order, as the placeholders consume them. Raises ValueError when the counts disagree."""
    rows = ((digest, row) for digest, count in images for row in range(count))
    keys: list[TokenKey] = []
    for token in token_ids:
        if token != placeholder_id:
            keys.append(token)
            continue
        key = next(rows, None)
        if key is None:
            raise ValueError("more image placeholders than image rows")
        keys.append(key)
    if next(rows, None) is not None:
        raise ValueError("fewer image placeholders than image rows")
    return keys


class PrefixCache:
    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self._ticks = itertools.count(1)
        self.root = CacheNode((), -1, None, 0)
        self.num_pages = 0  # pages held by nodes
        self.num_locked = 0  # of those, pages of nodes with lock_ref > 0

    @property
    def num_evictable(self) -> int:
        return self.num_pages - self.num_locked

    def _page_keys(self, keys: Sequence[TokenKey], num_pages: int):
        size = self.page_size
        return (tuple(keys[i * size : (i + 1) * size]) for i in range(num_pages))

    def match(self, keys: Sequence[TokenKey], max_pages: int) -> list[CacheNode]:
        """The cached path of the longest page-aligned prefix of `keys`, at most `max_pages`
        long, root excluded; marks it used now."""
        tick = next(self._ticks)
        path, node = [], self.root
        for key in self._page_keys(keys, min(max_pages, len(keys) // self.page_size)):
            node = node.children.get(key)
            if node is None:
                break
            node.last_access = tick
            path.append(node)
        return path

    def lock(self, path: list[CacheNode]) -> None:
        for node in path:
            self.num_locked += node.lock_ref == 0
            node.lock_ref += 1

    def unlock(self, path: list[CacheNode]) -> None:
        for node in path:
            assert node.lock_ref > 0, f"page {node.page} unlocked more often than locked"
            node.lock_ref -= 1
            self.num_locked -= node.lock_ref == 0

    def insert(self, keys: Sequence[TokenKey], pages: list[int]) -> list[int]:
        """Adopts `pages`, holding the latents of the first `len(pages)` full pages of `keys`.

        Returns the pages not adopted because the tree already holds the same prefix (a page of
        the caller's own cached path, which it keeps, is not returned); the caller frees them."""
        tick = next(self._ticks)
        node, spare = self.root, []
        for key, page in zip(self._page_keys(keys, len(pages)), pages):
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = CacheNode(key, page, node, tick)
                self.num_pages += 1
            elif child.page != page:
                spare.append(page)  # computed twice (two jobs ran the prefix at once)
            child.last_access = tick
            node = child
        return spare

    def allocate(self, num: int) -> list[int] | None:
        """`num` pages from the allocator, evicting cached pages when it is short; None (and
        nothing evicted) when even eviction cannot free enough."""
        short = num - self.allocator.num_free
        if short > self.num_evictable:
            return None
        if short > 0:
            self.evict(short)
        return self.allocator.allocate(num)

    def evict(self, num: int) -> int:
        """Frees up to `num` pages of unlocked leaves, least recently used first; returns how
        many it freed."""
        leaves = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
        heap = [(n.last_access, id(n), n) for n in leaves]
        heapq.heapify(heap)
        freed: list[int] = []
        while heap and len(freed) < num:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            del parent.children[node.key]
            freed.append(node.page)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        self.num_pages -= len(freed)
        self.allocator.free(freed)
        return len(freed)

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
