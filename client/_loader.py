"""``load_safetensors``: a whole checkpoint into one buffer, tensors as zero-copy views."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sdcache import errors
from sdcache.safetensors_header import HEADER_LEN, Header, HeaderError, parse_header

if TYPE_CHECKING:
    import torch

_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
    "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16",
    "F32": "float32", "F64": "float64", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
}


def _fill_local(path: str, out: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        got = 0
        while got < len(out):
            n = f.readinto(out[got:])
            if not n:
                raise errors.StaleSource(f"{path} shrank while it was read")
            got += n


def load_safetensors(url: str, device: str = "cpu", *, meta: str | None = None,
                     token: str | None = None) -> dict[str, "torch.Tensor"]:
    """Load every tensor of a ``.safetensors`` file.

    *url* is ``sdcache://…`` (chunks fetched in parallel from the cache nodes,
    each verified), a local path, or any other fsspec URL. The file lands in
    one ``uint8`` buffer and every tensor is a view into it, so loading costs
    one copy of the bytes off the network and none after. With *device* other
    than ``cpu`` the tensors are then moved there.
    """
    import torch

    if url.startswith("sdcache://"):
        from ._mapped import load_mapped
        from .fs import SdcacheFileSystem

        fs = SdcacheFileSystem(meta=meta, token=token)
        manifest = fs.manifest(url)
        if fs.fetcher.short_circuit:
            try:
                mapped = load_mapped(fs.fetcher, manifest, url)
            except HeaderError as exc:
                raise errors.InvalidArgument(f"{url}: not a safetensors file ({exc})") from None
            if mapped is not None:
                return _to_device(mapped, device)
        buf = torch.empty(manifest.size, dtype=torch.uint8)
        fs.fetcher.read_into(manifest, 0, memoryview(buf.numpy()))
    elif "://" in url and not url.startswith("file://"):
        import fsspec

        with fsspec.open(url, "rb") as f:
            data = f.read()
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    else:
        path = url[len("file://") :] if url.startswith("file://") else url
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise errors.NotFound(f"no such file: {url}") from None
        buf = torch.empty(size, dtype=torch.uint8)
        _fill_local(path, memoryview(buf.numpy()))
    return tensors_from_buffer(buf, url, device)


def tensors_from_buffer(buf: "torch.Tensor", name: str, device: str = "cpu") -> dict[str, "torch.Tensor"]:
    """Views of every tensor in the safetensors bytes held by uint8 tensor *buf*."""
    size = buf.numel()
    if size < HEADER_LEN.size:
        raise errors.InvalidArgument(f"{name}: not a safetensors file (truncated)")
    (n,) = HEADER_LEN.unpack(bytes(buf[: HEADER_LEN.size].numpy()))
    if HEADER_LEN.size + n > size:
        raise errors.InvalidArgument(f"{name}: not a safetensors file (header runs past the end)")
    try:
        header = parse_header(bytes(buf[HEADER_LEN.size : HEADER_LEN.size + n].numpy()), size)
    except HeaderError as exc:
        raise errors.InvalidArgument(f"{name}: not a safetensors file ({exc})") from None
    return _to_device(tensor_views(buf, header, lambda begin: begin), device)


def tensor_views(flat: "torch.Tensor", header: Header, where: Callable[[int], int]) -> dict[str, "torch.Tensor"]:
    """A view into uint8 tensor *flat* for every tensor of *header*.

    *where* maps a tensor's file offset to its offset in *flat* (the identity
    for a file read whole; something else for the mapped layout).
    """
    import torch

    out: dict[str, Any] = {}
    for t in header.tensors:
        dtype = getattr(torch, _DTYPES[t.dtype])
        at = where(t.begin) if t.end > t.begin else 0
        raw = flat[at : at + t.nbytes]
        if at % dtype.itemsize:
            raw = raw.clone()  # misaligned in the file: one copy of this tensor
        out[t.name] = raw.view(dtype).reshape(t.shape)
    return out


def _to_device(tensors: dict[str, "torch.Tensor"], device: str) -> dict[str, "torch.Tensor"]:
    if device == "cpu":
        return tensors
    return {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
