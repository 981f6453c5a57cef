"""fewstep.quant: number formats against their definitions and torch's own casts, schemes, timestep-aware calibration
(counted evaluations), split skip concatenations, torchao's kernels, and the original network left untouched."""

import logging
import math
import sys

import pytest
import torch
from torch import nn

import fewstep
from fewstep.hooks import NFECounter
from fewstep.models import ClassifierFreeGuidance, from_diffusers
from fewstep.quant import (
    SCHEMES,
    ActQuant,
    FPFormat,
    Int8Conv2d,
    IntFormat,
    QuantizedDenoiser,
    calibrate,
    find_splits,
    fp_max,
    fp_values,
    parse_scheme,
    quantize,
    quantize_fp,
    quantize_int,
    target_layers,
    weights_bytes,
)
from fewstep.quant import calibration as quant_calibration
from fewstep.quant import kernels as quant_kernels
from fewstep.quant.apply import scale_count
from fewstep.quant.calibration import layer_rows
from fewstep.quant.formats import absmax_scale
from fewstep.quant.gptq import gptq_round
from fewstep.schedules import LinearVP
from fewstep.zoo import AnalyticDenoiser, gaussian, load

ENDS = ("conv_in", "conv_out")  # a UNet2DModel's first and last layers, kept in float by default


@pytest.fixture(scope="module")
def unet_s():
    return load("unet_s")


@pytest.fixture(scope="module")
def tiny():
    """A tiny random UNet2DModel (block channels 8, 16) as a denoiser."""
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    return from_diffusers(unet, diffusers.DDPMScheduler(num_train_timesteps=1000))


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def assert_untouched(net: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = net.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert type(after[k]) is torch.Tensor and torch.equal(after[k], v), k  # plain tensors, bit for bit
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def trajectory(den, solver="ddim", steps=5, seeds=4):
    rec = fewstep.TrajectoryRecorder()
    fewstep.sample(den, solver, steps, shape=den.sample_shape, seeds=seeds, hooks=[rec])
    return list(zip(rec.times[:-1], rec.states[:-1], strict=True))


# ---------------------------------------------------------------- integer formats


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_int_representable_values_round_trip_exactly(bits):
    s = 0.37
    k = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.float64)
    assert torch.equal(quantize_int(k * s, bits, scale=s), k * s)
    z = 3.0  # asymmetric: codes 0 .. 2^b - 1 shifted by the zero point
    codes = torch.arange(0, 2**bits, dtype=torch.float64)
    assert torch.equal(quantize_int((codes - z) * s, bits, scale=s, zero_point=z), (codes - z) * s)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_int_error_is_at_most_half_a_step_and_saturates(bits):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 40, generator=g) * torch.logspace(-2, 1, 16)[:, None]  # channels of very different size
    q = quantize_int(w, bits, axis=0)
    step = w.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)  # per output channel
    assert ((q - w).abs() <= step / 2 * (1 + 1e-6)).all()
    assert torch.allclose(quantize_int(q, bits, axis=0), q, rtol=1e-6, atol=0)  # idempotent: q is on the grid
    assert float(quantize_int(torch.tensor([1e4]), bits, scale=1.0)) == 2 ** (bits - 1) - 1
    assert float(quantize_int(torch.tensor([-1e4]), bits, scale=1.0, zero_point=1.0)) == -1.0


def test_int_16_bits_equals_float_to_round_off():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    assert rel(quantize_int(x, 16), x) < 1e-4


# ---------------------------------------------------------------- floating-point formats


def test_fp_value_sets_from_the_standards():
    assert fp_values(2, 1) == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # OCP MX FP4 E2M1
    assert fp_max(4, 3) == 448.0 and fp_max(5, 2) == 57344.0  # OCP FP8
    assert fp_max(3, 2) == 28.0 and fp_max(2, 3) == 7.5  # OCP MX FP6
    assert fp_max(5, 10) == 65504.0  # IEEE half
    # E4M3 reserves one NaN code of 128 non-negative codes; E5M2 reserves inf and three NaNs
    assert len(fp_values(4, 3)) == 127 and len(fp_values(5, 2)) == 124
    assert fp_values(4, 3)[1] == 2.0**-9  # smallest subnormal: 2^(1 - bias - m)


@pytest.mark.parametrize("fmt,dtype", [((4, 3), torch.float8_e4m3fn), ((5, 2), torch.float8_e5m2),
                                       ((5, 10), torch.float16), ((8, 7), torch.bfloat16)])
