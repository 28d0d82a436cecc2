"""Are rendered patients demographically faithful *different people*? Normal PA radiographs of
many jobs (sex balanced, ages 20-85, each its own `seed` and `patient_seed`) are rendered with
the DRR backend at its default options and measured:

1. sex from pixels: L2 logistic regression on 32×32 images, out-of-fold AUROC       (≥ 0.90)
2. age from pixels: ridge regression, out-of-fold MAE / MAE of the training mean    (≤ 0.7)
3. lung-field shape diversity: mean pairwise IoU of box-cropped 64×64 lung fields,
   rendered vs the v7labs masks in torchxrayvision (within 0.05); SD of the lung
   fields' height/width                                                              (≥ 0.7 × real)
4. cardiothoracic ratio by sex and age band next to published adult norms           (report)
5. nearest-neighbour similarity: median over images of the highest Pearson
   correlation with any other image (64×64)                                         (report)
6. throughput: normal PA images at 256² per second, one process, default device    (≥ 1.5/s)

    python bench/virtual_patients.py                  # N=160 at 128 px, prints the table
    python bench/virtual_patients.py --json vp.json   # also writes every number

Jobs, folds and λ choices come from fixed seeds, so two runs (e.g. before and after a backend
change) differ only by what the backend renders. The statistics are plain numpy: no scikit-learn.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.special import expit
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from drr_realism import xrv_frontal_masks  # noqa: E402

from chexforge.backends.drr import realism  # noqa: E402
from chexforge.backends.drr.backend import DRRBackend  # noqa: E402
from chexforge.backends.drr.options import DRROptions  # noqa: E402

# Per-sample L2 penalty on standardised pixels. Chosen per outer fold by an inner 4-fold CV
# (log-loss for sex, MAE for age), so the same code suits a backend with no signal (large λ)
# and one with a strong signal (small λ) without anyone tuning it.
LAMBDAS = 10.0 ** np.arange(-2.0, 5.0)
BANDS = ((20, 39), (40, 59), (60, 85))

# Published adult PA cardiothoracic ratios (mean ± SD where given). None of the sources found
# gives SDs per age band; they agree the ratio is higher in women and rises with age.
# - Anyanwu GE, Agwuna KK. Sex dimorphism of the heart diameters and cardiothoracic ratios in a
#   normal Nigerian population. Nigerian Medical Journal 2007;48(1):24-26 (510 men, 508 women,
#   4-80 years): men 0.462 ± 0.041, women 0.472 ± 0.044.
# - Mensah YB, Mensah K, Asiamah S, Gbadamosi H, Idun EA, Brakohiapa W, Oddoye A. Establishing
#   the cardiothoracic ratio using chest radiographs in an indigenous Ghanaian population. Ghana
#   Med J 2015;49(3):159-64, doi:10.4314/gmj.v49i3.6 (n = 1989): men 0.452, women 0.467, mean
#   rising gradually with age.
# - Inoue K, Yoshii K, Ito H. Effect of aging on cardiothoracic ratio in women: a longitudinal
#   study. Gerontology 45(1), doi:10.1159/000022056: +0.020 (95 % CI 0.012-0.028) in 9 years.
# - Effect of aging on the cardiothoracic ratio of men. J Am Geriatr Soc 1982;30(6):404-409
#   (243 men, 20-95 years): CTR rises across the lifespan, even without heart disease.
# - Nickol K, Wade AJ 1982 (1432 male job applicants, 17-64 years): median 0.43 in white men,
#   0.46 in African men; "age accounted for relatively little of the variation".
CTR_NORMS = {"M": (0.462, 0.041), "F": (0.472, 0.044)}  # Anyanwu & Agwuna 2007
CTR_SOURCES = ("Anyanwu & Agwuna, Niger Med J 2007;48:24 (mean ± SD by sex); Mensah et al., Ghana Med J "
               "2015;49:159 (men 0.452, women 0.467, rising with age); Inoue et al., Gerontology 45(1) "
               "(women +0.020 in 9 years); J Am Geriatr Soc 1982;30:404 (men, rising with age)")


def make_jobs(n: int, size: int, seed: int = 7) -> list[dict]:
    """n normal PA jobs: exactly half women, integer ages uniform on 20-85, distinct seeds and
    patient seeds (drawn apart, so no backend can tie the person to the exposure by accident)."""
    rng = np.random.default_rng(seed)
    sexes = rng.permutation(np.array(["F", "M"] * (n // 2) + ["F"] * (n % 2)))
    ages = rng.integers(20, 86, n)
    patients = rng.choice(2**31 - 1, n, replace=False)
    return [{"job_id": f"vp{seed}-{i}", "seed": seed * 100_000 + i, "patient_seed": int(patients[i]),
             "size": size, "view": "PA", "sex": str(sexes[i]), "age": int(ages[i]),
             "anatomy": ["lung_left", "lung_right", "heart"]} for i in range(n)]


# ---- statistics -------------------------------------------------------------------------------

def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney form: P(score of a positive > score of a negative), ties counted half."""
    pos = np.asarray(labels, bool)
    n1, n0 = pos.sum(), (~pos).sum()
    return float((rankdata(scores)[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def stratified_folds(strata: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold number per sample; each stratum shuffled (fixed seed) and dealt round the folds."""
    rng, fold, start = np.random.default_rng(seed), np.empty(len(strata), int), 0
    for s in np.unique(strata):
        idx = rng.permutation(np.flatnonzero(strata == s))
        fold[idx] = (np.arange(len(idx)) + start) % k
        start += len(idx)
    return fold


def design(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels standardised with the training rows' statistics, in the coordinates of their
    principal axes. An L2 penalty keeps the weights in the span of the centred training rows,
    so fitting in these ≤ n-1 coordinates is the full-pixel fit exactly, only cheaper."""
    mu, sd = train.mean(0), train.std(0)
    sd[sd < 1e-8] = 1.0  # constant pixels (background) carry nothing
    a, b = (train - mu) / sd, (test - mu) / sd
    _, s, vt = np.linalg.svd(a, full_matrices=False)
    v = vt[s > s[0] * 1e-9].T
    return a @ v, b @ v


def ridge(z: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """argmin mean((y - b - z·w)²) + λ|w|² for column-centred z, closed form."""
    n, k = z.shape
    return np.linalg.solve(z.T @ z + n * lam * np.eye(k), z.T @ (y - y.mean())), float(y.mean())


def logistic(z: np.ndarray, t: np.ndarray, lam: float, iters: int = 100) -> tuple[np.ndarray, float]:
    """argmin mean log-loss + λ/2 |w|² (intercept unpenalised): Newton with step halving."""
    n, k = z.shape
    a = np.hstack([z, np.ones((n, 1))])
    pen = np.r_[np.full(k, lam), 0.0]

    def objective(beta):
        eta = a @ beta
        return np.mean(np.logaddexp(0, eta) - t * eta) + 0.5 * np.sum(pen * beta**2)

    beta = np.zeros(k + 1)
    f = objective(beta)
    for _ in range(iters):
        p = expit(a @ beta)
        grad = a.T @ (p - t) / n + pen * beta
        hess = (a * (p * (1 - p))[:, None]).T @ a / n + np.diag(pen + 1e-12)
        step = np.linalg.solve(hess, grad)
        for _ in range(30):  # halve until the objective does not rise (Newton can overshoot)
            f_new = objective(beta - step)
            if f_new <= f:
                break
            step /= 2
        beta, f = beta - step, f_new
        if np.abs(step).max() < 1e-9:
            break
    return beta[:-1], float(beta[-1])


def fit_predict(kind: str, xtr, ytr, xte, lam: float) -> np.ndarray:
    ztr, zte = design(xtr, xte)
    w, b = ridge(ztr, ytr, lam) if kind == "ridge" else logistic(ztr, ytr, lam)
    return zte @ w + b


def loss(kind: str, y: np.ndarray, pred: np.ndarray) -> float:
    if kind == "ridge":
        return float(np.abs(y - pred).mean())
    return float(np.mean(np.logaddexp(0, pred) - y * pred))


def out_of_fold(kind: str, x, y, fold, strata, inner: int = 4) -> tuple[np.ndarray, list[float]]:
    """Out-of-fold predictions; per outer fold, λ from an inner stratified CV on its training rows."""
    pred, chosen = np.empty(len(y)), []
    for f in range(fold.max() + 1):
        tr, te = fold != f, fold == f
        ifold = stratified_folds(strata[tr], inner, seed=100 + f)
        xt, yt = x[tr], y[tr]
        scores = []
        for lam in LAMBDAS:
            p = np.empty(len(yt))
            for g in range(inner):
                p[ifold == g] = fit_predict(kind, xt[ifold != g], yt[ifold != g], xt[ifold == g], lam)
            scores.append(loss(kind, yt, p))
        lam = float(LAMBDAS[int(np.argmin(scores))])
        pred[te] = fit_predict(kind, xt, yt, x[te], lam)
        chosen.append(lam)
    return pred, chosen


def area_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Box filter: for an integer factor, the mean of each size×size block (area averaging)."""
    return np.asarray(Image.fromarray(img.astype(np.float32)).resize((size, size), Image.BOX))


def crop_resample(mask: np.ndarray, size: int = 64) -> np.ndarray:
    """The mask inside its own bounding box, resampled to size² (bilinear on 0/1, antialiased
    when shrinking, then > 0.5): its shape, without position or scale."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32)
    return np.asarray(Image.fromarray(box).resize((size, size), Image.BILINEAR)) > 0.5


def mean_pairwise_iou(masks: np.ndarray) -> float:
    m = masks.reshape(len(masks), -1).astype(np.float64)
    inter = m @ m.T
    area = m.sum(1)
    iu = np.triu_indices(len(m), 1)
    return float((inter / (area[:, None] + area[None, :] - inter))[iu].mean())


def nearest_neighbour_corr(images: np.ndarray) -> np.ndarray:
    """Per image, the highest Pearson correlation with any other image."""
    x = images.reshape(len(images), -1).astype(np.float64)
    x = (x - x.mean(1, keepdims=True)) / np.maximum(x.std(1, keepdims=True), 1e-12)
    c = x @ x.T / x.shape[1]
    np.fill_diagonal(c, -np.inf)
    return c.max(1)


def aspect(mask: np.ndarray, pixel_aspect: float = 1.0) -> float:
    h, w = realism.extent(mask)
    return h / w * pixel_aspect


# ---- the benchmark ----------------------------------------------------------------------------

def render(backend: DRRBackend, jobs: list[dict]) -> dict:
    """Images, lung fields (both lungs), CTRs. Each job's own scene: with virtual patients a job
    may bring its own person, so nothing is shared across jobs but the covering structures of a repeated scene."""
    images, fields, ctr = [], [], []
    last, cover = None, None
    for job in jobs:
        s = backend.render(job)
        scene = backend.scene_for(job)
        if scene is not last:  # field_masks needs what covers the scene's lungs; rebuild it only on a new scene
            last, cover = scene, realism.cover_slabs(scene.phantom)
        # What covers the lungs, projected through the job's patient (its deformation), as the image was.
        f = realism.field_masks(scene, s, cover, backend.options.projector, backend=backend, job=job)
        images.append(s.image)
        fields.append(f["lung_left"] | f["lung_right"])
        ctr.append(float(s.meta["ctr"]))
    return {"images": np.stack(images), "fields": fields, "ctr": np.array(ctr)}


def throughput(backend: DRRBackend, n: int, size: int) -> float:
    jobs = make_jobs(n + 1, size, seed=8)
    backend.render(jobs[0])  # warm-up: CT loading, scene preparation, allocator
    t0 = time.perf_counter()
    for job in jobs[1:]:
        backend.render(job)
    return n / (time.perf_counter() - t0)


def summary(v) -> dict:
    v = np.asarray(v, float)
    return {"n": int(len(v)), "mean": float(v.mean()) if len(v) else None,
            "sd": float(v.std(ddof=1)) if len(v) > 1 else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=160, help="jobs measured (sex balanced)")
    p.add_argument("--size", type=int, default=128, help="image size of the measured jobs")
    p.add_argument("--speed-n", type=int, default=24, help="images timed for throughput (256², after one warm-up)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    print(f"machine: {machine()}")
    t0 = time.perf_counter()
    backend = DRRBackend(DRROptions())
    jobs = make_jobs(a.n, a.size)
    with torch.no_grad():
        r = render(backend, jobs)
    t_render = time.perf_counter() - t0
    print(f"rendered {a.n} normal PA radiographs at {a.size}² in {t_render:.1f} s")

    sex = np.array([j["sex"] == "M" for j in jobs], float)
    age = np.array([j["age"] for j in jobs], float)
    x32 = np.stack([area_resize(im, 32).ravel() for im in r["images"]]).astype(np.float64)
    fold = stratified_folds(sex, 5, seed=0)
    sex_score, sex_lams = out_of_fold("logistic", x32, sex, fold, sex)
    age_pred, age_lams = out_of_fold("ridge", x32, age, fold, sex)
    mean_pred = np.array([age[fold != fold[i]].mean() for i in range(len(age))])
    sex_auc = auroc(sex_score, sex)
    mae, mae_mean = float(np.abs(age_pred - age).mean()), float(np.abs(mean_pred - age).mean())

    pairs, xrv_counts = xrv_frontal_masks(256)
    real_fields = [left | right for left, right, _ in pairs]
    iou_ours = mean_pairwise_iou(np.stack([crop_resample(m) for m in r["fields"]]))
    iou_real = mean_pairwise_iou(np.stack([crop_resample(m) for m in real_fields]))
    asp_ours = summary([aspect(m) for m in r["fields"]])
    asp_real = summary([aspect(m, px) for m, (_, _, px) in zip(real_fields, pairs)])
    nn = nearest_neighbour_corr(np.stack([area_resize(im, 64) for im in r["images"]]))
    with torch.no_grad():
        speed = throughput(backend, a.speed_n, 256)

    rows = [  # measurement, rendered, reference, target text, met
        ("sex AUROC from 32² pixels (5-fold OOF)", f"{sex_auc:.3f}", "chance 0.5", "≥ 0.90", sex_auc >= 0.90),
        ("age MAE from 32² pixels (years)", f"{mae:.1f}", f"training-mean predictor {mae_mean:.1f}",
         f"≤ 0.7 × ({0.7 * mae_mean:.1f}); ratio {mae / mae_mean:.2f}", mae <= 0.7 * mae_mean),
        ("lung-field mean pairwise IoU (box-cropped 64²)", f"{iou_ours:.3f}", f"v7labs {iou_real:.3f}",
         "within 0.05 of real", abs(iou_ours - iou_real) <= 0.05),
        ("lung-field height/width: SD (mean)", f"{asp_ours['sd']:.3f} ({asp_ours['mean']:.2f})",
         f"v7labs {asp_real['sd']:.3f} ({asp_real['mean']:.2f})", f"≥ 0.7 × real ({0.7 * asp_real['sd']:.3f})",
         asp_ours["sd"] >= 0.7 * asp_real["sd"]),
        ("nearest-neighbour correlation, median (64²)", f"{np.median(nn):.3f}",
         "no real images here", "report", None),
        ("throughput, normal PA 256² (images/s)", f"{speed:.2f}", f"{a.speed_n} images after 1 warm-up",
         "≥ 1.5", speed >= 1.5),
    ]
    print(f"\nv7labs lung masks (torchxrayvision): {xrv_counts['kept']} frontal of {xrv_counts['total']}")
    print("\n| measurement | rendered | reference | target | met |\n|---|---|---|---|---|")
    for name, ours, ref, target, met in rows:
        print(f"| {name} | {ours} | {ref} | {target} | {'—' if met is None else 'met' if met else '**not met**'} |")
    print(f"\nλ chosen by inner CV per outer fold: sex {sex_lams}, age {age_lams}")

    ctr_rows = {}
    print("\n| cardiothoracic ratio | n | rendered mean ± SD | published (sex, all ages) |\n|---|---|---|---|")
    for s in ("F", "M"):
        for lo, hi in (*BANDS, (20, 85)):
            pick = np.array([j["sex"] == s and lo <= j["age"] <= hi for j in jobs])
            st = summary(r["ctr"][pick])
            ctr_rows[f"{s} {lo}-{hi}"] = st
            ours = f"{st['mean']:.3f} ± {st['sd']:.3f}" if st["n"] > 1 else "—"
            print(f"| {'women' if s == 'F' else 'men'} {lo}-{hi} | {st['n']} | {ours} | "
                  f"{CTR_NORMS[s][0]:.3f} ± {CTR_NORMS[s][1]:.3f}, rising with age |")
    print(f"\nCTR sources: {CTR_SOURCES}")
    total = time.perf_counter() - t0
    print(f"\nbenchmark took {total:.0f} s")

    if a.json:
        result = {
            "machine": machine(), "n": a.n, "size": a.size, "seconds": {"render": t_render, "total": total},
            "sex": {"auroc": sex_auc, "lambdas": sex_lams, "target": 0.90, "met": sex_auc >= 0.90},
            "age": {"mae": mae, "mae_mean_predictor": mae_mean, "ratio": mae / mae_mean, "lambdas": age_lams,
                    "target_ratio": 0.7, "met": mae <= 0.7 * mae_mean},
            "lung_shape": {"iou_rendered": iou_ours, "iou_real": iou_real, "iou_met": abs(iou_ours - iou_real) <= 0.05,
                           "aspect_rendered": asp_ours, "aspect_real": asp_real,
                           "aspect_met": asp_ours["sd"] >= 0.7 * asp_real["sd"], "xrv_masks": xrv_counts},
            "ctr": {"by_sex_band": ctr_rows, "published": CTR_NORMS, "sources": CTR_SOURCES},
            "nearest_neighbour": {"median": float(np.median(nn)), "per_image": nn.tolist()},
            "throughput": {"images_per_s": speed, "n": a.speed_n, "size": 256, "target": 1.5, "met": speed >= 1.5},
            "jobs": [{**j, "ctr": float(c), "sex_score": float(ss), "age_pred": float(ap), "fold": int(f),
                      "nn_corr": float(q)} for j, c, ss, ap, f, q in
                     zip(jobs, r["ctr"], sex_score, age_pred, fold, nn)],
        }
        a.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
