"""Serving on paged caches: page allocators, the cache pool of every layer's paged caches, requests and their
block tables, forward batches over many requests, prefix reuse, and the continuous-batching engine."""
from .batch import KINDS, ForwardBatch, first_needed_position, kinds_of
from .engine import Engine, EngineBusyError, EngineRequest, StepStats
from .pages import PageAllocator, PoolExhaustedError
from .pool import CachePool, LayerCaches, RequestState, alloc_cache, cache_layouts, layout_problem, memory_table
from .prefix import PrefixCache, PrefixEntry

__all__ = ["KINDS", "ForwardBatch", "first_needed_position", "kinds_of", "Engine", "EngineBusyError", "EngineRequest",
           "StepStats", "PageAllocator", "PoolExhaustedError", "CachePool", "LayerCaches", "RequestState",
           "alloc_cache", "cache_layouts", "layout_problem", "memory_table", "PrefixCache", "PrefixEntry"]