def test_fp_rounding_equals_torchs_own_casts(fmt, dtype):
    """Round to nearest even with subnormals, checked against torch's float8/float16/bfloat16 conversions from
    subnormal magnitudes up to the format's maximum."""
    g = torch.Generator().manual_seed(0)
    top = fp_max(*fmt)
    tiny = fp_values(*fmt)[1] if fmt[0] < 8 else 2.0**-133
    mag = torch.exp(torch.empty(50_000, dtype=torch.float64).uniform_(math.log(tiny), math.log(top), generator=g))
    x = (mag * torch.sign(torch.randn(50_000, generator=g, dtype=torch.float64))).float()
    x = x[x.abs() <= top]
    assert torch.equal(quantize_fp(x, *fmt, scale=1.0), x.to(dtype).float())


@pytest.mark.parametrize("fmt", [(2, 1), (3, 2), (4, 3), (1, 2)])
def test_fp_rounds_to_the_nearest_representable_value(fmt):
    values = torch.tensor(fp_values(*fmt), dtype=torch.float64)
    grid = torch.cat([-values.flip(0), values])
    assert torch.equal(quantize_fp(grid, *fmt, scale=1.0), grid)  # round trip
    x = torch.empty(2000, dtype=torch.float64).uniform_(-1.2 * values[-1], 1.2 * values[-1],
                                                        generator=torch.Generator().manual_seed(2))
    nearest = grid[(x[:, None] - grid[None]).abs().argmin(1)]  # brute force; beyond the max: the max
    assert torch.equal(quantize_fp(x, *fmt, scale=1.0), nearest)
    special = quantize_fp(torch.tensor([float("inf"), -1e30, float("nan")]), *fmt, scale=1.0)
    assert special[0] == values[-1] and special[1] == -values[-1] and special[2].isnan()


def test_fp_per_channel_scale_maps_each_channel_max_to_the_format_max():
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(3)) * torch.arange(1, 7)[:, None]
    q = quantize_fp(w, 2, 1, axis=0)
    scale = w.abs().amax(1, keepdim=True) / 6.0
    assert torch.allclose(q.abs().amax(1), w.abs().amax(1))
    on_grid = torch.tensor(fp_values(2, 1))
    assert ((q / scale).abs().unsqueeze(-1) - on_grid).abs().amin(-1).max() < 1e-5


def test_fp_16_bits_equals_float_to_round_off():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    assert rel(quantize_fp(x, 5, 10), x) < 1e-3 and rel(quantize_fp(x, 8, 7), x) < 5e-3


# ---------------------------------------------------------------- schemes


def test_every_listed_scheme_parses():
    for name in SCHEMES:
        assert parse_scheme(name).text == name
    s = parse_scheme("w4a8:calibration=single:t=0.5:split=false")
    assert (s.weight, s.act, s.calibration, s.t, s.split) == (IntFormat(4), IntFormat(8), "single", 0.5, False)
    s = parse_scheme("fp:e2m1:act=e4m3")
    assert (s.weight, s.act) == (FPFormat(2, 1), FPFormat(4, 3))
    assert parse_scheme("fp:search:bits=6").search_bits == 6 and parse_scheme("fp:search").search_bits == 4
    assert parse_scheme("w3a6").act == IntFormat(6)


@pytest.mark.parametrize("text,message", [
    ("int8w", "did you mean 'int8wo'"),
    ("w8a", "unknown quantization scheme"),
    ("w1", "weight bits must be in [2, 16]"),
    ("w8a32", "activation bits must be in [2, 16]"),
    ("fp", "names its format first"),
    ("fp:e4m9x", "unknown fp format"),
    ("fp:e9m1", "exponent bits"),
    ("fp:search:bits=2", "bits=<3..16>"),
    ("w8:round=nearest:calibration=single", "takes no knob 'calibration'"),
    ("fp8wo:calibration=single", "takes no knob 'calibration'"),
    ("w8:round=best", "round must be one of gptq, nearest"),
    ("fp8wo:round=gptq", "fp8wo rounds to nearest"),
    ("w8:keep_ends=1", "keep_ends must be true or false"),
    ("w4:group=0", "group must be a positive number"),
    ("int8wo:group=32", "takes no knob 'group'"),
    ("int8wo:fast=true", "takes no knob 'fast'"),
    ("w8a8:t=0.5", "calibration=single"),
    ("w8a8:calibration=sometimes", "trajectory, single"),
    ("w8a8:split=1", "split must be true or false"),
    ("fp:e4m3:act=e9", "bad act="),
    ("w8a8:seeds", "expected key=value"),
])
def test_bad_schemes_get_one_line_errors(text, message):
    with pytest.raises(ValueError, match=None) as err:
        parse_scheme(text)
    assert message in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- quantize: errors


