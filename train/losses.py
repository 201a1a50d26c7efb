"""The recipe's losses: L = CE + alpha RCE + beta CR + gamma MT (+ the auxiliary head's SCE).

Each term is a small function with its formula (RECIPE.md section 3, the paper's Eq. 1):
- Symmetric Cross Entropy: Wang et al. 2019, "Symmetric Cross Entropy for Robust Learning with
  Noisy Labels" (CE plus the reverse CE, log 0 clamped at A).
- Contrastive Regularization: Supervised Contrastive Learning (Khosla et al. 2020) applied to the
  class-probability vectors, positives chosen by the Jensen-Shannon divergence of the soft targets.
- Mean Teacher consistency: Tarvainen & Valpola 2017, KL between teacher and student predictions.
`AttractRepulseLoss` combines them from the config and returns every term for logging.

Rows are views, stacked view-major: with two views of N images, rows i and i + N are the two
views of image i. Losses are computed in at least float32 whatever the logits' dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import UserError

MT_DIRECTIONS = ("teacher_student", "student_teacher")
# The terms `AttractRepulseLoss` reports (unweighted), in the order metrics.csv lists them.
TERMS = ("ce", "rce", "cr", "mt", "aux")
# Elements of the candidate-pair blocks in `positive_mask` (2^20 float32 = 4 MB per temporary).
MASK_BLOCK_ELEMENTS = 1 << 20
# Slack (nats) of the Pinsker pre-filter: it only admits more candidate pairs, whose exact
# divergence is then computed, so it never changes the mask; it absorbs float rounding.
PREFILTER_SLACK = 1e-3


def _promote(x: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 logits), float64 kept for gradcheck."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum_c y_c log p_c, p = softmax(logits), y soft targets."""
    log_probs = F.log_softmax(_promote(logits), dim=-1)
    return -(targets * log_probs).sum(-1).mean()


def reverse_cross_entropy(logits: Tensor, targets: Tensor, log_min: float = -4.0) -> Tensor:
    """Mean over rows of -sum_c p_c max(log y_c, A) (Wang et al. 2019; A = log_min).

    For a one-hot target this is -A (1 - p_y): the clamp is what makes log 0 finite.
    """
    probs = F.softmax(_promote(logits), dim=-1)
    log_targets = torch.log(_promote(targets)).clamp_min(log_min)
    return -(probs * log_targets).sum(-1).mean()


def symmetric_cross_entropy(
    logits: Tensor, targets: Tensor, alpha: float = 0.01, log_min: float = -4.0
) -> Tensor:
    """SCE (Wang et al. 2019) for soft targets: CE + alpha RCE, each a mean over rows."""
    return soft_cross_entropy(logits, targets) + alpha * reverse_cross_entropy(
        logits, targets, log_min
    )


def _js_sum(a: Tensor, b: Tensor, a_log_a: Tensor, b_log_b: Tensor) -> Tensor:
    """JS(a, b) over the last axis from broadcastable rows and their x log x.

    Per element: (a log a + b log b)/2 - m log m, m = (a + b)/2, which is >= 0 by convexity.
    Elements where a == b contribute exactly 0, so identical rows give JS = 0 exactly whatever
    the layout; `jensen_shannon` and `positive_mask` share this expression so that their
    values agree bit for bit on CPU (a GPU may sum in another order, which matters only for a
    divergence within rounding of delta).
    """
    mid = (a + b) * 0.5
    terms = (a_log_a + b_log_b) * 0.5 - torch.xlogy(mid, mid)
    return torch.where(a == b, 0.0, terms).sum(-1).clamp_min(0.0)


