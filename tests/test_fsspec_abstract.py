"""fsspec's own reusable test suite, run against a real cluster (see fsspec/tests/abstract)."""

from __future__ import annotations

import posixpath
import uuid

import fsspec.tests.abstract as abstract
import pytest

from sdcache.client.fs import SdcacheFileSystem


class SdcacheFixtures(abstract.AbstractFixtures):
    @pytest.fixture
    def fs(self, cluster):
        return SdcacheFileSystem(meta=cluster.meta_addr, skip_instance_cache=True)

    @pytest.fixture
    def fs_join(self):
        return posixpath.join

    @pytest.fixture
    def fs_path(self):
        return f"/fsspec-abstract-{uuid.uuid4().hex[:8]}"

    @pytest.fixture
    def supports_empty_directories(self):
        return False  # directories are implicit: they exist while they hold a file


class TestSdcacheOpen(abstract.AbstractOpenTests, SdcacheFixtures):
    pass


class TestSdcachePipe(abstract.AbstractPipeTests, SdcacheFixtures):
    pass


class TestSdcacheGet(abstract.AbstractGetTests, SdcacheFixtures):
    pass


class TestSdcachePut(abstract.AbstractPutTests, SdcacheFixtures):
    pass


class TestSdcacheCopy(abstract.AbstractCopyTests, SdcacheFixtures):
    pass
