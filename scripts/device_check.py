"""Device check: does every rule run on CUDA (fp32, bf16), and what does a learned step cost on GPT-2 355M?

A first, unfused baseline for the GPU work (issue 17): no fused kernels yet. Two parts:

1. **Correctness** — every rule (and the ``celo2`` / ``celo2-base`` presets) steps a small model
   (conv, linear, embedding, layer norm) for 3 steps from the same parameters and gradients on the CPU
   and on the device; reports the largest parameter difference, and whether bf16 parameters stay finite.
2. **Speed** — GPT-2 355M built from its config (no download), batch 4×1024: ``optimizer.step()``
   in ms (median of timed steps after warm-up, CUDA-synchronised) for fused AdamW and each learned
   optimizer, with the peak memory the optimizer adds (allocator peak over parameters + gradients).

Writes ``device_check.json`` and ``device_check.md`` to ``--out``. Runs on the CPU too, with a tiny GPT-2
(``--tiny``), which is how it is tested here.

    python scripts/device_check.py --out $OUT            # on the GPU machine
    python scripts/device_check.py --tiny --out /tmp/dc  # anywhere, in seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from lopt_hf.bench import benchmark_names, make_optimizer

SPEED_OPTIMIZERS = ["adamw", "small_fc_lopt", "celo2", "celo2-base", "mlp_lopt"]


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.LayerNorm(16), nn.GELU(),
                         nn.Linear(16, 5))


def fixed_gradients(model: nn.Module, step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=generator) * 0.1 for p in model.parameters()]


def correctness(name: str, device: str) -> dict:
    """3 steps on the CPU and on ``device`` from the same start and gradients; bf16 on ``device`` too."""
    results = {}
    finals = []
    for where, dtype in (("cpu", torch.float32), (device, torch.float32), (device, torch.bfloat16)):
        model = small_model().to(device=where, dtype=dtype)
        optimizer = make_optimizer(name, model)
        for step in range(3):
            for param, grad in zip(model.parameters(), fixed_gradients(model, step)):
                param.grad = grad.to(device=where, dtype=dtype)
            optimizer.step()
        finals.append([p.detach().float().cpu() for p in model.parameters()])
    cpu, dev, bf16 = finals
    results["max_abs_diff_fp32"] = max(float((a - b).abs().max()) for a, b in zip(cpu, dev))
    results["max_param"] = max(float(a.abs().max()) for a in cpu)
    results["bf16_finite"] = all(bool(torch.isfinite(p).all()) for p in bf16)
    results["max_abs_diff_bf16_vs_fp32"] = max(float((a - b).abs().max()) for a, b in zip(cpu, bf16))
    return results


def gpt2(tiny: bool, device: str) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = (GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=512) if tiny else
              GPT2Config(n_layer=24, n_embd=1024, n_head=16, n_positions=1024))  # GPT-2 medium, 355M
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def speed(name: str, model: nn.Module, batch: tuple[int, int], device: str, warmup: int, repeats: int,
          chunk_size: int | None = None) -> dict:
    """Median ``step()`` ms with fixed gradients of one real backward pass; peak memory the optimizer adds."""
    for param in model.parameters():
        param.grad = None
    tokens = torch.randint(0, model.config.vocab_size, batch, device=device)
    with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    if name == "adamw":  # the baseline is torch's fused AdamW where there is one
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.startswith("cuda"))
    else:
        optimizer = make_optimizer(name, model)
        if chunk_size is not None:
            optimizer.chunk_size = chunk_size
    synchronize(device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    optimizer.step()
    synchronize(device)
    peak_extra_mb = None
    if device.startswith("cuda"):
        peak_extra_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    for _ in range(warmup):
        optimizer.step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    del optimizer
    return {"step_ms": statistics.median(times), "min_ms": min(times), "peak_extra_mb": peak_extra_mb,
            "params_finite": finite}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for device_check.json / .md")
    parser.add_argument("--tiny", action="store_true", help="tiny GPT-2 and few repeats (a CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk-size", type=int, help="elements per chunk of the per-element networks "
                                                        "(default: LearnedOptimizer's, tuned for CPU caches)")
    parser.add_argument("--skip-correctness", action="store_true", help="only the speed part")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = args.device
    report: dict = {"chunk_size": args.chunk_size, "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor(),
                    "torch": torch.__version__, "python": sys.version.split()[0],
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "correctness": {}, "speed": {}}
    try:
        import transformers
        report["transformers"] = transformers.__version__
    except ImportError:
        pass
    torch.backends.cuda.matmul.allow_tf32 = True  # PyLO's published figures are TF32
    for name in [] if args.skip_correctness else [n for n in benchmark_names() if n != "adamw"]:
        try:
            report["correctness"][name] = correctness(name, device)
        except Exception as err:  # noqa: BLE001  (report every rule, whatever breaks)
            report["correctness"][name] = {"error": f"{type(err).__name__}: {err}",
                                           "traceback": traceback.format_exc()[-1500:]}
        print(name, report["correctness"][name], flush=True)
    model = gpt2(args.tiny, device)
    report["model_parameters"] = sum(p.numel() for p in model.parameters())
    batch = (2, 64) if args.tiny else (4, 1024)
    warmup, repeats = (1, 3) if args.tiny else (3, 10)
    for name in SPEED_OPTIMIZERS:
        try:
            report["speed"][name] = speed(name, model, batch, device, warmup, repeats, args.chunk_size)
        except Exception as err:  # noqa: BLE001
            report["speed"][name] = {"error": f"{type(err).__name__}: {err}",
                                     "traceback": traceback.format_exc()[-1500:]}
        print(name, report["speed"][name], flush=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    (args.out / "device_check.json").write_text(json.dumps(report, indent=2))
    (args.out / "device_check.md").write_text(format_report(report))
    print(format_report(report))
    return 0


def format_report(report: dict) -> str:
    lines = [f"device: {report['device']}; torch {report['torch']}; transformers {report.get('transformers')}; "
             f"{report['date']}", "", "| rule | max \\|cpu − device\\| fp32 | max \\|param\\| | bf16 finite |",
             "|---|---:|---:|---|"]
    for name, row in report["correctness"].items():
        if "error" in row:
            lines.append(f"| {name} | error: {row['error'][:80]} | | |")
        else:
            lines.append(f"| {name} | {row['max_abs_diff_fp32']:.2e} | {row['max_param']:.2f} | {row['bf16_finite']} |")
    lines += ["", f"GPT-2 ({report.get('model_parameters', 0) / 1e6:.0f}M parameters), optimizer.step():", "",
              "| optimizer | step ms (median) | × AdamW | peak extra MiB |", "|---|---:|---:|---:|"]
    adamw = report["speed"].get("adamw", {}).get("step_ms")
    for name, row in report["speed"].items():
        if "error" in row:
            lines.append(f"| {name} | error: {row['error'][:80]} | | |")
            continue
        ratio = f"{row['step_ms'] / adamw:.1f}" if adamw else ""
        peak = f"{row['peak_extra_mb']:.0f}" if row["peak_extra_mb"] is not None else "n/a"
        lines.append(f"| {name} | {row['step_ms']:.2f} | {ratio} | {peak} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
