"""fewstep.quant's scheme registry: every entry parses and declares a consistent twin, GPTQ and calibration, the side
lists are derived from it, and no module of fewstep.quant branches on a scheme's name."""

import ast
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import fewstep.quant
from fewstep.quant import KERNELS, SCHEMES, parse_scheme
from fewstep.quant.apply import round_to, scale_matrix
from fewstep.quant.schemes import FAKE_SCHEMES, KERNEL_SCHEMES, Kernel

ENTRIES = sorted(KERNEL_SCHEMES)


def test_the_side_lists_are_the_registry():
    assert list(SCHEMES) == [*KERNEL_SCHEMES, *FAKE_SCHEMES]
    assert {name: SCHEMES[name] for name in KERNEL_SCHEMES} == {n: k.description for n, k in KERNEL_SCHEMES.items()}
    assert KERNELS == {n: (k.config, k.twin) for n, k in KERNEL_SCHEMES.items()}
    assert fewstep.quant.KERNELS is KERNELS and fewstep.quant.SCHEMES is SCHEMES
    assert all(name == k.name for name, k in KERNEL_SCHEMES.items())


@pytest.mark.parametrize("name", list(SCHEMES))
def test_every_listed_scheme_parses_to_its_entry(name):
    s = parse_scheme(name)
    assert s.text == name and SCHEMES[name].strip() and "\n" not in SCHEMES[name]
    if name in KERNEL_SCHEMES:
        assert s.kernel is KERNEL_SCHEMES[name] and s.weight is None and s.act is None
    else:  # a fake-quant scheme: its formats say everything, GPTQ always applies
        assert s.kernel is None and (s.weight is not None or s.search_bits is not None)
        assert s.gptq and s.calibratable and s.calibrated == (s.act is not None)


@pytest.mark.parametrize("name", ENTRIES)
def test_a_kernel_entry_names_a_config_and_a_fake_quant_twin(name):
    k = KERNEL_SCHEMES[name]
    assert k.config and k.twin in SCHEMES
    twin = parse_scheme(k.twin)
    assert twin.kernel is None and twin.weight is not None and k.weight == twin.weight
    assert (k.act is None) == (twin.act is None)  # the twin quantizes activations where the kernel does
    if importlib.util.find_spec("torchao") is not None:
        import torchao.quantization as tq

        assert isinstance(getattr(tq, k.config), type), k.config


@pytest.mark.parametrize("name", ENTRIES)
def test_a_kernel_entrys_gptq_and_calibration_are_what_parsing_does(name):
    k = KERNEL_SCHEMES[name]
    s = parse_scheme(name)
    assert s.gptq == k.gptq and s.calibratable == k.calibratable and not s.calibrated
    assert s.rounding(True) == ("gptq" if k.gptq else "nearest") and s.rounding(False) == "nearest"
    assert not parse_scheme(f"{name}:round=nearest").calibratable
    if k.calibratable:
        assert parse_scheme(f"{name}:calibration=single:t=0.5").t == 0.5
    else:
        with pytest.raises(ValueError, match="takes no knob 'calibration'"):
            parse_scheme(f"{name}:calibration=single")
    if k.gptq:
        assert parse_scheme(f"{name}:round=gptq").calibrated
    else:
        assert_refuses_gptq(k)


def assert_refuses_gptq(k: Kernel) -> None:
    with pytest.raises(ValueError) as err:
        parse_scheme(f"{k.name}:round=gptq")
    msg = str(err.value)
    assert f"{k.name} rounds to nearest" in msg and f"{k.twin}:round=gptq simulates it" in msg and "\n" not in msg
    assert parse_scheme(f"{k.twin}:round=gptq").calibrated  # the twin it points to takes GPTQ


def test_a_new_entry_is_all_it_takes(monkeypatch):
    """What a kernel scheme does is read from its entry, not its name: a copy of int8wo under another name that says
    GPTQ does not apply refuses round=gptq and takes no calibration."""
    k = dataclasses.replace(KERNEL_SCHEMES["int8wo"], name="int8wo_rtn", gptq=False)
    monkeypatch.setitem(KERNEL_SCHEMES, k.name, k)
    s = parse_scheme(k.name)
    assert s.kernel is k and not s.gptq and not s.calibratable and s.rounding(True) == "nearest"
    assert_refuses_gptq(k)
    assert any(not entry.gptq for entry in KERNEL_SCHEMES.values() if entry is not k)  # fp8wo is such an entry


@pytest.mark.parametrize("name", [n for n in ENTRIES if KERNEL_SCHEMES[n].conv is not None])
def test_a_kernels_convolution_module_stores_the_twins_grid(name):
    k = KERNEL_SCHEMES[name]
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    q = k.conv(conv)
    w = conv.weight.detach()
    want = round_to(w.flatten(1), scale_matrix(w, k.weight), k.weight).view_as(w)
    assert torch.allclose(q.weight, want, rtol=0, atol=1e-7)


def test_no_module_of_quant_branches_on_a_scheme_name():
    """Comparisons (==, !=, in) against a listed scheme's name string are what the registry replaced."""
    names = set(SCHEMES)
    found = []
    for path in sorted(Path(fewstep.quant.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for operand in ast.walk(node):
                    if isinstance(operand, ast.Constant) and operand.value in names:
                        found.append(f"{path.name}:{node.lineno}: {operand.value!r}")
    assert not found
