"""train/losses.py against float64 brute-force loops written here, on realistic soft targets.

Targets are built the way the pipeline builds them: smoothed one-hots (timm's off = s/C), Mixup
with one lambda per batch and the flipped batch as partner (timm's batch mode), CutMix with lambda
from integer boxes, Dirichlet draws, and the two views of an image carrying the same row.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from train.config import available, load_config
from train.losses import (
    AttractRepulseLoss,
    contrastive_regularization,
    jensen_shannon,
    mean_teacher_consistency,
    positive_mask,
    reverse_cross_entropy,
    soft_cross_entropy,
    symmetric_cross_entropy,
)

torch.set_num_threads(1)
F64 = torch.float64


# ---- targets ---------------------------------------------------------------------------------
def smoothed(labels: torch.Tensor, classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / classes
    y = torch.full((len(labels), classes), off, dtype=F64)
    return y.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def make_targets(kind: str, n: int, classes: int, seed: int, views: int = 2) -> torch.Tensor:
    """[views * n, classes] float64 soft targets, the rows of one image repeated per view."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    y = smoothed(labels, classes, 0.1)
    if kind == "mixup":  # one lambda for the batch, partner = the flipped batch (timm)
        lam = torch.distributions.Beta(0.5, 0.5).sample().item()
        t = lam * y + (1 - lam) * y.flip(0)
    elif kind == "mixup_half":  # lam = 0.5 makes each image and its partner identical
        t = 0.5 * y + 0.5 * y.flip(0)
    elif kind == "cutmix":  # per-image boxes on a 4x4 grid: lambdas repeat across images
        area = torch.randint(0, 17, (n, 1), generator=g).to(F64)
        lam = 1 - area / 16
        t = lam * y + (1 - lam) * y.flip(0)
    elif kind == "unmixed":
        t = y
    elif kind == "one_hot":
        t = smoothed(labels, classes, 0.0)
    elif kind == "dirichlet":
        t = torch.distributions.Dirichlet(torch.ones(classes, dtype=F64)).sample((n,))
    else:
        raise AssertionError(kind)
    return t.repeat(views, 1)


def make_logits(rows: int, classes: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, classes, generator=g, dtype=F64) * scale


# ---- float64 brute-force references ---------------------------------------------------------
def loop_softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(z - top) for z in row]
    total = math.fsum(exps)
    return [e / total for e in exps]


def loop_log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_total = top + math.log(math.fsum(math.exp(z - top) for z in row))
    return [z - log_total for z in row]


def loop_ce_rce(logits, targets, log_min: float) -> tuple[float, float]:
    ce = rce = 0.0
    for z, y in zip(logits.tolist(), targets.tolist(), strict=True):
        log_p, p = loop_log_softmax(z), loop_softmax(z)
        ce -= math.fsum(yc * lc for yc, lc in zip(y, log_p, strict=True))
        rce -= math.fsum(
            pc * (max(math.log(yc), log_min) if yc > 0 else log_min)
            for pc, yc in zip(p, y, strict=True)
        )
    return ce / len(logits), rce / len(logits)


def loop_kl(a: list[float], b: list[float]) -> float:
    return math.fsum(ac * math.log(ac / bc) for ac, bc in zip(a, b, strict=True) if ac > 0)


def loop_js(a: list[float], b: list[float]) -> float:
    m = [(ac + bc) / 2 for ac, bc in zip(a, b, strict=True)]
    return loop_kl(a, m) / 2 + loop_kl(b, m) / 2


def loop_cr(vectors, tau: float, similarity: str, positive) -> float:
    """SupCon over rows; positive(i, k) says whether k != i is a positive of anchor i.
    similarity "dot" uses the rows as they are (the paper's p_i . p_k), "cosine" normalises."""
    rows = [list(map(float, r)) for r in vectors.tolist()]
    if similarity == "cosine":
        rows = [[x / math.sqrt(math.fsum(v * v for v in r)) for x in r] for r in rows]
    total = 0.0
    for i, ui in enumerate(rows):
        sims = [math.fsum(x * y for x, y in zip(ui, uk, strict=True)) / tau for uk in rows]
        others = [s for a, s in enumerate(sims) if a != i]
        top = max(others)
        log_den = top + math.log(math.fsum(math.exp(s - top) for s in others))
        pos = [k for k in range(len(rows)) if k != i and positive(i, k)]
        if pos:
            total -= math.fsum(sims[k] - log_den for k in pos) / len(pos)
    return total / len(rows)


