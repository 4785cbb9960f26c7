"""The quantization core as an extension point: a new algorithm written entirely here (config +
quantizer, through the public API) runs through qkern.quantize_model and is checked against an
independent computation; every algorithm module is discovered and every built-in config is
exported; the public calibration toolkit (layer-by-layer runner, block inputs)."""

from __future__ import annotations

import inspect
import pkgutil
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import qkern
import qkern.quantization as Q
from qkern.nn import QuantLinear
from qkern.quantization import algorithms
from qkern.quantization.registry import check_format, check_real

# ---- a new algorithm, from outside the package ---------------------------------------------

RUNS: list[ClippedRTNQuantizer] = []  # the quantizers that converted a model, last one last


@Q.config_class
@dataclass
class ClippedRTNConfig(Q.BaseConfig):
    """Round to nearest per output channel with the weight range clipped to ``clip_ratio``."""

    fmt: str = "int4"
    clip_ratio: float = 0.9

    def __post_init__(self) -> None:
        check_format("ClippedRTNConfig", "fmt", self.fmt)
        check_real("ClippedRTNConfig", "clip_ratio", self.clip_ratio, 0.1, 1.0,
                   "a number in [0.1, 1]")
        super().__post_init__()


@Q.register_quantizer(ClippedRTNConfig)
class ClippedRTNQuantizer(Q.Quantizer):
    """Layer by layer in execution order (``sequential_calibration``): each layer's input
    second moment is measured on the already-quantized prefix, then the layer is replaced by
    its quantized twin (``weight_module``) with the clipped range."""

    def records_inputs(self) -> bool:
        return True

    def needs_calibration(self) -> str | None:
        return "measures each layer's inputs on calibration data"

    def calibrated(self, model: nn.Module) -> bool:
        return bool(self.batches)

    def convert(self, model: nn.Module) -> None:
        cfgs = dict(self.plan)
        grams: dict[str, Q.Gram] = {}
        self.moments: dict[str, torch.Tensor] = {}

        def hooks(stage):
            grams.clear()
            grams.update({n: Q.Gram(model.get_submodule(n)) for n in stage})
            return {n: (g, None) for n, g in grams.items()}

        def finish(i, name):
            self.moments[name] = grams[name].matrix()
            cfg, mod = cfgs[name], model.get_submodule(name)
            self.swap(model, name, lambda: Q.weight_module(
                mod, cfg.fmt, None, {}, name, clip_ratio=cfg.clip_ratio))

        self.order = Q.sequential_calibration(model, list(cfgs), self.batches, finish, hooks)
        RUNS.append(self)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                         nn.Linear(24, 8))


def test_new_algorithm_from_outside_runs_through_quantize_model():
    m = _mlp()
    calib = [torch.randn(5, 16) for _ in range(3)]
    cfg = ClippedRTNConfig(fmt="int4", clip_ratio=0.8, exclude=["4"])
    prepared = qkern.prepare(m, cfg)
    for x in calib:
        prepared(x)
    q = qkern.convert(prepared)
    quantizer = RUNS[-1]
    assert quantizer.order == ["0", "2"]
    assert type(q[4]) is nn.Linear and torch.equal(q[4].weight, m[4].weight)
    x = torch.randn(7, 16)
    h = x
    for i in (0, 2):
        assert type(q[i]) is QuantLinear
        want = qkern.quantize(m[i].weight.detach(), "int4", granularity="channel", axis=0,
                              clip_ratio=0.8).dequantize()
        assert torch.equal(q[i].dequantize_weight(), want)
        torch.testing.assert_close(q[i](h), F.linear(h, want, m[i].bias), rtol=1e-5,
                                   atol=1e-5)
        h = torch.relu(F.linear(h, want, m[i].bias))
    # layer 2 was measured on the outputs of the already-quantized layer 0
    w0 = qkern.quantize(m[0].weight.detach(), "int4", granularity="channel", axis=0,
                        clip_ratio=0.8).dequantize()
    rows = torch.cat([torch.relu(F.linear(x, w0, m[0].bias)) for x in calib]).double()
    torch.testing.assert_close(quantizer.moments["2"], rows.T @ rows / rows.shape[0])
    # the same through quantize_model, and the config round-trips through JSON
    q2 = qkern.quantize_model(m, cfg, calibration=calib)
    assert torch.equal(q2(x), q(x))
    assert Q.BaseConfig.from_json(cfg.to_json()) == cfg


# ---- discovery and exports -------------------------------------------------------------------


def _algorithm_modules() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(algorithms.__path__)]


def test_every_algorithm_module_is_imported_by_discovery():
    names = _algorithm_modules()
    assert {"weight_only", "dynamic", "static", "activation_only", "equalization",
            "smoothquant", "bias_correction", "clip_search", "adaround"} <= set(names)
    registered = set(Q.registered_quantizers())
    for name in names:
        full = f"{algorithms.__name__}.{name}"
        assert full in sys.modules, f"{full} was not imported by discovery"
        assert algorithms.MODULES[name] is sys.modules[full]
        mod = sys.modules[full]
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, Q.BaseConfig) and cls.__module__ == full:
                assert cls in registered, f"{full}.{cls.__name__} has no quantizer"
                assert Q.registered_configs()[cls.__name__] is cls


def test_every_registered_builtin_config_is_exported():
    builtin = [c for c in Q.registered_quantizers()
               if c.__module__.startswith(algorithms.__name__ + ".")]
    assert len(builtin) >= 5
    for cls in builtin:
        assert cls.__name__ in Q.__all__, f"add {cls.__name__} to qkern.quantization.__all__"
        assert getattr(Q, cls.__name__) is cls
    for name in ("WeightOnlyConfig", "DynamicConfig", "StaticConfig", "ActivationOnlyConfig",
                 "AdaRoundConfig"):
        assert name in qkern.__all__ and getattr(qkern, name) is getattr(Q, name)


def test_public_names_resolve():
    for name in Q.__all__:
        assert getattr(Q, name) is not None, name


# ---- the calibration toolkit -----------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, *, scale=1.0):
        return self.fc(x) * scale


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.inp = nn.Linear(4, 8)
        self.block = _Block()

    def forward(self, x):
        return self.block(self.inp(x).relu(), scale=0.5)


def test_capture_block_inputs_replays_through_the_block():
    net = _Net()
    batches = [torch.randn(3, 4), torch.randn(2, 4)]
    got = Q.capture_block_inputs(net, "block", batches)
    assert len(got) == 2 and all(b.kwargs == {"scale": 0.5} for b in got)
    with torch.no_grad():
        for b, x in zip(got, batches):
            torch.testing.assert_close(b.args[0], net.inp(x).relu())
            assert torch.equal(Q.call_model(net.block, b), net(x))


def test_sequential_calibration_one_stage_sees_the_float_model():
    m = _mlp()
    batches = [torch.randn(4, 16)]
    seen: list[tuple[int, str]] = []
    hooked: list[list[str]] = []

    def hooks(stage):
        hooked.append(list(stage))
        return {}

    order = Q.sequential_calibration(m, ["4", "0", "2"], batches,
                                     lambda i, n: seen.append((i, n)), hooks,
                                     one_at_a_time=False)
    assert order == ["0", "2", "4"] and hooked == [["0", "2", "4"]]
    assert seen == [(0, "0"), (1, "2"), (2, "4")]
