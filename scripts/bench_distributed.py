"""1 process vs 2 processes under torchrun (gloo, CPU): extraction and ensemble-training throughput.

Builds a phantom run (shipped phantom backbone) once, then times `sae-cxr extract --force` and
`sae-cxr train-transcoders --force` under `torchrun --nproc_per_node P` for each setting below.
The figure is the stage's own time from the manifest (what torchrun startup and imports add is
printed as the wall time beside it); each setting is repeated and the median is reported, since
the machine is shared. Settings: 1 process x 1 thread (the per-core baseline), 2 processes x 1 thread
each, and with --all-threads 1 process x all threads (what a single process gets from the cores). The 2-process
results are checked against the 1-process ones (shards bit for bit, ensemble weights bit for bit).

    PYTHONPATH=. python scripts/bench_distributed.py --n 512 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, threads: int, args: list[str]) -> float:
    """Run one CLI command under torchrun; returns the wall time (raises with the output on failure)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "SAE_CXR_NO_PROGRESS": "1",
           "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--module", "sae_cxr.cli", "--", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln.lower()] or proc.stderr.splitlines()[-20:]
        raise SystemExit(f"{' '.join(cmd)} failed:\n" + "\n".join(errors))
    return time.perf_counter() - t0


def stage_seconds(run: Path, stage: str) -> float:
    """The stage's time; for train-transcoders its training loop only (the slowest rank's), since the
    evaluation that follows runs on rank 0 alone and is not what the ranks divide."""
    summary = json.loads((run / "manifest.json").read_text())["stages"][stage]["summary"]
    return float(summary["train_seconds"] if stage == "train-transcoders" else summary["seconds"])


def arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512, help="phantom images")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--latents", type=int, default=1024)
    ap.add_argument("--epochs", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stages", default="extract,train-transcoders")
    ap.add_argument("--all-threads", action="store_true", help="also time 1 process using every core's thread")
    ap.add_argument("--out", default=None, help="work directory (default: a temporary one, removed)")
    a = ap.parse_args()

    import torch

    from sae_cxr.config import RunConfig
    from sae_cxr.pipeline import run_stage
    from sae_cxr.run import RunDir

    work = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="bench-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig(name="bench-dist", seed=0)
    cfg.data.phantom.n, cfg.data.phantom.size = a.n, a.size
    cfg.extract.device, cfg.extract.num_workers = "cpu", 0
    cfg.extract.shard_size = max(16, a.n // 8)  # 8 shards: 4 per rank
    cfg.classifier.device = cfg.transcoders.device = "cpu"
    tc = cfg.transcoders
    tc.n_members, tc.n_latents, tc.train.epochs = a.members, a.latents, a.epochs
    tc.train.min_samples = 0  # --epochs means epochs here
    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(cfg.to_dict(), indent=1))
    run = RunDir(work / "run", create=True)
    t0 = time.perf_counter()
    for s in ("data", "extract", "train-classifier"):
        run_stage(run, s, cfg)
    cores = os.cpu_count() or 1
    print(f"{a.n} phantom images of {a.size} px, ensemble {a.members} x {a.latents}, {cores} cores, "
          f"torch {torch.__version__}; base run in {time.perf_counter() - t0:.0f} s; median of {a.repeats}")

    settings = [(1, 1), (2, 1)] + ([(1, cores)] if a.all_threads and cores > 1 else [])
    outputs = {"extract": "embeddings", "train-transcoders": "transcoders/ensemble.safetensors"}
    for stage in a.stages.split(","):
        secs: dict[tuple[int, int], list[float]] = {st: [] for st in settings}
        walls: dict[tuple[int, int], list[float]] = {st: [] for st in settings}
        kept: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        for _ in range(a.repeats):  # settings interleaved, so the shared machine's load hits each alike
            for st in settings:
                if stage == "extract":  # finished shards are reused even with --force: embed from scratch
                    shutil.rmtree(run.path / "embeddings", ignore_errors=True)
                shutil.rmtree(run.path / "transcoders/checkpoint", ignore_errors=True)  # of an interrupted run
                walls[st].append(torchrun(st[0], st[1], [stage, "--run", str(run.path), "--config", str(cfg_path),
                                                         "--force"]))
                secs[st].append(stage_seconds(run.path, stage))
                out = run.path / outputs[stage]
                kept[st] = ({p.name: arrays(p) for p in sorted(out.glob("shard-*.safetensors"))}
                            if out.is_dir() else {"ensemble": arrays(out)})
        med = {st: statistics.median(v) for st, v in secs.items()}
        for (nproc, threads), v in secs.items():
            rate = f", {a.n / med[(nproc, threads)]:6.1f} img/s" if stage == "extract" else " (training loop)"
            print(f"  {stage:<18} {nproc} proc x {threads} thread(s): {med[(nproc, threads)]:6.2f} s{rate} "
                  f"(min {min(v):.2f}, max {max(v):.2f}; wall with launch {statistics.median(walls[(nproc, threads)]):.1f} s)")
        ratios = [one / two for one, two in zip(secs[(1, 1)], secs[(2, 1)])]
        print(f"  {stage}: 2 proc vs 1 proc (1 thread each): speed-up {med[(1, 1)] / med[(2, 1)]:.2f}x from the medians, "
              f"paired ratios median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})", end="")
        if (1, cores) in med:
            print(f"; 2 proc x 1 thread vs 1 proc x {cores} threads {med[(1, cores)] / med[(2, 1)]:.2f}x", end="")
        ref, got = kept[(1, 1)], kept[(2, 1)]
        equal = sorted(ref) == sorted(got) and all(same(ref[k], got[k]) for k in ref)
        print(f"; 2-proc output identical to 1-proc: {equal}")
    if not a.out:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
