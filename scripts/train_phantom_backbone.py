"""Train the phantom backbone and write the weights that ship in sae_cxr/assets/phantom_clip/.

    python scripts/train_phantom_backbone.py --reproduce   # the shipped weights: five phases (~65 min, 2 cores)
    python scripts/train_phantom_backbone.py --quick       # a small run to check the script

The shipped weights come from the phases in PHASES, each on freshly rendered images (a new seed, so
no phase sees an image twice): 24,000 images for 6 epochs from scratch, then fine-tuning on 20,000
new images at a time with a quarter to a third of them rendered at 96 px and upsampled (small films,
1-2 px nodules), the last with under-exposed films at 35% (subtle findings under low contrast and
extra noise). The fine-tuning phases are what lift the subtle concepts: on the 96 px held-out world
the nodule probe went 0.927 -> 0.944 -> 0.951 over phases 2-4, and on an artifact-like world (low
exposure planted on Edema, 96 px) consolidation under low exposure 0.893 -> 0.909 in phase 5.

Objective, per batch:
- concept loss: for every planted concept c, logit = exp(s) * cos(image, text(phrase_c)) + b_c with
  phrase_c a synonym drawn from the radiology vocabulary, BCE against the concept's presence. The
  text embedding of a concept phrase thus becomes that concept's classifier in image space: the
  embedding carries every concept linearly, and concept phrases retrieve their images.
- non-phantom vocabulary phrases (rib fracture, chest tube, ...) get the same logit with target 0,
  so the text labeler's distractors stay away from phantom images.
- a symmetric CLIP loss between images and their report or a synthetic caption, so sentences
  (with negations: "No pleural effusion.") land near their images.

The training world has no shortcut (a backbone is pretrained before anyone plants one) and mixes
image sizes, so the model serves phantom worlds of any seed, size and prevalence. Afterwards it
evaluates on held-out worlds: a linear probe per concept (AUROC) and text retrieval (precision@10,
AUROC of the phrase similarity), and saves those numbers in quality.json next to the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sae_cxr.backbones.base import letterbox
from sae_cxr.backbones.phantom_clip import (PhantomClip, PhantomClipBackbone, PhantomClipConfig, WordTokenizer,
                                            default_weights_dir, save_phantom_clip)
from sae_cxr.data.phantom import PhantomCase, PhantomConfig, PhantomWorld
from sae_cxr.findings import CONCEPT_NAMES, CONCEPTS, radiology_vocabulary


def render_world(cfg: PhantomConfig, size_out: int, workers: int) -> tuple[list[PhantomCase], np.ndarray]:
    world = PhantomWorld(cfg)
    cases, imgs = [], []
    for c, im in world.batches(64, workers=workers):
        cases += c
        t = torch.from_numpy(im)
        if im.shape[-1] != size_out:
            t = torch.stack([letterbox(x, size_out)[0][0] for x in t])
        imgs.append((t.numpy() * 255 + 0.5).astype(np.uint8))
    return cases, np.concatenate(imgs)


def synonyms() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {c: [] for c in CONCEPT_NAMES}
    for v in radiology_vocabulary():
        if v.concept:
            out[v.concept].append(v.phrase)
    return out


def distractors() -> list[str]:
    return [v.phrase for v in radiology_vocabulary() if v.concept is None]


def caption(case: PhantomCase, syn: dict[str, list[str]], rng: np.random.Generator) -> str:
    parts = []
    for name, c in case.concepts.items():
        side = c.get("side") or ""
        ok = [p for p in syn[name] if ("right" not in p or side in ("right", "bilateral"))
              and ("left" not in p or side in ("left", "bilateral")) and ("bilateral" not in p or side == "bilateral")]
        parts.append(str(rng.choice(ok or [CONCEPTS[name].phrase])))
    rng.shuffle(parts)
    return ". ".join(parts) + "." if parts else "normal chest radiograph."


def texts_for(cases: list[PhantomCase], syn, rng) -> list[str]:
    return [c.report if rng.random() < 0.5 else caption(c, syn, rng) for c in cases]


def concept_matrix(cases: list[PhantomCase]) -> np.ndarray:
    return np.array([[name in c.concepts for name in CONCEPT_NAMES] for c in cases], dtype=np.float32)


def to_gray(batch_u8: np.ndarray, mean: float, std: float) -> torch.Tensor:
    return ((torch.from_numpy(batch_u8).float() / 255.0 - mean) / std).unsqueeze(1)


@torch.no_grad()
def embed(model: PhantomClip, imgs_u8: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    out = []
    for s in range(0, len(imgs_u8), batch):
        e, _ = model.encode_image(to_gray(imgs_u8[s:s + batch], model.cfg.mean, model.cfg.std))
        out.append(e.numpy())
    return np.concatenate(out)


def evaluate(model: PhantomClip, worlds: list[tuple[str, list[PhantomCase], np.ndarray]]) -> dict:
    """Linear-probe AUROC per concept and phrase retrieval, on each held-out world."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    backbone = PhantomClipBackbone(model, "training")
    phrases = [CONCEPTS[c].phrase for c in CONCEPT_NAMES]
    t = backbone.encode_texts(phrases).numpy()
    report = {}
    for name, cases, imgs in worlds:
        x = embed(model, imgs)
        y = concept_matrix(cases)
        n_fit = int(0.6 * len(x))
        probe, retrieval = {}, {}
        for j, c in enumerate(CONCEPT_NAMES):
            yt, yv = y[:n_fit, j], y[n_fit:, j]
            if yt.min() == yt.max() or yv.min() == yv.max():
                probe[c] = float("nan")
                continue
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000)).fit(x[:n_fit], yt)
            probe[c] = float(roc_auc_score(yv, clf.decision_function(x[n_fit:])))
            sim = x @ t[j]
            top = np.argsort(-sim)[:10]
            retrieval[c] = {"precision_at_10": float(y[top, j].mean()), "auroc": float(roc_auc_score(y[:, j], sim))}
        report[name] = {"n": len(x), "probe_auroc": probe, "retrieval": retrieval,
                        "min_probe_auroc": float(np.nanmin(list(probe.values())))}
    return report


