"""Fitting a new task's prototypes: Adam on cross-entropy plus a pull towards the starting prototypes.

    minimise over U:  CE( B(x) @ H(Z(U))^T , y )  +  weight / C * |U - U0|^2 / mean_c |U0_c|^2

U are the fit's coordinates: the prototypes Z themselves, or for a linear generator coordinates in
which heads are orthonormal combinations (so the pull is measured on the heads). With a linear
generator the objective is convex, so it is run to convergence instead of being
early-stopped on a handful of validation images; the pull towards the class-mean start ``Z0`` is
the regulariser that keeps few-shot heads close to class means and lets many-shot heads move
(early stopping and the pull's weight: docs/benchmarks.md, "Learning a new task on the device").
Step sizes are relative to the start's RMS, so one setting fits prototypes of any scale. For a
linear generator the fit runs in coordinates where the generator is orthonormal
(``prototype_init.LinearHeads``): a trained ``A`` is ill-conditioned, and Adam's per-coordinate
steps in raw prototype space then overshoot along its strong directions. The cross-entropy and its gradient come from
``learner_step.onnx``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from pah_edge.device.prototype_init import LinearHeads
from pah_edge.device.runtimes import Runner

FULL_BATCH_MAX = 2048  # train images up to which every step sees all of them
MINIBATCH = 256
MIN_REL_IMPROVEMENT = 1e-4  # the objective must fall by this fraction to count as progress


@dataclass
class Adam:
    """Adam (Kingma & Ba) on one numpy array, with bias correction."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    steps: int = 0
    _m: np.ndarray | None = field(default=None, repr=False)
    _v: np.ndarray | None = field(default=None, repr=False)

    def step(self, params: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """The updated parameters (float32); ``params`` is left as it is."""
        grad = np.asarray(grad, np.float64)
        if self._m is None:
            self._m, self._v = np.zeros_like(grad), np.zeros_like(grad)
        self.steps += 1
        self._m = self.beta1 * self._m + (1 - self.beta1) * grad
        self._v = self.beta2 * self._v + (1 - self.beta2) * grad * grad
        m_hat = self._m / (1 - self.beta1 ** self.steps)
        v_hat = self._v / (1 - self.beta2 ** self.steps)
        return (params - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)).astype(np.float32)


class PrototypeObjective:
    """Cross-entropy of the new task w.r.t. its prototypes and its gradient, via learner_step.onnx."""

    def __init__(self, runner: Runner):
        self.runner = runner

    def __call__(self, prototypes: np.ndarray, features: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        out = self.runner.infer({"prototypes": prototypes, "features": features, "labels": labels})
        return float(out["loss"]), out["grad"]


@dataclass
class FitResult:
    prototypes: np.ndarray  # the best by the objective
    steps: int
    converged: bool  # stopped before max_steps because the objective stopped falling
    initial_loss: float  # cross-entropy where the first step is taken (the warm start, if given)
    final_loss: float  # cross-entropy of the returned prototypes
    seconds: float


def fit_prototypes(objective: PrototypeObjective, init: np.ndarray, features: np.ndarray, labels: np.ndarray, *,
                   max_steps: int, lr: float, weight: float, patience: int, seed: int,
                   coordinates: LinearHeads | None = None, warm: np.ndarray | None = None,
                   advance=lambda n: None) -> FitResult:
    """Minimise the regularised objective from ``init``; returns the best prototypes seen.

    lr: Adam's step as a fraction of the RMS of the start (in the fit's coordinates). weight:
    strength of the pull to the start. coordinates: fit ``u`` with prototypes ``u @ to_prototypes``
    (``init`` must come from ``prototypes_for``); None fits the prototypes directly.
    warm: prototypes to take the first step from instead of ``init`` (the pull still points to ``init``).
    Stops after ``patience`` steps without a relative improvement of 1e-4. Full-batch up to 2,048
    images, else a random minibatch of 256 per step, judged on a fixed subset of 2,048.
    """
    start = time.perf_counter()
    init = np.ascontiguousarray(init, np.float32)
    classes, shape = len(init), init.shape
    flat = init.reshape(classes, -1).astype(np.float64)

    def coordinates_of(prototypes_flat):
        return prototypes_flat if coordinates is None else prototypes_flat @ coordinates.from_prototypes

    def prototypes_of(u):
        flat_u = u if coordinates is None else u @ coordinates.to_prototypes
        return flat_u.reshape(shape).astype(np.float32)

    def coordinate_gradient(grad_flat):
        return grad_flat if coordinates is None else grad_flat @ coordinates.to_prototypes.T

    u0 = coordinates_of(flat)
    scale = float(np.sqrt(np.mean(u0 ** 2))) or 1.0
    pull = 2 * weight / (classes * max(float(np.mean(np.sum(u0 ** 2, axis=1))), 1e-12))
    rng = np.random.default_rng(seed)
    large = len(labels) > FULL_BATCH_MAX
    monitored = np.sort(rng.choice(len(labels), FULL_BATCH_MAX, replace=False)) if large else slice(None)
    adam = Adam(lr * scale)
    params = init if warm is None else np.ascontiguousarray(warm, np.float32)
    u = coordinates_of(params.reshape(classes, -1).astype(np.float64))
    best = params
    best_total = best_ce = initial = float("inf")
    since_progress, converged = 0, False
    for step in range(max_steps + 1):
        batch = np.sort(rng.choice(len(labels), MINIBATCH, replace=False)) if large else slice(None)
        ce, grad = objective(params, features[batch], labels[batch])
        if large:
            ce = objective(params, features[monitored], labels[monitored])[0]
        total = ce + pull / 2 * float(np.sum((u - u0) ** 2))
        if step == 0:
            # Progress is judged on the total: a warm start begins away from u0, so its total exceeds
            # its cross-entropy, and a reference of the latter would make every step look like none.
            initial, reference = ce, total
        if total < best_total:
            best, best_total, best_ce = params, total, ce
        # Patience counts steps since the last real progress, so a slow crawl still stops.
        if total < reference * (1 - MIN_REL_IMPROVEMENT):
            reference, since_progress = total, 0
        elif step > 0:
            since_progress += 1
            if since_progress >= patience:
                converged = True
                break
        if step == max_steps:
            break
        grad_u = coordinate_gradient(grad.reshape(classes, -1).astype(np.float64)) + pull * (u - u0)
        u = adam.step(u, grad_u).astype(np.float64)
        params = prototypes_of(u)
        advance(1)
    return FitResult(best, adam.steps, converged, initial, best_ce, time.perf_counter() - start)
