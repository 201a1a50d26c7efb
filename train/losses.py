"""The recipe's losses: L = CE + alpha RCE + beta CR + gamma MT (+ the auxiliary head's SCE).

Each term is a small function with its formula (docs/recipe.md section 3, the paper's Eq. 1):
- Symmetric Cross Entropy: Wang et al. 2019, "Symmetric Cross Entropy for Robust Learning with
  Noisy Labels" (CE plus the reverse CE, log 0 clamped at A).
- Contrastive Regularization: Supervised Contrastive Learning (Khosla et al. 2020) applied to the
  class-probability vectors, positives chosen by the Jensen-Shannon divergence of the soft targets.
  The paper's similarity is the raw dot product p_i . p_k (default); cosine is our variant. The
  feature-space variant (the paper's Figure 4(b) comparison) contrasts a projector's normalised
  embeddings instead, with the same positives and tau.
- Mean Teacher consistency: Tarvainen & Valpola 2017; the paper's KL(student || teacher) by
  default, KL(teacher || student) (the distillation direction) as our variant.
`AttractRepulseLoss` combines them from the config and returns every term for logging.

Rows are views, stacked view-major: with two views of N images, rows i and i + N are the two
views of image i. Losses are computed in at least float32 whatever the logits' dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import UserError

# The paper's form first: L_MT = KL(f(x, theta) || f(x, theta')), student first.
MT_DIRECTIONS = ("student_teacher", "teacher_student")
# The paper's L_CR uses exp(p_i . p_k / tau); cosine (u = p / ||p||) is our variant.
CR_SIMILARITIES = ("dot", "cosine")
# CR on the class probabilities (the paper), or on a projector's embeddings (its Figure 4(b)).
CR_SPACES = ("probs", "features")
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
    vectors: Tensor,
    targets: Tensor,
    tau: float = 0.1,
    delta: float = 0.005,
    similarity: str = "dot",
    positives: Tensor | None = None,
) -> Tensor:
    """Contrastive Regularization: SupCon (Khosla et al. 2020) on class probabilities.

    Args:
        vectors: [2N, D]; rows i and i + N are the two views of image i. The softmax outputs
            (D = C, the paper's CR) or a projector's L2-normalised embeddings (the feature-space
            variant, where the dot product is the cosine).
        targets: [2N, C] soft targets (mixed, smoothed).
        tau: temperature of s_ik = u_i . u_k / tau.
        delta: k != i is a positive of i when JS(y_i, y_k) <= delta (nats); the other view of
            image i is always a positive, so delta = 0 gives two-view InfoNCE.
        similarity: "dot", u = p (the paper's p_i . p_k), or "cosine", u = p / ||p||.

    L_CR = mean_i -1/|K(i)| sum_{k in K(i)} log(exp(s_ik) / sum_{a != i} exp(s_ia)), the mean
    over all 2N anchors. An anchor with no positive would contribute 0 (its count is clamped to
    1); with two views every anchor has its other view, so no anchor is ever dropped.
    Computed in float32 (or float64) even under autocast.
    """
    rows = vectors.shape[0]
    if rows % 2 or targets.shape[0] != rows or vectors.ndim != 2 or targets.ndim != 2:
        raise ValueError(
            f"contrastive_regularization needs [2N, D] vectors and [2N, C] targets, got "
            f"{tuple(vectors.shape)} and {tuple(targets.shape)}"
        )
    if similarity not in CR_SIMILARITIES:
        raise ValueError(f"similarity={similarity!r}; valid: {', '.join(CR_SIMILARITIES)}")
    with torch.autocast(device_type=vectors.device.type, enabled=False):
        u = _promote(vectors)
        if similarity == "cosine":
            u = F.normalize(u, dim=1)
        sim = u @ u.T / tau
        # Subtract the row maximum before exponentiating (as SupCon does); the loss is unchanged.
        sim = sim - sim.max(dim=1, keepdim=True).values.detach()
        self_pair = torch.eye(rows, dtype=torch.bool, device=vectors.device)
        log_prob = sim - sim.masked_fill(self_pair, float("-inf")).logsumexp(dim=1, keepdim=True)
        if positives is None:
            positives = positive_mask(targets, delta)
        positives = (positives | self_pair.roll(rows // 2, dims=1)) & ~self_pair
        count = positives.sum(1).clamp_min(1)
        return (-torch.where(positives, log_prob, 0.0).sum(1) / count).mean()


def mean_teacher_consistency(
    student_logits: Tensor, teacher_logits: Tensor, direction: str = "student_teacher"
) -> Tensor:
    """Mean over rows of KL(p || q), p = softmax(student), q = softmax(teacher) (no gradient).

    Mean Teacher (Tarvainen & Valpola 2017) as the paper writes it,
    L_MT = E_x[KL(f(x, theta) || f(x, theta'))]. direction="teacher_student" gives KL(q || p),
    the direction of distillation (our variant).
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
        cr_tau, cr_delta, cr_similarity: see `contrastive_regularization`.
        cr_space: "probs" (the paper's CR on the softmax outputs) or "features" (CR on the
            normalised projector embeddings that `embeddings()` returns, the same positives).
        mt_weight: gamma; the MT term is used when it is > 0 and teacher logits are given.
        mt_direction: "student_teacher" (the paper's KL(p || q)) or "teacher_student" (KL(q || p)).
        aux_weight: weight of the auxiliary head's SCE; used when > 0 and aux logits are given.
        num_views: views per image stacked in each batch (1 or 2).
        embeddings: with cr_space="features", a callable returning the [2N, D] embeddings of the
            forward pass whose logits are being scored (`AuxNet.take_embeddings`): the training
            step hands the loss logits only, so the feature variant reads the model's last pass.

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
        cr_similarity: str = "dot",
        cr_space: str = "probs",
        mt_weight: float = 0.0,
        mt_direction: str = "student_teacher",
        aux_weight: float = 0.0,
        num_views: int = 2,
        embeddings: Callable[[], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if cr_weight > 0 and num_views != 2:
            raise ValueError(
                f"Contrastive Regularization needs num_views=2 (got {num_views}); "
                "set num_views=2 or cr_weight=0"
            )
        for key, value, valid in (
            ("mt_direction", mt_direction, MT_DIRECTIONS),
            ("cr_similarity", cr_similarity, CR_SIMILARITIES),
            ("cr_space", cr_space, CR_SPACES),
        ):
            if value not in valid:
                raise ValueError(f"{key}={value!r}; valid: {', '.join(valid)}")
        if cr_weight > 0 and cr_space == "features" and embeddings is None:
            raise ValueError("cr_space='features' needs the model's projector embeddings")
        self.rce_weight, self.rce_log_min = rce_weight, rce_log_min
        self.cr_weight, self.cr_tau, self.cr_delta = cr_weight, cr_tau, cr_delta
        self.cr_similarity, self.cr_space, self.embeddings = cr_similarity, cr_space, embeddings
        self.mt_weight, self.mt_direction = mt_weight, mt_direction
        self.aux_weight, self.num_views = aux_weight, num_views

    @classmethod
    def from_config(cls, cfg: dict[str, Any], model: nn.Module | None = None) -> AttractRepulseLoss:
        """Build from the flat config dict (keys of configs/base.yaml); bad values: UserError.

        `model` (an `AuxNet` built from the same config) supplies the projector embeddings when
        cr_space is "features".
        """
        keys = (
            "rce_weight",
            "rce_log_min",
            "cr_weight",
            "cr_tau",
            "cr_delta",
            "cr_similarity",
            "cr_space",
            "mt_weight",
            "mt_direction",
            "aux_weight",
            "num_views",
        )
        source = getattr(model, "take_embeddings", None) if cfg["cr_space"] == "features" else None
        try:
            return cls(**{key: cfg[key] for key in keys}, embeddings=source)
        except ValueError as err:
            raise UserError(f"config: {err}") from None

    def positives(self, targets: Tensor) -> Tensor | None:
        """CR's positive pairs of these targets (`positive_mask`), None without CR: the step
        finds them on the host before the forward and passes them in."""
        return positive_mask(targets, self.cr_delta) if self.cr_weight > 0 else None

    def _sce_terms(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        ce = soft_cross_entropy(logits, targets)
        return ce, reverse_cross_entropy(logits, targets, self.rce_log_min)

    def _cr_vectors(self, logits: Tensor) -> Tensor:
        if self.cr_space == "features":
            return self.embeddings()
        return F.softmax(_promote(logits), dim=-1)

    def forward(
        self,
        logits: Tensor,
        targets: Tensor,
        aux_logits: Tensor | None = None,
        teacher_logits: Tensor | None = None,
        mt_scale: float = 1.0,
        positives: Tensor | None = None,
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
            terms["cr"] = contrastive_regularization(
                self._cr_vectors(logits),
                targets,
                self.cr_tau,
                self.cr_delta,
                self.cr_similarity,
                positives,
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
