"""Why int8 weights hurt unet_m, and what fixes it: the ablation behind fewstep's int8 defaults (docs/design.md).

On unet_m (seeds 0-255, grid ``time_quadratic``), for DDIM at 10 steps and DPM-Solver++(2M) at 20, the FD and the
sample error (mean per-sample RMSE against the float network's samples from the same noise) and mean shift of int8
weights (per output channel, symmetric ``max |w| / 127``) rounded in several ways:

* ``nearest``: every layer rounded to nearest (what torchao's int8 weight-only does);
* ``random``: every weight moved by uniform noise of one rounding step (same size as rounding, uncorrelated);
* ``conv_out only``: only the last layer rounded;
* ``nearest, ends float``: ``conv_in`` and ``conv_out`` kept in float;
* ``+ bias correction``: and each layer's bias corrected by the rounding's mean effect on its inputs over the
  calibration trajectory, ``b -= (W_q - W) E[x]`` (Nagel et al., *Data-Free Quantization Through Weight
  Equalization and Bias Correction*, ICCV 2019), averaged over all steps, or per step (a bias per time);
* ``gptq, ...``: fewstep's GPTQ rounding under the trajectory's Hessians (:mod:`fewstep.quant.gptq`), in natural
  column order or by decreasing ``H_ii`` (the default), with or without the ends in float.

Calibration: the same solver and grid, seeds 1000-1127 (Hessians from 32 of them per evaluation, as fewstep does).

    python benchmarks/quant_ablation.py      # about 3 min
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import fewstep
from fewstep.metrics import DigitsFD
from fewstep.quant import calibrate, quantize_int, target_layers
from fewstep.quant.apply import rebuild
from fewstep.quant.gptq import gptq_round
from fewstep.quant.records import QuantInfo
from fewstep.zoo import load

ENDS = {"conv_in", "conv_out"}
GRID = "time_quadratic"
RUNS = (("ddim", 10), ("dpmpp_2m", 20))


def _patch_mean(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).double().mean(0)
    return F.unfold(x.double(), layer.kernel_size, layer.dilation, layer.padding, layer.stride).mean((0, 2))


def _input_means(den, solver: str, steps: int) -> dict[str, dict]:
    """Layer -> {time: mean input patch, "all": over every step} over the float model's calibration run."""
    net, now, sums = den.model, {}, {}

    def top(module, args, kwargs):
        now["t"] = round(float(kwargs.get("timestep", args[1] if len(args) > 1 else 0).flatten()[0]), 4)

    def watch(module, args, name):
        m = _patch_mean(module, args[0])
        for key in (now["t"], "all"):
            s = sums.setdefault(name, {}).setdefault(key, [0, 0])
            s[0], s[1] = s[0] + m, s[1] + 1

    handles = [net.register_forward_pre_hook(top, with_kwargs=True)]
    handles += [layer.register_forward_pre_hook(lambda m, a, name=name: watch(m, a, name))
                for name, layer in target_layers(net)]
    try:
        with torch.no_grad():
            fewstep.sample(den, solver, steps, seeds="1000-1127", grid=GRID, shape=den.sample_shape)
    finally:
        for h in handles:
            h.remove()
    return {name: {k: a / c for k, (a, c) in by.items()} for name, by in sums.items()}


def _run(ctx: dict, label: str, *, skip=(), only=None, mode="nearest", bias=None, order=True) -> None:
    """One row: unet_m with int8 weights rounded as the arguments say, sampled and measured against float."""
    den, solver, steps, ref = ctx["den"], ctx["solver"], ctx["steps"], ctx["ref"]
    net = copy.deepcopy(den.model)
    table: dict[str, dict] = {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in target_layers(net):
            if name in skip or (only is not None and name != only):
                continue
            w = layer.weight
            w2 = w.detach().double().flatten(1)
            s = w2.abs().amax(1, keepdim=True) / 127
            if mode == "random":
                q = w2 + (torch.rand(w2.shape, generator=g, dtype=torch.float64) - 0.5) * s
            elif mode == "gptq":
                q = gptq_round(w2, ctx["hessians"][name], s, _int8, act_order=order)
            else:
                q = quantize_int(w2, 8, scale=s)
            if bias is not None:
                shifts = {t: (q - w2) @ m for t, m in ctx["means"][name].items()}
                if bias == "all":
                    layer.bias.sub_(shifts["all"].to(w.dtype))
                else:
                    table[name] = {t: v.float() for t, v in shifts.items() if t != "all"}
            w.copy_(q.view_as(w).to(w.dtype))
    if table:  # a bias per step: subtract the step's shift from each layer's output
        now: dict = {}

        def top(module, args, kwargs):
            now["t"] = round(float(kwargs.get("timestep", args[1] if len(args) > 1 else 0).flatten()[0]), 4)

        net.register_forward_pre_hook(top, with_kwargs=True)
        for name, by in table.items():
            def fix(module, args, out, by=by):
                shift = by[now["t"]]
                if isinstance(module, nn.Linear):
                    return out - shift.view(*([1] * (out.ndim - 1)), -1)
                return out - shift.view(1, -1, *([1] * (out.ndim - 2)))
            net.get_submodule(name).register_forward_hook(fix)
    q = rebuild(den, net, QuantInfo(label, {}, {}))
    x = fewstep.sample(q, solver, steps, seeds="0-255", grid=GRID, shape=den.sample_shape)
    f = ctx["fd"](x)
    err = float((x - ref).flatten(1).square().mean(1).sqrt().mean())
    print(f"| {solver} {steps} | {label} | {f:.2f} | {100 * (f / ctx['base'] - 1):+.1f} % | {err:.4f} | "
          f"{float((x - ref).mean()):+.4f} |", flush=True)


def _int8(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return quantize_int(x, 8, scale=s)


def main() -> None:
    torch.set_num_threads(1)
    den = load("unet_m")
    fd = DigitsFD()
    print("| run | rounding | FD | FD change | sample error | mean shift |")
    print("|---|---|---|---|---|---|")
    for solver, steps in RUNS:
        ref = fewstep.sample(den, solver, steps, seeds="0-255", grid=GRID, shape=den.sample_shape)
        base = fd(ref)
        print(f"| {solver} {steps} | float | {base:.2f} | | | |")
        ctx = dict(den=den, fd=fd, solver=solver, steps=steps, ref=ref, base=base,
                   means=_input_means(den, solver, steps),
                   hessians=calibrate(den, solver, steps, grid=GRID, hessians=True).hessians)
        _run(ctx, "nearest")
        _run(ctx, "random", mode="random")
        _run(ctx, "conv_out only", only="conv_out")
        _run(ctx, "nearest, ends float", skip=ENDS)
        _run(ctx, "nearest, ends float, bias correction (all steps)", skip=ENDS, bias="all")
        _run(ctx, "nearest, ends float, bias correction (per step)", skip=ENDS, bias="time")
        _run(ctx, "gptq, natural order", mode="gptq", order=False)
        _run(ctx, "gptq, decreasing H_ii", mode="gptq")
        _run(ctx, "gptq, natural order, ends float", mode="gptq", order=False, skip=ENDS)
        _run(ctx, "gptq, decreasing H_ii, ends float (fewstep's default)", mode="gptq", skip=ENDS)


if __name__ == "__main__":
    main()
