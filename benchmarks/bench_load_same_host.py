"""Same-host load_safetensors (pool chunks mapped) vs safetensors load_file from the page cache.

Alternates the two in one process, 3 rounds; both touch every page (load_file maps lazily).
    python benchmarks/bench_load_same_host.py [CHECKPOINT]   (default: the one bench_backbone.py wrote)
"""
import os, shutil, tempfile, time, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import touch_tensors
from sdcache.cluster import LocalCluster
from sdcache.client.fs import SdcacheFileSystem
from sdcache.client.importer import import_file
from sdcache.client import load_safetensors
from safetensors.torch import load_file
src = sys.argv[1] if len(sys.argv) > 1 else '/tmp/sdcache-bench/sd-2.0g.safetensors'
c = LocalCluster(tempfile.mkdtemp(prefix='bench-same-host-'), nodes=2, capacity=3<<30, pool_root=tempfile.mkdtemp(dir='/dev/shm')).start()
os.environ['SDCACHE_TOKEN'] = c.admin_token
try:
    fs = SdcacheFileSystem(meta=c.meta_addr)
    import_file(fs.meta, src, '/b')
    for p in fs.meta.warmup(['/b']): pass
    for i in range(3):
        t=time.perf_counter(); x=load_safetensors('sdcache://b', meta=c.meta_addr); t1=time.perf_counter()-t
        t=time.perf_counter(); touch_tensors(x); t2=time.perf_counter()-t
        del x
        t=time.perf_counter(); y=load_file(src); touch_tensors(y); t3=time.perf_counter()-t; del y
        print(f'ours load {t1:.2f} touch {t2:.2f} | load_file+touch {t3:.2f}')
finally:
    c.stop()
    shutil.rmtree(c.pool_root, ignore_errors=True)
