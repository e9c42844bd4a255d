"""Training data: images (a class-per-folder tree or an ``.npz``), or VAE latents extracted once.

Images go through DiT's train.py transform (dit.md §D.1): ADM's centre crop, a horizontal flip with
probability 0.5, then [0, 255] -> [-1, 1]. It is written on PIL and NumPy, so torchvision is not needed.

Every item is asked for as ``(index, flip)``: the flip is decided by the caller from the run's seed and
the step (``BatchPlan``), not by the data loader's workers, so a resumed run sees the same pixels.

Pre-extracted latents (fast-DiT's ``extract_features.py``, dit.md §D.2) live in a directory written
by ``extract_features``: ``features/<index>.npy`` (float32, ``(1, C, h, w)`` as fast-DiT stores it, or
``(2, C, h, w)`` = [as is, flipped] in the mode that keeps the flip augmentation), ``labels/<index>.npy``
(int64, ``(1,)``) and a ``features.json`` manifest. Files are named by the image's index, and each
index is written by exactly one rank, atomically: fast-DiT's multi-GPU extraction let every rank
write the same names.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from bench.errors import UserError
from bench.atomic import atomic_open

# The extensions torchvision's ImageFolder accepts.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FEATURES_MANIFEST = "features.json"
FEATURES_FORMAT = "dit-bench-features"
EXTRACT_MODES = ("frozen-flip", "both-flips")

# Stream words mixed into the seed, so each kind of randomness has its own independent stream.
ORDER_STREAM, FLIP_STREAM, POSTERIOR_STREAM = 101, 102, 103


class DataError(UserError):
    """Training data that cannot be read or does not fit the run."""


def derive_seed(seed: int, *words: int) -> int:
    """A 63-bit seed for (seed, words...) through NumPy's SeedSequence: neighbours get unrelated streams."""
    if seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed}")
    state = np.random.SeedSequence([seed, *words]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ (int(state[1]) & 0x7FFFFFFF)


# ------------------------------------------------------------------------------------------ transform
def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion, used by DiT's train.py) as a uint8 HWC array.

    While the shorter side is at least twice the target, both sides are halved (integer division) with
    a BOX filter; then a BICUBIC resize brings the shorter side to ``image_size`` (the other side
    rounded); then an integer-offset centre crop.
    """
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


def to_model_range(arr: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float32 CHW in [-1, 1], in torchvision's order: ToTensor (/255), then Normalize(0.5, 0.5)."""
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div(255)
    return x.sub(0.5).div(0.5)


def _flip(x: torch.Tensor, flip) -> torch.Tensor:
    # A horizontal flip is a permutation of pixels, so flipping after normalising is bit-identical.
    return x.flip(-1) if flip else x


# ------------------------------------------------------------------------------------------ datasets
class ImageFolder:
    """``root/<class>/<image>``: classes in sorted order, files sorted within a class (torchvision's order)."""

    kind = "image-folder"

    def __init__(self, root: str | os.PathLike, image_size: int):
        self.root = Path(root)
        self.image_size = image_size
        self.classes = sorted(d.name for d in os.scandir(self.root) if d.is_dir())
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            for folder, _, files in sorted(os.walk(self.root / name, followlinks=True)):
                for file in sorted(files):
                    if file.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(folder, file), label))
        if not self.samples:
            raise DataError(f"{self.root} holds no images in class folders (root/<class>/<image>.jpg); "
                            "point --data at an ImageNet-style train folder")
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        index, flip = item
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                arr = center_crop_arr(image.convert("RGB"), self.image_size)
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        return _flip(to_model_range(arr), flip), label


class ArrayImages:
    """Images held in memory, from an ``.npz`` with uint8 ``images`` (N, H, W[, 3]) and int ``labels`` (N,).

    ``arr_0`` / ``arr_1`` (the ADM sample layout) are read too. Grayscale images become RGB, as
    ImageFolder's ``convert("RGB")`` would; images of another size go through the centre crop.
    """

    kind = "npz"

    def __init__(self, path: str | os.PathLike, image_size: int | None = None):
        self.path = Path(path)
        try:
            with np.load(self.path, allow_pickle=False) as f:
                keys = ("images", "labels") if "images" in f else ("arr_0", "arr_1")
                if not all(k in f for k in keys):
                    raise DataError(f"{self.path} has arrays {sorted(f.keys())}; expected 'images' and 'labels'")
                images, labels = f[keys[0]], f[keys[1]]
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {self.path} as an .npz of images and labels: {exc}") from None
        if images.ndim == 3:
            images = np.repeat(images[..., None], 3, axis=-1)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"{self.path}: images must be uint8 (N, H, W) or (N, H, W, 3), got "
                            f"{images.dtype} {images.shape}")
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise DataError(f"{self.path}: labels must be {len(images)} non-negative integers, got "
                            f"{labels.dtype} {labels.shape}")
        self.image_size = image_size or images.shape[1]
        if images.shape[1:3] != (self.image_size, self.image_size):
            images = np.stack([center_crop_arr(Image.fromarray(a), self.image_size) for a in images])
        self.images = torch.stack([to_model_range(a) for a in images])
        self.labels = labels.astype(np.int64)
        self.num_classes = int(self.labels.max()) + 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        index, flip = item
        return _flip(self.images[index], flip), int(self.labels[index])


