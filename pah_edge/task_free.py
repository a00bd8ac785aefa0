"""Task-free prediction: one shared-covariance discriminant over every class of every task, and novelty.

A deployed camera does not know which task a frame belongs to, and the generated heads' confidences
are not comparable across tasks. Every task therefore also keeps the Gaussian statistics of its
features, and one linear discriminant over all classes (LDA with one shared covariance) picks the
(task, class); the Mahalanobis distance to the nearest class mean is the novelty score.

Features are first transformed as few-shot learning on frozen features does: a signed square root
(``sign(f) |f|^0.5``, which makes the skewed post-ReLU activations closer to Gaussian), L2
normalisation, then centring on the workstation's mean feature.

State, all numpy (no torch; the device reads and extends it):

- shared (``SharedStats``, written once at export): the centring mean [D], the workstation's pooled
  within-class scatter [D, D] and its image count, and the novelty threshold with the rate of known
  images it calls unknown. It describes the backbone's feature space, like the backbone itself.
- per task (``TaskStats``): class means [C, D] of the transformed (uncentred) features and image
  counts, plus (device tasks) a rank-C factor
  ``L`` [C, D] of the task's within-class scatter (``L.T @ L`` are its C largest directions) and
  ``residual``, the scatter it leaves out spread evenly over the D directions. Means and factor are
  stored as float16: C x D floats' worth of bytes per task.

The rule's covariance is ``(S0 + sum_t (L_t.T L_t + residual_t I)) / (n0 + sum_t n_t)``, shrunk
towards a multiple of the identity: a sum over tasks, so tasks learned in any order give the same
rule and removing a task removes its contribution exactly. A new domain's own directions of
variation enter the covariance through its factor; measured in docs/benchmarks.md.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

POWER = 0.5  # exponent of the signed power transform
SHRINKAGE = 0.05  # covariance shrinkage towards (trace / D) I
UNKNOWN_RATE = 0.05  # default share of known images that the threshold calls unknown
STORE_DTYPE = np.float16
# Workstation images per class for the shared state: more than a quick generator run trains on, as
# a covariance needs them (more task-free accuracy than with 100: docs/benchmarks.md, "Task-free prediction").
STATS_PER_CLASS = 600


def transform(features: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """Signed square root, L2-normalised rows, minus ``mean`` (the shared centring mean) if given."""
    z = np.sign(features) * np.abs(features) ** POWER
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return z if mean is None else z - mean


@dataclass(frozen=True)
class SharedStats:
    """The bundle-wide state: centring mean [D], within-class scatter [D, D] of ``count`` images."""

    mean: np.ndarray
    scatter: np.ndarray
    count: int
    threshold: float | None = None  # novelty above this is unknown
    unknown_rate: float | None = None  # share of held-out known images the threshold calls unknown

    def to_bytes(self) -> bytes:
        arrays = {"mean": self.mean.astype(np.float32), "scatter": self.scatter.astype(np.float32),
                  "count": np.int64(self.count)}
        if self.threshold is not None:
            arrays |= {"threshold": np.float64(self.threshold), "unknown_rate": np.float64(self.unknown_rate)}
        return _npz_bytes(arrays)

    @classmethod
    def from_npz(cls, npz) -> SharedStats:
        threshold = float(npz["threshold"]) if "threshold" in npz else None
        rate = float(npz["unknown_rate"]) if "unknown_rate" in npz else None
        return cls(np.asarray(npz["mean"], np.float64), np.asarray(npz["scatter"], np.float64), int(npz["count"]),
                   threshold, rate)


@dataclass(frozen=True)
class TaskStats:
    """A task's class means [C, D] and counts [C]; ``factor`` [r, D] and ``residual``: its scatter."""

    means: np.ndarray
    counts: np.ndarray
    factor: np.ndarray  # [0, D] for workstation tasks: their scatter is in the shared state
    residual: float

    def to_bytes(self) -> bytes:
        return _npz_bytes({"means": self.means.astype(STORE_DTYPE), "counts": self.counts.astype(np.int64),
                           "factor": self.factor.astype(STORE_DTYPE), "residual": np.float64(self.residual)})

    @classmethod
    def from_npz(cls, npz) -> TaskStats:
        return cls(np.asarray(npz["means"], np.float64), np.asarray(npz["counts"], np.int64),
                   np.asarray(npz["factor"], np.float64), float(npz["residual"]))

    def scatter(self) -> np.ndarray:
        """This task's contribution to the shared scatter, [D, D]."""
        dim = self.means.shape[1]
        return self.factor.T @ self.factor + self.residual * np.eye(dim)