def test_quantize_refuses_bad_input(unet_s):
    cal = dict(solver="ddim", steps=3, seeds=2)
    with pytest.raises(ValueError, match="pass calibration=dict"):
        quantize(unet_s, "w8a8")
    with pytest.raises(ValueError, match="takes no calibration"):
        quantize(unet_s, "w8:round=nearest", calibration=cal)
    with pytest.raises(ValueError, match="takes no calibration"):
        quantize(unet_s, "fp8wo", calibration=cal)
    with pytest.raises(ValueError, match="rounds weights by GPTQ under Hessians of a calibration run: pass"):
        quantize(unet_s, "w8:round=gptq")
    with pytest.raises(ValueError, match="needs steps"):
        quantize(unet_s, "w8a8", calibration=dict(solver="ddim"))
    with pytest.raises(ValueError, match="unknown calibration key 'batch'"):
        quantize(unet_s, "w8a8", calibration={**cal, "batch": 2})
    with pytest.raises(TypeError, match="from_diffusers"):
        quantize(unet_s.model, "w8")
    with pytest.raises(TypeError, match="ModelDenoiser"):
        quantize(AnalyticDenoiser(gaussian(dim=2), LinearVP()), "w8")
    with pytest.raises(ValueError, match="did you mean 'fp8wo'"):
        quantize(unet_s, "fp8")


def test_a_kernel_the_device_lacks_is_named_with_its_alternative(unet_s):
    """torchao's int8 kernels take no float64 on this CPU: the scheme says so in one line, with the device and the
    fake-quant scheme that simulates it."""
    den64 = quantize(unet_s, "w16")  # a private copy to cast
    den64.model.double()
    den64.dtype = torch.float64
    with pytest.raises(ValueError) as err:
        quantize(den64, "int8wo")
    msg = str(err.value)
    assert "no torchao kernel on this device (cpu, float64" in msg and "'w8'" in msg and "\n" not in msg


def test_missing_kernel_on_any_device_and_missing_torchao(unet_s, monkeypatch):
    monkeypatch.setattr(quant_kernels, "probe_kernel", lambda *a: "RuntimeError: no fp8 on this GPU")
    with pytest.raises(ValueError, match=r"'fp8wo' has no torchao kernel on this device \(cpu, float32 layers: "
                                         r"RuntimeError: no fp8 on this GPU\); the fake-quant scheme 'fp:e4m3'"):
        quantize(unet_s, "fp8wo")
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ValueError, match=r"needs torchao \(pip install torchao==0.18.0\).*'w8a8'"):
        quantize(unet_s, "int8dq")


# ---------------------------------------------------------------- torchao kernels


# int8wo also rounds the convolutions (as w8 does, whose error here is 0.027)
@pytest.mark.parametrize("scheme,tol", [("int8wo", 0.04), ("int8dq", 0.02), ("fp8wo", 0.02)])
def test_torchao_kernels_are_close_to_float_and_leave_the_original(unet_s, scheme, tol):
    before, rng = snapshot(unet_s.model), torch.get_rng_state()
    q = quantize(unet_s, scheme)
    assert isinstance(q, QuantizedDenoiser) and q.model is not unet_s.model
    assert_untouched(unet_s.model, before)
    assert torch.equal(torch.get_rng_state(), rng)  # the kernel probes draw from their own generator
    linears = [n for n, m in target_layers(unet_s.model) if isinstance(m, nn.Linear)]
    convs = [n for n, m in target_layers(unet_s.model) if isinstance(m, nn.Conv2d) and n not in ENDS]
    assert {n: q.quant.skipped[n] for n in ENDS} == {"conv_in": "kept in float (keep_ends): reads the noisy input",
                                                     "conv_out": "kept in float (keep_ends): writes the prediction"}
    assert all(type(q.model.get_submodule(n)) is nn.Conv2d for n in ENDS)
    if scheme == "int8wo":  # torchao 0.18 has no int8 convolution: fewstep's int8-stored one stands in
        assert sorted(q.quant.layers) == sorted(linears + convs) and sorted(q.quant.skipped) == sorted(ENDS)
        assert all(isinstance(q.model.get_submodule(n), Int8Conv2d) for n in convs)
    else:  # nor a float8 one, nor int8 x int8: convolutions stay float
        assert sorted(q.quant.layers) == sorted(linears)
        assert sorted(q.quant.skipped) == sorted([*convs, *ENDS])
    for name in linears:
        assert type(q.model.get_submodule(name).weight).__name__ in ("Int8Tensor", "Float8Tensor")
    with torch.no_grad():
        for t, x in trajectory(unet_s):
            n = unet_s.native_time(t)
            assert rel(q.network(x, n), unet_s.network(x, n)) < tol
    assert weights_bytes(q) < weights_bytes(unet_s)


