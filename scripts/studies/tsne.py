"""`make tsne RUNS="a b"`: the paper's Figure 5, a t-SNE of the learned features of test images.

Each of RUNS is a row of configs/ablation.yaml (its run at --seed, resolved with the same
key=value overrides the ablation ran with) or a run folder (holding config.yaml); the default is
the ablation's `baseline` and `full_recipe`. For each run: the weights the row is scored with
(the student or the teacher, best checkpoint), the penultimate features (timm's
`forward_head(..., pre_logits=True)`: the pooled features before the classifier) of --images
test images (one seeded sample, the same for every run, centre crop), and a 2-D t-SNE
(scikit-learn, PCA initialisation, fixed seed). The classes separate better where the scores
are higher: the silhouette score of the features (cosine distance) and of the 2-D embedding,
and the leave-one-out 5-nearest-neighbour accuracy of the features (cosine). Writes
results/tsne.png (the runs side by side, coloured by class) and results/tsne.md; prints the scores.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.cli import int_at_least
from common.errors import UserError, cli_main
from common.fs import write_text_atomic
from common.metrics import top1
from data_prep.layout import Layout
from ensemble.submission import read_labels
from scripts.studies import runner
from train.checkpoint import load_into, load_weights
from train.config import load_config, run_dir
from train.inference import build_crop_transform
from train.model import build_model
from train.views import EvalDataset

MIN_IMAGES = 20
KNN = 5  # neighbours of the k-NN accuracy


def resolve(target: str, seed: int, overrides: list[str], results: Path) -> tuple[str, dict, str]:
    """(label, config, role) of a row of the ablation or of a run folder."""
    folder = Path(target)
    if (folder / "config.yaml").is_file():
        cfg = load_config(
            str(folder / "config.yaml"), [f"out_dir={folder.parent}", f"name={folder.name}"]
        )
        return folder.name, cfg, "teacher" if cfg["mt_weight"] > 0 else "student"
    spec = runner.load_spec()
    rows = {r["name"]: r for r in spec["rows"]}
    if target not in rows:
        raise UserError(
            f"{target!r} is neither a run folder (with config.yaml) nor a row of "
            f"configs/ablation.yaml ({', '.join(rows)})"
        )
    (job,) = runner.row_jobs(spec, [rows[target]], [seed], overrides)
    cfg = load_config(spec["model"], runner.job_overrides(spec["model"], job, results))
    return f"{target} (seed {seed})", cfg, runner.EVALS[job.eval][0]


def test_sample(data_dir: Path, images: int) -> list[tuple[str, Path, int]]:
    """A seeded sample of `images` labelled test items, the same for every run."""
    layout = Layout(data_dir)
    labels = read_labels(layout.test_labels)
    items = [(i, path, labels[i]) for i, path in layout.test_items()]
    chosen = np.random.default_rng(0).permutation(len(items))[: min(images, len(items))]
    sample = [items[i] for i in sorted(chosen)]
    classes = len({item[2] for item in sample})
    if not 2 <= classes < len(sample) or len(sample) <= KNN:
        raise UserError(
            f"{len(sample)} test images of {classes} classes sampled from {data_dir}: the "
            f"silhouette needs 2 or more classes, fewer than the images, and {KNN}-NN more than "
            f"{KNN} images; raise --images"
        )
    return sample


@torch.inference_mode()
def features(cfg: dict[str, Any], role: str, items: list) -> np.ndarray:
    """Pooled penultimate features [N, D] of `items` (centre crop) under the run's best weights."""
    model = build_model(cfg)
    load_into(model, load_weights(run_dir(cfg), "best", role), run_dir(cfg))
    backbone = model.eval().backbone
    loader = DataLoader(EvalDataset(items, build_crop_transform(cfg, "center")), batch_size=256)
    rows = [
        backbone.forward_head(backbone.forward_features(crops[:, 0]), pre_logits=True)
        for crops, _, _ in loader
    ]
    return torch.cat(rows).float().numpy()


