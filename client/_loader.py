"""``load_safetensors``: a whole checkpoint into one buffer, tensors as zero-copy views."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from sdcache import errors
from sdcache.safetensors_header import HEADER_LEN, HeaderError, parse_header

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


def load_safetensors(url: str, device: str = "cpu", *, meta: str | None = None) -> dict[str, "torch.Tensor"]:
    """Load every tensor of a ``.safetensors`` file.

    *url* is ``sdcache://…`` (chunks fetched in parallel from the cache nodes,
    each verified), a local path, or any other fsspec URL. The file lands in
    one ``uint8`` buffer and every tensor is a view into it, so loading costs
    one copy of the bytes off the network and none after. With *device* other
    than ``cpu`` the tensors are then moved there.
    """
    import torch

    if url.startswith("sdcache://"):
        from .fs import SdcacheFileSystem

        fs = SdcacheFileSystem(meta=meta)
        manifest = fs.manifest(url)
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
    import torch

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
    out: dict[str, Any] = {}
    for t in header.tensors:
        dtype = getattr(torch, _DTYPES[t.dtype])
        raw = buf[t.begin : t.end]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if t.begin % itemsize:
            raw = raw.clone()  # misaligned in the file: one copy of this tensor
        out[t.name] = raw.view(dtype).reshape(t.shape)
    if device != "cpu":
        out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
    return out