def test_int8wo_stores_convolutions_as_int8_and_stays_close_to_float():
    """unet_m is almost all convolution: int8wo must shrink it to about a quarter (1 byte a weight + scales), stay
    close to the float network along a trajectory, and leave the original untouched."""
    den = load("unet_m")
    before = snapshot(den.model)
    q = quantize(den, "int8wo")
    assert_untouched(den.model, before)
    assert weights_bytes(q) <= 0.3 * weights_bytes(den)
    state = sum(v.numel() * v.element_size() for v in q.model.state_dict().values() if type(v) is torch.Tensor)
    assert state <= 0.3 * sum(v.numel() * v.element_size() for v in den.model.state_dict().values())
    with torch.no_grad():
        for t, x in trajectory(den):
            n = den.native_time(t)
            assert rel(q.network(x, n), den.network(x, n)) < 0.05


def test_int8_conv_is_w8_stored_as_int8(tiny):
    """The int8 convolution holds exactly w8's per-channel grid (codes in [-128, 127], float32 scales) as buffers,
    counted at 1 byte a weight, and computes what the float layer computes with w8's weights."""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
    q = Int8Conv2d.from_float(conv)
    assert q.qweight.dtype == torch.int8 and q.scale.dtype == torch.float32 and q.scale.shape == (6,)
    assert dict(q.named_parameters()).keys() == {"bias"}
    assert torch.equal(q.weight, quantize_int(conv.weight.detach(), 8, axis=0))
    x = torch.randn(2, 4, 5, 5)
    ref = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
    with torch.no_grad():
        ref.weight.copy_(quantize_int(conv.weight, 8, axis=0))
        ref.bias.copy_(conv.bias)
        assert torch.allclose(q(x), ref(x), rtol=0, atol=1e-6)
    w8, i8 = quantize(tiny, "w8"), quantize(tiny, "int8wo")
    convs = [(n, m) for n, m in target_layers(tiny.model) if isinstance(m, nn.Conv2d)]
    for name, _ in convs:
        assert torch.equal(i8.model.get_submodule(name).weight, w8.model.get_submodule(name).weight), name
    saved = sum(3 * m.weight.numel() for _, m in convs)  # 4 bytes -> 1 a weight; the scales are counted by both
    linears = [m for _, m in target_layers(tiny.model) if isinstance(m, nn.Linear)]
    assert weights_bytes(tiny) - weights_bytes(i8) >= saved + sum(2 * m.weight.numel() for m in linears)


# ---------------------------------------------------------------- fake quantization


@pytest.mark.parametrize("scheme", ["w8", "w4", "fp:e4m3", "fp:e2m1"])
def test_fake_quant_weights_lie_on_the_grid_and_the_original_is_untouched(unet_s, scheme):
    before = snapshot(unet_s.model)
    q = quantize(unet_s, scheme)
    assert_untouched(unet_s.model, before)
    fmt = parse_scheme(scheme).weight
    assert q.quant.rounding == "nearest" and sorted(q.quant.skipped) == sorted(ENDS)
    for name in ENDS:  # the first and last layers stay float
        assert torch.equal(q.model.get_submodule(name).weight, unet_s.model.get_submodule(name).weight)
    for name, layer in target_layers(q.model):
        if name in ENDS:
            continue
        w = layer.weight.detach()
        again = quantize_int(w, fmt.bits, axis=0) if isinstance(fmt, IntFormat) else \
            quantize_fp(w, fmt.exp_bits, fmt.man_bits, axis=0)
        assert torch.allclose(again, w, rtol=1e-6, atol=0), name  # on the grid (scales recomputed: round-off)
        assert q.quant.layers[name].weight == fmt.name
    # the wrapped denoiser is the same model otherwise
    assert (q.schedule, q.prediction, q.family, q.dtype) == (unet_s.schedule, unet_s.prediction, unet_s.family,
                                                              unet_s.dtype)
    assert q.scheduler_config == unet_s.scheduler_config


def test_fp_search_picks_the_least_mse_split_per_layer(unet_s):
    q = quantize(unet_s, "fp:search:bits=4")
    for name, layer in target_layers(unet_s.model):
        if name in ENDS:
            continue
        w = layer.weight.detach()
        errs = {f"e{e}m{3 - e}": float((quantize_fp(w, e, 3 - e, axis=0).double() - w.double()).square().mean())
                for e in (1, 2, 3)}
        pick = q.quant.layers[name].weight
        assert errs[pick] == min(errs.values()), (name, errs, pick)
    assert weights_bytes(q) == weights_bytes(quantize(unet_s, "fp:e2m1"))


