"""Model families: each diffusers class called as its pipeline calls it, pinned to the real ``forward``.

Tiny random-weight instances of the real classes. For every family: fewstep's raw network output equals a direct
keyword call of the model's ``forward`` as the family's pipeline makes it (bit for bit, float32), the output
conversion is right, batch-1 conditioning broadcasts exactly, folders round-trip (variant, torch_dtype), and
``sample()`` runs end to end. Then the clear errors.
"""

import json
import os
from dataclasses import dataclass
from typing import Any

import diffusers
import pytest
import torch

from fewstep import ClassifierFreeGuidance, from_diffusers, sample
from fewstep.caching import BlockCache
from fewstep.models import FAMILIES, ModelDenoiser, family_of
from fewstep.schedules import DiscreteVP

FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
DDPM = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear"}
B = 3  # batch of the equivalence checks


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- the pipelines' own ways of calling each model (diffusers' pipeline code, keyword for keyword) --------------

def _first_half(out, x):  # DiT/PixArt/Sana pipelines: keep the prediction when the model also learned sigma
    return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * x.shape[1] else out


def _unet(m, x, ts, c):  # DDPMPipeline
    return m(x, ts).sample


def _sd(m, x, ts, c):  # StableDiffusion(XL)Pipeline
    return m(x, ts, encoder_hidden_states=c["encoder_hidden_states"], timestep_cond=None, cross_attention_kwargs=None,
             added_cond_kwargs=c.get("added_cond_kwargs"), return_dict=False)[0]


def _dit(m, x, ts, c):  # DiTPipeline
    return torch.split(m(x, timestep=ts, class_labels=c["class_labels"]).sample, x.shape[1], dim=1)[0]


def _pixart(m, x, ts, c):  # PixArtAlphaPipeline (no micro-conditioning at this sample size)
    return _first_half(m(x, encoder_hidden_states=c["encoder_hidden_states"],
                         encoder_attention_mask=c["encoder_attention_mask"], timestep=ts,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0], x)


def _sd3(m, x, ts, c):  # StableDiffusion3Pipeline
    return m(hidden_states=x, timestep=ts, encoder_hidden_states=c["encoder_hidden_states"],
             pooled_projections=c["pooled_projections"], joint_attention_kwargs=None, return_dict=False)[0]


def _flux(m, x, ts, c):  # FluxPipeline: _pack_latents, _prepare_latent_image_ids, guidance, _unpack_latents
    b, ch, h, w = x.shape
    packed = x.view(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), ch * 4)
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    text = c["encoder_hidden_states"]
    out = m(hidden_states=packed, timestep=ts, guidance=torch.full([1], 3.5, dtype=torch.float32).expand(b),
            pooled_projections=c["pooled_projections"], encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3), img_ids=ids.reshape(-1, 3), joint_attention_kwargs=None,
            return_dict=False)[0]
    out = out.view(b, h // 2, w // 2, out.shape[-1] // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(b, out.shape[1], h, w)


def _sana(m, x, ts, c):  # SanaPipeline (timestep_scale 1)
    return _first_half(m(x, encoder_hidden_states=c["encoder_hidden_states"],
                         encoder_attention_mask=c["encoder_attention_mask"], timestep=ts, return_dict=False,
                         attention_kwargs=None)[0], x)


# -- tiny instances of the real classes --------------------------------------------------------------------------

def _build(name):
    torch.manual_seed(0)
    if name == "UNet2DModel":
        return diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                                     layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                     up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)
    if name in ("UNet2DConditionModel", "SDXL"):
        extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": 4,
                 "projection_class_embeddings_input_dim": 8 + 6 * 4} if name == "SDXL" else {}
        return diffusers.UNet2DConditionModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(16, 32),
                                              layers_per_block=1, cross_attention_dim=8, attention_head_dim=4,
                                              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                                              **extra)
    if name == "DiTTransformer2DModel":  # learned sigma, as DiT-XL ships: out_channels = 2 in_channels
        return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2,
                                               out_channels=4, num_layers=2, sample_size=8, patch_size=2,
                                               num_embeds_ada_norm=10, norm_num_groups=8)
    if name == "PixArtTransformer2DModel":  # learned sigma too
        return diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2,
                                                  out_channels=4, num_layers=2, sample_size=8, patch_size=2,
                                                  cross_attention_dim=16, caption_channels=12)
    if name == "SD3Transformer2DModel":
        return diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=2, num_layers=2,
                                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                               caption_projection_dim=16, pooled_projection_dim=10, out_channels=2,
                                               pos_embed_max_size=8)
    if name == "FluxTransformer2DModel":  # guidance-distilled (Flux-dev's layout), 2 latent channels packed 2x2
        return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                                pooled_projection_dim=10, guidance_embeds=True,
                                                axes_dims_rope=(2, 2, 4))
    if name == "SanaTransformer2DModel":
        return diffusers.SanaTransformer2DModel(in_channels=2, out_channels=2, num_attention_heads=2,
                                                attention_head_dim=8, num_layers=2, num_cross_attention_heads=2,
                                                cross_attention_head_dim=8, cross_attention_dim=16,
                                                caption_channels=12, sample_size=8, patch_size=2)
    raise AssertionError(name)


