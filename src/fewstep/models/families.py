"""diffusers model families as data: how each network class is called, in one room.

Each :class:`ModelFamily` describes one diffusers class once: the keyword names of its ``forward``, the time it
takes, how its latents are laid out (Flux packs 2x2 patches into tokens), the learned-sigma split, the
conditioning it needs or defaults, where its blocks are and what a block takes and returns, and how a feature
cache sees them (:class:`CacheLayout`, or the reason it has none). :class:`~fewstep.models.ModelDenoiser` calls a
network through :meth:`ModelFamily.call`; :func:`~fewstep.models.from_diffusers` looks the family up with
:func:`family_of`; the caches' block adapters (:data:`fewstep.caching.ADAPTERS`) are derived from the entries with a
layout. Adding a family is one entry in :data:`FAMILIES` and one test pinning it to the real ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fewstep.schedules import NoiseSchedule, RectifiedFlow

__all__ = ["CACHE_KINDS", "FAMILIES", "Blocks", "CacheLayout", "Default", "ModelFamily", "Need", "Refuse", "When",
           "family_of"]


def setting(model: Any, name: str) -> Any:
    """A model setting: its config entry, else (when the config leaves it ``None``) a plain attribute the module set
    itself (PixArt resolves ``use_additional_conditions`` from ``sample_size`` in its constructor). Read from the
    instance's own ``__dict__``: diffusers' attribute fallback to the config is deprecated."""
    value = getattr(getattr(model, "config", None), name, None)
    return getattr(model, "__dict__", {}).get(name) if value is None else value


@dataclass(frozen=True)
class When:
    """A rule holds when the model setting ``name`` is truthy (``equals=True``), falsy (``equals=False``) or equal
    to ``equals``."""

    name: str
    equals: Any = True

    def holds(self, model: Any) -> bool:
        value = setting(model, self.name)
        return bool(value) == self.equals if isinstance(self.equals, bool) else value == self.equals


@dataclass(frozen=True)
class Need:
    """Conditioning the network cannot run without; ``key`` may be dotted into a dict-valued keyword
    (``"added_cond_kwargs.text_embeds"``)."""

    key: str
    when: When | None = None


@dataclass(frozen=True)
class Default:
    """Conditioning passed unless the caller gives it: ``make(model)`` (the pipeline's own default)."""

    key: str
    make: Callable[[Any], Any]
    when: When | None = None


@dataclass(frozen=True)
class Refuse:
    """A configuration of the class that fewstep cannot drive correctly, and why."""

    when: When
    reason: str


@dataclass(frozen=True)
class Blocks:
    """A block list of the network (for feature caches): the attribute holding it, what one block takes (keywords,
    or positional names in order for blocks called positionally; a trailing ``*`` marks one that only some blocks
    take, the U-Nets' cross-attention blocks) and what it returns, in order. ``single``: one module (a U-Net's
    ``mid_block``, possibly ``None``), not a list."""

    attr: str
    takes: tuple[str, ...]
    returns: tuple[str, ...]
    single: bool = False


CACHE_KINDS = ("unet", "chain")


@dataclass(frozen=True)
class CacheLayout:
    """How a feature cache sees a family's :class:`Blocks` (:mod:`fewstep.caching.adapters` reads it).

    Attributes:
        kind: ``"unet"``: the block lists are a U-Net's ``down``/``mid``/``up`` positions (caches reuse their
            outputs); ``"chain"``: a transformer's blocks, one chain in the order ``forward`` runs them (caches reuse
            the chain's residual on every stream a block returns).
        unbatched: block inputs that are not per sample (Flux's rotary embedding), passed whole to a sample subset.
        refused: conditioning a cache cannot honour: residuals added between the blocks it skips (ControlNet,
            T2I-Adapter), or a change of which blocks run (SD3's ``skip_layers``).
    """

    kind: str
    unbatched: frozenset[str] = frozenset()
    refused: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in CACHE_KINDS:
            raise ValueError(f"cache layout kind must be one of {', '.join(CACHE_KINDS)}, got {self.kind!r}")


@dataclass(frozen=True)
class ModelFamily:
    """How one diffusers model class is called.

    Attributes:
        name: the diffusers class name.
        sample: keyword of the noisy input (``"sample"`` for U-Nets, ``"hidden_states"`` for transformers).
        cond: conditioning keywords its ``forward`` accepts; anything else is refused.
        needs, defaults, refuse: conditioning it requires, conditioning it gets unless given (the pipeline's
            default), configurations that are refused.
        timestep: keyword of the time.
        time: ``"native"``: the scheduler's own timestep (training-step index, or ``sigma * N`` for flow
            schedulers); ``"unit"``: the flow sigma in [0, 1] (Flux multiplies by 1000 inside ``forward``; its
            pipeline divides the scheduler's timestep by 1000).
        time_scale: a setting that multiplies the timestep (Sana's ``timestep_scale``, as its pipeline does).
        packing: side of the square latent patches packed into tokens before the call and unpacked after
            (Flux: 2, ``(B, C, H, W) -> (B, HW/4, 4C)``); 1: none.
        position_ids: keywords of the image and text position ids computed from the latent size and the text
            length (Flux: ``("img_ids", "txt_ids")``), unless given.
        per_sample: keywords whose plain numbers become one value per sample (Flux's ``guidance``).
        nested: dict-valued keywords whose tensors are per sample too (``added_cond_kwargs``).
        unbatched: tensor keywords that are not per sample (Flux's position ids).
        learned_sigma: the network may also predict a variance: when it returns twice the input's channels the
            first half is the prediction (DiT, PixArt, Sana, DeepFloyd IF; as their pipelines do).
        default_size: latent side when the config has no ``sample_size`` (Flux: 128, its pipeline's default).
        blocks: the block lists, in the order ``forward`` runs them.
        cache: how feature caches wrap the blocks; ``None`` when they cannot, and then ``no_cache`` says why.
        no_cache: why a family without a cache layout has none (named in the caches' error).
        ends: the layers that read the noisy input and write the prediction (the patch or input embedding, the
            output projection): quantization keeps them in float by default (:mod:`fewstep.quant`).
    """

    name: str
    sample: str
    cond: tuple[str, ...]
    needs: tuple[Need, ...] = ()
    defaults: tuple[Default, ...] = ()
    refuse: tuple[Refuse, ...] = ()
    timestep: str = "timestep"
    time: str = "native"
    time_scale: str | None = None
    packing: int = 1
    position_ids: tuple[str, str] | None = None
    per_sample: tuple[str, ...] = ()
    nested: tuple[str, ...] = ()
    unbatched: tuple[str, ...] = ()
    learned_sigma: bool = False
    default_size: int | None = None
    blocks: tuple[Blocks, ...] = ()
    cache: CacheLayout | None = None
    no_cache: str = ""
    ends: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.time not in ("native", "unit"):
            raise ValueError(f"time must be 'native' or 'unit', got {self.time!r}")
        if (self.cache is None) == (not self.no_cache):
            raise ValueError(f"{self.name}: give a cache layout or the reason it has none (no_cache=), not both")
        if self.cache is not None and not self.blocks:
            raise ValueError(f"{self.name}: a cache layout needs the block lists (blocks=)")
        if self.cache is not None and self.cache.kind == "chain" and len({b.returns for b in self.blocks}) != 1:
            raise ValueError(f"{self.name}: every block list of a chain returns the same streams")

    # -- reading a model's configuration -------------------------------------------------------------------------

    def check(self, model: Any) -> None:
        """Refuse a configuration of this class that fewstep cannot drive."""
        for rule in self.refuse:
            if rule.when.holds(model):
                raise ValueError(f"{self.name} with {rule.when.name}={setting(model, rule.when.name)!r} is not "
                                 f"supported: {rule.reason}")

    def required(self, model: Any) -> tuple[str, ...]:
        """The conditioning keys (dotted into nested dicts) this model needs on every call."""
        return tuple(n.key for n in self.needs if n.when is None or n.when.holds(model))

    def default_cond(self, model: Any) -> dict[str, Any]:
        """The conditioning this model gets unless the caller gives it."""
        return {d.key: d.make(model) for d in self.defaults if d.when is None or d.when.holds(model)}

    def sample_shape(self, model: Any) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the denoiser's state (for Flux the unpacked latent)."""
        channels = int(setting(model, "in_channels")) // (self.packing * self.packing)
        size = setting(model, "sample_size") or self.default_size
        if size is None:
            raise ValueError(f"{self.name} config has no sample_size; pass shape= yourself")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return channels, int(height), int(width)

    def image_seq_len(self, model: Any, height: int, width: int) -> int:
        """Image tokens of a ``height x width`` latent, as pipelines count them for dynamic flow shifting
        (Flux: its 2x2 packed tokens; SD3 and other patch transformers: ``patch_size`` patches)."""
        p = self.packing if self.packing > 1 else int(setting(model, "patch_size") or 1)
        return (int(height) // p) * (int(width) // p)

    def native_time(self, model: Any, schedule: NoiseSchedule,
                    scheduler_time: Callable[[float], float]) -> Callable[[float], float]:
        """What the network takes at continuous time ``t``, given the timestep its scheduler feeds
        (``scheduler_time``, :func:`~fewstep.models.scheduler_config.native_time_from_config`)."""
        if self.time == "unit":
            if not isinstance(schedule, RectifiedFlow):
                raise ValueError(f"{self.name} takes flow time sigma in [0, 1]; it needs a flow-matching scheduler "
                                 f"config (FlowMatchEulerDiscreteScheduler), got a {type(schedule).__name__} schedule")
            return schedule.sigma  # the (shifted) flow sigma itself, not sigma * N
        scale = 1.0 if self.time_scale is None else float(setting(model, self.time_scale) or 1.0)
        if scale == 1.0:
            return scheduler_time
        return lambda t: scheduler_time(t) * scale  # as Sana's pipeline scales the scheduler's timestep

    # -- the call ------------------------------------------------------------------------------------------------

    def call(self, net: Callable[..., Any], x: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, Any],
             *, required: tuple[str, ...] = ()) -> torch.Tensor:
        """The network's prediction for ``x`` (``(B, C, H, W)``, in the network's dtype) at ``timestep``
        (``(B,)``), called with this family's keywords, as its pipeline calls it.

        ``net`` is the diffusers module or a stand-in with the same keywords (a feature cache). Conditioning
        tensors of batch 1 are broadcast to ``B`` (prompt embeddings computed once for many seeds); floating ones
        are cast to ``x``'s dtype and device. Keys in ``required`` are checked before the network runs.
        """
        if x.ndim != 4:
            raise ValueError(f"{self.name} takes (B, C, H, W) latents, got shape {tuple(x.shape)}")
        batch = x.shape[0]
        unknown = sorted(set(cond) - set(self.cond))
        if unknown:
            raise ValueError(f"{self.name} takes no conditioning {unknown}; it takes {', '.join(self.cond)}")
        for key in required:
            head, _, tail = key.partition(".")
            value = cond.get(head)
            if tail and isinstance(value, Mapping):
                value = value.get(tail)
            if value is None:
                raise ValueError(f"{self.name} needs conditioning {key!r} (pass it in cond); got "
                                 f"{sorted(k for k, v in cond.items() if v is not None) or 'none'}")
        kwargs = {k: self._per_sample(k, v, batch, x) for k, v in cond.items()}
        channels, height, width = x.shape[-3:]
        if self.packing > 1:
            p = self.packing
            if height % p or width % p:
                raise ValueError(f"{self.name} packs {p}x{p} latent patches: height and width must be multiples of "
                                 f"{p}, got {height}x{width}")
            x = x.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
            x = x.reshape(batch, (height // p) * (width // p), channels * p * p)
        if self.position_ids is not None:
            img_key, txt_key = self.position_ids
            if kwargs.get(img_key) is None:
                kwargs[img_key] = _image_ids(height // self.packing, width // self.packing, x)
            if kwargs.get(txt_key) is None:
                text = kwargs.get("encoder_hidden_states")
                length = 0 if text is None else text.shape[1]
                kwargs[txt_key] = torch.zeros(length, 3).to(device=x.device, dtype=x.dtype)
        out = net(**{self.sample: x, self.timestep: timestep, **kwargs})
        if not isinstance(out, torch.Tensor):
            out = out.sample if hasattr(out, "sample") else out[0]
        if self.packing > 1:
            p = self.packing
            c = out.shape[-1] // (p * p)
            out = out.reshape(batch, height // p, width // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
            out = out.reshape(batch, c, height, width)
        if self.learned_sigma and out.shape[1] == 2 * channels:
            out = out[:, :channels]  # the variance half is not used by these samplers
        return out

    def _per_sample(self, key: str, value: Any, batch: int, x: torch.Tensor) -> Any:
        if key in self.per_sample and isinstance(value, int | float) and not isinstance(value, bool):
            return torch.full((batch,), float(value), dtype=torch.float32, device=x.device)
        if key in self.nested and isinstance(value, Mapping):
            return {k: _broadcast(f"{key}.{k}", v, batch, x) for k, v in value.items()}
        if key in self.unbatched:
            return _cast(value, x)
        return _broadcast(key, value, batch, x)


def _cast(value: Any, x: torch.Tensor) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        return value.to(device=x.device, dtype=x.dtype)
    return value.to(device=x.device)


def _broadcast(key: str, value: Any, batch: int, x: torch.Tensor) -> Any:
    """A per-sample tensor of batch 1 expanded to ``batch``; batch ``batch`` as is; any other batch refused."""
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        return _cast(value, x)
    if value.shape[0] == batch:
        return _cast(value, x)
    if value.shape[0] == 1:
        return _cast(value.expand(batch, *value.shape[1:]), x)
    raise ValueError(f"conditioning {key!r} has batch {value.shape[0]}; expected 1 (broadcast) or {batch} "
                     f"(one per sample)")


def _image_ids(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """Flux's latent position ids: ``(rows * cols, 3)`` with (0, row, column), as its pipeline builds them."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(rows)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=like.device, dtype=like.dtype)


# -- the families -------------------------------------------------------------------------------------------------

_UNET_DOWN = Blocks("down_blocks", ("hidden_states", "temb", "encoder_hidden_states*"),
                    ("hidden_states", "res_hidden_states_tuple"))
_UNET_MID = Blocks("mid_block", ("hidden_states", "temb", "encoder_hidden_states*"), ("hidden_states",), single=True)
_UNET_UP = Blocks("up_blocks", ("hidden_states", "res_hidden_states_tuple", "temb", "encoder_hidden_states*",
                                "upsample_size"), ("hidden_states",))
_BASIC_BLOCKS = Blocks("transformer_blocks", ("hidden_states", "attention_mask", "encoder_hidden_states",
                                              "encoder_attention_mask", "timestep", "cross_attention_kwargs",
                                              "class_labels"), ("hidden_states",))
_JOINT_TAKES = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "joint_attention_kwargs")
_UNET_CACHE = CacheLayout("unet")
_CHAIN_CACHE = CacheLayout("chain")
_CLASS_NEEDS = (Need("class_labels", When("num_class_embeds")), Need("class_labels", When("class_embed_type")))

_ALL = (
    ModelFamily(
        name="UNet2DModel",
        sample="sample",
        cond=("class_labels",),
        needs=_CLASS_NEEDS,
        blocks=(_UNET_DOWN, _UNET_MID, _UNET_UP),
        cache=_UNET_CACHE,
        ends=("conv_in", "conv_out"),
    ),
    ModelFamily(  # SD 1.x/2.x; SDXL (added_cond_kwargs text_embeds + time_ids); DeepFloyd IF (learned sigma)
        name="UNet2DConditionModel",
        sample="sample",
        cond=("encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask", "cross_attention_kwargs",
              "added_cond_kwargs", "encoder_attention_mask", "down_block_additional_residuals",
              "mid_block_additional_residual", "down_intrablock_additional_residuals"),
        needs=(Need("encoder_hidden_states"), *_CLASS_NEEDS,
               Need("added_cond_kwargs.text_embeds", When("addition_embed_type", "text_time")),
               Need("added_cond_kwargs.time_ids", When("addition_embed_type", "text_time"))),
        nested=("added_cond_kwargs",),
        learned_sigma=True,
        blocks=(_UNET_DOWN, _UNET_MID, _UNET_UP),
        cache=CacheLayout("unet", refused=("down_block_additional_residuals", "mid_block_additional_residual",
                                           "down_intrablock_additional_residuals")),
        ends=("conv_in", "conv_out"),
    ),
    ModelFamily(  # class-conditional; the label table has a null class at index num_classes (class dropout)
        name="DiTTransformer2DModel",
        sample="hidden_states",
        cond=("class_labels", "cross_attention_kwargs"),
        needs=(Need("class_labels"),),
        defaults=(Default("class_labels", lambda m: torch.tensor(int(m.config.num_embeds_ada_norm)),
                          When("num_embeds_ada_norm")),),
        learned_sigma=True,
        blocks=(_BASIC_BLOCKS,),
        cache=_CHAIN_CACHE,
        ends=("pos_embed.proj", "proj_out_2"),
    ),
    ModelFamily(
        name="PixArtTransformer2DModel",
        sample="hidden_states",
        cond=("encoder_hidden_states", "encoder_attention_mask", "attention_mask", "added_cond_kwargs",
              "cross_attention_kwargs"),
        needs=(Need("encoder_hidden_states"),
               Need("added_cond_kwargs.resolution", When("use_additional_conditions")),
               Need("added_cond_kwargs.aspect_ratio", When("use_additional_conditions"))),
        defaults=(Default("added_cond_kwargs", lambda m: {"resolution": None, "aspect_ratio": None},
                          When("use_additional_conditions", False)),),
        nested=("added_cond_kwargs",),
        learned_sigma=True,
        blocks=(_BASIC_BLOCKS,),
        cache=_CHAIN_CACHE,
        ends=("pos_embed.proj", "proj_out"),
    ),
    ModelFamily(
        name="SD3Transformer2DModel",
        sample="hidden_states",
        cond=("encoder_hidden_states", "pooled_projections", "joint_attention_kwargs", "skip_layers",
              "block_controlnet_hidden_states"),
        needs=(Need("encoder_hidden_states"), Need("pooled_projections")),
        blocks=(Blocks("transformer_blocks", ("hidden_states", "encoder_hidden_states", "temb",
                                              "joint_attention_kwargs"), ("encoder_hidden_states", "hidden_states")),),
        cache=CacheLayout("chain", refused=("skip_layers", "block_controlnet_hidden_states")),
        ends=("pos_embed.proj", "proj_out"),
    ),
    ModelFamily(
        name="FluxTransformer2DModel",
        sample="hidden_states",
        cond=("encoder_hidden_states", "pooled_projections", "guidance", "img_ids", "txt_ids",
              "joint_attention_kwargs", "controlnet_block_samples", "controlnet_single_block_samples",
              "controlnet_blocks_repeat"),
        needs=(Need("encoder_hidden_states"), Need("pooled_projections"), Need("guidance", When("guidance_embeds"))),
        time="unit",
        packing=2,
        position_ids=("img_ids", "txt_ids"),
        per_sample=("guidance",),
        unbatched=("img_ids", "txt_ids"),
        default_size=128,
        blocks=(Blocks("transformer_blocks", _JOINT_TAKES, ("encoder_hidden_states", "hidden_states")),
                Blocks("single_transformer_blocks", _JOINT_TAKES, ("encoder_hidden_states", "hidden_states"))),
        cache=CacheLayout("chain", unbatched=frozenset({"image_rotary_emb"}),
                          refused=("controlnet_block_samples", "controlnet_single_block_samples")),
        ends=("x_embedder", "proj_out"),
    ),
    ModelFamily(
        name="SanaTransformer2DModel",
        sample="hidden_states",
        cond=("encoder_hidden_states", "encoder_attention_mask", "attention_mask", "attention_kwargs",
              "controlnet_block_samples"),
        needs=(Need("encoder_hidden_states"),),
        refuse=(Refuse(When("guidance_embeds"), "Sana-Sprint's guidance embedding and SCM (TrigFlow) time are not "
                                                "a diffusion schedule fewstep knows"),),
        time_scale="timestep_scale",
        learned_sigma=True,
        blocks=(Blocks("transformer_blocks", ("hidden_states", "attention_mask", "encoder_hidden_states",
                                              "encoder_attention_mask", "timestep", "height", "width"),
                       ("hidden_states",)),),
        no_cache="its blocks take the latent height and width, and no test pins them yet",
        ends=("patch_embed.proj", "proj_out"),
    ),
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in _ALL}


def family_of(model: Any) -> ModelFamily:
    """The family of a diffusers model (an instance, its class, or the class name); a ``ValueError`` naming the
    supported classes for any other."""
    if isinstance(model, str):
        names = [model]
    else:
        cls = model if isinstance(model, type) else type(model)
        names = [c.__name__ for c in cls.__mro__]
    for name in names:
        if name in FAMILIES:
            return FAMILIES[name]
    raise ValueError(f"unsupported diffusers model class {names[0]!r}; fewstep calls {', '.join(FAMILIES)}")