def jensen_shannon(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise Jensen-Shannon divergence in nats between rows of a [N, C] and b [M, C] -> [N, M].

    JS(a, b) = KL(a || m)/2 + KL(b || m)/2, m = (a + b)/2, with 0 log 0 = 0. This is the plain
    O(N M C)-memory form; `positive_mask` thresholds the same quantity in bounded memory.
    """
    a, b = _promote(a), _promote(b)
    return _js_sum(a[:, None], b[None], torch.xlogy(a, a)[:, None], torch.xlogy(b, b)[None])


def positive_mask(
    targets: Tensor, delta: float, block_elements: int = MASK_BLOCK_ELEMENTS
) -> Tensor:
    """[R, R] bool: JS(y_i, y_k) <= delta, equal to `jensen_shannon(targets, targets) <= delta`.

    Memory stays O(R^2 + block_elements) instead of O(R^2 C). Identical rows (the two views of
    an image, unmixed images of one class) have JS = 0 exactly, so the divergence is computed
    between distinct rows only. Pinsker's inequality gives JS(a, b) >= TV(a, b)^2 / 2 >=
    ||a - b||_2^2 / 8 for probability rows (checked: rows must sum to 1), so a float64 Gram
    matrix rules out every pair with ||a - b||^2 > 8 (delta + slack); the exact divergence is
    computed only for the remaining candidate pairs, block_elements // C pairs at a time.
    """
    targets = _promote(targets).detach()
    if len(targets) and (targets.sum(-1) - 1).abs().max() > 1e-3:
        raise ValueError("positive_mask needs probability rows (each target row must sum to 1)")
    distinct, inverse = torch.unique(targets, dim=0, return_inverse=True)
    rows, classes = distinct.shape
    t64 = distinct.double()
    sq_norm = t64.square().sum(-1)
    sq_dist = sq_norm[:, None] + sq_norm[None] - 2.0 * (t64 @ t64.T)
    pairs = (sq_dist <= 8.0 * (delta + PREFILTER_SLACK)).nonzero()
    x_log_x = torch.xlogy(distinct, distinct)
    mask = torch.zeros(rows, rows, dtype=torch.bool, device=targets.device)
    for block in pairs.split(max(1, block_elements // classes)):
        i, k = block.unbind(1)
        js = _js_sum(distinct[i], distinct[k], x_log_x[i], x_log_x[k])
        mask[i, k] = js <= delta
    return mask[inverse][:, inverse]


def contrastive_regularization(
    probs: Tensor, targets: Tensor, tau: float = 0.1, delta: float = 0.005, normalize: bool = True
) -> Tensor:
    """Contrastive Regularization: SupCon (Khosla et al. 2020) on class probabilities.

    Args:
        probs: [2N, C] softmax outputs; rows i and i + N are the two views of image i.
        targets: [2N, C] soft targets (mixed, smoothed).
        tau: temperature of s_ik = u_i . u_k / tau.
        delta: k != i is a positive of i when JS(y_i, y_k) <= delta (nats); the other view of
            image i is always a positive, so delta = 0 gives two-view InfoNCE.
        normalize: u = p / ||p|| (cosine similarity); False is the paper's literal p_i . p_k.

    L_CR = mean_i -1/|K(i)| sum_{k in K(i)} log(exp(s_ik) / sum_{a != i} exp(s_ia)), the mean
    over all 2N anchors. An anchor with no positive would contribute 0 (its count is clamped to
    1); with two views every anchor has its other view, so no anchor is ever dropped.
    Computed in float32 (or float64) even under autocast.
    """
    rows = probs.shape[0]
    if rows % 2 or targets.shape != probs.shape:
        raise ValueError(
            f"contrastive_regularization needs [2N, C] probs and targets of one shape, got "
            f"{tuple(probs.shape)} and {tuple(targets.shape)}"
        )
    with torch.autocast(device_type=probs.device.type, enabled=False):
        p = _promote(probs)
        u = F.normalize(p, dim=1) if normalize else p
        sim = u @ u.T / tau
        # Subtract the row maximum before exponentiating (as SupCon does); the loss is unchanged.
        sim = sim - sim.max(dim=1, keepdim=True).values.detach()
        self_pair = torch.eye(rows, dtype=torch.bool, device=probs.device)
        log_prob = sim - sim.masked_fill(self_pair, float("-inf")).logsumexp(dim=1, keepdim=True)
        positives = positive_mask(targets, delta) | self_pair.roll(rows // 2, dims=1)
        positives &= ~self_pair
        count = positives.sum(1).clamp_min(1)
        return (-torch.where(positives, log_prob, 0.0).sum(1) / count).mean()


def mean_teacher_consistency(
    student_logits: Tensor, teacher_logits: Tensor, direction: str = "teacher_student"
) -> Tensor:
    """Mean over rows of KL(q || p), q = softmax(teacher) (no gradient), p = softmax(student).

    Mean Teacher (Tarvainen & Valpola 2017). direction="student_teacher" gives the paper's
    literal KL(p || q).
    """
    if direction not in MT_DIRECTIONS:
        raise ValueError(f"direction={direction!r}; valid: {', '.join(MT_DIRECTIONS)}")
    log_p = F.log_softmax(_promote(student_logits), dim=-1)
    log_q = F.log_softmax(_promote(teacher_logits.detach()), dim=-1)
    if direction == "teacher_student":
        return (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


class AttractRepulseLoss(nn.Module):
    """L = CE + alpha RCE + beta CR + gamma * mt_scale * MT + aux_weight (CE_aux + alpha RCE_aux).

    Args:
        rce_weight: alpha, the weight of the reverse cross entropy (main and auxiliary head).
        rce_log_min: A, the clamp of log y in RCE.
        cr_weight: beta; 0 disables Contrastive Regularization (which needs two views).
        cr_tau, cr_delta, cr_normalize: see `contrastive_regularization`.
        mt_weight: gamma; the MT term is used when it is > 0 and teacher logits are given.
        mt_direction: "teacher_student" (KL(q || p)) or "student_teacher" (the paper's form).
        aux_weight: weight of the auxiliary head's SCE; used when > 0 and aux logits are given.
        num_views: views per image stacked in each batch (1 or 2).

    forward returns (total, terms): terms holds the unweighted value of each term in use
    (ce, rce, cr, mt, aux = CE_aux + alpha RCE_aux), detached, for logging.
    """

    def __init__(
        self,
        rce_weight: float = 0.01,
        rce_log_min: float = -4.0,
        cr_weight: float = 0.0,
        cr_tau: float = 0.1,
        cr_delta: float = 0.005,
        cr_normalize: bool = True,
        mt_weight: float = 0.0,
        mt_direction: str = "teacher_student",
        aux_weight: float = 0.0,
        num_views: int = 2,
    ) -> None:
        super().__init__()
        if cr_weight > 0 and num_views != 2:
            raise ValueError(
                f"Contrastive Regularization needs num_views=2 (got {num_views}); "
                "set num_views=2 or cr_weight=0"
            )
        if mt_direction not in MT_DIRECTIONS:
            raise ValueError(f"mt_direction={mt_direction!r}; valid: {', '.join(MT_DIRECTIONS)}")
        self.rce_weight, self.rce_log_min = rce_weight, rce_log_min
        self.cr_weight, self.cr_tau, self.cr_delta = cr_weight, cr_tau, cr_delta
        self.cr_normalize = cr_normalize
        self.mt_weight, self.mt_direction = mt_weight, mt_direction
        self.aux_weight, self.num_views = aux_weight, num_views

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> AttractRepulseLoss:
        """Build from the flat config dict (keys of configs/base.yaml); bad values: UserError."""
        keys = (
            "rce_weight",
            "rce_log_min",
            "cr_weight",
            "cr_tau",
            "cr_delta",
            "cr_normalize",
            "mt_weight",
            "mt_direction",
            "aux_weight",
            "num_views",
        )
        try:
            return cls(**{key: cfg[key] for key in keys})
        except ValueError as err:
            raise UserError(f"config: {err}") from None

    def _sce_terms(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        ce = soft_cross_entropy(logits, targets)
        return ce, reverse_cross_entropy(logits, targets, self.rce_log_min)

    def forward(
        self,
        logits: Tensor,
        targets: Tensor,
        aux_logits: Tensor | None = None,
        teacher_logits: Tensor | None = None,
        mt_scale: float = 1.0,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if logits.shape != targets.shape or logits.shape[0] % self.num_views:
            raise ValueError(
                f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both be "
                f"[{self.num_views}*N, C]"
            )
        ce, rce = self._sce_terms(logits, targets)
        terms = {"ce": ce, "rce": rce}
        total = ce + self.rce_weight * rce
        if self.cr_weight > 0:
            probs = F.softmax(_promote(logits), dim=-1)
            terms["cr"] = contrastive_regularization(
                probs, targets, self.cr_tau, self.cr_delta, self.cr_normalize
            )
            total = total + self.cr_weight * terms["cr"]
        if self.mt_weight > 0 and teacher_logits is not None:
            terms["mt"] = mean_teacher_consistency(logits, teacher_logits, self.mt_direction)
            total = total + self.mt_weight * mt_scale * terms["mt"]
        if self.aux_weight > 0 and aux_logits is not None:
            aux_ce, aux_rce = self._sce_terms(aux_logits, targets)
            terms["aux"] = aux_ce + self.rce_weight * aux_rce
            total = total + self.aux_weight * terms["aux"]
        return total, {name: value.detach() for name, value in terms.items()}