def _cond(name, batch, seed=1):
    """Conditioning of ``batch`` prompts (``batch=1``: one prompt for every seed)."""
    text = {"UNet2DConditionModel": 8, "SDXL": 8, "PixArtTransformer2DModel": 12, "SD3Transformer2DModel": 12,
            "FluxTransformer2DModel": 12, "SanaTransformer2DModel": 12}
    if name == "UNet2DModel":
        return {}
    if name == "DiTTransformer2DModel":
        return {"class_labels": torch.arange(batch) % 10}
    c = {"encoder_hidden_states": _randn(batch, 5, text[name], seed=seed)}
    if name == "SDXL":
        c["added_cond_kwargs"] = {"text_embeds": _randn(batch, 8, seed=seed + 1),
                                  "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]]).repeat(batch, 1)}
    if name in ("SD3Transformer2DModel", "FluxTransformer2DModel"):
        c["pooled_projections"] = _randn(batch, 10, seed=seed + 1)
    if name == "FluxTransformer2DModel":
        c["guidance"] = 3.5
    if name in ("PixArtTransformer2DModel", "SanaTransformer2DModel"):
        c["encoder_attention_mask"] = torch.ones(batch, 5)
    return c


def _repeat(cond, batch):
    """The batch-1 conditioning repeated explicitly (what callers had to do before broadcasting)."""
    out: dict[str, Any] = {}
    for k, v in cond.items():
        if isinstance(v, dict):
            out[k] = _repeat(v, batch)
        elif isinstance(v, torch.Tensor) and v.ndim:
            out[k] = v.repeat(batch, *[1] * (v.ndim - 1))
        else:
            out[k] = v
    return out


@dataclass(frozen=True)
class Case:
    name: str
    config: dict
    direct: Any
    t: float  # continuous time of the checks

    @property
    def flow(self):
        return self.config is FLOW


CASES = [Case("UNet2DModel", DDPM, _unet, 0.5), Case("UNet2DConditionModel", DDPM, _sd, 0.5),
         Case("SDXL", DDPM, _sd, 0.5), Case("DiTTransformer2DModel", DDPM, _dit, 0.5),
         Case("PixArtTransformer2DModel", DDPM, _pixart, 0.5), Case("SD3Transformer2DModel", FLOW, _sd3, 0.625),
         Case("FluxTransformer2DModel", FLOW, _flux, 0.625), Case("SanaTransformer2DModel", FLOW, _sana, 0.625)]
IDS = [c.name for c in CASES]


@pytest.fixture(scope="module")
def models():
    return {c.name: _build(c.name).eval() for c in CASES}


def _native(case, t):
    """The timestep the pipeline feeds at ``t``: the training step, sigma * 1000 (SD3, Sana) or sigma (Flux, which
    multiplies by 1000 inside its forward)."""
    if case.name == "FluxTransformer2DModel":
        value = t
    elif case.flow:
        value = t * 1000
    else:
        value = 500.0  # t is the time of training step 500
    return torch.full((B,), value, dtype=torch.float64).float()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_network_output_is_the_real_forward_and_converts(models, case):
    model = models[case.name]
    den = from_diffusers(model, case.config)
    t = case.t if case.flow else den.schedule.time_of_index(500)
    x, cond = _randn(B, 2, 8, 8, seed=0), _cond(case.name, B)
    with torch.no_grad():
        raw = den.network(x, den.native_time(t), cond)
        ref = case.direct(model, x, _native(case, t), {**den.default_cond, **cond})
        x0 = den(x, t, cond)
    assert raw.shape == x.shape and torch.equal(raw, ref)
    if case.flow:  # x0 = x - t u (Flux: u is the unpacked velocity of the packed latents)
        expected = x - t * ref
    else:  # eps: x0 = (x - sigma eps) / alpha
        expected = (x - den.schedule.sigma(t) * ref) / den.schedule.alpha(t)
    torch.testing.assert_close(x0, expected, rtol=1e-6, atol=1e-6)
    assert den.sample_shape == ((2, 128, 128) if case.name == "FluxTransformer2DModel" else (2, 8, 8))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flux_takes_sigma_and_sd3_sigma_times_1000(models, shift):
    """Flux multiplies its timestep by 1000 inside forward: it gets the (shifted) sigma, never sigma * 1000."""
    config = {**FLOW, "shift": shift}
    x, t = _randn(B, 2, 8, 8, seed=0), 0.625
    for name, direct, scale in (("FluxTransformer2DModel", _flux, 1.0), ("SD3Transformer2DModel", _sd3, 1000.0)):
        den = from_diffusers(models[name], config)
        sigma = den.schedule.sigma(t)
        assert (sigma == t) == (shift == 1.0)
        cond = _cond(name, B)
        with torch.no_grad():
            raw = den.network(x, den.native_time(t), cond)
            assert torch.equal(raw, direct(models[name], x, torch.full((B,), sigma * scale).float(), cond))
            wrong = direct(models[name], x, torch.full((B,), sigma * scale * 1000).float(), cond)
        assert not torch.allclose(raw, wrong)


@pytest.mark.parametrize("name", ["DiTTransformer2DModel", "PixArtTransformer2DModel"])
def test_learned_sigma_keeps_the_first_half(models, name):
    model = models[name]
    den = from_diffusers(model, DDPM)
    x, cond = _randn(2, 2, 8, 8, seed=0), {**den.default_cond, **_cond(name, 2)}
    ts = torch.full((2,), 500.0)
    with torch.no_grad():
        full = model(hidden_states=x, timestep=ts, **cond).sample
        raw = den.network(x, den.native_time(den.schedule.time_of_index(500)), cond)
    assert full.shape[1] == 4 and torch.equal(raw, full[:, :2])


@pytest.mark.parametrize("case", [c for c in CASES if c.name not in ("UNet2DModel", "DiTTransformer2DModel")],
                         ids=lambda c: c.name)
def test_batch_one_conditioning_broadcasts(models, case):
    den = from_diffusers(models[case.name], case.config)
    x, one = _randn(B, 2, 8, 8, seed=0), _cond(case.name, 1)
    with torch.no_grad():
        assert torch.equal(den(x, 0.5, one), den(x, 0.5, _repeat(one, B)))
    # guidance with a batch-1 negative prompt broadcasts the same way
    neg = _cond(case.name, 1, seed=7)
    with torch.no_grad():
        guided = ClassifierFreeGuidance(den, 2.0, uncond=neg)(x, 0.5, one)
        repeated = ClassifierFreeGuidance(den, 2.0, uncond=_repeat(neg, B))(x, 0.5, _repeat(one, B))
    assert torch.equal(guided, repeated)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_folder_round_trip_with_variant_and_dtype(models, case, tmp_path):
    model = models[case.name]
    sub = "unet" if case.name.startswith(("UNet", "SDXL")) else "transformer"
    model.save_pretrained(tmp_path / sub, variant="fp16")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(case.config))
    x, cond = _randn(B, 2, 8, 8, seed=0), _cond(case.name, B)
    den = from_diffusers(model, case.config)
    loaded = from_diffusers(os.fspath(tmp_path), variant="fp16")
    with torch.no_grad():
        assert torch.equal(loaded(x, 0.5, cond), den(x, 0.5, cond))
    assert type(loaded.model) is type(model) and loaded.family is family_of(model)
    half = from_diffusers(os.fspath(tmp_path), subfolder=sub, variant="fp16", torch_dtype=torch.float16)
    assert half.dtype == torch.float16 and {p.dtype for p in half.model.parameters()} == {torch.float16}
    with torch.no_grad():
        x0_half, x0 = half(x, 0.5, cond), den(x, 0.5, cond)  # float32 state and conditioning, network in float16
    assert x0_half.dtype == torch.float32 and float((x0_half - x0).abs().max()) < 0.05
    # the safetensors-only check follows the variant name: no plain weights file here
    with pytest.raises(ValueError, match=r"no diffusion_pytorch_model\.safetensors"):
        from_diffusers(os.fspath(tmp_path))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_ends_read_the_noisy_input_and_write_the_prediction(models, case):
    """A family's ``ends`` (kept in float by quantization) are layers of the class: the first is fed the very tensor
    the network is called with as its noisy input, the second is the last nn.Linear/nn.Conv2d that runs."""
    from torch import nn

    from fewstep.quant import quantize, target_layers

    model = models[case.name]
    den = from_diffusers(model, case.config)
    first, last = den.family.ends
    layers = dict(target_layers(model))
    assert isinstance(layers[first], nn.Linear | nn.Conv2d) and isinstance(layers[last], nn.Linear | nn.Conv2d)
    seen, order, fed = {}, [], {}

    def top(module, args, kwargs):
        seen["x"] = kwargs[den.family.sample] if den.family.sample in kwargs else args[0]

    def watch(module, args, name):
        order.append(name)
        fed.setdefault(name, args[0])

    handles = [model.register_forward_pre_hook(top, with_kwargs=True)]
    handles += [layer.register_forward_pre_hook(lambda m, a, name=name: watch(m, a, name))
                for name, layer in layers.items()]
    try:
        t = case.t if case.flow else den.schedule.time_of_index(500)
        with torch.no_grad():
            den(_randn(B, 2, 8, 8, seed=0), t, _cond(case.name, B))
    finally:
        for h in handles:
            h.remove()
    assert fed[first] is seen["x"] and order[-1] == last
    q = quantize(den, "w8")
    assert sorted(n for n, why in q.quant.skipped.items() if "keep_ends" in why) == sorted((first, last))
    assert not {first, last} & set(q.quant.layers)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sample_runs_end_to_end(models, case):
    den = from_diffusers(models[case.name], case.config)
    shape = (2, 8, 8) if case.name == "FluxTransformer2DModel" else den.sample_shape
    with torch.no_grad():
        out = sample(den, "dpmpp_2m", 3, shape=shape, seeds=range(2), cond=_cond(case.name, 1))
    assert out.shape == (2, 2, 8, 8) and torch.isfinite(out).all()