# The phases behind the shipped weights, in order; each starts from the previous one's weights.
PHASES: list[dict] = [
    {"n_train": 24000, "epochs": 6, "lr": 2e-3, "seed": 1234},
    {"n_train": 20000, "epochs": 3, "lr": 6e-4, "seed": 4321, "small_frac": 0.25},
    {"n_train": 20000, "epochs": 2, "lr": 4e-4, "seed": 5678, "small_frac": 0.3},
    {"n_train": 20000, "epochs": 2, "lr": 3e-4, "seed": 8765, "small_frac": 0.3},
    {"n_train": 20000, "epochs": 2, "lr": 3e-4, "seed": 9876, "small_frac": 0.3, "prevalence": ["low_exposure=0.35"]},
]


def parse_prevalence(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in CONCEPT_NAMES:
            raise SystemExit(f"--prevalence takes CONCEPT=P with CONCEPT one of {list(CONCEPT_NAMES)}; got {item!r}")
        try:
            out[name] = float(value)
        except ValueError:
            raise SystemExit(f"--prevalence {item!r}: {value!r} is not a number") from None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(default_weights_dir()))
    ap.add_argument("--n-train", type=int, default=24000)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--eval-n", type=int, default=3000)
    ap.add_argument("--quick", action="store_true", help="a tiny run to check the script end to end")
    ap.add_argument("--reproduce", action="store_true", help="run both phases that made the shipped weights")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the weights in --out without training")
    ap.add_argument("--init", default=None, help="start from the weights in this folder (fine-tuning)")
    ap.add_argument("--small-frac", type=float, default=0.0,
                    help="share of training images rendered at 96 px and upsampled (robustness to small films)")
    ap.add_argument("--prevalence", nargs="*", default=[], metavar="CONCEPT=P",
                    help="per-concept prevalence overrides for the training worlds (e.g. low_exposure=0.35: "
                         "more under-exposed films, so subtle findings survive low contrast)")
    a = ap.parse_args()
    prevalence = parse_prevalence(a.prevalence)
    if a.quick:
        a.n_train, a.epochs, a.eval_n = 512, 1, 400
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    t0 = time.perf_counter()
    if a.reproduce:
        import subprocess
        import sys
        import tempfile

        base = [sys.executable, __file__, "--workers", str(a.workers), "--eval-n", str(a.eval_n)]
        previous, record = None, []
        for i, phase in enumerate(PHASES):
            last = i == len(PHASES) - 1
            out = a.out if last else tempfile.mkdtemp(prefix=f"phantom_clip_phase{i + 1}_")
            args = [f"--{k.replace('_', '-')}={v}" for k, v in phase.items() if k != "prevalence"]
            args += ["--prevalence", *phase.get("prevalence", [])]
            subprocess.run(base + ["--out", out, *(["--init", previous] if previous else []), *args], check=True)
            record.append({**phase, **json.loads((Path(out) / "quality.json").read_text())["training"]})
            previous = out
        quality = json.loads((Path(a.out) / "quality.json").read_text())
        quality["training"] = {"phases": record}
        (Path(a.out) / "quality.json").write_text(json.dumps(quality, indent=1))
        return
    if a.eval_only:
        from sae_cxr.backbones.phantom_clip import load_phantom_clip

        report_quality(load_phantom_clip(a.out), a, t0, {"eval_only": True})
        return

    # Training data: mostly at the model's size, a fifth rendered larger and downsampled, and
    # optionally a share rendered smaller and upsampled.
    n_big = a.n_train // 5
    n_small = int(a.n_train * a.small_frac)
    parts = [render_world(PhantomConfig(n=a.n_train - n_big - n_small, seed=a.seed, size=128, prevalence_scale=1.5,
                                        prevalence=prevalence),
                          128, a.workers),
             render_world(PhantomConfig(n=n_big, seed=a.seed + 1, size=192, prevalence_scale=1.5, prevalence=prevalence),
                          128, a.workers)]
    if n_small:
        parts.append(render_world(PhantomConfig(n=n_small, seed=a.seed + 2, size=96, prevalence_scale=1.5,
                                                prevalence=prevalence), 128,
                                  a.workers))
    cases = [c for p, _ in parts for c in p]
    imgs = np.concatenate([im for _, im in parts])
    y_all = torch.from_numpy(concept_matrix(cases))
    print(f"rendered {len(cases)} training images in {time.perf_counter() - t0:.0f} s")

    syn, distract = synonyms(), distractors()
    all_text = [c.report for c in cases[:5000]] + [p for v in syn.values() for p in v] + distract
    all_text += [caption(c, syn, rng) for c in cases[:2000]] + ["normal chest radiograph."]
    if a.init:
        from sae_cxr.backbones.phantom_clip import load_phantom_clip

        model = load_phantom_clip(a.init)
        cfg = model.cfg
        print(f"fine-tuning from {a.init}")
    else:
        cfg = PhantomClipConfig(vocab=WordTokenizer.build_vocab(all_text), concepts=list(CONCEPT_NAMES))
        model = PhantomClip(cfg)
    tok = WordTokenizer(cfg.vocab, cfg.context_length)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, vocab {len(cfg.vocab)}")

    steps_per_epoch = len(cases) // a.batch
    total = steps_per_epoch * a.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.05)
    warm = max(1, min(300, total // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    step = 0
    for epoch in range(a.epochs):
        model.train()
        order = rng.permutation(len(cases))
        t_ep = time.perf_counter()
        run_loss = []
        for b in range(steps_per_epoch):
            idx = order[b * a.batch:(b + 1) * a.batch]
            gray = to_gray(imgs[idx], cfg.mean, cfg.std)
            y = y_all[idx]
            texts = texts_for([cases[i] for i in idx], syn, rng)
            phrase = [str(rng.choice(syn[c])) for c in CONCEPT_NAMES]
            negs = list(rng.choice(distract, size=24, replace=False))
            tids = tok(texts + phrase + negs)
            img_emb, _ = model.encode_image(gray)
            txt = model.encode_text(tids)
            t_cap, t_con, t_neg = txt[:len(idx)], txt[len(idx):len(idx) + len(phrase)], txt[len(idx) + len(phrase):]
            scale = model.logit_scale.exp().clamp(max=100.0)
            con_logits = scale * img_emb @ t_con.T + model.concept_bias
            loss_con = F.binary_cross_entropy_with_logits(con_logits, y)
            neg_logits = scale * img_emb @ t_neg.T + model.concept_bias.mean()
            loss_neg = F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits))
            sim = scale * img_emb @ t_cap.T
            target = torch.arange(len(idx))
            loss_clip = 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target))
            loss = loss_con + 0.3 * loss_neg + 0.3 * loss_clip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            run_loss.append((loss_con.item(), loss_clip.item()))
            if b % 50 == 0:
                lc, lp = np.mean(run_loss[-50:], axis=0)
                rate = (b + 1) * a.batch / (time.perf_counter() - t_ep)
                print(f"epoch {epoch} step {b}/{steps_per_epoch} concept {lc:.4f} clip {lp:.3f} "
                      f"({rate:.0f} img/s)", flush=True)
        save_phantom_clip(model, a.out)
        print(f"epoch {epoch} done in {time.perf_counter() - t_ep:.0f} s; saved to {a.out}", flush=True)

    report_quality(model, a, t0, {"n_train": len(cases), "epochs": a.epochs, "batch": a.batch, "lr": a.lr,
                                  "seed": a.seed})