def knn_accuracy(feats: np.ndarray, labels: np.ndarray, k: int = KNN) -> float:
    """Leave-one-out k-NN accuracy (%) under cosine similarity; a tied vote goes to the
    smallest class index."""
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True).clip(min=1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    neighbours = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    votes = np.array([np.bincount(labels[n], minlength=labels.max() + 1) for n in neighbours])
    return top1(votes, labels)


def separation(feats: np.ndarray, embedded: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import silhouette_score

    return {
        "silhouette_features": float(silhouette_score(feats, labels, metric="cosine")),
        "silhouette_tsne": float(silhouette_score(embedded, labels)),
        "knn5": knn_accuracy(feats, labels),
    }


def embed(feats: np.ndarray) -> np.ndarray:
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (len(feats) - 1) / 3)  # t-SNE needs perplexity < samples
    tsne = TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=0)
    return tsne.fit_transform(feats)


def plot(panels: list[dict], classes: list[str], labels: np.ndarray, path: Path) -> None:
    plt = runner.pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1.5, 5.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for c, name in enumerate(classes):
            points = panel["embedded"][labels == c]
            ax.scatter(points[:, 0], points[:, 1], s=4, color=plt.cm.tab10(c % 10), label=name)
        scores = panel["scores"]
        ax.set_title(
            f"{panel['label']}\nsilhouette {scores['silhouette_features']:.3f} (features), "
            f"{scores['silhouette_tsne']:.3f} (2-D); {KNN}-NN {scores['knn5']:.1f}%",
            fontsize=9,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, markerscale=3, fontsize=8, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    runner.save_figure(fig, path)


def report(panels: list[dict], images: int) -> str:
    lines = [
        "| run | test images | silhouette, features (cosine) | silhouette, t-SNE 2-D "
        f"| {KNN}-NN accuracy, features (%) |",
        "|---|---|---|---|---|",
    ]
    for p in panels:
        s = p["scores"]
        lines.append(
            f"| {p['label']} | {images} | {s['silhouette_features']:.3f} "
            f"| {s['silhouette_tsne']:.3f} | {s['knn5']:.1f} |"
        )
    return "\n".join(lines) + "\n"


@cli_main
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help="rows or run folders, then key=value overrides")
    parser.add_argument("--seed", type=int, default=0, help="the seed of a row's run")
    parser.add_argument(
        "--images",
        type=int_at_least(MIN_IMAGES),
        default=2000,
        help=f"test images to embed (at least {MIN_IMAGES}: t-SNE, the silhouette and {KNN}-NN "
        "need several per class)",
    )
    parser.add_argument("--results", type=Path, default=Path("results"), help="output folder")
    args = parser.parse_intermixed_args(argv)
    overrides = [t for t in args.targets if "=" in t]
    runs = [t for t in args.targets if "=" not in t]
    if not runs:
        spec = runner.load_spec()
        runs = [spec["baseline"], spec["full_recipe"]]
    resolved = [resolve(r, args.seed, overrides, args.results) for r in runs]
    data_dirs = {str(cfg["data_dir"]) for _, cfg, _ in resolved}
    if len(data_dirs) != 1:
        raise UserError(f"the runs were trained on different datasets ({', '.join(data_dirs)})")
    items = test_sample(Path(data_dirs.pop()), args.images)
    labels = np.array([item[2] for item in items])
    panels = []
    for label, cfg, role in resolved:
        feats = features(cfg, role, items)
        embedded = embed(feats)
        panels.append(
            {
                "label": f"{label}, {role}",
                "embedded": embedded,
                "scores": separation(feats, embedded, labels),
            }
        )
    classes = Layout(Path(resolved[0][1]["data_dir"])).classes()
    plot(panels, classes, labels, args.results / "tsne.png")
    table = report(panels, len(items))
    write_text_atomic(args.results / "tsne.md", table)
    print(table, end="")
    print(f"wrote {args.results / 'tsne.png'}, {args.results / 'tsne.md'}")
    return panels


if __name__ == "__main__":
    main()
