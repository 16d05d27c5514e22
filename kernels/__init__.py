"""sdcache.kernels: the embedded inference runner and its optimized kernels."""