def test_block_cache_that_never_reuses_is_the_learned_sigma_dit(models):
    den = from_diffusers(models["DiTTransformer2DModel"], DDPM)
    kw = {"shape": den.sample_shape, "seeds": range(2), "cond": {"class_labels": torch.tensor([3, 7])}}
    with torch.no_grad():
        assert torch.equal(sample(BlockCache(den, threshold=0.0), "ddim", 3, **kw), sample(den, "ddim", 3, **kw))


def test_instance_dtype_and_device():
    model = _build("UNet2DModel")  # a fresh one: it is converted in place
    den = from_diffusers(model, DDPM, torch_dtype=torch.float16, device="cpu")
    assert den.dtype == torch.float16 and {p.dtype for p in model.parameters()} == {torch.float16}


def test_variant_indexes_are_checked(models, tmp_path):
    model = models["UNet2DModel"]
    model.save_pretrained(tmp_path, variant="fp16")
    for index in ("diffusion_pytorch_model.safetensors.index.fp16.json",  # diffusers' name
                  "diffusion_pytorch_model.safetensors.fp16.index.json"):  # its older (legacy) name
        path = tmp_path / index
        path.write_text(json.dumps({"weight_map": {"w": "diffusion_pytorch_model.fp16.bin"}}))
        with pytest.raises(ValueError, match="non-safetensors shards"):
            from_diffusers(os.fspath(tmp_path), DDPM, variant="fp16")
        path.unlink()
    with pytest.raises(ValueError, match="variant must be a name"):
        from_diffusers(os.fspath(tmp_path), DDPM, variant="../fp16")
    with pytest.raises(ValueError, match="already loaded"):
        from_diffusers(model, DDPM, variant="fp16")