def test_weights_bytes_count_the_format(unet_s):
    params = sum(p.numel() for p in unet_s.model.parameters())
    assert weights_bytes(unet_s) == 4 * params
    layers = target_layers(unet_s.model)
    quantized = sum(m.weight.numel() for _, m in layers)
    scales = 4 * sum(m.weight.shape[0] for _, m in layers)  # one float32 scale per output channel
    rest = 4 * (params - quantized)
    assert weights_bytes(quantize(unet_s, "w8:keep_ends=false")) == rest + quantized + scales
    assert weights_bytes(quantize(unet_s, "fp:e4m3:keep_ends=false")) == rest + quantized + scales
    ends = [unet_s.model.get_submodule(n).weight for n in ENDS]  # kept: 4 bytes a weight instead of 1 and scales
    assert weights_bytes(quantize(unet_s, "w8")) == rest + quantized + scales + sum(3 * w.numel() - 4 * w.shape[0]
                                                                                    for w in ends)
    assert weights_bytes(quantize(unet_s, "w4:keep_ends=false")) == rest + sum(math.ceil(m.weight.numel() / 2)
                                                               for _, m in layers) + scales


def test_16_bit_fake_quant_equals_float_to_round_off(unet_s):
    q = quantize(unet_s, "w16a16", calibration=dict(solver="ddim", steps=5, seeds=4))
    w16 = quantize(unet_s, "w16")
    with torch.no_grad():
        for t, x in trajectory(unet_s, seeds=4):  # the calibration's own trajectory: no clipping
            n = unet_s.native_time(t)
            ref = unet_s.network(x, n)
            assert rel(w16.network(x, n), ref) < 2e-4
            assert rel(q.network(x, n), ref) < 1e-3


def test_guided_denoisers_are_quantized_under_their_guidance(unet_s):
    guided = ClassifierFreeGuidance(unet_s, 1.5)
    q = quantize(guided, "w8")
    assert isinstance(q, ClassifierFreeGuidance) and q.scale == 1.5 and isinstance(q.inner, QuantizedDenoiser)
    assert isinstance(quantize("unet_s", "w8"), QuantizedDenoiser)  # a zoo name loads the model


def test_quantized_sampling_is_deterministic(unet_s):
    q = quantize(unet_s, "w4a8", calibration=dict(solver="dpmpp_2m", steps=4, seeds=3))
    a = fewstep.sample(q, "dpmpp_2m", 4, shape=unet_s.sample_shape, seeds="0-2")
    b = fewstep.sample(q, "dpmpp_2m", 4, shape=unet_s.sample_shape, seeds="0-2")
    assert torch.equal(a, b) and torch.isfinite(a).all()


# ---------------------------------------------------------------- calibration


@pytest.mark.parametrize("solver,steps", [("ddim", 5), ("dpmpp_2m", 4), ("heun", 3)])
def test_trajectory_calibration_observes_every_evaluation(unet_s, solver, steps):
    before = snapshot(unet_s.model)
    r = calibrate(unet_s, solver, steps, seeds=2)
    assert_untouched(unet_s.model, before)  # observers removed, weights as they were
    counter = NFECounter()
    fewstep.sample(unet_s, solver, steps, shape=unet_s.sample_shape, seeds=2, hooks=[counter])
    layers = [n for n, _ in target_layers(unet_s.model)]
    assert r.nfe == counter.nfe and len(r.times) == counter.nfe
    assert r.counts == {n: counter.nfe for n in layers}
    assert sum(r.counts.values()) == counter.nfe * len(layers)
    assert set(r.ranges) == set(layers)


