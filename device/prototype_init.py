"""Initial prototypes of a new task, in numpy (the device has no torch).

Linear generators start from the least-squares prototypes of the nearest-class-mean head
(``class_mean_head``, ``LinearHeads.prototypes_for``): learning starts at the class-mean classifier,
projected into the generator's span. Other generators use the paper's data init below.

A class's initial prototype is its mean normalised training image, averaged over RGB when the
prototypes have one channel, then area-pooled to ``s x s`` exactly as torch's
``adaptive_avg_pool2d`` does (``PrototypeGenerator.init_params(random=False)`` on the workstation).
Both steps are linear, so pooling each image and averaging the small results equals pooling the
mean image: the learner keeps one ``c x s x s`` thumbnail per image instead of full-size sums.
"""

from __future__ import annotations

import numpy as np


def pooling_matrix(in_size: int, out_size: int) -> np.ndarray:
    """float64 [out_size, in_size]: row i averages input window [floor(i*in/out), ceil((i+1)*in/out))."""
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        start, end = (i * in_size) // out_size, -(-((i + 1) * in_size) // out_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_avg_pool(images: np.ndarray, size: int) -> np.ndarray:
    """float64 [..., size, size] from [..., H, W], with torch ``adaptive_avg_pool2d``'s windows."""
    height, width = images.shape[-2:]
    return pooling_matrix(height, size) @ np.asarray(images, np.float64) @ pooling_matrix(width, size).T


def thumbnails(inputs: np.ndarray, channels: int, size: int) -> np.ndarray:
    """float64 [N, channels, size, size] of normalised images [N, 3, S, S]; their class mean is the init."""
    if channels not in (1, 3):
        raise ValueError(f"prototypes have 1 or 3 channels, got {channels}")
    images = np.asarray(inputs, np.float64)
    if channels == 1:
        images = images.mean(axis=1, keepdims=True)
    return adaptive_avg_pool(images, size)


def initial_prototypes(thumbs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 [C, c, s, s]: the mean thumbnail of each class (every class needs one image or more)."""
    sums = np.zeros((num_classes, *thumbs.shape[1:]))
    np.add.at(sums, labels, thumbs)
    counts = np.bincount(labels, minlength=num_classes)
    return (sums / counts[:, None, None, None]).astype(np.float32)


# Logit scale of the class-mean start: a cosine of 1 gives logit 10, so softmax starts confident
# but not saturated and the gradient has room to sharpen the head.
MEAN_HEAD_TEMPERATURE = 10.0


def class_mean_head(features: np.ndarray, labels: np.ndarray, num_classes: int,
                    temperature: float = MEAN_HEAD_TEMPERATURE) -> np.ndarray:
    """float64 [C, D]: the nearest-class-mean classifier as a bias-free linear head on raw features.

    Row c is the normalised mean of class c's normalised features, scaled so that a feature of the
    task's mean norm gets logit ``temperature * cosine``.
    """
    feats = np.asarray(features, np.float64)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    unit = feats / np.maximum(norms, 1e-12)
    sums = np.zeros((num_classes, feats.shape[1]))
    np.add.at(sums, labels, unit)
    means = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return temperature / max(float(norms.mean()), 1e-12) * means


class LinearHeads:
    """A linear generator's prototype -> head map, known from its K basis heads, decomposed once.

    ``basis`` [K, D]: the generator's heads of the K unit prototypes (rows of ``A.T``). With
    ``basis = U S V.T``, prototypes ``u @ to_prototypes`` give heads ``u @ directions.T`` with
    orthonormal ``directions`` [D, K']; ``from_prototypes`` maps flat prototypes back to ``u``.
    Directions with a singular value below ``rtol`` times the largest are dropped (they move no head).
    """

    def __init__(self, basis: np.ndarray, shape: tuple[int, ...], rtol: float = 1e-6):
        basis = np.asarray(basis, np.float64)
        # The SVD from the K x K Gram matrix: 4x faster than np.linalg.svd of [K, D] here, and a
        # trained generator's condition number (~60) squared is far from float64's limits.
        eigenvalues, u = np.linalg.eigh(basis @ basis.T)
        keep = eigenvalues > (rtol * np.sqrt(max(eigenvalues.max(), 0.0))) ** 2
        s, u = np.sqrt(eigenvalues[keep]), u[:, keep]
        self.shape = tuple(shape)
        self.to_prototypes = (u / s).T  # [K', K]
        self.from_prototypes = u * s  # [K, K']
        self.directions = basis.T @ u / s  # [D, K'], orthonormal columns

    def prototypes_for(self, heads: np.ndarray) -> np.ndarray:
        """float32 [C, *shape]: the least-squares prototypes of ``heads`` [C, D]."""
        flat = np.asarray(heads, np.float64) @ self.directions @ self.to_prototypes
        return flat.reshape(len(heads), *self.shape).astype(np.float32)