def test_unsupported_class_is_refused_naming_the_supported_ones(tmp_path):
    with pytest.raises(ValueError, match="unsupported diffusers model class 'Linear'.*FluxTransformer2DModel"):
        from_diffusers(torch.nn.Linear(2, 2), DDPM)
    # from a folder: refused from its config, before any weights are looked for
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet1DModel"}))
    with pytest.raises(ValueError, match="unsupported diffusers model class 'UNet1DModel'.*SD3Transformer2DModel"):
        from_diffusers(os.fspath(tmp_path), DDPM)
    assert set(FAMILIES) >= {"UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel",
                             "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel"}


@pytest.mark.parametrize(("name", "config", "drop", "missing"), [
    ("SD3Transformer2DModel", FLOW, "pooled_projections", "pooled_projections"),
    ("FluxTransformer2DModel", FLOW, "guidance", "guidance"),
    ("SDXL", DDPM, "added_cond_kwargs", "added_cond_kwargs.text_embeds"),
    ("UNet2DConditionModel", DDPM, "encoder_hidden_states", "encoder_hidden_states"),
])
def test_missing_conditioning_is_named_before_the_network_runs(models, name, config, drop, missing):
    model = models[name]
    den = from_diffusers(model, config)
    ran = []
    handle = model.register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        cond = {k: v for k, v in _cond(name, 1).items() if k != drop}
        with pytest.raises(ValueError, match=f"needs conditioning '{missing}'"):
            den(_randn(1, 2, 8, 8, seed=0), 0.5, cond)
    finally:
        handle.remove()
    assert not ran


