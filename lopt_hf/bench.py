"""Optimizer step-time and memory benchmark: every learned rule against ``torch.optim.AdamW``.

All optimizers step the same model (by default the 512→1024→1024→10 MLP, 1.59M parameters)
with the same fixed gradients. Times are medians over repeated ``step()`` calls after warm-up,
measured in one process so the AdamW ratio compares like with like. Peak extra memory is
measured in fresh subprocesses per optimizer (the median of :data:`MEMORY_RUNS`; on Linux, by resetting the
peak-RSS counter right before the first step; on CUDA with the allocator's peak counter), after the same optimizer has
stepped a tiny model once: the first step of an optimizer in a process also pages in the code of every
kernel it calls and initialises libraries (≈ 8 MB of RSS for the learned rules, measured), a one-off
cost that does not grow with the model and is not the step's memory.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .harness import RULE_PRESETS, route_parameters
from .layout import infer_layouts, to_rule_layout
from .optim import LearnedOptimizer
from .rules import available_rules, build_rule

ADAMW = "adamw"
DEFAULT_LAYERS = (512, 1024, 1024, 10)
# The model a throwaway optimizer steps before memory is measured (see measure_peak_extra_memory).
WARMUP_LAYERS = (16, 16, 4)
# Named setups of a rule with a harness, timed like a rule: name -> (rule, rule_config, harness).
# Named setups benchmarked besides the bare rules (Celo2 with its harness, Celo2-base without).
PRESETS = RULE_PRESETS


# A benchmark name with this suffix times the rule with ``LearnedOptimizer(compile=True)``.
COMPILED = "+compile"


def compiled_names(names: Sequence[str]) -> list[str]:
    """``name + COMPILED`` for each named rule (or preset) that ``compile=True`` steps otherwise
    (:func:`~lopt_hf.kernels.compiled.takes_compiled_path`)."""
    from .kernels.compiled import takes_compiled_path

    compiled = []
    for name in names:
        rule_name, rule_config, _ = setup_of(name)
        if name != ADAMW and takes_compiled_path(build_rule(rule_name, **rule_config)):
            compiled.append(name + COMPILED)
    return compiled


def setup_of(name: str) -> tuple[str, dict, dict | None]:
    """``(rule name, rule hyper-parameters, harness)`` of a benchmark name: a :data:`PRESETS` entry, else the
    rule of that name with its defaults and no harness."""
    return PRESETS.get(name, (name, {}, None))


def benchmark_names() -> list[str]:
    """Every rule (a preset replaces the rule of the same name) and every preset."""
    return [*available_rules(), *[name for name in PRESETS if name not in available_rules()]]


@dataclasses.dataclass
class StepResult:
    """Timing and memory of one optimizer on the benchmark model."""

    name: str
    step_ms: float
    ratio_to_adamw: float | None = None
    state_mb: float | None = None
    peak_extra_mb: float | None = None
    floor_ms: float | None = None  # the step's matrix-product FLOPs at the sgemm rate of the same run
    ratio_to_floor: float | None = None
    sgemm_gflops: float | None = None  # the matmul rate measured in the same run


def sgemm_gflops(device: str = "cpu", size: int = 2048, repeats: int = 5) -> float:
    """The float32 matmul rate (GFLOP/s) of ``size × size`` products on ``device``, measured now: the
    anchor of the arithmetic floors (a figure from another day or machine does not transfer)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    milliseconds = time_steps(lambda: torch.mm(a, b), device, warmup=2, repeats=repeats)
    return 2.0 * size ** 3 / (milliseconds * 1e-3) / 1e9


def step_flops(optimizer: torch.optim.Optimizer) -> float | None:
    """FLOPs of the matrix products in one step of a ``LearnedOptimizer`` over its learned tensors, each
    in the rule's layout (:meth:`~lopt_hf.rules.base.UpdateRule.tensor_flops`); ``None`` for other
    optimizers and for rules without matrix products."""
    if not isinstance(optimizer, LearnedOptimizer):
        return None
    flops = [optimizer.rule.tensor_flops(tuple(to_rule_layout(param.detach(), optimizer.layout_of(param)).shape))
             for group in optimizer.param_groups if group.get("route", "learned") == "learned"
             for param in group["params"]]
    known = [value for value in flops if value is not None]
    return float(sum(known)) if known else None


