"""Quality metrics for generated 8x8 digits, and the fixed train/test split.

Two numbers judge a batch of generated digits [n, 1, 8, 8] in [0, 1]:

* **Recognized-class rate**: the fraction of images that a fixed classifier
  (an RBF ``sklearn.svm.SVC`` fitted on the train split) predicts as the class
  the generator was asked for. It is a digits-sized stand-in for the
  classifier-based Inception score (Salimans et al. 2016, "Improved
  Techniques for Training GANs"): instead of a pretrained Inception network,
  a small classifier that reads digits at ~99% accuracy; instead of a score
  from the label distribution, the accuracy against the requested labels.
* **Fréchet distance**: FID's formula (Heusel et al. 2017, "GANs Trained by a
  Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"),
  ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` between Gaussians
  fitted to features of the generated images and of the real train split,
  in a fixed PCA feature space (fitted on the train split) instead of
  Inception features. Lower is better; it sees diversity as well as realism.

``judge().reference()`` gives the real test split's own scores (the split the
generator never sees): the numbers to print beside generated ones.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

SVC_C = 10.0
PCA_COMPONENTS = 20
PCA_SEED = 0


def split(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed seeded split of the digits: (train indices, test indices)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def _as_flat_images(images) -> np.ndarray:
    """[n, 1, 8, 8] torch tensor or numpy array in [0, 1] -> float64 [n, 64]."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4 or x.shape[1:] != (1, 8, 8):
        raise ValueError(f"images must have shape [n, 1, 8, 8], got {list(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("images is empty: need at least one image")
    if not np.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values")
    if x.min() < -1e-6 or x.max() > 1 + 1e-6:
        raise ValueError(f"image values must lie in [0, 1], got [{x.min():.4g}, {x.max():.4g}]")
    return x.reshape(x.shape[0], 64)


def _as_labels(labels, n: int) -> np.ndarray:
    """[n] torch tensor or numpy array of integer class ids -> int64 [n]."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must have shape [{n}] (one per image), got {list(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix [d, d] (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians N(mu_a, cov_a) and N(mu_b, cov_b).

    Tr((S_a S_b)^(1/2)) is computed as Tr((S_b^(1/2) S_a S_b^(1/2))^(1/2)): the two
    matrices are similar, and the second is symmetric PSD, so its eigenvalues
    (clipped at 0 against rounding) give the trace without ``scipy.linalg.sqrtm``'s
    complex parts or its failures on singular covariances (e.g. n identical images).
    """
    root_b = _sqrt_psd(cov_b)  # [d, d]
    w = np.linalg.eigvalsh(root_b @ cov_a @ root_b)  # [d]
    tr_covmean = float(np.sum(np.sqrt(np.clip(w, 0, None))))
    d = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)
    return max(d, 0.0)


class DigitsJudge:
    """A fixed classifier and feature space, fitted once on the train split."""

    def __init__(self, test_fraction: float = 0.2, seed: int = 0):
        from sklearn.decomposition import PCA
        from sklearn.svm import SVC

        from ..tokenizer.image import load_digits_images

        images, labels = load_digits_images()  # [1797, 1, 8, 8], [1797]
        train, test = split(len(labels), test_fraction, seed)
        x = images.reshape(len(labels), 64).double().numpy()  # [1797, 64]
        y = labels.numpy()  # [1797]
        self._train_x, self._test_x = x[train.numpy()], x[test.numpy()]  # [n_train, 64], [n_test, 64]
        self._train_y, self._test_y = y[train.numpy()], y[test.numpy()]
        self.classifier = SVC(C=SVC_C, gamma="scale").fit(self._train_x, self._train_y)
        self.pca = PCA(n_components=PCA_COMPONENTS, random_state=PCA_SEED).fit(self._train_x)
        f = self.pca.transform(self._train_x)  # [n_train, PCA_COMPONENTS]
        self._train_mu, self._train_cov = f.mean(axis=0), np.cov(f, rowvar=False)

    def recognized_rate(self, images, labels) -> float:
        """Fraction of images [n, 1, 8, 8] predicted as their label [n]."""
        x = _as_flat_images(images)  # [n, 64]
        y = _as_labels(labels, x.shape[0])  # [n]
        return float(np.mean(self.classifier.predict(x) == y))

    def frechet_distance(self, images) -> float:
        """Fréchet distance between PCA features of images [n, 1, 8, 8] (n >= 2)
        and of the train split."""
        x = _as_flat_images(images)  # [n, 64]
        if x.shape[0] < 2:
            raise ValueError(f"frechet_distance needs at least 2 images for a covariance, got {x.shape[0]}")
        f = self.pca.transform(x)  # [n, PCA_COMPONENTS]
        return frechet(f.mean(axis=0), np.cov(f, rowvar=False), self._train_mu, self._train_cov)

    def _test_images(self) -> np.ndarray:
        return self._test_x.reshape(-1, 1, 8, 8)  # [n_test, 1, 8, 8]

    def reference(self) -> dict:
        """The real test split's scores: recognized rate (classifier accuracy),
        Fréchet distance to the train split, and the number of test images."""
        images = self._test_images()
        return {
            "recognized_rate": self.recognized_rate(images, self._test_y),
            "frechet_distance": self.frechet_distance(images),
            "n_test": int(len(self._test_y)),
        }


@functools.lru_cache(maxsize=1)
def judge() -> DigitsJudge:
    """The shared judge on the default split, built once."""
    return DigitsJudge()
