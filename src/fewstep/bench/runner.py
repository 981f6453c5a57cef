"""Run experiments, measure them, and store the results (resumable)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fewstep.bench.experiment import Experiment
from fewstep.bench.peers import run_diffusers
from fewstep.bench.reference import pf_ode_reference
from fewstep.bench.store import ResultStore
from fewstep.caching import CacheStats
from fewstep.hooks import NFECounter
from fewstep.metrics import DigitsFD, rmse_per_sample, sliced_wasserstein
from fewstep.models.base import Cond, Denoiser, Run
from fewstep.noise import SampleNoise, parse_seeds
from fewstep.plan import place, placement, state_dtype
from fewstep.quant import weights_bytes

__all__ = ["Context", "run_experiment", "run_sweep"]


class _Timed(Denoiser):
    """Accumulates the wall time spent inside the wrapped denoiser (the model time); binds the inner denoiser per
    run (caches) and keeps counting into the same total."""

    def __init__(self, inner: Denoiser, total: list[float] | None = None) -> None:
        self.inner, self.schedule = inner, inner.schedule
        self.total = total if total is not None else [0.0]

    @property
    def seconds(self) -> float:
        return self.total[0]

    def for_run(self, run: Run) -> Denoiser:
        bound = self.inner.for_run(run)
        return self if bound is self.inner else _Timed(bound, self.total)

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.inner(x, t, cond)
        _finish(out)
        self.total[0] += time.perf_counter() - t0
        return out


def _finish(x: torch.Tensor) -> None:
    """Wait for the kernels that make ``x`` (a CUDA device runs them asynchronously): a time taken after this is
    the work's."""
    if isinstance(x, torch.Tensor) and x.is_cuda:
        torch.cuda.synchronize(x.device)


class Context:
    """Per-sweep caches: loaded models (one copy per device and dtype), starting noise, references (also stored in
    the DB), the float network's samples that quantized experiments are compared with, and the FD metric."""

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self._models: dict[tuple[str, str, str], Any] = {}
        self._fd: DigitsFD | None = None
        self._floors: dict[int, float] = {}
        self._unquantized: dict[str, torch.Tensor] = {}

    def model(self, name: str, *, device: str = "cpu", dtype: str = "float32") -> Any:
        """Model ``name``'s denoiser, its network on ``device`` in ``dtype``."""
        key = (name, device, dtype)
        if key not in self._models:
            from fewstep.zoo import load

            den = load(name)
            torch_dtype, torch_device = placement(dtype, device)
            place(den, torch_device, torch_dtype)
            self._models[key] = den
        return self._models[key]

    def x_init(self, exp: Experiment) -> torch.Tensor:
        """The starting noise of ``exp``'s seeds, on its device in its state's dtype."""
        return self._noise(exp.model, exp.seeds, device=exp.device, dtype=exp.dtype)

    def _noise(self, model: str, seeds: str, *, device: str, dtype: str) -> torch.Tensor:
        den = self.model(model)
        s = den.schedule
        shape = den.sample_shape
        z = SampleNoise(parse_seeds(seeds), shape, device=device, dtype=state_dtype(dtype)).draw()
        return z * s.prior_std(s.t_max)

    def reference(self, exp: Experiment) -> torch.Tensor:
        """The PF-ODE reference of ``exp``'s model, seeds and conditioning, solved once for every sweep on the
        store: the solve is claimed like an experiment, and a sweep that finds it claimed by another live one waits
        for it. It is one for every device and dtype: the float32 network on the CPU from float32 noise. Its store
        key is the seeds, and the conditioning source's fingerprint after ``|`` when the row has one."""
        seeds = exp.seeds if exp.conditioning is None else f"{exp.seeds}|{exp.conditioning.fingerprint}"
        token = _Token(f"reference:{exp.model}:{seeds}")
        while True:
            cached = self.store.reference(exp.model, seeds)
            if cached is not None:
                return cached[0]
            if self.store.claim(token) == "busy":  # type: ignore[arg-type]
                time.sleep(0.5)
                continue
            try:
                cached = self.store.reference(exp.model, seeds)  # another sweep may have stored it since we looked
                if cached is not None:
                    return cached[0]
                den = self.model(exp.model)
                x_start = self._noise(exp.model, exp.seeds, device="cpu", dtype="float32")
                ref, nfe = pf_ode_reference(den, x_start, den.schedule.t_max, cond=self.cond(exp, den))
                self.store.put_reference(exp.model, seeds, ref, nfe)
            finally:
                self.store.release(token)  # type: ignore[arg-type]
            return ref

    @staticmethod
    def cond(exp: Experiment, den: Denoiser) -> Cond:
        """The conditioning of ``exp``'s seeds (its source's; ``None``: the model's default)."""
        source = exp.conditioning
        return None if source is None else source.cond(den, len(parse_seeds(exp.seeds)))

    def unquantized(self, exp: Experiment) -> torch.Tensor:
        """The samples (on the CPU) of ``exp`` on the float network, from the same noise with the same solver,
        steps, grid, cache, dtype and device: that experiment's stored result, else sampled here once per sweep
        (not stored: it is not an experiment this sweep was asked for)."""
        plain = exp.unquantized()
        if plain.key not in self._unquantized:
            try:
                self._unquantized[plain.key] = self.store.samples(plain.key)
            except KeyError:
                self._unquantized[plain.key] = _run(plain, self).out.float()
        return self._unquantized[plain.key]

    @property
    def fd(self) -> DigitsFD:
        if self._fd is None:
            self._fd = DigitsFD()
        return self._fd

    def floor(self, n: int) -> float:
        if n not in self._floors:
            self._floors[n] = self.fd.floor(min(n, 898))
        return self._floors[n]


