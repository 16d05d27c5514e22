"""Layouts and their maps: original single files, shipped configs, tokenizer, LoRA keys, cache tiers."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
from ._requirements import import_required

torch = import_required("torch")
import_required("diffusers")

from sdcache.kernels import checkpoint, lora  # noqa: E402
from sdcache.kernels import original_layout as ol  # noqa: E402
from sdcache.kernels.components import build_module, empty_module  # noqa: E402
from sdcache.kernels.families import family  # noqa: E402
from sdcache.kernels.model_cache import ByteLRU  # noqa: E402
from sdcache.kernels.request import LoraRef, parse_lora, parse_size  # noqa: E402
from sdcache.kernels.tokenizer import clip_tokenizer, tokenizer_from_files, write_vocab_files  # noqa: E402

from sdcache import errors  # noqa: E402

from . import runner_models as rm  # noqa: E402

SHAPE_KEYS = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "attention_head_dim",
              "cross_attention_dim", "transformer_layers_per_block", "use_linear_projection",
              "projection_class_embeddings_input_dim", "addition_time_embed_dim", "latent_channels",
              "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "projection_dim",
              "vocab_size", "hidden_act")


@pytest.mark.parametrize("fam", ["sd1", "sd2", "sdxl"])
def test_tiny_original_layout_round_trips_through_diffusers_conversion(fam: str) -> None:
    comps = rm.build_tiny(fam, 3)
    ckpt = ol.original_layout(fam, comps)
    f = checkpoint.detect_family("tiny", {k: tuple(v.shape) for k, v in ckpt.items()})
    assert f.name == fam
    for comp, (cfg, sd) in checkpoint.split_single_file(f, ckpt).items():
        built = build_module(f.components[comp], cfg, sd, "cpu", torch.float32, comp)
        ref = comps[comp].state_dict()
        got = built.state_dict()
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), comp
        ref_cfg = comps[comp].config
        ref_cfg = ref_cfg.to_dict() if hasattr(ref_cfg, "to_dict") else dict(ref_cfg)
        for k in SHAPE_KEYS:
            unused = (k == "attention_head_dim" and fam == "sd1") or (k == "projection_dim" and comp == "text_encoder")
            if k in ref_cfg and k in cfg and not unused:
                want, have = ref_cfg[k], cfg[k]
                assert (list(want) if isinstance(want, (list, tuple)) else want) == (
                    list(have) if isinstance(have, (list, tuple)) else have), (comp, k)


@pytest.mark.parametrize(
    "fam, counts",
    [
        ("sd1", {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
        ("sd2", {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}),
        ("sdxl", {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                  "text_encoder_2": 694_659_840}),
    ],
)
def test_shipped_configs_are_the_real_architectures(fam: str, counts: dict[str, int]) -> None:
    """Parameter counts of the published SD1.5 / SD2.1 / SDXL-base components, built on the meta device."""
    f = family(fam)
    for comp, n in counts.items():
        model = empty_module(f.components[comp], f.config(comp))
        assert sum(p.numel() for p in model.parameters()) == n, comp


@pytest.mark.parametrize("fam", ["sd1", "sd2", "sdxl"])
def test_real_size_single_file_layout_gives_back_the_shipped_configs(fam: str) -> None:
    """A real-sized original-layout checkpoint (meta tensors: shapes only) is recognised and its configs inferred."""
    f = family(fam)
    comps = {c: empty_module(f.components[c], f.config(c)) for c in f.components}
    if fam == "sd2":  # the file holds one more OpenCLIP block than SD2 uses
        cfg = f.config("text_encoder") | {"num_hidden_layers": 24}
        comps["text_encoder"] = empty_module("CLIPTextModel", cfg)
    sd: dict[str, torch.Tensor] = {}
    sd.update(checkpoint.unet_to_ldm(comps["unet"].state_dict(), comps["unet"].config))
    sd.update(ol.vae_to_ldm(comps["vae"].state_dict(), comps["vae"].config))
    te = comps["text_encoder"].state_dict()
    if fam == "sd1":
        sd.update(ol.clip_to_ldm(te, "cond_stage_model.transformer."))
    elif fam == "sd2":
        te = dict(te) | {"text_projection.weight": torch.empty(1024, 1024, device="meta")}
        sd.update(ol.open_clip_to_ldm(te, "cond_stage_model.model.", 24))
    else:
        sd.update(ol.clip_to_ldm(te, "conditioner.embedders.0.transformer."))
        sd.update(ol.open_clip_to_ldm(comps["text_encoder_2"].state_dict(), "conditioner.embedders.1.model.", 32))
    detected = checkpoint.detect_family("real", {k: tuple(v.shape) for k, v in sd.items()})
    assert detected.name == fam
    for comp, (cfg, _) in checkpoint.split_single_file(detected, sd).items():
        shipped = f.config(comp)
        for k in SHAPE_KEYS:
            if k in shipped:
                assert cfg[k] == shipped[k], (comp, k, cfg[k], shipped[k])


def test_layout_errors_name_the_problem() -> None:
    with pytest.raises(errors.InvalidArgument, match="unknown checkpoint layout"):
        checkpoint.detect_family("x", {"foo.weight": (2, 2)})
    with pytest.raises(errors.InvalidArgument, match="is a LoRA"):
        checkpoint.detect_family("x", {"lora_unet_a.lora_down.weight": (4, 8)})
    with pytest.raises(errors.InvalidArgument, match="is a ControlNet"):
        checkpoint.detect_family("x", {"control_model.input_hint_block.0.weight": (16, 3, 3, 3)})
    with pytest.raises(errors.InvalidArgument, match="refiner"):
        checkpoint.detect_family("x", {"conditioner.embedders.0.model.text_projection": (1280, 1280),
                                       "model.diffusion_model.out.2.weight": (4, 384, 3, 3)})


def test_tokenizer_from_the_shipped_bpe_file(tmp_path: object) -> None:
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    pad2 = clip_tokenizer("!")("a cat", padding="max_length", max_length=6).input_ids
    assert pad2 == [49406, 320, 2368, 49407, 0, 0]
    write_vocab_files(tmp_path)  # type: ignore[arg-type]
    d = str(tmp_path)
    own = tokenizer_from_files(open(f"{d}/vocab.json").read(), open(f"{d}/merges.txt").read(), {"pad_token": "!"})
    text = "An astronaut riding a horse, 4k, highly detailed!"
    assert own(text).input_ids == clip_tokenizer("!")(text).input_ids
    assert own.pad_token == "!"


def test_lora_key_layouts_map_to_the_same_modules() -> None:
    comps = rm.build_tiny("sd1", 0)
    mods = {c: comps[c] for c in ("unet", "text_encoder")}
    index = lora.target_index(mods, xl=False)
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    variants = {
        "kohya": {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
                  "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": up},
        "peft": {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default_0.weight": down,
                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.default_0.weight": up},
        "old-diffusers": {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": down,
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": up},
        "sgm-names": {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
                      "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": up},
    }
    want = {("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")}
    for name, sd in variants.items():
        r = lora.resolve(lora.parse_lora(name, sd), mods, index, "SD1.x", "sd1")
        assert set(r.targets) == want, name
    te = {"lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight": torch.randn(2, 32),
          "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight": torch.randn(37, 2)}
    r = lora.resolve(lora.parse_lora("te", te), mods, index, "SD1.x", "sd1")
    assert set(r.targets) == {("text_encoder", "encoder.layers.1.mlp.fc1")}


def test_lora_delta_is_alpha_over_rank_times_scale() -> None:
    comps = rm.build_tiny("sd1", 0)
    mods = {"unet": comps["unet"]}
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    stem = "lora_unet_" + name.replace(".", "_")
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    sd = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(2.0)}
    r = lora.resolve(lora.parse_lora("a", sd), mods, lora.target_index(mods, False), "SD1.x", "sd1")
    module = comps["unet"].get_submodule(name)
    w = module.weight
    w0 = w.detach().clone()
    x = torch.randn(3, 32)
    with torch.no_grad():
        base_out = module(x)
    want = x @ (w0 + 0.5 * (2.0 / 4) * up @ down).T
    # side paths (a new set): the weight stays, the module's output carries the delta
    patcher = lora.LoraPatcher(mods)
    assert patcher.switch([(r, 0.5)]) == [f"unet.{name}"]
    assert torch.equal(w.detach(), w0)
    with torch.no_grad():
        torch.testing.assert_close(module(x), want)
    patcher.switch([])
    # merged: the weight itself is W0 + delta
    merged = lora.LoraPatcher(mods, merge_after=1)
    assert merged.switch([(r, 0.5)]) == [f"unet.{name}"]
    torch.testing.assert_close(w.detach(), w0 + 0.5 * (2.0 / 4) * up @ down)
    with torch.no_grad():
        torch.testing.assert_close(module(x), want)
    merged.switch([])
    assert torch.equal(w.detach(), w0)
    with torch.no_grad():
        assert torch.equal(module(x), base_out)


def test_byte_lru_budget_eviction_and_pins() -> None:
    evicted: list[object] = []
    lru: ByteLRU[str] = ByteLRU("t", 100, on_evict=lambda k, v: evicted.append(k))
    lru.put("a", "A", 40)
    lru.put("b", "B", 40)
    assert lru.get("a") == "A"  # a is now the most recent
    lru.put("c", "C", 40)
    assert evicted == ["b"] and lru.keys() == ["a", "c"]
    lru.pin("a")
    lru.put("d", "D", 90)
    assert "a" in lru and "c" not in lru and "d" not in lru  # d does not fit beside pinned a
    assert not lru.put("e", "E", 200)
    assert lru.put("f", "F", 200, pin=True) and "f" in lru  # in use: kept whatever its size
    lru.unpin("f")
    lru.unpin("a")
    lru.put("g", "G", 10)
    assert lru.keys() == ["g"]


def test_request_parsing() -> None:
    assert parse_lora("sdcache://loras/a.safetensors") == LoraRef("sdcache://loras/a.safetensors", 1.0)
    assert parse_lora("sdcache://loras/a.safetensors:0.75") == LoraRef("sdcache://loras/a.safetensors", 0.75)
    assert parse_lora("/x/b.safetensors:-1") == LoraRef("/x/b.safetensors", -1.0)
    assert parse_size("768x512") == (768, 512) and parse_size("512") == (512, 512)
    with pytest.raises(errors.InvalidArgument):
        parse_size("big")


def test_default_host_budget_follows_the_container_memory_limit(tmp_path) -> None:
    """In a pod with a memory limit, "half the RAM" is half the limit, not half the host."""
    from sdcache.kernels.model_cache import cgroup_memory_limit

    (tmp_path / "memory.max").write_text("2147483648\n")  # cgroup v2, 2 GiB
    assert cgroup_memory_limit(str(tmp_path)) == 2 << 30
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_memory_limit(str(tmp_path)) is None
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1 "unlimited"
    assert cgroup_memory_limit(str(tmp_path)) is None
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("1073741824\n")
    assert cgroup_memory_limit(str(tmp_path)) == 1 << 30