def make_mlp(layers: Sequence[int], device: str = "cpu") -> nn.Module:
    """An MLP with ReLU between the given layer widths, with deterministic random gradients."""
    torch.manual_seed(0)
    modules: list[nn.Module] = []
    for fan_in, fan_out in zip(layers[:-1], layers[1:]):
        modules += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    model = nn.Sequential(*modules[:-1]).to(device)
    for param in model.parameters():
        param.grad = 1e-2 * torch.randn_like(param)
    return model


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` for ``"adamw"``, otherwise a LearnedOptimizer with a seeded random theta.

    A :data:`PRESETS` name builds its rule with its hyper-parameters and harness (e.g. Celo2:
    AdamW param groups for 1-D tensors), as ``load_lopt`` would for such an artifact. A name ending in
    :data:`COMPILED` steps with ``compile=True``.
    """
    if name == ADAMW:
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    compile = name.endswith(COMPILED)
    name = name.removesuffix(COMPILED)
    rule_name, rule_config, harness = setup_of(name)
    rule = build_rule(rule_name, **rule_config)
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    lr = 1e-3 if name in PRESETS else 1.0
    params = route_parameters(harness, model, lr=lr)
    optimizer = LearnedOptimizer(params, rule, theta, lr=lr, param_layouts=infer_layouts(model), compile=compile)
    if rule.needs_loss:  # fixed gradients, no forward pass: give such rules (opt2vec, celo) a constant loss
        optimizer.step = functools.partial(optimizer.step, loss=1.0)  # type: ignore[method-assign]
    optimizer.set_total_steps(10_000)  # scheduled rules (celo, velo) plan by it; others ignore it
    return optimizer


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step: Callable[[], object], device: str, warmup: int, repeats: int) -> float:
    """Median wall time of ``step()`` in milliseconds."""
    for _ in range(warmup):
        step()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def state_megabytes(optimizer: torch.optim.Optimizer) -> float:
    """Size of the optimizer's per-parameter state tensors in MB."""
    total = sum(value.numel() * value.element_size() for state in optimizer.state.values()
                for value in state.values() if isinstance(value, torch.Tensor))
    return total / 2**20


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak_extra_memory(name: str, layers: Sequence[int], device: str) -> tuple[float, float]:
    """(state MB, peak extra MB over the model+grads) for two steps of optimizer ``name``.

    A throwaway optimizer of the same name steps first, on :data:`WARMUP_LAYERS` (small enough that the memory
    it frees is negligible), so the peak is the step's and not the process's first-call costs (code paged in,
    libraries initialised); a compiled rule (:data:`COMPILED`) on a model of the same shapes, which compiles
    its graphs (cached for the process), so the peak is not Inductor's either."""
    make_optimizer(name, make_mlp(layers if name.endswith(COMPILED) else WARMUP_LAYERS, device)).step()
    gc.collect()
    model = make_mlp(layers, device)
    optimizer = make_optimizer(name, model)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        optimizer.step()
        optimizer.step()
        torch.cuda.synchronize()
        return state_megabytes(optimizer), (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    base_kb = _rss_kb("VmRSS:")
    optimizer.step()
    optimizer.step()
    return state_megabytes(optimizer), (_rss_kb("VmHWM:") - base_kb) / 1024


def run_benchmark(names: Sequence[str] | None = None, layers: Sequence[int] = DEFAULT_LAYERS, device: str = "cpu",
                  warmup: int = 3, repeats: int = 10, measure_memory: bool = True,
                  compile: bool = False) -> list[StepResult]:
    """Time AdamW and every named rule on the same model; return one result per optimizer.

    ``compile``: also time each named rule that takes the compiled path with ``compile=True`` (a row
    ``name+compile``; the warm-up steps include its compilation, so ``warmup`` must be ≥ 1)."""
    names = [ADAMW, *[n for n in (names or benchmark_names()) if n != ADAMW]]
    if compile:
        if warmup < 1:
            raise ValueError("timing compiled steps needs warmup >= 1 (the first step compiles)")
        names += compiled_names(names)
    gflops = sgemm_gflops(device)
    results = []
    for name in names:
        model = make_mlp(layers, device)
        optimizer = make_optimizer(name, model)
        result = StepResult(name, time_steps(optimizer.step, device, warmup, repeats), sgemm_gflops=gflops)
        flops = step_flops(optimizer)
        if flops:
            result.floor_ms = flops / (gflops * 1e9) * 1e3
            result.ratio_to_floor = result.step_ms / result.floor_ms
        results.append(result)
    adamw_ms = results[0].step_ms
    for result in results:
        result.ratio_to_adamw = result.step_ms / adamw_ms
        if measure_memory:
            result.state_mb, result.peak_extra_mb = _memory_in_subprocess(result.name, layers, device)
    return results


# Fresh processes per memory figure, the median reported: the peak RSS of one run varies by several MB with
# where the C allocator places the temporaries (AdamW's on the benchmark MLP: 18–30 MB over 8 runs).
MEMORY_RUNS = 3


def _memory_in_subprocess(name: str, layers: Sequence[int], device: str,
                          runs: int = MEMORY_RUNS) -> tuple[float | None, float | None]:
    """(state MB, median peak extra MB) of :func:`measure_peak_extra_memory` in ``runs`` fresh processes."""
    code = ("import json, sys; from lopt_hf.bench import measure_peak_extra_memory; "
            f"print(json.dumps(measure_peak_extra_memory({name!r}, {list(layers)!r}, {device!r})))")
    peaks = []
    try:
        for _ in range(runs):
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 timeout=600)
            state_mb, peak_mb = json.loads(out.stdout.strip().splitlines()[-1])
            peaks.append(peak_mb)
        return state_mb, statistics.median(peaks)
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None, None  # e.g. no /proc on this platform: report timing only


def format_results(results: Sequence[StepResult], layers: Sequence[int], device: str,
                   gflops: float | None = None) -> str:
    """A plain-text table of the results (``gflops``: the sgemm rate the floors were computed with)."""
    num_params = sum(fan_in * fan_out + fan_out for fan_in, fan_out in zip(layers[:-1], layers[1:]))
    gflops = gflops or (results[0].sgemm_gflops if results else None)
    rate = f", sgemm {gflops:.0f} GFLOP/s" if gflops else ""
    width = max([16, *(len(r.name) + 2 for r in results)])  # "small_fc_lopt+compile" and its numbers stay apart
    lines = [f"optimizer step on MLP {'→'.join(map(str, layers))} ({num_params / 1e6:.2f}M parameters), "
             f"device={device}, torch {torch.__version__}, threads={torch.get_num_threads()}{rate}",
             f"{'optimizer':<{width}}{'step ms':>10}{'× AdamW':>10}{'floor ms':>10}{'× floor':>9}{'state MB':>10}"
             f"{'peak extra MB':>15}"]
    for r in results:
        state = f"{r.state_mb:.1f}" if r.state_mb is not None else "n/a"
        peak = f"{r.peak_extra_mb:.1f}" if r.peak_extra_mb is not None else "n/a"
        floor = f"{r.floor_ms:.1f}" if r.floor_ms is not None else "-"
        to_floor = f"{r.ratio_to_floor:.1f}" if r.ratio_to_floor is not None else "-"
        lines.append(f"{r.name:<{width}}{r.step_ms:>10.2f}{r.ratio_to_adamw:>10.1f}{floor:>10}{to_floor:>9}{state:>10}"
                     f"{peak:>15}")
    lines.append("floor: the FLOPs of the rule's matrix products (per-element network, Newton–Schulz) over the learned "
                 "tensors at the sgemm rate measured in this run ('-': none)")
    return "\n".join(lines)


# Elements of the one large tensor of the memory benchmark (an nn.Linear(7072, 7072): 50.0M weights).
MEMORY_TENSOR_NUMEL = 50_000_000


@dataclasses.dataclass
class MemoryResult:
    """Peak memory over parameters and gradients of one optimizer stepping one large tensor."""

    name: str
    state_mb: float | None
    peak_extra_mb: float | None
    ratio_to_adamw: float | None = None


def run_memory_benchmark(names: Sequence[str], numel: int = MEMORY_TENSOR_NUMEL,
                         device: str = "cpu", runs: int = MEMORY_RUNS) -> list[MemoryResult]:
    """Peak extra memory of AdamW and each named optimizer on one ``nn.Linear(n, n)`` with ``n² ≈ numel``
    (two steps, each optimizer in ``runs`` fresh subprocesses, the median; see :func:`measure_peak_extra_memory`),
    with the ratio to AdamW's measured in the same run."""
    side = max(1, round(numel ** 0.5))
    layers = [side, side]
    results = [MemoryResult(name, *_memory_in_subprocess(name, layers, device, runs))
               for name in [ADAMW, *[n for n in names if n != ADAMW]]]
    adamw = results[0].peak_extra_mb
    for result in results:
        if adamw and result.peak_extra_mb is not None:
            result.ratio_to_adamw = result.peak_extra_mb / adamw
    return results


def format_memory_results(results: Sequence[MemoryResult], numel: int, device: str) -> str:
    """A plain-text table of :func:`run_memory_benchmark`'s results."""
    side = max(1, round(numel ** 0.5))
    lines = [f"peak memory over parameter + gradient, one nn.Linear({side}, {side}) ({side * side / 1e6:.1f}M "
             f"weights), two steps, device={device}, torch {torch.__version__}",
             f"{'optimizer':<16}{'state MB':>10}{'peak extra MB':>15}{'× AdamW':>10}"]
    for r in results:
        state = f"{r.state_mb:.1f}" if r.state_mb is not None else "n/a"
        peak = f"{r.peak_extra_mb:.1f}" if r.peak_extra_mb is not None else "n/a"
        ratio = f"{r.ratio_to_adamw:.2f}" if r.ratio_to_adamw is not None else "n/a"
        lines.append(f"{r.name:<16}{state:>10}{peak:>15}{ratio:>10}")
    return "\n".join(lines)