@dataclasses.dataclass(frozen=True)
class _Token:
    """A claim on shared work that is not an experiment (a reference solve): claims need only a key."""

    key: str


def diffusers_cache(den: Denoiser, spec: str) -> Any:
    """The diffusers cache hook a ``"diffusers:<name>[:key=value...]"`` spec names on ``den``'s network
    (:class:`~fewstep.bench.cache_peers.DiffusersCache`; use it in a ``with`` block)."""
    from fewstep.bench.cache_peers import DiffusersCache
    from fewstep.spec import parse_spec

    name, knobs = parse_spec(spec.removeprefix("diffusers:"))
    return DiffusersCache(den, name, **knobs)


@dataclasses.dataclass
class _Samples:
    """What one sampling run of an experiment gives, before it is measured."""

    out: torch.Tensor  # on the CPU
    nfe: int
    model_seconds: float
    wall_seconds: float
    extra: dict[str, Any]
    network: Denoiser  # the denoiser whose network ran (quantized if the experiment says), for its weights' bytes


def _run(exp: Experiment, ctx: Context) -> _Samples:
    """Sample ``exp``: the network, the noise and the state on ``exp.device`` (the network in ``exp.dtype``,
    quantized as ``exp.quant`` says; quantizing and calibrating are not part of the time).

    A fewstep row is exactly ``exp.as_plan().build(den).sample(seeds=exp.seeds)``, timed, with a diffusers cache
    hook around the built denoiser when the row names one: the plan's grid gives the start (the grids of plain rows
    start at ``t_max``, as the reference does)."""
    den = ctx.model(exp.model, device=exp.device, dtype=exp.dtype)
    timed = _Timed(den)
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    network: Denoiser = den
    if exp.backend == "fewstep":
        counter, stats = NFECounter(), CacheStats()
        # ``auto`` calibrates on seeds 1000-1127, an activation quantization on calibrate's default seeds
        sampler = exp.as_plan().build(den)  # placed as the plan says (exp's dtype and device)
        network = sampler.network or den
        peer: Any = contextlib.nullcontext()
        if exp.diffusers_cache:  # diffusers' own cache hook on the same (quantized) network, noise and solver
            peer = diffusers_cache(sampler.denoiser, exp.diffusers_cache)
            timed = _Timed(peer)
        else:
            if sampler.calibration is not None:
                extra = {"cache_choice": sampler.calibration.spec,
                         "cache_calibration_error": sampler.calibration.error}
            timed = _Timed(sampler.denoiser)
        cond = ctx.cond(exp, den)
        t0 = time.perf_counter()  # quantization, calibration and conditioning are not part of the run's time
        with peer:
            out = dataclasses.replace(sampler, denoiser=timed).sample(seeds=exp.seeds, cond=cond,
                                                                      hooks=[counter, stats])
        nfe = counter.nfe
        if exp.cache:
            extra["cache_work"] = stats.mean_work
            extra["cache_reused"] = stats.reused
    else:
        net, net_dtype, cond = den.model, getattr(den, "dtype", None), ctx.cond(exp, den)

        def timed_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t1 = time.perf_counter()
            if cond is None:
                y = net(x if net_dtype is None else x.to(net_dtype), t).sample.to(x.dtype)  # half: a float32 state
            else:  # with the family's keywords, as fewstep's rows call it
                y = den.network(x, float(t), cond)
            _finish(y)
            timed.total[0] += time.perf_counter() - t1
            return y

        config = json.loads(json.dumps(dict(den.scheduler_config)))
        x_init = ctx.x_init(exp)
        t0 = time.perf_counter()  # drawing the noise is not part of the run's time
        out, nfe = run_diffusers(exp.solver, timed_net, config, x_init, exp.steps, options=exp.options)
    out = out.cpu()  # waits for the device: the wall time is the run's
    return _Samples(out, nfe, timed.seconds, time.perf_counter() - t0, extra, network)


