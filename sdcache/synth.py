"""Random-weight, real-shaped Stable Diffusion checkpoints for tests, benchmarks and the demo.

Never a hub download: the tensor names and shapes follow the original
(LDM) SD1.x single-file layout, with every width scaled by ``base / 320`` so
a test can ask for a few hundred MB and a benchmark for the real 2 GB. The
VAE and text encoder come from their own seeds, so two "fine-tunes" made with
different ``unet_seed`` share those tensors byte for byte, as real ones do.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

Shape = tuple[int, ...]


def _resnet(p: str, cin: int, cout: int, emb: int) -> Iterator[tuple[str, Shape]]:
    yield f"{p}.in_layers.0.weight", (cin,)
    yield f"{p}.in_layers.0.bias", (cin,)
    yield f"{p}.in_layers.2.weight", (cout, cin, 3, 3)
    yield f"{p}.in_layers.2.bias", (cout,)
    yield f"{p}.emb_layers.1.weight", (cout, emb)
    yield f"{p}.emb_layers.1.bias", (cout,)
    yield f"{p}.out_layers.0.weight", (cout,)
    yield f"{p}.out_layers.0.bias", (cout,)
    yield f"{p}.out_layers.3.weight", (cout, cout, 3, 3)
    yield f"{p}.out_layers.3.bias", (cout,)
    if cin != cout:
        yield f"{p}.skip_connection.weight", (cout, cin, 1, 1)
        yield f"{p}.skip_connection.bias", (cout,)


def _transformer(p: str, c: int, ctx: int) -> Iterator[tuple[str, Shape]]:
    yield f"{p}.norm.weight", (c,)
    yield f"{p}.norm.bias", (c,)
    yield f"{p}.proj_in.weight", (c, c, 1, 1)
    yield f"{p}.proj_in.bias", (c,)
    b = f"{p}.transformer_blocks.0"
    for attn, kv in (("attn1", c), ("attn2", ctx)):
        yield f"{b}.{attn}.to_q.weight", (c, c)
        yield f"{b}.{attn}.to_k.weight", (c, kv)
        yield f"{b}.{attn}.to_v.weight", (c, kv)
        yield f"{b}.{attn}.to_out.0.weight", (c, c)
        yield f"{b}.{attn}.to_out.0.bias", (c,)
    yield f"{b}.ff.net.0.proj.weight", (c * 8, c)
    yield f"{b}.ff.net.0.proj.bias", (c * 8,)
    yield f"{b}.ff.net.2.weight", (c, c * 4)
    yield f"{b}.ff.net.2.bias", (c,)
    for n in (1, 2, 3):
        yield f"{b}.norm{n}.weight", (c,)
        yield f"{b}.norm{n}.bias", (c,)
    yield f"{p}.proj_out.weight", (c, c, 1, 1)
    yield f"{p}.proj_out.bias", (c,)


def unet_shapes(base: int = 320, ctx: int = 768) -> Iterator[tuple[str, Shape]]:
    """Tensor names and shapes of an SD1.x UNet (``model.diffusion_model.*``)."""
    p = "model.diffusion_model"
    mult = (1, 2, 4, 4)
    emb = base * 4
    yield f"{p}.time_embed.0.weight", (emb, base)
    yield f"{p}.time_embed.0.bias", (emb,)
    yield f"{p}.time_embed.2.weight", (emb, emb)
    yield f"{p}.time_embed.2.bias", (emb,)
    yield f"{p}.input_blocks.0.0.weight", (base, 4, 3, 3)
    yield f"{p}.input_blocks.0.0.bias", (base,)
    i, ch, skips = 1, base, [base]
    for level, m in enumerate(mult):
        for _ in range(2):
            yield from _resnet(f"{p}.input_blocks.{i}.0", ch, base * m, emb)
            ch = base * m
            if level < 3:
                yield from _transformer(f"{p}.input_blocks.{i}.1", ch, ctx)
            skips.append(ch)
            i += 1
        if level < 3:
            yield f"{p}.input_blocks.{i}.0.op.weight", (ch, ch, 3, 3)
            yield f"{p}.input_blocks.{i}.0.op.bias", (ch,)
            skips.append(ch)
            i += 1
    yield from _resnet(f"{p}.middle_block.0", ch, ch, emb)
    yield from _transformer(f"{p}.middle_block.1", ch, ctx)
    yield from _resnet(f"{p}.middle_block.2", ch, ch, emb)
    o = 0
    for level, m in reversed(list(enumerate(mult))):
        for j in range(3):
            yield from _resnet(f"{p}.output_blocks.{o}.0", ch + skips.pop(), base * m, emb)
            ch = base * m
            if level < 3:
                yield from _transformer(f"{p}.output_blocks.{o}.1", ch, ctx)
            if level > 0 and j == 2:
                k = 2 if level < 3 else 1
                yield f"{p}.output_blocks.{o}.{k}.conv.weight", (ch, ch, 3, 3)
                yield f"{p}.output_blocks.{o}.{k}.conv.bias", (ch,)
            o += 1
    yield f"{p}.out.0.weight", (base,)
    yield f"{p}.out.0.bias", (base,)
    yield f"{p}.out.2.weight", (4, base, 3, 3)
    yield f"{p}.out.2.bias", (4,)


def vae_shapes(base: int = 128) -> Iterator[tuple[str, Shape]]:
    """A simplified SD VAE (``first_stage_model.*``): real names, real widths at base=128."""
    p = "first_stage_model"
    chans = (base, base * 2, base * 4, base * 4)
    for side, order in (("encoder", chans), ("decoder", tuple(reversed(chans)))):
        yield f"{p}.{side}.conv_in.weight", (order[0], 4 if side == "decoder" else 3, 3, 3)
        yield f"{p}.{side}.conv_in.bias", (order[0],)
        for lvl, c in enumerate(order):
            for b in range(2 if side == "encoder" else 3):
                q = f"{p}.{side}.{'down' if side == 'encoder' else 'up'}.{lvl}.block.{b}"
                yield f"{q}.norm1.weight", (c,)
                yield f"{q}.norm1.bias", (c,)
                yield f"{q}.conv1.weight", (c, c, 3, 3)
                yield f"{q}.conv1.bias", (c,)
                yield f"{q}.norm2.weight", (c,)
                yield f"{q}.norm2.bias", (c,)
                yield f"{q}.conv2.weight", (c, c, 3, 3)
                yield f"{q}.conv2.bias", (c,)
        yield f"{p}.{side}.norm_out.weight", (order[-1],)
        yield f"{p}.{side}.norm_out.bias", (order[-1],)
        yield f"{p}.{side}.conv_out.weight", (8 if side == "encoder" else 3, order[-1], 3, 3)
        yield f"{p}.{side}.conv_out.bias", (8 if side == "encoder" else 3,)
    yield f"{p}.quant_conv.weight", (8, 8, 1, 1)
    yield f"{p}.quant_conv.bias", (8,)
    yield f"{p}.post_quant_conv.weight", (4, 4, 1, 1)
    yield f"{p}.post_quant_conv.bias", (4,)


def text_encoder_shapes(width: int = 768, layers: int = 12) -> Iterator[tuple[str, Shape]]:
    """CLIP ViT-L/14 text encoder (``cond_stage_model.transformer.*``)."""
    p = "cond_stage_model.transformer.text_model"
    yield f"{p}.embeddings.token_embedding.weight", (49408, width)
    yield f"{p}.embeddings.position_embedding.weight", (77, width)
    for i in range(layers):
        q = f"{p}.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield f"{q}.self_attn.{proj}.weight", (width, width)
            yield f"{q}.self_attn.{proj}.bias", (width,)
        for n in (1, 2):
            yield f"{q}.layer_norm{n}.weight", (width,)
            yield f"{q}.layer_norm{n}.bias", (width,)
        yield f"{q}.mlp.fc1.weight", (width * 4, width)
        yield f"{q}.mlp.fc1.bias", (width * 4,)
        yield f"{q}.mlp.fc2.weight", (width, width * 4)
        yield f"{q}.mlp.fc2.bias", (width,)
    yield f"{p}.final_layer_norm.weight", (width,)
    yield f"{p}.final_layer_norm.bias", (width,)


def _fill(shapes: Iterator[tuple[str, Shape]], seed: int, dtype: type) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes:
        n = int(np.prod(shape))
        # Random bits are much faster than normal samples and just as incompressible;
        # keep them finite by masking the exponent of fp16 (values in [-2, 2]).
        raw = rng.integers(0, 1 << 16, size=n, dtype=np.uint16) & np.uint16(0xBFFF)
        out[name] = raw.view(np.float16).reshape(shape).astype(dtype, copy=False)
    return out


def sd_checkpoint_tensors(scale: float = 1.0, *, unet_seed: int = 0, shared_seed: int = 1,
                          unet_scale: float | None = None) -> dict[str, np.ndarray]:
    """An SD1.x-shaped fp16 checkpoint; ``scale`` 1.0 is the real 2.1 GB size.

    Widths scale with ``sqrt(scale)`` so bytes scale about linearly;
    *unet_scale* sizes the UNet alone (two "fine-tunes" of one family share
    VAE and text encoder but can differ in everything else).
    """
    f = max(scale, 1e-4) ** 0.5
    fu = max(unet_scale if unet_scale is not None else scale, 1e-4) ** 0.5
    base = max(8, int(round(320 * fu / 8)) * 8)
    ctx = max(8, int(round(768 * f / 8)) * 8)
    vae_base = max(8, int(round(128 * f / 8)) * 8)
    tensors = _fill(unet_shapes(base, ctx), unet_seed, np.float16)
    tensors.update(_fill(vae_shapes(vae_base), shared_seed, np.float16))
    tensors.update(_fill(text_encoder_shapes(ctx, 12), shared_seed + 1, np.float16))
    return tensors


def write_sd_checkpoint(path: str, scale: float = 1.0, *, unet_seed: int = 0, shared_seed: int = 1,
                        unet_scale: float | None = None, metadata: dict[str, str] | None = None) -> int:
    """Write :func:`sd_checkpoint_tensors` as a .safetensors file; returns its size."""
    import os

    from safetensors.numpy import save_file

    save_file(sd_checkpoint_tensors(scale, unet_seed=unet_seed, shared_seed=shared_seed, unet_scale=unet_scale), path,
              metadata=metadata or {"format": "pt"})
    return os.path.getsize(path)