class LatentFeatures:
    """A directory written by ``extract_features``: latents (already x 0.18215) and labels per image."""

    kind = "features"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.manifest = read_features_manifest(self.root)
        self.num_images = int(self.manifest["num_images"])
        self.num_classes = int(self.manifest["num_classes"])
        self.latent_shape = tuple(self.manifest["latent_shape"])
        self.image_size = int(self.manifest["image_size"])
        self.keeps_flip = self.manifest["mode"] == "both-flips"

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, item: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        index, flip = item
        latents = np.load(feature_path(self.root, index))
        # frozen-flip: the flip was drawn once at extraction (fast-DiT), so the plan's flip is moot.
        row = int(bool(flip)) if self.keeps_flip else 0
        label = np.load(label_path(self.root, index))
        return torch.from_numpy(latents[row]).float(), int(label[0])


def is_features_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / FEATURES_MANIFEST).is_file()


def open_images(path: str | os.PathLike, image_size: int | None):
    """An image dataset: an ``.npz`` or a class-per-folder tree (ImageNet's train layout)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        return ArrayImages(path, image_size)
    if path.is_dir() and not is_features_dir(path):
        return ImageFolder(path, image_size or 256)
    if is_features_dir(path):
        raise DataError(f"{path} holds pre-extracted latents, not images; images are needed here")
    raise DataError(f"--data {path}: not an image folder, an .npz of images, or a features directory")


def feature_path(root: Path, index: int) -> Path:
    return root / "features" / f"{index:08d}.npy"


def label_path(root: Path, index: int) -> Path:
    return root / "labels" / f"{index:08d}.npy"


def read_features_manifest(root: Path) -> dict:
    path = root / FEATURES_MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{root} has no {FEATURES_MANIFEST}: it was not written by `dit-bench extract-features` "
                        "or the extraction did not finish (run it again to complete it)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not a dit-bench features manifest") from None
    if manifest.get("format") != FEATURES_FORMAT or manifest.get("mode") not in EXTRACT_MODES:
        raise DataError(f"{path} is not a dit-bench features manifest")
    return manifest


# ------------------------------------------------------------------------------------------ order
class BatchPlan:
    """Which items, flipped or not, make up the global batch of every step: a function of (seed, step).

    Epochs are shuffled permutations drawn from (seed, epoch); the tail that does not fill a batch is
    dropped, as DiT's DataLoader(drop_last=True). A global batch is split into contiguous per-rank
    slices. Flips are drawn per global position from (seed, step), so the data does not depend on the
    number of processes, and a run resumed at step k gets exactly the batches it would have had.
    """

    def __init__(self, num_items: int, global_batch: int, seed: int):
        if global_batch < 1:
            raise DataError("the global batch size must be at least 1")
        if num_items < global_batch:
            raise DataError(f"the data holds {num_items} items, fewer than one global batch of {global_batch}; "
                            "lower --global-batch-size or add data")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.steps_per_epoch = num_items // global_batch
        self._epoch, self._order = -1, None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a step."""
        return divmod(step, self.steps_per_epoch)

    def indices(self, step: int) -> np.ndarray:
        epoch, batch = self.position(step)
        if epoch != self._epoch:
            rng = np.random.default_rng(derive_seed(self.seed, ORDER_STREAM, epoch))
            self._epoch, self._order = epoch, rng.permutation(self.num_items)
        return self._order[batch * self.global_batch: (batch + 1) * self.global_batch]

    def flips(self, step: int) -> np.ndarray:
        return np.random.default_rng(derive_seed(self.seed, FLIP_STREAM, step)).random(self.global_batch) < 0.5

    def for_rank(self, step: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, bool]]:
        if self.global_batch % world_size:
            raise DataError(f"global batch {self.global_batch} does not split evenly over {world_size} processes")
        local = self.global_batch // world_size
        part = slice(rank * local, (rank + 1) * local)
        return [(int(i), bool(f)) for i, f in zip(self.indices(step)[part], self.flips(step)[part])]


class StepBatches:
    """A DataLoader ``batch_sampler``: this rank's ``(index, flip)`` items for steps start..stop-1."""

    def __init__(self, plan: BatchPlan, start: int, stop: int, rank: int = 0, world_size: int = 1):
        self.plan, self.start, self.stop, self.rank, self.world_size = plan, start, stop, rank, world_size

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.plan.for_rank(step, self.rank, self.world_size)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


