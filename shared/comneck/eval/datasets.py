"""Dataset readers: each reads one dataset in its published format from a local folder (nothing is
downloaded) and returns its :class:`~comneck.eval.items.Item` list in a fixed order (the file's).

A folder in another layout, a missing image or an annotation file of another structure is
refused with one line naming the file and what was expected (``ErrorCode.BAD_DATASET``).

========  ========================  =======================================================  ==========================================================
task      reader                    published at                                             files read under ``root``
========  ========================  =======================================================  ==========================================================
caption   :func:`coco_karpathy`     https://cs.stanford.edu/people/karpathy/deepimagesent/   ``dataset_coco.json``, ``<filepath>/<filename>`` (COCO 2014)
mcq       :func:`seed_bench`        https://huggingface.co/datasets/AILab-CVC/SEED-Bench     ``SEED-Bench.json``, ``SEED-Bench-image/<data_id>``
rec       :func:`refcoco`           https://github.com/lichengunc/refer                      ``<dataset>/refs(unc).p`` or ``refs(umd).p``,
                                                                                             ``<dataset>/instances.json``, ``images/<file_name>``
                                                                                             or ``train2014/<file_name>`` (COCO train2014)
fewshot   :func:`fewshot_episodes`  https://github.com/zh460045050/V2L-Tokenizer             ``fewshot_split/5_way_1_shot.csv``, ``<class folder>/<file>``
                                                                                             (ImageNet-1k val, https://image-net.org/download.php)
classify  :func:`image_folder`      https://pytorch.org/vision/stable/generated/             ``<class folder>/**/<image>``, optional class names
                                    torchvision.datasets.ImageFolder.html                    (``.txt``, ``.json``)
human     :func:`kodak`             https://r0k.us/graphics/kodak/                           the images directly in ``root`` (``kodim01.png`` ..)
========  ========================  =======================================================  ==========================================================

:data:`DATASETS` holds the same facts as data; :func:`read_dataset` reads a task's dataset by
the task's name. Few-shot episodes can also be drawn from any ImageFolder with a seed
(:func:`sample_episodes`) and saved in V2L's CSV format (:func:`save_episodes`) to be read again.
"""

from __future__ import annotations

import inspect
import json
import pickle
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from ..errors import ComneckInputError, ErrorCode
from ..train.data import read_class_names
from .items import Item, Support

KARPATHY_SPLITS = ("train", "restval", "val", "test")
#: SEED-Bench's image dimensions are question types 1..9 (Honeybee's ``SEEDDataset``, target "image").
SEED_IMAGE_TYPES = 9
SEED_LETTERS = ("A", "B", "C", "D")
#: refer's datasets: (the refs pickle in ``root/<dataset>/``, the evaluation splits).
REFER: dict[str, tuple[str, tuple[str, ...]]] = {
    "refcoco": ("refs(unc).p", ("val", "testA", "testB")),
    "refcoco+": ("refs(unc).p", ("val", "testA", "testB")),
    "refcocog": ("refs(umd).p", ("val", "test")),
}
#: The folder of V2L's episode files (``{ways}_way_{shots}_shot.csv``), beside the class folders
#: of a few-shot dataset (and so no class of it).
EPISODES_FOLDER = "fewshot_split"
#: Where refer's images may lie under ``root`` (refer's own layout, then COCO's folder name).
REFER_IMAGE_FOLDERS = ("images", "train2014")


def _bad(path: Path, why: str) -> ComneckInputError:
    """A one-line refusal naming the file."""
    return ComneckInputError(f"{path}: {why}", ErrorCode.BAD_DATASET)


def _choose(value: str, allowed: Sequence[str], what: str) -> str:
    """``value`` if it is one of ``allowed``, else a refusal listing them."""
    if value not in allowed:
        raise ComneckInputError(f"unknown {what} {value!r}: expected one of {', '.join(allowed)}", ErrorCode.BAD_DATASET)
    return value


