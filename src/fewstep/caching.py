"""Model-side acceleration that reuses features across steps: DeepCache, encoder propagation (Faster Diffusion),
a first-block-residual cache for diffusion transformers, and calibration of the cache for a solver and budget.

Each method is a :class:`~fewstep.models.Denoiser` wrapping a :class:`~fewstep.models.ModelDenoiser`: solvers
never hear of it. The cache lives in a per-run copy made by ``for_run`` inside ``sample()``: nothing is shared
between runs or threads. The networks are diffusers modules, driven block by block through their own submodules
(diffusers is not edited); a cache that never reuses reproduces the network's output bit for bit (tested).

Reuse decisions go by grid step: each evaluation belongs to the grid time nearest to it (Heun's second evaluation
of step ``i`` belongs to step ``i + 1``; DPM-Solver-2's midpoints to the nearer end), and an evaluation at a reused
step uses the features of the last fully computed one. Hooks with ``on_cache(step, reused, work)``
(:class:`CacheStats`) hear every evaluation.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from fewstep.models.adapter import ModelDenoiser
from fewstep.models.base import Cond, Denoiser, Run

__all__ = ["BlockCache", "CacheStats", "DeepCache", "EncoderPropagation", "cache_error", "cache_from_spec",
           "calibrate_cache", "full_steps", "make_cache"]


class CacheStats:
    """Counts evaluations of the last run: ``full`` and ``reused`` (per grid step in ``steps``), and ``work``,
    the summed fraction of the network actually computed (1 per full evaluation)."""

    def __init__(self) -> None:
        self.full = self.reused = 0
        self.work = 0.0
        self.steps: list[tuple[int, bool]] = []

    def on_start(self, grid: torch.Tensor) -> None:
        self.full = self.reused = 0
        self.work = 0.0
        self.steps = []

    def on_cache(self, step: int, reused: bool, work: float) -> None:
        self.reused += int(reused)
        self.full += int(not reused)
        self.work += work
        self.steps.append((step, reused))

    @property
    def mean_work(self) -> float:
        """Mean fraction of the network computed per evaluation (1 when nothing was reused or nothing ran)."""
        calls = self.full + self.reused
        return self.work / calls if calls else 1.0

    @property
    def reused_steps(self) -> list[int]:
        return sorted({s for s, r in self.steps if r})


def full_steps(steps: int, interval: int, schedule: str = "uniform", *, power: float = 2.0) -> list[int]:
    """Grid steps computed in full, about one in ``interval``.

    ``"uniform"``: ``0, interval, 2 interval, ...`` (DeepCache's uniform 1:N). ``"nonuniform"``: the same count of
    full steps placed at ``round((steps - 1) (i/m)^power)``, denser early, where features change fastest at few
    steps (the key-step placement of Faster Diffusion and DeepCache's non-uniform variant, without their tuned
    constants). Step 0 is always full."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be an int >= 1, got {interval!r}")
    if schedule == "uniform":
        return list(range(0, steps, interval))
    if schedule != "nonuniform":
        raise ValueError(f"schedule must be 'uniform' or 'nonuniform', got {schedule!r}")
    m = max(1, math.ceil(steps / interval))
    out: list[int] = []
    for i in range(m):  # distinct, increasing
        pos = round((steps - 1) * (i / m) ** power)
        out.append(max(pos, out[-1] + 1) if out else 0)
    return [p for p in out if p < steps]


# -- driving diffusers U-Nets block by block --------------------------------------------------------------------