# ------------------------------------------------------------------------------------------ extraction
def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as fh:
        np.save(fh, array)


def _write_json_atomic(path: Path, obj: dict) -> None:
    from bench.results import write_json_atomic

    write_json_atomic(path, obj)


def extraction_flip(seed: int, index: int) -> bool:
    """The one flip image ``index`` gets in frozen-flip mode, from (seed, index) alone."""
    return bool(np.random.default_rng(derive_seed(seed, FLIP_STREAM, index)).random() < 0.5)


def extract_features(images, encoder, out: str | os.PathLike, *, mode: str = "frozen-flip", seed: int = 0,
                     batch_size: int = 32, device: torch.device | str = "cpu", world=None,
                     num_workers: int = 0, progress=None, vae_name: str = "", source: str = "") -> dict:
    """Encode every image once and store its latents (fast-DiT's pre-extraction); returns the manifest.

    ``frozen-flip``: one random flip and one posterior sample per image, stored ``(1, C, h, w)`` and
    reused every epoch (fast-DiT). ``both-flips``: the image and its mirror, each with its own posterior
    sample, stored ``(2, C, h, w)``, so training can keep drawing the flip. Image ``i``'s flip and
    posterior noise come from ``(seed, i)``, so the files do not depend on batch size or process count.
    Rank r encodes images r, r + W, ...; files already present are kept, so an interrupted run resumes.
    """
    from bench import distributed

    if mode not in EXTRACT_MODES:
        raise DataError(f"unknown extraction mode {mode!r}; choose one of {', '.join(EXTRACT_MODES)}")
    world = world or distributed.World()
    device = torch.device(device)
    out = Path(out)
    if is_features_dir(out):
        previous = read_features_manifest(out)
        if (previous["mode"], previous["seed"], previous["vae"]) != (mode, seed, vae_name):
            raise DataError(f"{out} already holds features of another extraction (mode {previous['mode']}, "
                            f"seed {previous['seed']}, vae {previous['vae']}); choose another --out")
    for sub in ("features", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    mine = [i for i in range(world.rank, len(images), world.world_size)
            if not (feature_path(out, i).is_file() and label_path(out, i).is_file())]
    batches = [mine[k: k + batch_size] for k in range(0, len(mine), batch_size)]
    items = [[(i, extraction_flip(seed, i) if mode == "frozen-flip" else False) for i in b] for b in batches]
    loader = torch.utils.data.DataLoader(images, batch_sampler=items, num_workers=num_workers)
    latent_shape = None
    for batch, (x, y) in zip(batches, loader):
        x = x.to(device)
        generators = [torch.Generator(device).manual_seed(derive_seed(seed, POSTERIOR_STREAM, i)) for i in batch]
        if mode == "both-flips":
            x, generators = torch.cat([x, x.flip(-1)]), generators + generators  # second draw of each generator
        with torch.no_grad():
            z = encoder.encode(x, generator=generators).float().cpu().numpy()
        z = z.reshape(-1, len(batch), *z.shape[1:]).swapaxes(0, 1)  # (B, 1 or 2, C, h, w)
        latent_shape = list(z.shape[2:])
        for i, latents, label in zip(batch, z, y.tolist()):
            _save_npy_atomic(feature_path(out, i), np.ascontiguousarray(latents, dtype=np.float32))
            _save_npy_atomic(label_path(out, i), np.array([label], dtype=np.int64))
        if progress is not None:
            progress(len(batch) * world.world_size)
    world.barrier()
    manifest = None
    if world.is_main:
        missing = [i for i in range(len(images)) if not feature_path(out, i).is_file()]
        if missing:
            raise DataError(f"{len(missing)} of {len(images)} images have no latents (first: {missing[0]}); "
                            "run the same command again to finish")
        if latent_shape is None:  # everything was already there
            latent_shape = list(np.load(feature_path(out, 0), mmap_mode="r").shape[1:])
        manifest = {"format": FEATURES_FORMAT, "version": 1, "mode": mode, "seed": seed, "vae": vae_name,
                    "image_size": images.image_size, "latent_shape": latent_shape, "num_images": len(images),
                    "num_classes": images.num_classes, "source": source}
        _write_json_atomic(out / FEATURES_MANIFEST, manifest)
    world.barrier()
    return manifest if manifest is not None else read_features_manifest(out)


def stack_features(root: str | os.PathLike, indices: Sequence[int]) -> np.ndarray:
    """The stored latents of some images, stacked (for inspection and tests)."""
    root = Path(root)
    return np.stack([np.load(feature_path(root, i)) for i in indices])