def _read_json(path: Path, what: str) -> Any:
    """The JSON value of ``path``, refused in one line if the file is missing or no JSON."""
    if not path.is_file():
        raise _bad(path, f"missing (expected {what})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(path, f"not JSON ({exc}); expected {what}") from None


def _get(record: Any, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    """``record[key]`` checked to be a ``kind`` (``where`` says which record, for the refusal)."""
    if not isinstance(record, dict) or not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _bad(path, f"{where} has no {key!r} ({names}) as the published format has")
    return record[key]


def _image(path: Path, source: Path) -> Path:
    """``path`` if that image exists, else a refusal naming it and the file that refers to it."""
    if not path.is_file():
        raise _bad(source, f"its image {path} is missing")
    return path


def coco_karpathy(root: Path, split: str = "test") -> list[Item]:
    """COCO captioning in Karpathy's split (``dataset_coco.json``): one item per image of ``split``,
    id the COCO id, reference the raw captions, images under ``root/<filepath>/<filename>``."""
    root, split = Path(root), _choose(split, KARPATHY_SPLITS, "Karpathy split")
    path = root / "dataset_coco.json"
    images = _get(_read_json(path, "Karpathy's captions"), "images", list, path, "the file")
    items = []
    for i, entry in enumerate(images):
        where = f"images[{i}]"
        if _get(entry, "split", str, path, where) != split:
            continue
        sentences = _get(entry, "sentences", list, path, where)
        folder, name = _get(entry, "filepath", str, path, where), _get(entry, "filename", str, path, where)
        items.append(Item(
            id=str(_get(entry, "cocoid", int, path, where)),
            image=_image(root / folder / name, path),
            reference=[_get(s, "raw", str, path, f"{where}.sentences[{j}]") for j, s in enumerate(sentences)],
        ))
    return items


def seed_bench(root: Path) -> list[Item]:
    """SEED-Bench's image questions (dimensions 1-9, the questions Honeybee's evaluation keeps):
    prompt the question, choices A-D, reference the answer letter, group the dimension's name."""
    root = Path(root)
    path = root / "SEED-Bench.json"
    data = _read_json(path, "SEED-Bench's questions")
    types = _get(data, "question_type", dict, path, "the file")
    dimension = {number: name for name, number in types.items()}
    items = []
    for i, question in enumerate(_get(data, "questions", list, path, "the file")):
        where = f"questions[{i}]"
        number = _get(question, "question_type_id", int, path, where)
        if number > SEED_IMAGE_TYPES:
            continue
        answer = _get(question, "answer", str, path, where)
        if answer not in SEED_LETTERS or number not in dimension:
            raise _bad(path, f"{where} has answer {answer!r} and type {number}: expected A-D and a type in question_type")
        items.append(Item(
            id=str(_get(question, "question_id", (str, int), path, where)),
            image=_image(root / "SEED-Bench-image" / _get(question, "data_id", str, path, where), path),
            prompt=_get(question, "question", str, path, where),
            choices=tuple(_get(question, f"choice_{letter.lower()}", str, path, where) for letter in SEED_LETTERS),
            reference=answer,
            group=dimension[number],
            extra={"question_type_id": number},
        ))
    return items


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only (lists, dicts, strings, numbers: what refer's pickles hold, in
    Python 2's protocols too): a pickle that names any class or function is refused, nothing imported."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it names {module}.{name}, and a refs file holds plain data only")


def _load_refs(path: Path) -> list[Any]:
    """refer's refs pickle (written by Python 2: its byte strings read as latin-1), plain data only."""
    if not path.is_file():
        raise _bad(path, "missing (expected refer's refs pickle)")
    try:
        with path.open("rb") as file:
            refs = _PlainDataUnpickler(file, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise _bad(path, f"not a plain-data refs pickle ({exc})") from None
    if not isinstance(refs, list):
        raise _bad(path, "not a list of refs as refer's pickles are")
    return refs


def _refer_images(root: Path) -> Path:
    """The folder of refer's COCO train2014 images."""
    for name in REFER_IMAGE_FOLDERS:
        if (root / name).is_dir():
            return root / name
    raise _bad(root, f"no {' or '.join(name + '/' for name in REFER_IMAGE_FOLDERS)} folder of COCO train2014 images")


def refcoco(root: Path, dataset: str = "refcoco", split: str = "val") -> list[Item]:
    """RefCOCO, RefCOCO+ or RefCOCOg (umd) in refer's layout: one item per referring sentence of
    ``split``, in the refs file's order; prompt the sentence, reference the object's box
    ``[x0, y0, x1, y1]`` in the photo's pixels (COCO's ``[x, y, w, h]`` with x1 = x + w), group the split."""
    root = Path(root)
    refs_name, splits = REFER[_choose(dataset, tuple(REFER), "refer dataset")]
    split = _choose(split, splits, f"{dataset} split")
    refs_path = root / dataset / refs_name
    refs = _load_refs(refs_path)
    instances_path = root / dataset / "instances.json"
    instances = _read_json(instances_path, "COCO instances (images, annotations)")
    files = {
        _get(image, "id", int, instances_path, f"images[{i}]"): _get(image, "file_name", str, instances_path, f"images[{i}]")
        for i, image in enumerate(_get(instances, "images", list, instances_path, "the file"))
    }
    boxes = {
        _get(ann, "id", int, instances_path, f"annotations[{i}]"): _get(ann, "bbox", list, instances_path, f"annotations[{i}]")
        for i, ann in enumerate(_get(instances, "annotations", list, instances_path, "the file"))
    }
    images = _refer_images(root)
    items = []
    for i, ref in enumerate(refs):
        where = f"ref {i}"
        if _get(ref, "split", str, refs_path, where) != split:
            continue
        ref_id, ann_id, image_id = (_get(ref, key, int, refs_path, where) for key in ("ref_id", "ann_id", "image_id"))
        box = boxes.get(ann_id)
        if image_id not in files or box is None or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            raise _bad(instances_path, f"has no image {image_id} or no [x, y, w, h] bbox for annotation {ann_id} (ref {ref_id})")
        x, y, w, h = (float(v) for v in box)
        image = _image(images / files[image_id], instances_path)
        for j, sentence in enumerate(_get(ref, "sentences", list, refs_path, where)):
            items.append(Item(
                id=f"{ref_id}_{j}",
                image=image,
                prompt=_get(sentence, "sent", str, refs_path, f"{where} sentence {j}"),
                reference=[x, y, x + w, y + h],
                group=split,
                extra={"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id},
            ))
    return items


def _class_folders(root: Path, skip: str | None = None) -> tuple[list[str], dict[str, int]]:
    """An ImageFolder's class folders (sorted, as torchvision's ``find_classes``) but ``skip``, and their indices."""
    if not root.is_dir():
        raise _bad(root, "not a folder (expected one sub-folder of images per class)")
    try:
        folders = [folder for folder in find_classes(str(root))[0] if folder != skip]
    except FileNotFoundError:
        folders = []
    if not folders:
        raise _bad(root, "has no class folders (expected one sub-folder of images per class)")
    return folders, {folder: i for i, folder in enumerate(folders)}


def _folder_images(root: Path, index: dict[str, int]) -> list[tuple[Path, int]]:
    """Every image of an ImageFolder with its class index, in torchvision's order (class, then path)."""
    try:
        return [(Path(file), label) for file, label in make_dataset(str(root), index, extensions=IMG_EXTENSIONS)]
    except FileNotFoundError as exc:
        raise _bad(root, f"{str(exc).splitlines()[0]} (a class folder without images)") from None


def _labels(root: Path, classes: Path | None) -> dict[str, str]:
    """A few-shot folder's class folder -> label: from the class-name file ``classes`` (see
    ``read_class_names``) or the folder names."""
    folders, _ = _class_folders(root, skip=EPISODES_FOLDER)
    return dict(zip(folders, read_class_names(classes, folders, ErrorCode.BAD_DATASET)))


def _episode(root: Path, image_ids: Sequence[str], labels: dict[str, str], source: Path, index: int) -> Item:
    """One episode from its image ids ``class/file`` (the supports in prompt order, then the query)."""
    shown = []
    for image_id in image_ids:
        folder = image_id.split("/")[0]
        if folder not in labels:
            raise _bad(source, f"episode {index}: {image_id} is in no class folder of {root}")
        shown.append(Support(_image(root / image_id, source), labels[folder]))
    return Item(id=str(index), image=shown[-1].image, reference=shown[-1].label, support=tuple(shown[:-1]),
                extra={"image_ids": list(image_ids)})


def _episode_ids(line: str, count: int, path: Path, number: int) -> list[str]:
    """A CSV line's image ids: ``count`` ids ``class/file``, each followed by a comma (V2L's format)."""
    fields = line.split(",")
    ids = fields[:-1]
    if fields[-1] != "" or len(ids) != count or any(len(i.split("/")) != 2 or "" in i.split("/") for i in ids):
        raise _bad(path, f"line {number} is not {count} image ids 'class/file' each followed by a comma")
    return ids


def fewshot_episodes(root: Path, episodes: Path | None = None, ways: int = 5, shots: int = 1,
                     classes: Path | None = None) -> list[Item]:
    """N-way K-shot episodes from V2L's CSV (default ``root/fewshot_split/{ways}_way_{shots}_shot.csv``,
    the official file's place in its repository; that folder counts as no class): each line holds
    ways x shots support image ids and then the query's, each ``class/file`` and followed by a
    comma, the images at ``root/class/file`` (ImageNet val in class folders), as the official
    ``MiniImageNetDataset`` reads them. Item ``i`` is line ``i``: support in the line's
    order, the query as the image, its class's label as the reference.

    Labels: the official code maps each class folder (an ImageNet wnid) to a name through a dict
    built into it in the form of Keras's ``imagenet_class_index.json`` ({index: [wnid, name]},
    names such as ``great_white_shark``; its class 27, n01631663, is blanked there); give such a
    file as ``classes`` for those names (or a .txt / {folder: name} .json); without one, the
    folder names, underscores as spaces."""
    root = Path(root)
    path = Path(episodes) if episodes is not None else root / EPISODES_FOLDER / f"{ways}_way_{shots}_shot.csv"
    if not path.is_file():
        raise _bad(path, "missing (expected V2L's episode CSV, one episode a line)")
    labels = _labels(root, classes)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [_episode(root, _episode_ids(line, ways * shots + 1, path, i + 1), labels, path, i) for i, line in enumerate(lines)]


def sample_episodes(root: Path, n: int, seed: int, ways: int = 5, shots: int = 1, classes: Path | None = None) -> list[Item]:
    """``n`` random N-way K-shot episodes over an ImageFolder, the same for the same ``seed``: each
    draws ``ways`` classes holding over ``shots`` images directly in their folder, the query's class
    among them, ``shots`` supports per class (in the drawn class order) and a query of its own.
    Labels as :func:`fewshot_episodes`; :func:`save_episodes` writes them in V2L's CSV format."""
    root = Path(root)
    folders, index = _class_folders(root, skip=EPISODES_FOLDER)
    files: dict[str, list[str]] = {folder: [] for folder in folders}
    for file, label in _folder_images(root, index):
        if file.parent == root / folders[label]:
            files[folders[label]].append(file.name)
    eligible = [folder for folder in folders if len(files[folder]) > shots]
    if len(eligible) < ways:
        raise _bad(root, f"{len(eligible)} class folders hold over {shots} images; {ways}-way {shots}-shot episodes need {ways}")
    rng = random.Random(seed)
    episodes = []
    for _ in range(n):
        drawn = rng.sample(eligible, ways)
        query = rng.choice(drawn)
        picks = {folder: rng.sample(files[folder], shots + (folder == query)) for folder in drawn}
        episodes.append([f"{folder}/{name}" for folder in drawn for name in picks[folder][:shots]] + [f"{query}/{picks[query][-1]}"])
    labels = _labels(root, classes)
    return [_episode(root, ids, labels, root, i) for i, ids in enumerate(episodes)]


def save_episodes(items: Sequence[Item], path: Path) -> Path:
    """Write few-shot items as V2L's episode CSV (supports then query, ``class/file,`` each), so a
    sampled run can be read again by :func:`fewshot_episodes`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ("".join(f"{image.parent.name}/{image.name}," for image in [*(s.image for s in item.support), item.image]) for item in items)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def image_folder(root: Path, classes: Path | None = None) -> list[Item]:
    """Zero-shot classification over an ImageFolder (torchvision's layout, order and image
    extensions): id the image's path under ``root``, reference its class's name, from ``classes``
    (.txt one per line in folder order, or .json {folder: name}) or the folder name, underscores as spaces."""
    root = Path(root)
    folders, index = _class_folders(root)
    names = read_class_names(classes, folders, ErrorCode.BAD_DATASET)
    return [Item(id=file.relative_to(root).as_posix(), image=file, reference=names[label]) for file, label in _folder_images(root, index)]


def kodak(root: Path) -> list[Item]:
    """Human viewing: the images directly in ``root`` (Kodak's kodim01.png .. kodim24.png, or any
    with torchvision's image extensions), sorted by name; no reference (the photo itself is one)."""
    root = Path(root)
    if not root.is_dir():
        raise _bad(root, "not a folder (expected a folder of images such as kodim01.png)")
    images = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not images:
        raise _bad(root, f"holds no image ({' '.join(IMG_EXTENSIONS)})")
    return [Item(id=image.name, image=image) for image in images]


@dataclass(frozen=True)
class Dataset:
    """A task's dataset: its reader, where it is published, and the files the reader reads."""

    reader: Callable[..., list[Item]]
    published: str
    files: str


#: Each task's dataset (the module docstring's table; docs/evaluation.md "Datasets").
DATASETS: dict[str, Dataset] = {
    "caption": Dataset(coco_karpathy, "https://cs.stanford.edu/people/karpathy/deepimagesent/",
                       "dataset_coco.json, <filepath>/<filename>"),
    "mcq": Dataset(seed_bench, "https://huggingface.co/datasets/AILab-CVC/SEED-Bench",
                   "SEED-Bench.json, SEED-Bench-image/<data_id>"),
    "rec": Dataset(refcoco, "https://github.com/lichengunc/refer",
                   "<dataset>/refs(unc).p or refs(umd).p, <dataset>/instances.json, images/ or train2014/<file_name>"),
    "fewshot": Dataset(fewshot_episodes, "https://github.com/zh460045050/V2L-Tokenizer",
                       "fewshot_split/5_way_1_shot.csv, <class folder>/<file>"),
    "classify": Dataset(image_folder, "https://pytorch.org/vision/stable/generated/torchvision.datasets.ImageFolder.html",
                        "<class folder>/**/<image>"),
    "human": Dataset(kodak, "https://r0k.us/graphics/kodak/", "<image> directly in the folder"),
}

def read_dataset(task: str, root: Path, **options: Any) -> list[Item]:
    """The items of ``task``'s dataset under ``root``; ``options`` go to its reader (e.g. ``split``)."""
    if task not in DATASETS:
        raise ComneckInputError(f"unknown evaluation task {task!r}: expected one of {', '.join(DATASETS)}", ErrorCode.UNKNOWN_TASK)
    reader = DATASETS[task].reader
    try:
        inspect.signature(reader).bind(root, **options)
    except TypeError:
        takes = ", ".join(list(inspect.signature(reader).parameters)[1:]) or "none"
        raise ComneckInputError(f"dataset options {', '.join(options)} do not fit {task}'s reader, which takes {takes}",
                                ErrorCode.BAD_DATASET) from None
    return reader(root, **options)
