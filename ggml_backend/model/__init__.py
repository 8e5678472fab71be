from .._numba_cache import serialize_cache_saves

serialize_cache_saves()   # before any kernel: one process at a time saves to numba's cache (see _numba_cache)
