"""Training data: ImageFolder class folders, each image seen twice.

The codec gets the paper's view (bicubic resize + centre crop to the preset's codec input, 256
or 384, values in [0, 1]); the teacher CLIP gets CLIP's own eval view of the same image (resize +
centre crop to CLIP's input, 224 or 336, CLIP normalisation), from open_clip's ``image_transform``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from open_clip.transform import image_transform
from torch.utils.data import Dataset, Sampler, Subset
from torchvision.datasets import ImageFolder

from ..errors import ComneckInputError, ErrorCode
from ..image import SAMPLE_PHOTOS, load_image, resize_for_codec, sample_photo, to_tensor
from .config import DataConfig


class TwoViews:
    """PIL image -> (codec view [3, S, S] in [0, 1], CLIP view [3, C, C] normalised)."""

    def __init__(self, codec_size: int, clip_size: int) -> None:
        self.codec_size = codec_size
        self.clip_view = image_transform(clip_size, is_train=False)

    def __call__(self, img) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
        return to_tensor(resize_for_codec(img, "paper", self.codec_size))[0], self.clip_view(img)


def read_class_names(path: Path | None, folders: list[str], code: ErrorCode = ErrorCode.BAD_CONFIG) -> list[str]:
    """Readable class names in folder order: from a .txt (one per line), a .json ({folder: name},
    or Keras's ``imagenet_class_index.json``, {index: [folder, name]}), else the folder names with
    underscores as spaces. A bad file is refused with ``code`` (the caller's kind of input)."""
    if path is None:
        return [folder.replace("_", " ") for folder in folders]
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ComneckInputError(f"cannot read class names {path}: {exc.strerror}", code) from None
    if Path(path).suffix == ".json":
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ComneckInputError(f"{path} is not JSON ({exc})", code) from None
        if not isinstance(mapping, dict):
            raise ComneckInputError(f"{path} is no JSON object of class names", code)
        if mapping and all(isinstance(v, list) and len(v) == 2 for v in mapping.values()):
            mapping = {str(folder): name for folder, name in mapping.values()}
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise ComneckInputError(f"{path} names no class for folder {missing[0]!r}", code)
        return [str(mapping[f]) for f in folders]
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != len(folders):
        raise ComneckInputError(f"{path} lists {len(names)} class names for {len(folders)} class folders", code)
    return names


class SamplePhotos(Dataset):
    """``data.root: sample``: the photos bundled with the package, one class each (cow, chicken),
    so a smoke run needs no download."""

    def __init__(self, transform: TwoViews) -> None:
        self.paths = [sample_photo(name) for name in SAMPLE_PHOTOS]
        self.classes = [name.split("_")[0] for name in SAMPLE_PHOTOS]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        return self.transform(load_image(self.paths[index])), index


def build_dataset(config: DataConfig, codec_size: int, clip_size: int) -> tuple[Dataset, list[str]]:
    """The two-view dataset and its class names."""
    views = TwoViews(codec_size, clip_size)
    if config.root == "sample":
        folder: ImageFolder | SamplePhotos = SamplePhotos(views)
    elif not Path(config.root).is_dir():
        raise ComneckInputError(f"data root {config.root} is not a folder", ErrorCode.BAD_CONFIG)
    else:
        folder = _image_folder(Path(config.root), views)
    names = read_class_names(config.classes, folder.classes)
    dataset: Dataset = Subset(folder, range(min(config.limit, len(folder)))) if config.limit else folder
    return dataset, names


def _image_folder(root: Path, views: TwoViews) -> ImageFolder:
    try:
        return ImageFolder(str(root), loader=load_image, transform=views)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ComneckInputError(f"data root {root}: {exc}".splitlines()[0], ErrorCode.BAD_CONFIG) from None


class ResumableSampler(Sampler[int]):
    """A shuffled order fixed by (seed, epoch), split across ``world`` processes, that can start
    ``skip`` samples in: a resumed run sees exactly the samples the interrupted one had left."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        usable = len(order) - len(order) % self.world  # every process gets as many samples
        return order[self.rank : usable : self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip :])

    def __len__(self) -> int:
        return len(self._indices()) - self.skip
