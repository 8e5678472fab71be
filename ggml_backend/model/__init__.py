from .._numba_cache import prepare_kernel_cache

prepare_kernel_cache()   # before any kernel: stale cached kernels dropped, one process at a time saves (_numba_cache)
