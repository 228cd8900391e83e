"""Serving bookkeeping: page allocators, the cache pool of every layer's paged caches, requests and their
block tables, forward batches over many requests, and prefix reuse."""
from .batch import KINDS, ForwardBatch, first_needed_position, kinds_of
from .pages import PageAllocator, PoolExhaustedError
from .pool import CachePool, LayerCaches, RequestState, alloc_cache, memory_table
from .prefix import PrefixCache, PrefixEntry

__all__ = ["KINDS", "ForwardBatch", "first_needed_position", "kinds_of", "PageAllocator", "PoolExhaustedError",
           "CachePool", "LayerCaches", "RequestState", "alloc_cache", "memory_table", "PrefixCache", "PrefixEntry"]
