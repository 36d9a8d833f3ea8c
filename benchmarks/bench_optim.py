"""LARS/LAMB step time: per-parameter reference loop vs foreach vs fused (torch.compile).

The parameter set has the shapes of torchvision's ResNet-18 (62 tensors, ~11.7M parameters,
float32) in largebatch's two groups (N-D tensors decayed and adapted; 1-D ones excluded), with
fixed random gradients. The reference is the per-parameter implementation the tests check the
optimizers against (``tests/unit/optim/test_lars_lamb.py``: in-place ops, one tensor at a time).
Each contender owns its copy of parameters, gradients and state; contenders are interleaved
within every repeat (rotating who goes first) and the median over repeats is reported, since
the machine is noisy and shared. The fused path's first step (trace + inductor compile) is
timed separately and excluded from its steady state. Finally the three contenders' parameters
are compared, so the timings are of the same arithmetic.

    python3 benchmarks/bench_optim.py --threads 1 --repeats 7 --steps 5 [--cold]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, markdown_table, median, print_machine, spread, write_json  # noqa: E402

from largebatch.optim.lamb import LAMB  # noqa: E402
from largebatch.optim.lars import LARS  # noqa: E402
from largebatch.optim.param_groups import param_groups  # noqa: E402


def load_references() -> Any:
    """The test file's module (its RefLARS / RefLAMB), loaded by path."""
    path = REPO / "tests" / "optim" / "test_lars_lamb.py"
    spec = importlib.util.spec_from_file_location("_optim_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resnet18_params(seed: int = 0) -> list[nn.Parameter]:
    """Fresh float32 parameters with ResNet-18's shapes and a fixed random gradient each."""
    from torchvision.models import resnet18
    shapes = [p.shape for p in resnet18().parameters()]
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=gen) * 0.05)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    return params


WEIGHT_DECAY = {"LARS": 5e-5, "LAMB": 0.01}  # of the adapted group; 1-D tensors get none
CONTENDERS: dict[str, dict[str, Callable[[list[dict[str, Any]], Any], Any]]] = {
    "LARS": {
        "reference": lambda g, ref: ref.RefLARS(g, lr=0.1, momentum=0.9, trust_coef=0.001,
                                                eps=1e-8, trust_clip=False, always_adapt=False),
        "foreach": lambda g, ref: LARS(g, lr=0.1, momentum=0.9),
        "fused": lambda g, ref: LARS(g, lr=0.1, momentum=0.9, fused=True),
    },
    "LAMB": {
        "reference": lambda g, ref: ref.RefLAMB(g, lr=1e-3, betas=(0.9, 0.999), eps=1e-6,
                                                trust_clip=False, max_trust=10.0),
        "foreach": lambda g, ref: LAMB(g, lr=1e-3),
        "fused": lambda g, ref: LAMB(g, lr=1e-3, fused=True),
    },
}


def timed_steps(opt: Any, steps: int) -> tuple[float, float]:
    """(wall, thread-CPU) milliseconds per step over ``steps`` steps."""
    w0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        opt.step()
    return ((time.perf_counter() - w0) * 1e3 / steps, (time.thread_time() - c0) * 1e3 / steps)


def bench_one(name: str, args: argparse.Namespace, ref: Any) -> dict[str, Any]:
    """Build the three contenders on their own parameter copies and time them interleaved."""
    makers = CONTENDERS[name]
    params = {k: resnet18_params() for k in makers}
    opts = {k: make(param_groups(params[k], weight_decay=WEIGHT_DECAY[name], exclude_1d=True),
                    ref) for k, make in makers.items()}
    t0 = time.perf_counter()
    opts["fused"].step()  # trace + compile + the first step
    compile_s = time.perf_counter() - t0
    for k in ("reference", "foreach"):
        opts[k].step()  # same number of steps everywhere (and warm caches)
    wall: dict[str, list[float]] = {k: [] for k in makers}
    cpu: dict[str, list[float]] = {k: [] for k in makers}
    order = list(makers)
    for r in range(args.repeats):
        for k in order[r % 3:] + order[:r % 3]:
            w, c = timed_steps(opts[k], args.steps)
            wall[k].append(w)
            cpu[k].append(c)
    agree = {k: max(float((a - b).detach().abs().max() / b.detach().abs().max())
                    for a, b in zip(params[k], params["reference"]))
             for k in ("foreach", "fused")}  # all took 1 + repeats * steps steps
    return {"optimizer": name, "compile_s": compile_s, "wall_ms": wall, "cpu_ms": cpu,
            "max_rel_diff_vs_reference": agree}


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: ms/step (median, min-max) and ratio vs the reference, per contender."""
    rows = []
    for res in results:
        base = median(res["wall_ms"]["reference"])
        for k in ("reference", "foreach", "fused"):
            wall, cpu = res["wall_ms"][k], res["cpu_ms"][k]
            note = f"compile + 1st step {res['compile_s']:.1f} s" if k == "fused" else ""
            rows.append([res["optimizer"], k, median(wall), spread(wall), median(cpu),
                         f"{median(wall) / base:.2f}x", note])
    return markdown_table(["optimizer", "path", "ms/step (median)", "min-max", "CPU ms/step",
                           "vs reference", "note"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--optimizers", default="LARS,LAMB")
    parser.add_argument("--cold", action="store_true",
                        help="fresh inductor cache dir, so compile time is a cold compile")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    args = parser.parse_args()
    if args.cold:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_optim_inductor_")
    torch.set_num_threads(args.threads)
    print_machine({"repeats": args.repeats, "steps": args.steps, "cold_compile": args.cold})
    ref = load_references()
    results = []
    for name in args.optimizers.split(","):
        results.append(bench_one(name, args, ref))
        print(f"{name}: max relative diff vs reference "
              f"{results[-1]['max_rel_diff_vs_reference']}", flush=True)
    print(table(results))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
