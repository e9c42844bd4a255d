"""The embedded default's proxy task: real images without a download, and a feature network for them.

Data: scikit-learn's bundled handwritten digits (1797 real 8x8 scans, 10 classes, shipped inside
the installed package), upscaled to 16x16 and replicated to 3 channels so they are ordinary ADM
images (uint8 N x H x W x 3). Models train on them in pixel space (the identity "VAE").

Features: a small CNN classifier trained on the same digits stands in for Inception-v3. It gives
the same three outputs the ADM metrics read (pool features, spatial features, class softmax), so
FID / sFID / IS / precision / recall are computed by exactly the same code as the real ones. Its
numbers are proxy numbers: they are compared with papers only through ratios and deltas.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.metrics.backends import FeatureBackend
from bench.atomic import atomic_open

IMAGE_SIZE = 16
NUM_CLASSES = 10
ASSET_DIR = Path(__file__).resolve().parent / "proxy_assets"
CLASSIFIER_FILE = ASSET_DIR / "digits_classifier.pt"


def digits_images(image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 (N, image_size, image_size, 3) and int64 labels, in dataset order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # values 0..16 -> [0, 1]
    if image_size != pixels.shape[-1]:
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (pixels.clamp(0, 1) * 255.0 + 0.5).floor().to(torch.uint8).repeat(1, 3, 1, 1)
    return images.permute(0, 2, 3, 1).numpy(), digits.target.astype(np.int64)


def split(images: np.ndarray, labels: np.ndarray, holdout: int = 297, seed: int = 0):
    """A fixed train / held-out split (1500 / 297): the held-out digits are the FID reference set."""
    order = np.random.default_rng(seed).permutation(len(images))
    test, train = order[:holdout], order[holdout:]
    return (images[train], labels[train]), (images[test], labels[test])


class DigitsClassifier(nn.Module):
    """conv 16x16 -> 8x8 ('spatial') -> 4x4 -> mean pool ('pool', 128-d) -> 10 logits."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * width, NUM_CLASSES)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> float NCHW in [-1, 1]."""
        return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.conv1(x))
        spatial = F.relu(self.conv2(h))
        pool = F.relu(self.conv3(spatial)).mean(dim=(2, 3))
        # Like sFID's first 7 channels of mixed_6/conv: a few channels of a mid-level map, flattened.
        return pool, spatial[:, :8].flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)[0])


def train_classifier(seed: int = 0, epochs: int = 30, out: str | Path | None = CLASSIFIER_FILE) -> tuple[DigitsClassifier, float]:
    """Train the proxy feature network on the training split; returns it and its held-out accuracy.

    Re-creates the shipped ``digits_classifier.pt`` (``dit-bench proxy-assets --classifier``).
    """
    torch.manual_seed(seed)
    (x_train, y_train), (x_test, y_test) = split(*digits_images())
    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    x = DigitsClassifier.preprocess(torch.from_numpy(x_train))
    y = torch.from_numpy(y_train)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        pred = net(DigitsClassifier.preprocess(torch.from_numpy(x_test))).argmax(1).numpy()
    accuracy = float((pred == y_test).mean())
    if out is not None:
        with atomic_open(out, "wb") as fh:
            torch.save(net.state_dict(), fh)
    return net, accuracy


class ProxyBackend(FeatureBackend):
    """The digits classifier as an ADM-metrics feature backend (registered as ``proxy``)."""

    name = "proxy"
    default_batch_size = 512
    inception_space = False
    proxy = True

    def __init__(self, weights=None, *, device=None, batch_size=None):
        super().__init__(weights if weights is not None else CLASSIFIER_FILE, device=device, batch_size=batch_size)
        self._net: DigitsClassifier | None = None

    @property
    def net(self) -> DigitsClassifier:
        if self._net is None:
            from bench.checkpoints import read_state_dict

            state, _ = read_state_dict(self.weights_path)
            net = DigitsClassifier()
            net.load_state_dict(state)
            self._net = net.eval().to(self.device or "cpu")
        return self._net

    @torch.no_grad()
    def image_features(self, images: np.ndarray):
        x = torch.from_numpy(np.array(images))  # a copy: the npz reader may hand out read-only views
        if x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                              align_corners=False).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        pool, spatial = self.net.features(DigitsClassifier.preprocess(x.to(self.device or "cpu")))
        return pool.cpu().numpy().astype(np.float32), spatial.cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def softmax(self, pool: np.ndarray) -> np.ndarray:
        logits = self.net.fc(torch.from_numpy(pool).to(self.device or "cpu"))
        return logits.softmax(dim=1).cpu().numpy().astype(np.float32)
