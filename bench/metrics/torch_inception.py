"""``torch``: the FID Inception-v3 in PyTorch, for speed on a GPU.

The network is the well-known port of the 2015 TF graph's weights (pytorch-fid's
``pt_inception-2015-12-05``): torchvision's Inception3 layout and parameter names, 1008 classes, no
auxiliary head, with the port's TF-faithful blocks: average pools that ignore padding
(FIDInceptionA/C/E_1) and a max pool in the last block's pool branch (FIDInceptionE_2). It is built
here (torchvision is not a dependency) so that the port's state dict loads key for key.

Everything around the network follows the ADM graph, not pytorch-fid: TF1's legacy bilinear resize
to 299 (no half-pixel centres), (x - 128) / 128, sFID features from ``Mixed_6d.branch1x1`` (the
graph's ``mixed_6/conv``) first 7 channels flattened in NHWC order, and a bias-free 1008-way softmax.
TF32 is switched off while it runs so that GPU features stay float32 features.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.metrics.backends import BackendError, FeatureBackend

INPUT_SIZE = 299
SPATIAL_CHANNELS = 7
NUM_CLASSES = 1008  # the 2015 graph's softmax (1000 ImageNet classes + 8 unused)


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, TF's) + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    # TF's SAME average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35 x 35 block (Mixed_5b/5c/5d)."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_tf_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction (Mixed_6a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """17 x 17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def branches(self, x) -> list:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        return [self.branch1x1(x), b7, b7dbl, self.branch_pool(_tf_avg_pool(x))]

    def forward(self, x):
        return torch.cat(self.branches(x), 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction (Mixed_7a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8 x 8 block with expanded filter banks (Mixed_7b: average pool, Mixed_7c: max pool)."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # The 2015 graph's last block max-pools here (FIDInceptionE_2); the paper's design averages.
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.pool == "max" else _tf_avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the 2015 TF graph, in torchvision's parameter names (the port's state dict)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        """Normalised 299 x 299 NCHW input -> (pool (N, 2048), mixed_6/conv (N, 192, 17, 17))."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        branches = self.Mixed_6d.branches(x)
        spatial = branches[0]  # the graph's mixed_6/conv: Mixed_6d's 1x1 branch after its ReLU
        x = self.Mixed_6e(torch.cat(branches, 1))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return x.mean(dim=(2, 3)), spatial


def _legacy_axis(in_size: int, out_size: int):
    # TF1 ResizeBilinear with align_corners=False and no half-pixel centres: source = dst * in/out,
    # all in float32 as TF computes it.
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo.astype(np.float32)).astype(np.float32)
    return torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(frac)


def resize_bilinear_tf1(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """NCHW float32 images resized like the ADM graph's ResizeBilinear (legacy TF1 sampling)."""
    y0, y1, fy = (t.to(x.device) for t in _legacy_axis(x.shape[2], size))
    x0, x1, fx = (t.to(x.device) for t in _legacy_axis(x.shape[3], size))
    top, bottom = x[:, :, y0, :], x[:, :, y1, :]
    # TF's order of operations: interpolate along x on both rows, then along y.
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * fx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * fx
    return top + (bottom - top) * fy[:, None]


@contextlib.contextmanager
def _full_float32():
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def load_port_state_dict(model: nn.Module, path) -> None:
    """Load the port's weights key for key; only BatchNorm's step counters may be absent."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackendError(f"{path} is not a PyTorch state dict: {exc}") from None
    if not isinstance(state, dict):
        raise BackendError(f"{path} holds a {type(state).__name__}, not a state dict")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise BackendError(f"{path} is not the FID Inception-v3 port: {len(missing)} missing keys "
                           f"(e.g. {missing[:2]}), {len(result.unexpected_keys)} unexpected "
                           f"(e.g. {result.unexpected_keys[:2]})")


class TorchInceptionBackend(FeatureBackend):
    name = "torch"
    asset_name = "pt-inception-fid"
    default_batch_size = 128
    inception_space = True

    def __init__(self, weights=None, *, device: str | None = None, batch_size: int | None = None):
        super().__init__(weights, device=device, batch_size=batch_size)
        self._model: FIDInceptionV3 | None = None

    @property
    def torch_device(self) -> torch.device:
        if self.device in (None, "auto"):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device("cuda" if self.device == "gpu" else self.device)

    def _load(self) -> FIDInceptionV3:
        if self._model is None:
            model = FIDInceptionV3()
            load_port_state_dict(model, self.weights_path)
            self._model = model.eval().requires_grad_(False).to(self.torch_device)
        return self._model

    @torch.inference_mode()
    def image_features(self, images: np.ndarray):
        model = self._load()
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.torch_device)
        x = x.permute(0, 3, 1, 2).float()
        with _full_float32():
            x = (resize_bilinear_tf1(x) - 128.0) / 128.0
            pool, spatial = model(x)
        spatial = spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # NHWC flatten order, as TF
        return pool.cpu().numpy(), spatial.reshape(len(spatial), -1).cpu().numpy()

    @torch.inference_mode()
    def softmax(self, pool: np.ndarray) -> np.ndarray:
        model = self._load()
        weight = model.fc.weight  # the evaluator's IS has no bias: softmax(pool @ W)
        out = []
        with _full_float32():
            for i in range(0, len(pool), 4096):
                logits = torch.from_numpy(np.ascontiguousarray(pool[i:i + 4096])).to(weight.device) @ weight.T
                out.append(torch.softmax(logits, dim=1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, weight.shape[0]), np.float32)

    def close(self) -> None:
        on_gpu = self._model is not None and self.torch_device.type == "cuda"
        self._model = None
        if on_gpu:  # hand the memory back, e.g. to a TF backend that runs next
            torch.cuda.empty_cache()