def twin(i: int, rows: int) -> int:
    return (i + rows // 2) % rows


# ---- symmetric cross entropy ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mixup", "cutmix", "unmixed", "one_hot", "dirichlet"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
@pytest.mark.parametrize("log_min", [-4.0, math.log(1e-4)])
def test_ce_and_rce_match_a_float64_loop(kind, scale, log_min):
    targets = make_targets(kind, 6, 7, seed=1)
    logits = make_logits(len(targets), 7, seed=2, scale=scale)
    ce, rce = loop_ce_rce(logits, targets, log_min)
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(ce, rel=1e-12, abs=1e-12)
    got_rce = reverse_cross_entropy(logits, targets, log_min).item()
    assert got_rce == pytest.approx(rce, rel=1e-12, abs=1e-12)
    sce = symmetric_cross_entropy(logits, targets, alpha=0.3, log_min=log_min).item()
    assert sce == pytest.approx(ce + 0.3 * rce, rel=1e-12, abs=1e-12)
    # float32 inputs give the same value to float32 accuracy
    sce32 = symmetric_cross_entropy(logits.float(), targets.float(), 0.3, log_min).item()
    assert sce32 == pytest.approx(ce + 0.3 * rce, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("log_min", [-4.0, math.log(1e-4)])
def test_rce_of_a_one_hot_target_is_minus_a_times_one_minus_p_y(log_min):
    labels = torch.tensor([0, 3, 3, 1, 4])
    logits = make_logits(5, 5, seed=3, scale=3.0)
    expected = [
        -log_min * (1 - loop_softmax(z)[y])
        for z, y in zip(logits.tolist(), labels.tolist(), strict=True)
    ]
    got = reverse_cross_entropy(logits, smoothed(labels, 5, 0.0), log_min)
    assert got.item() == pytest.approx(sum(expected) / 5, rel=1e-12)


# ---- Jensen-Shannon and the positive mask ---------------------------------------------------
def test_jensen_shannon_matches_a_float64_loop_with_zero_entries():
    one_hot = make_targets("one_hot", 3, 6, seed=4, views=1)
    a = torch.cat([one_hot, make_targets("dirichlet", 4, 6, seed=5, views=1)])
    b = torch.cat([make_targets("mixup", 2, 6, 6, views=1), a[:3]])
    js = jensen_shannon(a, b)
    assert js.shape == (7, 5)
    for i, ra in enumerate(a.tolist()):
        for k, rb in enumerate(b.tolist()):
            assert js[i, k].item() == pytest.approx(loop_js(ra, rb), rel=1e-12, abs=1e-15)
    # identical rows are exactly 0, also in float32; disjoint one-hots reach ln 2
    assert torch.all(jensen_shannon(a.float(), a.float()).diagonal() == 0)
    assert js[:3, 2:].diagonal().eq(0).all()
    assert jensen_shannon(a[:1], smoothed(torch.tensor([5]), 6, 0.0)).item() == pytest.approx(
        math.log(2), rel=1e-12
    )


KINDS = ["mixup", "mixup_half", "cutmix", "unmixed", "one_hot", "dirichlet"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_positive_mask_equals_the_brute_force_mask_exactly(kind, dtype):
    classes = 5
    targets = make_targets(kind, 24, classes, seed=7).to(dtype)
    exact64 = jensen_shannon(targets.double(), targets.double())
    for delta in [0.0, 0.005, 0.05, 0.3, 1.0]:
        brute = jensen_shannon(targets, targets) <= delta
        for block in [1, 3, classes * 7, 1 << 21]:
            assert torch.equal(positive_mask(targets, delta, block), brute), (delta, block)
        # and the brute-force mask is the float64 one wherever rounding cannot matter
        clear = (exact64 - delta).abs() > 1e-6
        assert torch.equal(brute[clear], (exact64 <= delta)[clear])
    rows = len(targets)
    mask = positive_mask(targets, 0.005)
    assert mask.diagonal().all()
    assert mask[torch.arange(rows), (torch.arange(rows) + rows // 2) % rows].all()
    if kind in ("mixup_half", "unmixed", "one_hot"):  # images sharing a target are found too
        assert mask.sum() > 2 * rows


def test_positive_mask_agrees_with_a_loop_on_a_large_mixed_batch():
    targets = torch.cat([make_targets("cutmix", 40, 10, seed=8), make_targets("mixup", 8, 10, 9)])
    mask = positive_mask(targets.float(), 0.005, block_elements=64)
    rows = targets.tolist()
    for i, a in enumerate(rows):
        for k, b in enumerate(rows):
            js = loop_js(a, b)
            if abs(js - 0.005) > 1e-6:
                assert mask[i, k].item() == (js <= 0.005), (i, k, js)


def test_positive_mask_rejects_rows_that_are_not_distributions():
    with pytest.raises(ValueError, match="sum to 1"):
        positive_mask(torch.ones(4, 3), 0.005)


# ---- contrastive regularization -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mixup", "mixup_half", "cutmix", "unmixed"])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_contrastive_regularization_matches_a_float64_loop(kind, similarity, scale):
    targets = make_targets(kind, 6, 4, seed=10)
    probs = make_logits(len(targets), 4, seed=11, scale=scale).softmax(-1)
    delta, tau = 0.02, 0.3
    rows = targets.tolist()

    def positive(i, k):
        return k == twin(i, len(rows)) or loop_js(rows[i], rows[k]) <= delta

    got = contrastive_regularization(probs, targets, tau, delta, similarity).item()
    assert got == pytest.approx(loop_cr(probs, tau, similarity, positive), rel=1e-10)


def test_the_default_similarity_is_the_papers_raw_dot_product_of_probabilities():
    targets = make_targets("cutmix", 4, 5, seed=40)
    probs = make_logits(8, 5, seed=41, scale=2.0).softmax(-1)
    rows = targets.tolist()

    def positive(i, k):
        return k == twin(i, 8) or loop_js(rows[i], rows[k]) <= 0.005

    expected = loop_cr(probs, 0.1, "dot", positive)
    assert contrastive_regularization(probs, targets).item() == pytest.approx(expected, rel=1e-10)
    assert expected != pytest.approx(loop_cr(probs, 0.1, "cosine", positive), rel=1e-3)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_contrastive_regularization_with_delta_zero_on_distinct_targets_is_two_view_infonce(
    similarity,
):
    targets = make_targets("dirichlet", 5, 6, seed=12)
    probs = make_logits(10, 6, seed=13, scale=2.0).softmax(-1)
    u = (F.normalize(probs, dim=1) if similarity == "cosine" else probs).tolist()
    loss = 0.0
    for i in range(10):  # InfoNCE: -log exp(s_i,twin) / sum_{a != i} exp(s_ia)
        sims = [math.fsum(x * y for x, y in zip(u[i], u[a], strict=True)) / 0.1 for a in range(10)]
        den = math.fsum(math.exp(s) for a, s in enumerate(sims) if a != i)
        loss -= math.log(math.exp(sims[twin(i, 10)]) / den)
    got = contrastive_regularization(probs, targets, tau=0.1, delta=0.0, similarity=similarity)
    assert got.item() == pytest.approx(loss / 10, rel=1e-10)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("delta", [0.0, 0.005])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_contrastive_regularization_on_unmixed_targets_is_supcon_with_class_positives(
    smoothing, delta, similarity
):
    labels = torch.tensor([0, 1, 1, 2, 0, 1]).repeat(2)
    targets = smoothed(labels, 3, smoothing)
    probs = make_logits(12, 3, seed=14).softmax(-1)
    expected = loop_cr(probs, 0.2, similarity, lambda i, k: bool(labels[i] == labels[k]))
    got = contrastive_regularization(probs, targets, 0.2, delta, similarity)
    assert got.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("kind", ["mixup", "cutmix", "unmixed"])
def test_feature_space_cr_contrasts_normalised_embeddings_with_the_same_positives(kind):
    # The projector's output, L2-normalised as AuxNet does, in a space wider than the classes.
    targets = make_targets(kind, 6, 4, seed=42)
    features = make_logits(12, 9, seed=43, scale=3.0)
    embeddings = F.normalize(features, dim=1).requires_grad_()
    rows = targets.tolist()

    def positive(i, k):
        return k == twin(i, 12) or loop_js(rows[i], rows[k]) <= 0.005

    unit = [[x / math.sqrt(math.fsum(v * v for v in r)) for x in r] for r in features.tolist()]
    expected = loop_cr(torch.tensor(unit, dtype=F64), 0.1, "dot", positive)
    loss = AttractRepulseLoss(cr_weight=0.5, cr_space="features", embeddings=lambda: embeddings)
    logits = make_logits(12, 4, seed=44)
    total, terms = loss(logits, targets)
    assert terms["cr"].item() == pytest.approx(expected, rel=1e-10)
    ce, rce = loop_ce_rce(logits, targets, -4.0)
    assert total.item() == pytest.approx(ce + 0.01 * rce + 0.5 * expected, rel=1e-10)
    total.backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    # on unit vectors the two similarity forms agree
    cosine = contrastive_regularization(embeddings, targets, 0.1, 0.005, "cosine")
    assert cosine.item() == pytest.approx(expected, rel=1e-10)


def test_feature_space_cr_needs_embeddings_and_names_are_checked():
    with pytest.raises(ValueError, match="projector embeddings"):
        AttractRepulseLoss(cr_weight=0.1, cr_space="features")
    with pytest.raises(ValueError, match="cr_space='proj'; valid: probs, features"):
        AttractRepulseLoss(cr_space="proj")
    with pytest.raises(ValueError, match="cr_similarity='l2'; valid: dot, cosine"):
        AttractRepulseLoss(cr_similarity="l2")
    with pytest.raises(ValueError, match="similarity='l2'"):
        contrastive_regularization(torch.full((2, 2), 0.5), torch.full((2, 2), 0.5), 0.1, 0, "l2")


def test_contrastive_regularization_rejects_an_odd_number_of_rows():
    with pytest.raises(ValueError, match=r"\[2N, D\]"):
        contrastive_regularization(torch.full((3, 2), 0.5), torch.full((3, 2), 0.5))


# ---- mean teacher -----------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["teacher_student", "student_teacher", None])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_mean_teacher_consistency_matches_a_float64_loop(direction, scale):
    student = make_logits(8, 5, seed=15, scale=scale).requires_grad_()
    teacher = make_logits(8, 5, seed=16, scale=scale).requires_grad_()
    expected = 0.0
    for s, t in zip(student.tolist(), teacher.tolist(), strict=True):
        p, q = loop_softmax(s), loop_softmax(t)
        # None = the default: the paper's KL(f(x, theta) || f(x, theta')), student first
        expected += loop_kl(q, p) if direction == "teacher_student" else loop_kl(p, q)
    args = () if direction is None else (direction,)
    got = mean_teacher_consistency(student, teacher, *args)
    assert got.item() == pytest.approx(expected / 8, rel=1e-10, abs=1e-13)
    got.backward()
    assert teacher.grad is None and student.grad is not None


def test_mean_teacher_consistency_rejects_an_unknown_direction():
    with pytest.raises(ValueError, match="teacher_student"):
        mean_teacher_consistency(torch.zeros(2, 3), torch.zeros(2, 3), "both")


# ---- gradients and extremes -----------------------------------------------------------------
def test_every_loss_passes_gradcheck_in_float64():
    targets = make_targets("mixup", 3, 4, seed=17)
    logits = make_logits(6, 4, seed=18).requires_grad_()
    teacher = make_logits(6, 4, seed=19)
    assert torch.autograd.gradcheck(lambda z: symmetric_cross_entropy(z, targets, 0.5), (logits,))
    for similarity in ("dot", "cosine"):
        assert torch.autograd.gradcheck(
            lambda z, s=similarity: contrastive_regularization(
                z.softmax(-1), targets, 0.2, 0.01, s
            ),
            (logits,),
        )
    assert torch.autograd.gradcheck(
        lambda e: contrastive_regularization(F.normalize(e, dim=1), targets, 0.2, 0.01),
        (make_logits(6, 7, seed=45).requires_grad_(),),
    )
    for direction in ("teacher_student", "student_teacher"):
        assert torch.autograd.gradcheck(
            lambda z, d=direction: mean_teacher_consistency(z, teacher, d), (logits,)
        )
    a = make_targets("dirichlet", 3, 4, seed=20, views=1).requires_grad_()
    b = make_targets("dirichlet", 2, 4, seed=21, views=1).requires_grad_()
    assert torch.autograd.gradcheck(jensen_shannon, (a, b))
    loss = AttractRepulseLoss(cr_weight=0.3, mt_weight=2.0, aux_weight=0.4, rce_weight=0.1)
    assert torch.autograd.gradcheck(
        lambda z, x: loss(z, targets, aux_logits=x, teacher_logits=teacher)[0],
        (logits, make_logits(6, 4, seed=22).requires_grad_()),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e4, 1.0])
def test_losses_are_finite_for_huge_logits_and_in_bfloat16(dtype, scale):
    targets = make_targets("cutmix", 8, 10, seed=23).float()
    logits = (make_logits(16, 10, seed=24, scale=scale)).to(dtype).requires_grad_()
    teacher = (make_logits(16, 10, seed=25, scale=scale)).to(dtype)
    aux = (make_logits(16, 10, seed=26, scale=scale)).to(dtype).requires_grad_()
    loss = AttractRepulseLoss(cr_weight=0.5, mt_weight=1.0, aux_weight=0.4)
    total, terms = loss(logits, targets, aux_logits=aux, teacher_logits=teacher)
    assert set(terms) == {"ce", "rce", "cr", "mt", "aux"}
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert all(torch.isfinite(value) for value in terms.values())
    total.backward()
    assert logits.grad.dtype == dtype and torch.isfinite(logits.grad).all()
    assert torch.isfinite(aux.grad).all()


# ---- the combined loss ----------------------------------------------------------------------
def test_attract_repulse_total_is_the_weighted_sum_of_its_terms():
    targets = make_targets("mixup", 4, 6, seed=27)
    logits, teacher, aux = (make_logits(8, 6, seed=s) for s in (28, 29, 30))
    loss = AttractRepulseLoss(
        rce_weight=0.05,
        cr_weight=0.3,
        cr_tau=0.2,
        cr_delta=0.01,
        cr_similarity="cosine",
        mt_weight=2.0,
        mt_direction="teacher_student",
        aux_weight=0.4,
    )
    total, terms = loss(logits, targets, aux_logits=aux, teacher_logits=teacher, mt_scale=0.25)
    ce, rce = loop_ce_rce(logits, targets, -4.0)
    aux_ce, aux_rce = loop_ce_rce(aux, targets, -4.0)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-12)
    assert terms["rce"].item() == pytest.approx(rce, rel=1e-12)
    assert terms["aux"].item() == pytest.approx(aux_ce + 0.05 * aux_rce, rel=1e-12)
    assert torch.equal(
        terms["cr"], contrastive_regularization(logits.softmax(-1), targets, 0.2, 0.01, "cosine")
    )
    assert torch.equal(terms["mt"], mean_teacher_consistency(logits, teacher, "teacher_student"))
    expected = ce + 0.05 * rce + 0.3 * terms["cr"] + 2.0 * 0.25 * terms["mt"] + 0.4 * terms["aux"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-12)
    assert not any(value.requires_grad for value in terms.values())


def test_attract_repulse_ignores_disabled_terms():
    targets = make_targets("cutmix", 4, 6, seed=31)
    logits, teacher, aux = (make_logits(8, 6, seed=s) for s in (32, 33, 34))
    sce = symmetric_cross_entropy(logits, targets, 0.01, -4.0)
    plain = AttractRepulseLoss(cr_weight=0.0, mt_weight=0.0, aux_weight=0.0)
    total, terms = plain(logits, targets, aux_logits=aux, teacher_logits=teacher)
    assert set(terms) == {"ce", "rce"} and torch.equal(total, sce)
    full = AttractRepulseLoss(cr_weight=0.0, mt_weight=1.0, aux_weight=0.4)
    total, terms = full(logits, targets)  # no teacher, no auxiliary head given
    assert set(terms) == {"ce", "rce"} and torch.equal(total, sce)
    single = AttractRepulseLoss(cr_weight=0.0, num_views=1)
    assert set(single(logits[:3], targets[:3])[1]) == {"ce", "rce"}


def test_contrastive_regularization_needs_two_views():
    with pytest.raises(ValueError, match="num_views=2"):
        AttractRepulseLoss(cr_weight=0.1, num_views=1)
    with pytest.raises(ValueError, match=r"\[2\*N, C\]"):
        AttractRepulseLoss(cr_weight=0.1)(torch.zeros(3, 4), torch.full((3, 4), 0.25))
    with pytest.raises(ValueError, match="mt_direction"):
        AttractRepulseLoss(mt_direction="teacher")


def test_from_config_reads_the_recipe_keys(tmp_path):
    model = tmp_path / "tiny.yaml"
    model.write_text("arch: resnet18\n")
    cfg = load_config(str(model), ["cr_weight=0.7", "mt_direction=teacher_student", "cr_tau=0.2"])
    loss = AttractRepulseLoss.from_config(cfg)
    assert (loss.cr_weight, loss.cr_tau, loss.mt_direction) == (0.7, 0.2, "teacher_student")
    assert (loss.rce_weight, loss.rce_log_min, loss.cr_delta) == (0.01, -4.0, 0.005)
    assert (loss.mt_weight, loss.aux_weight, loss.num_views) == (1.0, 0.4, 2)
    cosine = load_config(str(model), ["cr_similarity=cosine"])
    assert AttractRepulseLoss.from_config(cosine).cr_similarity == "cosine"
    with pytest.raises(UserError, match="cr_space='features' needs the model's projector"):
        AttractRepulseLoss.from_config(load_config(str(model), ["cr_space=features"]))
    with pytest.raises(UserError, match="set num_views=2 or cr_weight=0"):
        AttractRepulseLoss.from_config(load_config(str(model), ["num_views=1"]))
    with pytest.raises(UserError, match="mt_direction='kl'"):
        AttractRepulseLoss.from_config(load_config(str(model), ["mt_direction=kl"]))


def test_contrastive_regularization_is_float32_under_bfloat16_autocast():
    targets = make_targets("mixup", 8, 10, seed=35).float()
    logits = make_logits(16, 10, seed=36, scale=3.0).float()
    loss = AttractRepulseLoss(cr_weight=1.0)
    reference = loss(logits, targets)[1]["cr"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cr = loss(logits, targets)[1]["cr"]
    assert cr.dtype == torch.float32
    assert cr.item() == pytest.approx(reference.item(), rel=1e-6)


def test_every_paper_config_uses_the_papers_forms_by_default():
    paper = [m for m in available("models") if load_config(m)["data"] == "imagenet50"]
    assert len(paper) == 22  # the 16 ensemble members, the ablation's B2 and Table 1's 5 rows
    for model in paper:
        cfg = load_config(model)
        forms = (cfg["cr_similarity"], cfg["cr_space"], cfg["mt_direction"])
        assert forms == ("dot", "probs", "student_teacher"), model
        assert cfg["drop_path_rate"] == 0.0, model  # not among the paper's regularisers
        loss = AttractRepulseLoss.from_config(cfg)
        assert (loss.cr_similarity, loss.cr_space, loss.mt_direction) == forms
    defaults = AttractRepulseLoss()
    assert (defaults.cr_similarity, defaults.mt_direction) == ("dot", "student_teacher")