class _UNet:
    """``UNet2DModel`` / ``UNet2DConditionModel`` run in pieces with their own submodules, exactly as their
    ``forward`` does (for the features used here: no skip blocks, ControlNet/adapter residuals, attention masks,
    GLIGEN or added embeddings; refused with a clear error)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        name = type(unet).__name__
        if name not in ("UNet2DModel", "UNet2DConditionModel"):
            raise TypeError(f"this cache needs a diffusers UNet2DModel or UNet2DConditionModel with skip branches; "
                            f"got {name}")
        if any(hasattr(b, "skip_conv") for b in [*unet.down_blocks, *unet.up_blocks]):
            raise TypeError(f"{name} with skip-sample blocks (SkipDownBlock2D, ...) is not supported")
        cfg = unet.config
        if getattr(cfg, "addition_embed_type", None) is not None:
            raise TypeError(f"{name} with addition_embed_type={cfg.addition_embed_type!r} is not supported")
        self.unet, self.conditional = unet, name == "UNet2DConditionModel"

    def embed(self, sample: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]) -> tuple[
        torch.Tensor, torch.Tensor, dict[str, Any]
    ]:
        """``(sample, emb, extra)``: the (centred) input, the time embedding and block keyword arguments."""
        u = self.unet
        allowed = {"encoder_hidden_states", "class_labels", "timestep_cond"} if self.conditional else {"class_labels"}
        extra_keys = set(cond) - allowed
        if extra_keys:
            raise TypeError(f"conditioning {sorted(extra_keys)} is not supported by the cache")
        if u.config.center_input_sample:
            sample = 2 * sample - 1.0
        if self.conditional:
            t_emb = u.get_time_embed(sample=sample, timestep=timestep)
            emb = u.time_embedding(t_emb, cond.get("timestep_cond"))
            class_emb = u.get_class_embed(sample=sample, class_labels=cond.get("class_labels"))
            if class_emb is not None:
                emb = torch.cat([emb, class_emb], dim=-1) if u.config.class_embeddings_concat else emb + class_emb
            if u.time_embed_act is not None:
                emb = u.time_embed_act(emb)
            ehs = u.process_encoder_hidden_states(encoder_hidden_states=cond.get("encoder_hidden_states"),
                                                  added_cond_kwargs=None)
            return sample, emb, {"encoder_hidden_states": ehs}
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
        emb = u.time_embedding(u.time_proj(timesteps).to(dtype=u.dtype))
        if u.class_embedding is not None:
            labels = cond.get("class_labels")
            if labels is None:
                raise ValueError("class_labels should be provided when doing class conditioning")
            if u.config.class_embed_type == "timestep":
                labels = u.time_proj(labels)
            emb = emb + u.class_embedding(labels).to(dtype=u.dtype)
        return sample, emb, {"timesteps": timesteps}

    def _block(self, block: torch.nn.Module, sample: torch.Tensor, emb: torch.Tensor, extra: dict[str, Any],
               **kw: Any) -> Any:
        if self.conditional and getattr(block, "has_cross_attention", False):
            return block(hidden_states=sample, temb=emb, encoder_hidden_states=extra["encoder_hidden_states"], **kw)
        if "res_hidden_states_tuple" in kw:
            return block(hidden_states=sample, temb=emb, **kw)
        return block(hidden_states=sample, temb=emb)

    def down(self, sample: torch.Tensor, emb: torch.Tensor, extra: dict[str, Any], upto: int | None = None) -> tuple[
        torch.Tensor, list[torch.Tensor]
    ]:
        """``conv_in`` and down blocks ``0..upto`` (all by default): the last output and every residual."""
        sample = self.unet.conv_in(sample)
        res = [sample]
        blocks = self.unet.down_blocks if upto is None else self.unet.down_blocks[: upto + 1]
        for block in blocks:
            sample, block_res = self._block(block, sample, emb, extra)
            res.extend(block_res)
        return sample, res

    def mid(self, sample: torch.Tensor, emb: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        block = self.unet.mid_block
        if block is None:
            return sample
        if self.conditional and getattr(block, "has_cross_attention", False):
            return block(sample, emb, encoder_hidden_states=extra["encoder_hidden_states"])
        return block(sample, emb)

    def up(self, sample: torch.Tensor, res: list[torch.Tensor], emb: torch.Tensor, extra: dict[str, Any],
           start: int = 0, record: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Up blocks ``start..`` consuming ``res`` from its end; also returns the input of up block ``record``."""
        u = self.unet
        factor = 2 ** (len(u.up_blocks) - 1) if self.conditional else None
        forward_size = factor is not None and any(d % factor for d in res[0].shape[-2:])
        res = list(res)
        recorded = None
        for i in range(start, len(u.up_blocks)):
            block = u.up_blocks[i]
            if i == record:
                recorded = sample
            n = len(block.resnets)
            block_res, res = tuple(res[-n:]), res[:-n]
            kw: dict[str, Any] = {"res_hidden_states_tuple": block_res}
            if self.conditional:
                kw["upsample_size"] = res[-1].shape[2:] if forward_size and i < len(u.up_blocks) - 1 else None
            sample = self._block(block, sample, emb, extra, **kw)
        return sample, recorded

    def head(self, sample: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        u = self.unet
        if getattr(u, "conv_norm_out", None) is not None:
            sample = u.conv_act(u.conv_norm_out(sample))
        sample = u.conv_out(sample)
        if not self.conditional and u.config.time_embedding_type == "fourier":
            ts = extra["timesteps"]
            sample = sample / ts.reshape((sample.shape[0], *([1] * len(sample.shape[1:]))))
        return sample


class _Bound(Denoiser):
    """A per-run copy of ``den`` whose network call goes through the caching ``net`` (dtype, native time and the
    prediction conversion unchanged); tells ``net`` the continuous time of each evaluation."""

    def __init__(self, den: ModelDenoiser, net: _CachedNet) -> None:
        self.den = copy.copy(den)
        self.den.model = net
        self.net, self.schedule = net, den.schedule

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        self.net.t_of_call = t
        return self.den(x, t, cond)


def _macs_share(net: torch.nn.Module, parts: Sequence[torch.nn.Module], probe: Callable[[], Any]) -> float:
    """Share of the multiply-accumulates of ``net`` (convolutions and linear layers, counted on one probe forward)
    spent in the modules ``parts``."""
    macs: dict[int, int] = {}
    handles = []
    for mod in net.modules():
        if isinstance(mod, torch.nn.Conv2d | torch.nn.Linear):
            def hook(m: torch.nn.Module, inp: Any, out: torch.Tensor) -> None:
                per_out = m.in_features if isinstance(m, torch.nn.Linear) else (
                    m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
                macs[id(m)] = macs.get(id(m), 0) + out.numel() * per_out
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            probe()
    finally:
        for h in handles:
            h.remove()
    total = sum(macs.values())
    inside = {id(m) for part in parts for m in part.modules()}
    return sum(v for k, v in macs.items() if k in inside) / max(total, 1)


def _unet_probe(unet: torch.nn.Module) -> Callable[[], Any]:
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    x = torch.zeros(1, cfg.in_channels, size, size, dtype=unet.dtype)
    if type(unet).__name__ == "UNet2DConditionModel":
        ehs = torch.zeros(1, 1, cfg.cross_attention_dim, dtype=unet.dtype)
        return lambda: unet(x, torch.tensor([1]), encoder_hidden_states=ehs)
    return lambda: unet(x, torch.tensor([1]))


def _inner(den: Denoiser, attr: str) -> ModelDenoiser:
    if not isinstance(den, ModelDenoiser):
        raise TypeError(f"{attr} wraps a fewstep ModelDenoiser around a diffusers network (e.g. from_diffusers or "
                        f"fewstep.zoo.load); got {type(den).__name__}")
    return den


class _CachedNet:
    """Base of the per-run networks: the run (grid, hooks), the time of the current evaluation, and the grid steps
    computed in full (``None`` when the method decides per evaluation). A net stands in for the diffusers module, so
    it takes that module's keywords (the model family calls it by keyword)."""

    def __init__(self, method: _Cache, run: Run, full: set[int] | None = None) -> None:
        self.method, self.run, self.full = method, run, full
        self.t_of_call = 0.0

    def step_now(self) -> int:
        return self.run.step_of(self.t_of_call)

    def reuses(self, step: int, cached: torch.Tensor | None, batch: int) -> bool:
        """Whether this evaluation reuses: a scheduled reuse step with a cache of the same batch."""
        return step not in self.full and cached is not None and cached.shape[0] == batch


class _Cache(Denoiser):
    """A cache around a :class:`ModelDenoiser`: lives only in runs (``for_run`` binds a fresh ``_CachedNet``)."""

    net_class: type[_CachedNet]

    def __init__(self, den: Denoiser) -> None:
        self.den = _inner(den, type(self).__name__)
        self.schedule = self.den.schedule
        self.required_cond = self.den.required_cond

    def _net(self, run: Run) -> _CachedNet:
        return self.net_class(self, run)

    def for_run(self, run: Run) -> Denoiser:
        return _Bound(self.den, self._net(run))

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        raise TypeError("a cache lives in one run: call it through fewstep.sample()")


class _ScheduledCache(_Cache):
    """A U-Net cache whose full steps follow a schedule (:func:`full_steps`) or an explicit list."""

    def __init__(self, den: Denoiser, interval: int, schedule: str, full: Sequence[int] | None) -> None:
        super().__init__(den)
        self.unet = _UNet(self.den.model)
        full_steps(8, interval, schedule)  # validates
        self.interval, self.schedule_name = interval, schedule
        self.full = None if full is None else sorted({int(s) for s in full} | {0})

    def _net(self, run: Run) -> _CachedNet:
        steps = max(len(run.times) - 1, 1)
        full = self.full if self.full is not None else full_steps(steps, self.interval, self.schedule_name)
        return self.net_class(self, run, set(full))


class DeepCache(_ScheduledCache):
    """DeepCache: on a full step, run the U-Net and keep the input of up block ``U - 1 - branch`` (the deep
    features); on a reuse step run only the shallow branch — ``conv_in``, down blocks ``0..branch``, up blocks
    ``U - 1 - branch..`` and the head — with the cached deep features. ``branch=0`` reuses the most (only the
    outermost skip level is recomputed).

    Full steps: :func:`full_steps` (``interval``, ``schedule="uniform"`` or ``"nonuniform"``) or an explicit
    ``full=[...]`` list of grid steps. ``interval=1`` never reuses and equals the model bit for bit.

    References: *DeepCache: Accelerating Diffusion Models for Free* (Ma, Fang, Wang, CVPR 2024).
    """

    def __init__(self, den: Denoiser, *, interval: int = 3, branch: int = 0, schedule: str = "uniform",
                 full: Sequence[int] | None = None) -> None:
        super().__init__(den, interval, schedule, full)
        u = self.den.model
        n_up = len(u.up_blocks)
        if not 0 <= branch < n_up - 1:
            raise ValueError(f"branch must be in [0, {n_up - 2}] for a U-Net with {n_up} up blocks (a model "
                             f"without a deeper branch to skip cannot use DeepCache)")
        self.branch = branch
        self.reuse_work = _macs_share(u, [u.conv_in, *u.down_blocks[: branch + 1], *u.up_blocks[n_up - 1 - branch:],
                                          u.conv_out], _unet_probe(u))


class _DeepCacheNet(_CachedNet):
    method: DeepCache

    def __init__(self, method: DeepCache, run: Run, full: set[int]) -> None:
        super().__init__(method, run, full)
        self.cached: torch.Tensor | None = None

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        u, b = self.method.unet, self.method.branch
        step = self.step_now()
        n_up = len(u.unet.up_blocks)
        reuse = self.reuses(step, self.cached, sample.shape[0])
        sample, emb, extra = u.embed(sample, timestep, cond)
        if reuse:
            _, res = u.down(sample, emb, extra, upto=b)
            needed = sum(len(u.unet.up_blocks[i].resnets) for i in range(n_up - 1 - b, n_up))
            out, _ = u.up(self.cached, res[:needed], emb, extra, start=n_up - 1 - b)
        else:
            deep, res = u.down(sample, emb, extra)
            deep = u.mid(deep, emb, extra)
            out, self.cached = u.up(deep, res, emb, extra, record=n_up - 1 - b)
        self.run.report("on_cache", step, reuse, self.method.reuse_work if reuse else 1.0)
        return u.head(out, extra)


DeepCache.net_class = _DeepCacheNet


class EncoderPropagation(_ScheduledCache):
    """Encoder propagation (Faster Diffusion): on key steps run the whole U-Net and keep the encoder's outputs
    (every down-block residual and the mid block's output); on the other steps run only the decoder (up blocks and
    head) on the cached encoder features with the current time embedding. Key steps: :func:`full_steps`
    (``schedule="nonuniform"`` by default, denser early as in the paper) or an explicit ``full=[...]``.

    References: *Faster Diffusion: Rethinking the Role of the Encoder for Diffusion Model Inference* (Li et al.,
    NeurIPS 2024).
    """

    def __init__(self, den: Denoiser, *, interval: int = 2, schedule: str = "nonuniform",
                 full: Sequence[int] | None = None) -> None:
        super().__init__(den, interval, schedule, full)
        u = self.den.model
        self.reuse_work = _macs_share(u, [*u.up_blocks, u.conv_out], _unet_probe(u))


class _EncoderNet(_CachedNet):
    method: EncoderPropagation

    def __init__(self, method: EncoderPropagation, run: Run, full: set[int]) -> None:
        super().__init__(method, run, full)
        self.deep: torch.Tensor | None = None  # the mid block's output
        self.res: list[torch.Tensor] = []  # the encoder's residuals

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        u = self.method.unet
        step = self.step_now()
        reuse = self.reuses(step, self.deep, sample.shape[0])
        sample, emb, extra = u.embed(sample, timestep, cond)
        if not reuse:
            deep, self.res = u.down(sample, emb, extra)
            self.deep = u.mid(deep, emb, extra)
        out, _ = u.up(self.deep, self.res, emb, extra)
        self.run.report("on_cache", step, reuse, self.method.reuse_work if reuse else 1.0)
        return u.head(out, extra)


EncoderPropagation.net_class = _EncoderNet


# -- transformers: first-block-residual cache ------------------------------------------------------------------

class BlockCache(_Cache):
    """First-block-residual cache for diffusion transformers (diffusers ``DiTTransformer2DModel``).

    Every evaluation runs the patch embedding and the first block, ``r = block_0(h) - h``. For each sample, when
    the relative change ``mean|r - r_ref| / mean|r_ref|`` against the residual of its last full evaluation is
    below ``threshold`` (and at least ``warmup`` grid steps are done, and fewer than ``max_reuse`` evaluations in a
    row reused), the remaining blocks are skipped and their cached residual ``h_L - h_1`` is added instead;
    otherwise they run (on those samples only) and the cache is refreshed. Decisions are per sample, so sample
    ``k`` is the same in any batch. ``threshold=0`` never reuses and equals the model bit for bit.

    The threshold is what users hand-tune; :func:`calibrate_cache` picks it for a solver, step count and target
    error. References: first-block cache (ParaAttention's FBCache, cache-dit's DBCache F1B0); *HarmoniCa:
    Harmonizing Training and Inference for Better Feature Caching in Diffusion Transformer Acceleration* (Huang et
    al., 2024) for learning-free vs learned reuse schedules.
    """

    def __init__(self, den: Denoiser, *, threshold: float = 0.05, warmup: int = 1, max_reuse: int = 3) -> None:
        super().__init__(den)
        net = self.den.model
        if type(net).__name__ != "DiTTransformer2DModel":
            raise TypeError(f"BlockCache drives a diffusers DiTTransformer2DModel; got {type(net).__name__}")
        if len(net.transformer_blocks) < 2:
            raise ValueError("BlockCache needs at least two transformer blocks")
        if isinstance(threshold, bool) or not threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {threshold!r}")
        if warmup < 0 or max_reuse < 0:
            raise ValueError("warmup and max_reuse must be >= 0")
        self.threshold, self.warmup, self.max_reuse = float(threshold), int(warmup), int(max_reuse)


class _BlockCacheNet(_CachedNet):
    method: BlockCache

    def __init__(self, method: BlockCache, run: Run) -> None:
        super().__init__(method, run)
        self.ref: torch.Tensor | None = None  # first-block residual of each sample's last full evaluation
        self.rest: torch.Tensor | None = None  # residual of blocks 1.. at that evaluation
        self.streak: torch.Tensor | None = None

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None,
                 **cond: Any) -> torch.Tensor:
        x = hidden_states  # named as DiTTransformer2DModel.forward's input: the family calls it by keyword
        if cond:
            raise TypeError(f"conditioning {sorted(cond)} is not supported by BlockCache")
        net, m = self.method.den.model, self.method
        step = self.step_now()
        blocks = net.transformer_blocks
        kw = {"attention_mask": None, "encoder_hidden_states": None, "encoder_attention_mask": None,
              "timestep": timestep, "cross_attention_kwargs": None, "class_labels": class_labels}
        h0 = net.pos_embed(x)
        h1 = blocks[0](h0, **kw)
        r = h1 - h0
        batch = x.shape[0]
        if self.ref is None or self.ref.shape != r.shape or step < m.warmup or m.threshold == 0:
            reuse = torch.zeros(batch, dtype=torch.bool)
        else:
            change = (r - self.ref).abs().flatten(1).mean(1) / self.ref.abs().flatten(1).mean(1).clamp_min(1e-12)
            reuse = (change < m.threshold) & (self.streak < m.max_reuse)
        compute = (~reuse).nonzero().flatten()
        h = h1.clone()
        if compute.numel() > 0:
            sub = h1[compute] if compute.numel() < batch else h1
            sub_kw = dict(kw)
            if compute.numel() < batch:
                sub_kw["timestep"] = timestep[compute] if timestep.ndim else timestep
                if class_labels is not None and class_labels.ndim:
                    sub_kw["class_labels"] = class_labels[compute]
            out = sub
            for block in blocks[1:]:
                out = block(out, **sub_kw)
            if self.ref is None or self.ref.shape != r.shape:
                self.ref, self.rest = r.clone(), torch.zeros_like(r)
                self.streak = torch.zeros(batch, dtype=torch.long)
            self.ref[compute] = r[compute]
            self.rest[compute] = out - sub
            h[compute] = out
        if bool(reuse.any()):
            idx = reuse.nonzero().flatten()
            h[idx] = h1[idx] + self.rest[idx]
        self.streak = torch.where(reuse, self.streak + 1, torch.zeros_like(self.streak))
        work = (1 + (len(blocks) - 1) * compute.numel() / batch) / len(blocks)
        self.run.report("on_cache", step, bool(reuse.all()), work)
        # the head, as DiTTransformer2DModel.forward
        conditioning = blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=h.dtype)
        shift, scale = net.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        h = net.norm_out(h) * (1 + scale[:, None]) + shift[:, None]
        h = net.proj_out_2(h)
        side = int(h.shape[1] ** 0.5)
        p, c = net.patch_size, net.out_channels
        h = h.reshape(-1, side, side, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(-1, c, side * p, side * p)


BlockCache.net_class = _BlockCacheNet


def make_cache(den: Denoiser, method: str, **knobs: Any) -> Denoiser:
    """``method``: ``deepcache``, ``encoder`` (encoder propagation), ``block`` (transformer block cache) or
    ``none``; knobs as the classes take them."""
    methods: dict[str, Callable[..., Denoiser]] = {"deepcache": DeepCache, "encoder": EncoderPropagation,
                                                   "block": BlockCache}
    if method == "none":
        return den
    if method not in methods:
        raise ValueError(f"unknown cache {method!r}; known: none, {', '.join(methods)}, auto")
    try:
        return methods[method](den, **knobs)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise TypeError(f"cache {method!r}: {err}") from None
        raise


@dataclass
class Calibration:
    """What :func:`calibrate_cache` chose and measured."""

    method: str
    knobs: dict[str, Any]
    error: float  # mean per-sample relative error of the final samples vs the uncached model (calibration seeds)
    error_upper: float  # its bootstrap 90th percentile over the calibration samples (what the choice is held to)
    work: float  # mean fraction of the network computed per evaluation
    table: list[tuple[dict[str, Any], float, float, float]] = field(default_factory=list)  # knobs, err, upper, work


def cache_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample relative error ``|a_i - b_i| / |b_i|`` of cached samples ``a`` against uncached ``b``."""
    return (a - b).double().flatten(1).norm(dim=1) / b.double().flatten(1).norm(dim=1).clamp_min(1e-12)


def _rel_err(a: torch.Tensor, b: torch.Tensor, *, boot: int = 400) -> tuple[float, float]:
    """Mean per-sample relative error and the 90th percentile of its bootstrap over samples. (A batch-wide relative
    RMS is dominated by the few samples that switch mode — 30-75 % of it from 5 of 128 samples on the zoo UNet —
    and varies by 2x between seed sets; the per-sample mean varies by about 15 %.)"""
    r = cache_error(a, b)
    g = torch.Generator().manual_seed(0)
    reps = r[torch.randint(0, r.numel(), (boot, r.numel()), generator=g)].mean(1)
    return float(r.mean()), float(torch.quantile(reps, 0.9))


def calibrate_cache(den: Denoiser, solver: Any, steps: int, *, shape: Sequence[int], target_error: float,
                    seeds: str = "1000-1127", method: str | None = None, grid: str = "time_quadratic",
                    cond: Cond = None) -> Calibration:
    """Pick the most aggressive cache setting whose final samples stay within ``target_error`` (mean per-sample
    relative error, :func:`cache_error`) of the uncached model's, for this model, solver and step count, measured
    on ``seeds`` and held to the bootstrap 90th percentile of that error (so it holds on other seeds, not just the
    calibration ones).

    Candidates: DeepCache ``interval`` 2..8 (uniform and nonuniform) for U-Nets; ``threshold`` on a geometric grid
    for transformers (``method`` picks one family). The work fraction is counted (:class:`CacheStats`); the
    returned setting is the one with the least work that meets the target (none: ``interval=1`` / ``threshold=0``,
    i.e. no caching — at few steps caching often cannot pay)."""
    from fewstep.sample import sample

    inner = _inner(den, "calibrate_cache")
    kind = type(inner.model).__name__
    if method is None:
        method = "block" if kind == "DiTTransformer2DModel" else "deepcache"
    if method == "block":
        candidates: list[dict[str, Any]] = [{"threshold": th} for th in (0.5, 0.35, 0.25, 0.18, 0.12, 0.08, 0.05,
                                                                          0.03, 0.02, 0.01)]
    elif method in ("deepcache", "encoder"):
        candidates = [{"interval": k, "schedule": s} for k in range(8, 1, -1) for s in ("uniform", "nonuniform")]
    else:
        raise ValueError(f"unknown cache {method!r}")
    exact = sample(inner, solver, steps, shape=shape, seeds=seeds, grid=grid, cond=cond)
    table = []
    for knobs in candidates:
        stats = CacheStats()
        out = sample(make_cache(inner, method, **knobs), solver, steps, shape=shape, seeds=seeds, grid=grid,
                     cond=cond, hooks=[stats])
        table.append((knobs, *_rel_err(out, exact), stats.mean_work))
    ok = [row for row in table if row[2] <= target_error]
    if not ok:
        base = {"threshold": 0.0} if method == "block" else {"interval": 1, "schedule": "uniform"}
        return Calibration(method, base, 0.0, 0.0, 1.0, table)
    knobs, err, upper, work = min(ok, key=lambda row: (row[3], row[2]))
    return Calibration(method, knobs, err, upper, work, table)


def cache_from_spec(den: Denoiser, spec: str, *, solver: Any, steps: int, shape: Sequence[int],
                    grid: str = "time_quadratic", cond: Cond = None) -> tuple[Denoiser, Calibration | None]:
    """The cache a command-line spec names around ``den``: ``"deepcache:interval=3"``, ``"none"``, or
    ``"auto:target_error=0.05[:method=...]"``, which calibrates it (:func:`calibrate_cache`) for ``solver``,
    ``steps`` and ``grid`` and returns the calibration too."""
    from fewstep.spec import parse_spec

    name, knobs = parse_spec(spec)
    if name != "auto":
        return make_cache(den, name, **knobs), None
    target = float(knobs.pop("target_error", 0.05))
    cal = calibrate_cache(den, solver, steps, shape=shape, target_error=target, grid=grid, cond=cond, **knobs)
    return make_cache(den, cal.method, **cal.knobs), cal