def run_experiment(exp: Experiment, ctx: Context) -> tuple[dict[str, Any], torch.Tensor]:
    """Run one experiment; returns its record (NFE, error, FD, floor, SWD, times, memory, the network's
    ``weights_bytes``) and its samples (on the CPU). The network, the noise and the state are on ``exp.device``
    (the network in ``exp.dtype``); errors and metrics are computed on the CPU against the CPU reference.

    A quantized experiment's record also has ``quant_error``: the mean per-sample RMSE against the samples of the
    same experiment on the float network (same noise, solver, steps, grid, cache, dtype and device; its stored
    result if there is one, else run here, not stored): the error quantization adds, beside ``error``, which is
    against the PF-ODE reference."""
    cuda = torch.device(exp.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(exp.device)
    run = _run(exp, ctx)
    out = run.out
    ref = ctx.reference(exp)
    real = ctx.fd.half_b
    record = {
        "nfe": run.nfe,
        "error": float(rmse_per_sample(out, ref).mean()),
        "fd": ctx.fd(out),
        "fd_floor": ctx.floor(out.shape[0]),
        "swd": sliced_wasserstein(out.clamp(-1, 1), real),
        "model_seconds": run.model_seconds,
        "wall_seconds": run.wall_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "weights_bytes": weights_bytes(run.network),
        **run.extra,
    }
    if cuda:
        record["peak_cuda_mb"] = torch.cuda.max_memory_allocated(exp.device) / 2**20
    if exp.quant:
        record["quant_error"] = float(rmse_per_sample(out, ctx.unquantized(exp)).mean())
    return record, out


def run_sweep(
    experiments: Sequence[Experiment],
    store: ResultStore,
    *,
    force: bool = False,
    progress: bool | None = None,
    run: Callable[[Experiment, Context], tuple[dict[str, Any], torch.Tensor]] | None = None,
    poll: float = 0.5,
) -> int:
    """Run every experiment not yet in ``store`` (all of them with ``force``) with ``run`` (default
    :func:`run_experiment`); returns how many this process ran. Each result is committed as soon as it is measured,
    so an interrupted sweep resumes where it stopped.

    Sweeps running beside each other on one store share the work through claims (see :mod:`fewstep.bench.store`):
    an experiment claimed by another live sweep is skipped at first and, once every other one is done, waited for
    (polling every ``poll`` seconds) until its result appears or its claim lapses and this sweep runs it. Together
    the sweeps run each experiment once and each ends with all results present. ``force`` reruns results written
    before this sweep began, but not one that a forced sweep beside it rewrote meanwhile."""
    from tqdm.auto import tqdm

    run = run or run_experiment  # looked up now, so that a patched ``run_experiment`` is used
    since = time.time() if force else None
    todo = list({e.key: e for e in experiments if force or not store.has(e)}.values())
    ctx = Context(store)
    show = sys.stderr.isatty() if progress is None else progress
    ran = 0
    with tqdm(total=len(todo), desc="experiments", disable=not show) as bar, store.heartbeat():
        while todo:
            busy = []
            for exp in todo:
                state = store.claim(exp, since=since)
                if state == "busy":
                    busy.append(exp)
                    continue
                if state == "claimed":
                    try:
                        record, out = run(exp, ctx)
                    except BaseException:
                        with contextlib.suppress(ValueError):  # else the claim lapses with its lease
                            store.release(exp)
                        raise
                    store.put(exp, record, out)
                    ran += 1
                bar.update(1)
            if len(busy) == len(todo):  # no progress this pass: the rest is in other sweeps' hands
                time.sleep(poll)
            todo = busy
    return ran
