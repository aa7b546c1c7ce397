#!/usr/bin/env python
"""Benchmark: vectorised ensemble training step vs a Python loop over E single transcoders.

Both run in ONE process on identical data and config, interleaved repeat by repeat, so a busy
shared machine slows both alike; the script reports medians over repeats and the ratio.

(a) vectorised: sae_cxr.transcoders.train.EnsembleTrainer.step (one chunked GEMM for all
    members, sparse selection and backward, one fused Adam).
(b) loop: E independent transcoders, each its own module and fused Adam, the way SAELens and
    dictionary_learning train one SAE: dense encoder, torch.topk, dense decoder, autograd,
    per-member clipping, decoder renormalisation.

FLOP limit = (plain fp32 matmul FLOP/s, timed here) / (2 * d_in * m * E FLOPs per sample), i.e.
the samples/s if the step cost nothing but the irreducible dense encoder forward. Two matmuls
are timed: the encoder-shaped GEMM [B, d_in] x [d_in, E*m] and a square 2048^3 one; the
percentages use the FASTER of the two (the stricter limit), both are printed.

On a machine shared with other jobs, wall-clock rates swing with their load (a parallel
region waits for its slowest thread), and the loop, with ~20 parallel regions per member,
suffers more than the vectorised step. --cpu-time runs everything on ONE thread and times it
with the thread's CPU clock, which counts only the time this process actually ran: a
contention-robust measure of the work each implementation does.

The batch is the one training uses (TrainConfig.batch_size = 256, which the demo and the CXR
configs keep); a per-step cost (Adam over every parameter, renormalisation) weighs more there than
at a larger batch, so --batch 1024 reads higher.

Usage: python scripts/bench_ensemble.py [--configs demo,cxr] [--repeats 5] [--batch N] [--profile] [--cpu-time]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sae_cxr.transcoders import _native  # noqa: E402
from sae_cxr.transcoders.ensemble import EnsembleConfig, TranscoderEnsemble  # noqa: E402
from sae_cxr.transcoders.train import EnsembleTrainer, TrainConfig  # noqa: E402


@dataclass
class BenchConfig:
    name: str
    d_in: int
    d_out: int
    m: int
    k: int
    E: int = 100
    activation: str = "topk"
    matryoshka: tuple[int, ...] | None = None
    batch: int = TrainConfig().batch_size
    """Samples per step: what training uses (TrainConfig.batch_size; the demo and the CXR configs keep it)."""


CONFIGS = {
    # the stage's default: BatchTopK, Matryoshka (m/8, m/2, m), targets [h, 2x] (d_out = 256 + 256)
    "demo": BenchConfig("demo", d_in=256, d_out=512, m=128, k=32, activation="batchtopk", matryoshka=(16, 64, 128)),
    "demo-topk512": BenchConfig("demo-topk512", d_in=256, d_out=256, m=512, k=32),
    "cxr": BenchConfig("cxr-lanic", d_in=1024, d_out=256, m=2048, k=32),
}


class LoopTranscoder(nn.Module):
    """One TopK (or BatchTopK) transcoder as SAELens / dictionary_learning write it (dense everywhere)."""

    def __init__(self, d_in: int, d_out: int, m: int, k: int, seed: int, activation: str = "topk"):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(m, d_out, generator=g)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)
        we = torch.randn(m, d_in, generator=g)
        self.W_enc = nn.Parameter((we / we.norm(dim=1, keepdim=True)).t().contiguous())  # [d_in, m]
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.k = k
        self.activation = activation

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        pre = x @ self.W_enc + self.b_enc
        if self.activation == "batchtopk":  # the k * B largest over the whole batch
            flat = pre.relu().flatten()
            top = torch.topk(flat, self.k * len(x))
            return torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre)
        top = torch.topk(pre, self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.codes(x) @ self.W_dec + self.b_dec


class LoopEnsemble:
    def __init__(self, bc: BenchConfig, lr: float = 1e-3, clip: float = 1.0):
        self.members = [LoopTranscoder(bc.d_in, bc.d_out, bc.m, bc.k, seed=e, activation=bc.activation)
                        for e in range(bc.E)]
        self.prefixes = bc.matryoshka or (bc.m,)
        self.opts = [torch.optim.Adam(mod.parameters(), lr=lr, fused=True) for mod in self.members]
        self.clip = clip

    def step(self, x: torch.Tensor, h: torch.Tensor) -> None:
        tv = (h - h.mean(0)).pow(2).sum()
        for mod, opt in zip(self.members, self.opts):
            z = mod.codes(x)  # Matryoshka: every prefix reconstructs on its own, losses summed
            loss = sum((z[:, :p] @ mod.W_dec[:p] + mod.b_dec - h).pow(2).sum() for p in self.prefixes) / tv
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(mod.parameters(), self.clip)
            with torch.no_grad():
                W, g = mod.W_dec, mod.W_dec.grad
                g.sub_((g * W).sum(-1, keepdim=True) * W)
                opt.step()
                W /= W.norm(dim=-1, keepdim=True)


CLOCK = time.perf_counter


def _time(fn, n: int) -> float:
    t0 = CLOCK()
    for _ in range(n):
        fn()
    return (CLOCK() - t0) / n


def bench_config(bc: BenchConfig, batch: int, repeats: int, steps: int, skip_loop: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, bc.d_in, generator=g)
    W1 = torch.randn(bc.d_out, bc.d_in, generator=g) / bc.d_in ** 0.5
    h = torch.relu(x @ W1.t())
    ecfg = EnsembleConfig(d_in=bc.d_in, d_out=bc.d_out, n_members=bc.E, n_latents=bc.m, k=bc.k,
                          activation=bc.activation, matryoshka=bc.matryoshka)
    model = TranscoderEnsemble(ecfg)
    trainer = EnsembleTrainer(model, TrainConfig(lr=1e-3), n_samples=10 * batch)
    loop = None if skip_loop else LoopEnsemble(bc)
    W_flat = torch.randn(bc.E * bc.m, bc.d_in, generator=g)
    sq = torch.randn(2048, 2048, generator=g)
    enc_flops = 2.0 * batch * bc.d_in * bc.m * bc.E
    # warm up (allocations, kernel compilation, first-touch pages)
    for _ in range(2):
        trainer.step(x, h, lr=1e-3)
        if loop is not None:
            loop.step(x, h)
    x @ W_flat.t()
    sq @ sq
    rows = []
    for r in range(repeats):
        t_enc = _time(lambda: x @ W_flat.t(), 2)
        t_sq = _time(lambda: sq @ sq, 3)
        t_vec = _time(lambda: trainer.step(x, h, lr=1e-3), steps)
        t_loop = _time(lambda: loop.step(x, h), steps) if loop is not None else float("nan")
        rows.append({"gemm_enc_gflops": enc_flops / t_enc / 1e9, "gemm_square_gflops": 2 * 2048 ** 3 / t_sq / 1e9,
                     "vec_sps": batch / t_vec, "loop_sps": batch / t_loop, "ratio": t_loop / t_vec})
        print(f"  [{bc.name} repeat {r + 1}/{repeats}] vec {rows[-1]['vec_sps']:.0f}/s  loop {rows[-1]['loop_sps']:.0f}/s"
              f"  ratio {rows[-1]['ratio']:.2f}  gemm {rows[-1]['gemm_enc_gflops']:.0f} / "
              f"{rows[-1]['gemm_square_gflops']:.0f} GFLOP/s", flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    flops_per_sample = 2.0 * bc.d_in * bc.m * bc.E
    peak = max(med["gemm_enc_gflops"], med["gemm_square_gflops"]) * 1e9
    med["limit_sps"] = peak / flops_per_sample
    med["vec_pct_limit"] = 100 * med["vec_sps"] / med["limit_sps"]
    med["loop_pct_limit"] = 100 * med["loop_sps"] / med["limit_sps"]
    med["vec_pct_limit_enc_gemm"] = 100 * med["vec_sps"] / (med["gemm_enc_gflops"] * 1e9 / flops_per_sample)
    return {"config": bc.__dict__, "batch": batch, "repeats": rows, "median": med}


def profile_step(bc: BenchConfig, batch: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, bc.d_in, generator=g)
    h = torch.relu(x @ (torch.randn(bc.d_out, bc.d_in, generator=g) / bc.d_in ** 0.5).t())
    model = TranscoderEnsemble(EnsembleConfig(d_in=bc.d_in, d_out=bc.d_out, n_members=bc.E, n_latents=bc.m, k=bc.k,
                                              activation=bc.activation, matryoshka=bc.matryoshka))
    trainer = EnsembleTrainer(model, TrainConfig(lr=1e-3), n_samples=10 * batch)
    for _ in range(2):
        trainer.step(x, h, lr=1e-3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            trainer.step(x, h, lr=1e-3)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=36)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="demo,cxr", help="comma list of: " + ", ".join(CONFIGS))
    ap.add_argument("--batch", type=int, default=None, help="samples per step (default: the training batch, 256)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="steps per timing (each repeat)")
    ap.add_argument("--members", type=int, default=None, help="override E (default 100)")
    ap.add_argument("--no-loop", action="store_true", help="skip the loop baseline")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of the vectorised step")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--cpu-time", action="store_true", help="one thread, timed with the thread CPU clock")
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        torch.set_num_threads(1)
        CLOCK = time.thread_time

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads ({'thread CPU time' if args.cpu_time else 'wall clock'}), "
          f"{platform.processor() or platform.machine()}, "
          f"native kernels: {_native.available()}, load average at start: {os.getloadavg()[0]:.2f}")
    results = {}
    for name in args.configs.split(","):
        bc = CONFIGS[name.strip()]
        if args.members:
            bc = dataclasses.replace(bc, E=args.members)
        if args.batch:
            bc = dataclasses.replace(bc, batch=args.batch)
        print(f"{bc.name}: E={bc.E} d_in={bc.d_in} d_out={bc.d_out} m={bc.m} k={bc.k} batch={bc.batch}", flush=True)
        res = bench_config(bc, bc.batch, args.repeats, args.steps, args.no_loop)
        results[bc.name] = res
        if args.profile:
            print(profile_step(bc, bc.batch))
    print(f"\nload average at end: {os.getloadavg()[0]:.2f} (other processes share these cores)")
    hdr = (f"{'config':<11}{'vec samples/s':>14}{'loop samples/s':>15}{'ratio':>7}{'limit/s':>9}"
           f"{'vec %limit':>11}{'loop %limit':>12}{'vec %enc-gemm':>14}")
    print(hdr)
    for name, res in results.items():
        md = res["median"]
        print(f"{name:<11}{md['vec_sps']:>14.0f}{md['loop_sps']:>15.0f}{md['ratio']:>7.2f}{md['limit_sps']:>9.0f}"
              f"{md['vec_pct_limit']:>10.1f}%{md['loop_pct_limit']:>11.1f}%{md['vec_pct_limit_enc_gemm']:>13.1f}%")
    unit = "per CPU-second of one thread" if args.cpu_time else "per wall-clock second"
    print(f"(samples {unit}; medians over repeats; %limit uses the faster of the two timed fp32 matmuls)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