def report_quality(model: PhantomClip, a: argparse.Namespace, t0: float, training: dict) -> None:
    model.eval()
    held_out = []
    for name, wc in (("seed 777, 128 px", PhantomConfig(n=a.eval_n, seed=777, size=128)),
                     ("seed 778, 224 px, shortcut et_tube:Edema:0.85",
                      PhantomConfig(n=a.eval_n, seed=778, size=224, shortcut="et_tube:Edema:0.85")),
                     ("seed 779, 96 px, prevalence x0.6", PhantomConfig(n=a.eval_n, seed=779, size=96,
                                                                         prevalence_scale=0.6))):
        c, im = render_world(wc, 128, a.workers)
        held_out.append((name, c, im))
    quality = evaluate(model, held_out)
    quality["training"] = {**training, "seconds": round(time.perf_counter() - t0)}
    Path(a.out, "quality.json").write_text(json.dumps(quality, indent=1))
    for name, q in quality.items():
        if name == "training":
            continue
        print(f"\n{name}: n={q['n']}, min probe AUROC {q['min_probe_auroc']:.3f}")
        print(f"  {'concept':<24}{'probe AUROC':>12}{'text P@10':>11}{'text AUROC':>12}")
        for c in CONCEPT_NAMES:
            r = q["retrieval"].get(c, {})
            print(f"  {c:<24}{q['probe_auroc'][c]:>12.3f}{r.get('precision_at_10', float('nan')):>11.2f}"
                  f"{r.get('auroc', float('nan')):>12.3f}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