def test_single_time_calibration_sees_one_time_and_less_range(unet_s):
    full = calibrate(unet_s, "ddim", 6, seeds=2)
    one = calibrate(unet_s, "ddim", 6, seeds=2, mode="single")
    grid = fewstep.grids.make_grid(fewstep.grids.DEFAULT_GRID, unet_s.schedule, 6).tolist()
    assert one.times == (grid[3],)  # the middle step, once (DDIM evaluates once per step)
    assert set(one.counts.values()) == {1}
    for name, parts in one.ranges.items():  # a subset of the same run's evaluations
        for (lo1, hi1), (lo, hi) in zip(parts, full.ranges[name], strict=True):
            assert lo <= lo1 <= hi1 <= hi
    at = calibrate(unet_s, "ddim", 6, seeds=2, mode="single", t=0.02)
    assert at.times == (min(grid[:-1], key=lambda s: abs(s - 0.02)),)
    with pytest.raises(ValueError, match="outside the schedule's times"):
        calibrate(unet_s, "ddim", 6, seeds=2, mode="single", t=5.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        calibrate(unet_s, "ddim", 6, mode="uniform")


def test_single_time_calibration_clips_other_times(unet_s):
    """Naive calibration at one time is the worse one on the same run (the point of timestep-aware ranges)."""
    kw = dict(shape=unet_s.sample_shape, seeds="0-7")
    ref = fewstep.sample(unet_s, "ddim", 5, **kw)
    err = {}
    for mode in ("trajectory", "single"):
        q = quantize(unet_s, f"w8a8:calibration={mode}", calibration=dict(solver="ddim", steps=5, seeds="0-7"))
        err[mode] = rel(fewstep.sample(q, "ddim", 5, **kw), ref)
    assert err["trajectory"] < err["single"]


# ---------------------------------------------------------------- split skip concatenations


TINY_SPLITS = {  # (deep features, skip) channels entering each up-block resnet, from the architecture by hand
    "up_blocks.0.resnets.0": (16, 16),  # mid-block output + the last down resnet's
    "up_blocks.0.resnets.1": (16, 8),  # + down block 0's downsampler output
    "up_blocks.1.resnets.0": (16, 8),  # upsampled + down block 0's resnet output
    "up_blocks.1.resnets.1": (8, 8),  # + conv_in's output
}


def test_skip_concatenations_are_found_on_a_tiny_unet(tiny):
    splits = find_splits(tiny)
    expected = {f"{block}.{layer}": sizes for block, sizes in TINY_SPLITS.items()
                for layer in ("conv1", "conv_shortcut")}
    expected["time_embedding.linear_1"] = (4, 4)  # the sinusoidal embedding's cos | sin halves, also a concat
    assert splits == expected
    r = calibrate(tiny, "ddim", 3, seeds=2)
    assert r.splits == expected and all(len(r.ranges[n]) == 2 for n in expected)
    assert calibrate(tiny, "ddim", 3, seeds=2, split=False).splits == {}
    q = quantize(tiny, "w8a8", calibration=dict(solver="ddim", steps=3, seeds=2))
    assert q.quant.rounding == "gptq"
    for name, sizes in expected.items():
        assert q.quant.layers[name].split == sizes
        w = q.model.get_submodule(name).weight.detach()
        w0 = tiny.model.get_submodule(name).weight.detach()
        for part, part0 in zip(w.split(sizes, 1), w0.split(sizes, 1), strict=True):
            # each part's weights on its own per-channel grid (GPTQ keeps the float part's scales)
            s = absmax_scale(part0, 127, axis=0)
            assert torch.allclose(quantize_int(part, 8, scale=s), part, rtol=1e-6, atol=0)
    unsplit = quantize(tiny, "w8a8:split=false", calibration=dict(solver="ddim", steps=3, seeds=2))
    assert all(rec.split is None for rec in unsplit.quant.layers.values())


def test_split_ranges_keep_the_narrow_part_resolved():
    """One range for cat([wide, narrow]) spends the levels on the wide part; a range per part does not."""
    g = torch.Generator().manual_seed(0)
    wide, narrow = torch.randn(2, 8, 4, 4, generator=g) * 50, torch.randn(2, 8, 4, 4, generator=g) * 0.1
    x = torch.cat([wide, narrow], 1)
    conv = nn.Conv2d(16, 4, 1)
    ranges = ((float(wide.min()), float(wide.max())), (float(narrow.min()), float(narrow.max())))
    joint = ActQuant(IntFormat(8), ((min(r[0] for r in ranges), max(r[1] for r in ranges)),), None)(conv, (x,))[0]
    split = ActQuant(IntFormat(8), ranges, (8, 8))(conv, (x,))[0]
    assert rel(split[:, 8:], narrow) < 0.02 < rel(joint[:, 8:], narrow)
    assert rel(split[:, :8], wide) < 0.01 and rel(joint[:, :8], wide) < 0.01


# ---------------------------------------------------------------- exports and import noise


def test_exported_from_fewstep():
    assert fewstep.quantize is quantize and fewstep.QUANT_SCHEMES is SCHEMES


def test_only_the_known_import_noise_is_filtered():
    log = logging.getLogger("torchao")
    records = [logging.LogRecord("torchao", logging.WARNING, __file__, 1, msg, None, None) for msg in (
        "Failed to load /x/torchao/_C_mxfp8.so: Could not load this library", "something else entirely")]
    assert [all(f.filter(r) for f in log.filters) for r in records] == [False, True]


# ---------------------------------------------------------------- GPTQ rounding


def _int_rnd(bits):
    return lambda x, s: quantize_int(x, bits, scale=s)


def _correlated(n, cols, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, cols // 2, generator=g, dtype=torch.float64)
    return z @ torch.randn(cols // 2, cols, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        n, cols, generator=g, dtype=torch.float64)


def test_gptq_with_a_diagonal_hessian_is_round_to_nearest():
    """Nothing to compensate when the inputs are uncorrelated: GPTQ rounds exactly as nearest, dead columns too."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 20, generator=g)
    h = torch.diag(torch.rand(20, generator=g, dtype=torch.float64) + 0.1)
    h[3, 3] = 0.0  # a column the calibration never fed
    s = absmax_scale(w, 7, axis=0)
    for order in (True, False):
        assert torch.equal(gptq_round(w, h, s, _int_rnd(4), act_order=order), quantize_int(w, 4, scale=s))


def test_gptq_compensates_optimally_on_two_columns():
    """With two columns, GPTQ's second column is the grid point minimizing the output error given the first's:
    q2 = round(w2 + (w1 - q1) H12 / H22) (no dampening, natural order), checked against an exhaustive search."""
    x = _correlated(400, 2, seed=1)
    h = x.T @ x / 400
    g = torch.Generator().manual_seed(2)
    w = torch.randn(50, 2, generator=g, dtype=torch.float64)
    s = absmax_scale(w, 7, axis=0)
    q = gptq_round(w, h, s, _int_rnd(4), damp=0.0, act_order=False)
    q1 = quantize_int(w[:, :1], 4, scale=s)
    assert torch.equal(q[:, :1], q1)
    levels = torch.arange(-8, 8, dtype=torch.float64)[None, :] * s  # every grid point of each row
    e1 = w[:, :1] - q1
    e2 = w[:, 1:] - levels
    cost = h[0, 0] * e1**2 + 2 * h[0, 1] * e1 * e2 + h[1, 1] * e2**2
    best = levels.gather(1, cost.argmin(1, keepdim=True))
    assert torch.allclose(q[:, 1:], best, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_lowers_the_output_error_and_stays_on_the_grid(bits):
    x = _correlated(512, 48, seed=3)
    h = x.T @ x / 512
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 48, generator=g)
    top = 2 ** (bits - 1) - 1
    s = absmax_scale(w, top, axis=0)
    q = gptq_round(w, h, s, _int_rnd(bits))
    near = quantize_int(w, bits, scale=s)
    assert q.dtype == w.dtype and q.shape == w.shape
    codes = q.double() / s.double()
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= -top - 1 and codes.round().max() <= top

    def out_err(v):
        return float(((w.double() - v.double()) @ x.T).square().mean())

    assert out_err(q) < 0.5 * out_err(near)
    assert out_err(gptq_round(w, h, s, _int_rnd(bits), act_order=False)) < 0.5 * out_err(near)


def test_calibrate_gathers_every_steps_hessians(tiny):
    """The Hessian of a layer is the mean x x^T of its input rows (a convolution's unfolded patches) over every
    evaluation of the calibration run; single-time calibration gathers it from one time's evaluations only."""
    names = ["time_embedding.linear_2", "down_blocks.0.resnets.0.conv1"]
    rows = {n: [] for n in names}
    handles = [tiny.model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: rows[n].append(layer_rows(m, a[0].double()))) for n in names]
    try:
        r = calibrate(tiny, "ddim", 4, seeds=3, hessians=True)
    finally:
        for h in handles:
            h.remove()
    for n in names:
        assert len(rows[n]) == 4 and r.counts[n] == 4
        x = torch.cat(rows[n])
        assert torch.allclose(r.hessians[n], x.T @ x / x.shape[0], rtol=1e-5, atol=1e-7)
    assert r.hessians[names[1]].shape == (9 * 8, 9 * 8) and not r.no_hessian
    assert sorted(r.hessians) == sorted(n for n, _ in target_layers(tiny.model))
    single = calibrate(tiny, "ddim", 4, seeds=3, hessians=True, mode="single")
    assert single.counts[names[0]] == 1 and not torch.allclose(single.hessians[names[1]], r.hessians[names[1]])
    narrow = calibrate(tiny, "ddim", 2, seeds=1, hessians=True, hessian_columns=64)
    assert "over the Hessian limit of 64" in narrow.no_hessian[names[1]] and names[1] not in narrow.hessians
    assert calibrate(tiny, "ddim", 2, seeds=1).hessians == {}  # only when asked
    rows = []
    layer = tiny.model.get_submodule(names[0])
    handle = layer.register_forward_pre_hook(lambda m, a: rows.append(layer_rows(m, a[0].double()[::3])))
    try:  # 5 samples, at most 2 a Hessian: every 3rd (samples 0 and 3)
        few = calibrate(tiny, "ddim", 2, seeds=5, hessians=True, hessian_samples=2)
    finally:
        handle.remove()
    x = torch.cat(rows)
    assert x.shape[0] == 2 * 2 and torch.allclose(few.hessians[names[0]], x.T @ x / 4, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scheme", ["int8wo", "int8dq"])
def test_int8_kernels_gptq_rewrites_the_int8_codes_on_torchaos_scales(unet_s, scheme):
    """Calibrated int8wo/int8dq keep torchao's (and Int8Conv2d's) scales and store GPTQ's choice of codes: the stored
    weights are exactly gptq_round's on those scales, and differ from torchao's round-to-nearest codes."""
    cal = dict(solver="ddim", steps=3, seeds=4)
    q = quantize(unet_s, scheme, calibration=cal)
    near = quantize(unet_s, scheme)
    assert q.quant.rounding == "gptq" and near.quant.rounding == "nearest" and not q.quant.nearest
    assert sorted(q.quant.layers) == sorted(near.quant.layers)
    moved = 0
    for name, layer in target_layers(unet_s.model):
        if name not in q.quant.layers:
            continue
        codes, scale = quant_kernels.int8_storage(q.model.get_submodule(name))
        codes0, scale0 = quant_kernels.int8_storage(near.model.get_submodule(name))
        assert torch.equal(scale, scale0)
        want = gptq_round(layer.weight.detach().flatten(1).double(), q.quant.calibration.hessians[name],
                          scale.double(), lambda x, s: torch.round(x / s).clamp(-128, 127) * s)
        assert torch.equal(codes.flatten(1).double() * scale.double(), want.to(torch.float64)), name
        moved += int((codes != codes0).sum())
    assert moved > 0


def test_gptq_int8wo_is_much_closer_to_float_than_round_to_nearest():
    """unet_m, DDIM 10 steps: the calibrated int8wo's samples are at least 3x closer to the float network's (from
    the same noise) than torchao's plain round-to-nearest (measured: 10x)."""
    den = load("unet_m")
    cal = dict(solver="ddim", steps=10, seeds="1000-1031", grid="time_quadratic")
    gptq, near = quantize(den, "int8wo", calibration=cal), quantize(den, "int8wo:keep_ends=false")

    def run(d):
        return fewstep.sample(d, "ddim", 10, seeds="0-31", grid="time_quadratic", shape=den.sample_shape)

    ref = run(den)
    err = {k: float((run(d) - ref).flatten(1).square().mean(1).sqrt().mean()) for k, d in
           (("gptq", gptq), ("near", near))}
    assert err["gptq"] < err["near"] / 3, err


def test_group_scales_put_each_group_of_columns_on_its_own_grid(unet_s):
    """group=G: one scale per G consecutive input columns of each output channel (channel-major, then kernel
    positions), counted in the weights' bytes; a group as wide as the layer is per-channel quantization."""
    q = quantize(unet_s, "w4:group=16:keep_ends=false")
    total = 4 * sum(p.numel() for p in unet_s.model.parameters())
    for name, layer in target_layers(unet_s.model):
        w0, w = layer.weight.detach(), q.model.get_submodule(name).weight.detach()
        cols, cols0 = w.flatten(1), w0.flatten(1)
        for chunk, chunk0 in zip(cols.split(16, 1), cols0.split(16, 1), strict=True):
            assert torch.allclose(quantize_int(chunk, 4, scale=absmax_scale(chunk0, 7, axis=0)), chunk, rtol=1e-6,
                                  atol=0), name
        groups = w.shape[0] * math.ceil(cols.shape[1] / 16)
        assert q.quant.layers[name].scales == groups == scale_count(w0, None, 16)
        total += math.ceil(w.numel() / 2) + 4 * groups - 4 * w.numel()
    assert weights_bytes(q) == total
    wide = max(layer.weight[0].numel() for _, layer in target_layers(unet_s.model))
    same = quantize(unet_s, f"w4:group={wide}")
    plain = quantize(unet_s, "w4")
    for name, _ in target_layers(unet_s.model):
        assert torch.equal(same.model.get_submodule(name).weight, plain.model.get_submodule(name).weight), name
    err = {}
    for scheme in ("w4", "w4:group=16"):
        d = quantize(unet_s, scheme)
        err[scheme] = sum(float((d.model.get_submodule(n).weight - m.weight).detach().square().sum())
                          for n, m in target_layers(unet_s.model))
    assert err["w4:group=16"] < 0.8 * err["w4"]


def test_hessians_of_an_unbatched_convolution_take_every_channel():
    """A convolution fed one unbatched (C, H, W) input keeps all its channels: the sample stride applies to batches."""
    conv = nn.Conv2d(6, 4, 3, padding=1)
    session = quant_calibration.CalibrationSession(split=False, hessians=4096, hessian_samples=2)
    obs = quant_calibration.InputObserver(session)
    session.active = True
    x = torch.randn(6, 5, 5, generator=torch.Generator().manual_seed(0))
    obs(conv, (x,))
    rows = layer_rows(conv, x.float())
    assert obs.rows == 25 and torch.allclose(obs.xtx, (rows.T @ rows).double())
