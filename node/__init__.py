"""sdcache.node: a cache node (RAM chunk pool in shared memory, aiohttp chunk API)."""