def test_conditioning_errors(models):
    den = from_diffusers(models["SD3Transformer2DModel"], FLOW)
    x = _randn(3, 2, 8, 8, seed=0)
    with pytest.raises(ValueError, match="'pooled_projections' has batch 2; expected 1 .* or 3"):
        den(x, 0.5, {**_cond("SD3Transformer2DModel", 1), "pooled_projections": _randn(2, 10, seed=0)})
    with pytest.raises(ValueError, match=r"takes no conditioning \['class_labels'\]"):
        den(x, 0.5, {**_cond("SD3Transformer2DModel", 1), "class_labels": torch.tensor([1])})
    with pytest.raises(ValueError, match="flow-matching scheduler"):  # Flux takes sigma in [0, 1]: flow time only
        from_diffusers(models["FluxTransformer2DModel"], DDPM)
    with pytest.raises(ValueError, match="height and width must be multiples of 2"):
        from_diffusers(models["FluxTransformer2DModel"], FLOW)(_randn(1, 2, 7, 8, seed=0), 0.5,
                                                               _cond("FluxTransformer2DModel", 1))
    torch.manual_seed(0)
    sprint = diffusers.SanaTransformer2DModel(in_channels=2, out_channels=2, num_attention_heads=2,
                                              attention_head_dim=8, num_layers=1, num_cross_attention_heads=2,
                                              cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
                                              sample_size=8, guidance_embeds=True)
    with pytest.raises(ValueError, match="SanaTransformer2DModel with guidance_embeds=True is not supported"):
        from_diffusers(sprint, FLOW)


