"""``batch.micro_size: auto`` on CUDA: real out-of-memory errors during the search, clean recovery.

Skips without CUDA; ``benchmarks/gpu_micro_batch.sh`` (and ``gpu_check.sh``) run it on a GPU.
The MLP is wide enough (hidden 65536: ~0.8 MB of activations and gradients per sample) that the
largest candidates of a per-rank batch of 3 x 2^17 need several hundred GB: those trials really
run out of memory, on any current GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from largebatch.config import load_config
from largebatch.models.mnist import MLP
from largebatch.plan import micro_candidates
from largebatch.tune import micro_batch
from largebatch.tune.exact_state import preserved
from largebatch.tune.step_memory import cuda_trial, step_and_measure
from tests.conftest import CONFIGS, assert_same_weights, model_weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (run benchmarks/gpu_micro_batch.sh "
                                       "on a GPU machine)")

MLP_YAML = str(CONFIGS / "mnist" / "mlp.yaml")


def _nll(model, x, y):
    return F.nll_loss(model(x), y)


def test_cuda_search_survives_real_ooms_and_leaks_nothing(tmp_path):
    device = torch.device("cuda")
    cfg = load_config(MLP_YAML, ["batch.global_size=393216", "batch.micro_size=auto",
                                 "model.hidden=65536", "train.device=cuda",
                                 "batch.memory_fraction=0.9", f"log.out_dir={tmp_path}"])
    torch.manual_seed(0)
    model = MLP(65536).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(64, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with preserved(model, opt):  # warm-up: cuBLAS workspaces exist from here on
        step_and_measure(model, opt, _nll, x, y)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    limit = micro_batch.memory_limit(cfg, device)
    cands = micro_candidates(393216, 1)
    trial = cuda_trial(model, opt, _nll, x, y, "fp32", limit)
    found, peaks = micro_batch.run_search(cands, trial)
    assert found is not None and peaks[found] is not None and peaks[found] <= limit
    assert None in peaks.values(), peaks  # a trial really ran out of memory
    bigger = [m for m in peaks if m > found]
    assert bigger and all(peaks[m] is None or peaks[m] > limit for m in bigger), peaks
    # clean: same allocated memory, same weights, no grads, no optimizer state
    assert torch.cuda.memory_allocated(device) == before
    assert_same_weights({k: v for k, v in model.state_dict().items()}, init)
    assert all(p.grad is None for p in model.parameters()) and not opt.state
    # the run's entry point agrees (rank 0 of 1) and caches what it found
    auto = micro_batch.find_micro_size(cfg, model, opt, _nll, (x, y), 1, lambda m: m)
    assert auto.micro_size == found and auto.source == "search"
    again = micro_batch.find_micro_size(cfg, model, opt, _nll, (x, y), 1, lambda m: m)
    assert again.source == "cache" and again.micro_size == found and again.trials == 0


def test_cuda_auto_run_matches_the_explicit_micro_size(tmp_path, mnist_root):
    from largebatch.train.build import build_run, finish_run
    common = [f"data.root={mnist_root}", "data.download=false", "data.subset=2400",
              "data.test_subset=500", "batch.global_size=240", "train.device=cuda",
              "train.max_steps=4", "log.progress=false", "checkpoint.resume=never"]
    auto = build_run(load_config(MLP_YAML, [*common, "batch.micro_size=auto",
                                            f"log.out_dir={tmp_path / 'auto'}"]), quiet=True)
    found = auto.plan.micro_size
    assert auto.plan.micro_auto["source"] == "search" and found == 240  # a tiny net: all fit
    finish_run(auto, auto.trainer.fit(), quiet=True)
    explicit = build_run(load_config(MLP_YAML, [*common, f"batch.micro_size={found}",
                                                f"log.out_dir={tmp_path / 'm'}"]), quiet=True)
    finish_run(explicit, explicit.trainer.fit(), quiet=True)
    assert_same_weights(model_weights(tmp_path / "auto"), model_weights(tmp_path / "m"))