def class_means(z: np.ndarray, labels: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(means [C, D] of transformed features ``z`` per label, counts [C]); every class needs an image."""
    counts = np.bincount(labels, minlength=classes)
    sums = np.zeros((classes, z.shape[1]))
    np.add.at(sums, labels, z)
    return sums / np.maximum(counts, 1)[:, None], counts


def class_residuals(z: np.ndarray, labels: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Each image's transformed features minus its class mean, [N, D] float64."""
    return np.asarray(z, np.float64) - means[labels]


def within_scatter(z: np.ndarray, labels: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Sum over images of (z - its class mean)(z - its class mean)^T, [D, D] float64."""
    residuals = class_residuals(z, labels, means)
    return residuals.T @ residuals


def task_stats(features: np.ndarray, labels: np.ndarray, classes: int) -> TaskStats:
    """A device task's statistics from its raw backbone features [N, D] and labels [N] in [0, C):
    class means and a rank-C factor of the within-class scatter. Independent of the shared state.
    """
    z = transform(features)
    means, counts = class_means(z, labels, classes)
    dim = z.shape[1]
    keep = min(classes, dim)
    residuals = class_residuals(z, labels, means)  # the scatter is residuals.T @ residuals
    # Fewer images than dimensions (a device task): the scatter's top directions from the N x N Gram
    # matrix, whose eigen-decomposition needs a fraction of a D x D one's memory (31 vs 64 MB at
    # N = 1,000, D = 1280). The factor's rows u_k' R = sqrt(l_k) v_k are the same as the D x D route's.
    few = len(z) < dim
    gram = residuals @ residuals.T if few else residuals.T @ residuals  # either trace is the total scatter
    del residuals  # not held through the eigen-decomposition, the peak of a device's memory: recomputed below
    values, vectors = np.linalg.eigh(gram)
    if few:
        factor = vectors[:, -keep:].T @ class_residuals(z, labels, means)
    else:
        factor = (vectors[:, -keep:] * np.sqrt(np.clip(values[-keep:], 0, None))).T
    top = np.clip(values[-keep:], 0, None).sum()
    return TaskStats(means, counts, factor, float((np.trace(gram) - top) / dim))


class TaskFreeRule:
    """The discriminant over every class of ``tasks`` = [(task, TaskStats), ...] (task: a name or record).

    ``scores(features)`` -> (class scores [N, K] for the K classes of all tasks in order, novelty [N]);
    class k is class ``class_of[k]`` of ``tasks[task_of[k]]``.
    """

    def __init__(self, shared: SharedStats, tasks: list[tuple[object, TaskStats]]):
        self.shared = shared
        self.tasks = [task for task, _ in tasks]
        self.task_of = np.concatenate([np.full(len(s.counts), t) for t, (_, s) in enumerate(tasks)])
        self.class_of = np.concatenate([np.arange(len(s.counts)) for _, s in tasks])
        means = np.concatenate([s.means for _, s in tasks]) - shared.mean
        scatter = shared.scatter + sum(s.scatter() for _, s in tasks)
        count = shared.count + sum(int(s.counts.sum()) for _, s in tasks)
        covariance = scatter / max(count, 1)
        dim = covariance.shape[0]
        covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * np.trace(covariance) / dim * np.eye(dim)
        precision = np.linalg.inv(covariance)
        weights = means @ precision  # [K, D]: score_k = mu_k'P z - mu_k'P mu_k / 2
        self.bias = (-0.5 * np.einsum("kd,kd->k", weights, means)).astype(np.float32)
        # Per frame one float32 product z @ [P | W'] gives z'P (for novelty's z'Pz) and the K scores;
        # P's D x D floats are most of the work, as z'Pz has no cheaper exact form.
        self.linear_map = np.concatenate([precision, weights.T], axis=1).astype(np.float32)  # [D, D + K]
        self.mean = shared.mean.astype(np.float32)

    def scores(self, features: np.ndarray, task: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(discriminant scores [N, K] over every class, novelty [N]); novelty against the classes of
        ``tasks[task]`` alone when ``task`` is given."""
        z = transform(np.asarray(features, np.float32), self.mean)
        dim = z.shape[1]
        product = z @ self.linear_map
        scores = product[:, dim:] + self.bias
        nearest = scores if task is None else scores[:, self.task_of == task]
        # min_k Mahalanobis^2 = z'Pz - 2 max_k (mu_k'Pz - mu_k'P mu_k / 2); divided by D for a per-axis scale.
        novelty = (np.einsum("nd,nd->n", product[:, :dim], z) - 2 * nearest.max(axis=1)) / dim
        # A distance: float32 rounding in the difference must not make an image on a class mean "negative".
        novelty = np.maximum(novelty, 0)
        return scores, novelty


def workstation_stats(train_sets: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[SharedStats, list[TaskStats]]:
    """(shared state, per-task stats) from each workstation task's (raw features [N, D], labels, classes).

    The centring mean is the mean transformed feature over every image; the scatter is pooled over
    every class of every task. The threshold is set afterwards (``with_threshold``).
    """
    transformed = [(transform(f), y, c) for f, y, c in train_sets]  # once per task, not once per use
    mean = np.concatenate([z for z, _, _ in transformed]).mean(axis=0)
    tasks, scatter = [], 0.0
    for z, y, c in transformed:
        means, counts = class_means(z, y, c)
        tasks.append(TaskStats(means, counts, np.zeros((0, z.shape[1])), 0.0))  # its scatter goes to the shared state
        scatter = scatter + within_scatter(z, y, means)
    return SharedStats(mean, scatter, sum(len(y) for _, y, _ in train_sets)), tasks


def with_threshold(shared: SharedStats, rule_novelty: np.ndarray, unknown_rate: float = UNKNOWN_RATE) -> SharedStats:
    """``shared`` with the novelty threshold above which ``unknown_rate`` of these known images lie."""
    threshold = float(np.quantile(rule_novelty, 1 - unknown_rate))
    return SharedStats(shared.mean, shared.scatter, shared.count, threshold, unknown_rate)


def _npz_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()