def test_guidance_without_uncond(models):
    den = from_diffusers(models["SD3Transformer2DModel"], FLOW)
    with pytest.raises(ValueError, match="needs uncond=.*'encoder_hidden_states', 'pooled_projections'"):
        ClassifierFreeGuidance(den, 4.0)
    # a class-conditional DiT has a default null label: guidance needs no uncond
    dit = from_diffusers(models["DiTTransformer2DModel"], DDPM)
    assert dit.required_cond == ()
    x = _randn(2, 2, 8, 8, seed=0)
    labels = {"class_labels": torch.tensor([1, 2])}
    with torch.no_grad():
        guided = ClassifierFreeGuidance(dit, 1.5)(x, 0.5, labels)
        u, c = dit(x, 0.5), dit(x, 0.5, labels)
    torch.testing.assert_close(guided, u + 1.5 * (c - u))


def test_plain_callables_keep_the_positional_call():
    den = ModelDenoiser(lambda x, t, shift=0.0: x * 0 + shift, DiscreteVP.named("linear"), default_cond={"shift": 1.0})
    assert den.family is None and den.required_cond == ()
    assert torch.equal(den.network(torch.zeros(2, 3), den.native_time(0.5), None), torch.ones(2, 3))
    with pytest.raises(ValueError, match="pass shape= yourself"):
        den.sample_shape  # noqa: B018


# -- each entry's cache layout ------------------------------------------------------------------------------------

def test_every_family_has_a_cache_layout_or_says_why_it_has_none():
    """The caches' block adapters are derived from these entries: one per family with a layout, none for the
    others, whose entry names the reason (and the caches' error repeats it)."""
    from fewstep.caching import ADAPTERS, BlockAdapter
    from fewstep.models.families import CACHE_KINDS

    for family in FAMILIES.values():
        if family.cache is None:
            assert family.no_cache and family.name not in ADAPTERS, family.name
            with pytest.raises(TypeError, match=family.no_cache):
                BlockAdapter.of_family(family)
            continue
        assert not family.no_cache and family.blocks and family.cache.kind in CACHE_KINDS, family.name
        assert ADAPTERS[family.name] == BlockAdapter.of_family(family)
    assert list(ADAPTERS) == [f.name for f in FAMILIES.values() if f.cache is not None]


def test_a_family_entry_takes_a_cache_layout_or_a_reason_not_both():
    from fewstep.models.families import Blocks, CacheLayout, ModelFamily

    blocks = (Blocks("transformer_blocks", ("hidden_states",), ("hidden_states",)),)
    with pytest.raises(ValueError, match="cache layout or the reason"):
        ModelFamily(name="X", sample="hidden_states", cond=(), blocks=blocks)
    with pytest.raises(ValueError, match="cache layout or the reason"):
        ModelFamily(name="X", sample="hidden_states", cond=(), blocks=blocks, cache=CacheLayout("chain"),
                    no_cache="why")
    with pytest.raises(ValueError, match="needs the block lists"):
        ModelFamily(name="X", sample="hidden_states", cond=(), cache=CacheLayout("chain"))
    with pytest.raises(ValueError, match="kind must be one of unet, chain"):
        CacheLayout("transformer")
