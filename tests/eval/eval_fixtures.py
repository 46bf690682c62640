"""Tiny evaluation datasets in their PUBLISHED formats, made from the bundled photos.

Each ``write_*(root) -> Path`` writes a handful of items under ``root`` in the layout and file
format its dataset is published in (see ``comneck.eval.datasets``) and returns the folder to
give that dataset's reader. Images are small JPEGs (PNGs for Kodak) of the two bundled photos,
tinted where a dataset needs more distinct classes; everything is fast enough for any test.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from comneck.image import SAMPLE_PHOTOS, sample_photo

#: Tints (RGB) that make the coloured variants of a photo: one per few-shot class.
TINTS = ((255, 64, 64), (64, 200, 64), (64, 64, 255), (230, 200, 40), (200, 60, 220), (40, 210, 210))
#: The few-shot fixture's class folders (ImageNet wnids, as in ImageNet val arranged by class)
#: and the names a Keras-style ``imagenet_class_index.json`` gives them.
FEWSHOT_CLASSES = {
    "n01440764": "tench", "n01443537": "goldfish", "n01484850": "great_white_shark",
    "n01491361": "tiger_shark", "n01494475": "hammerhead", "n01496331": "electric_ray",
}
#: Episodes of the fixture's ``fewshot_split/5_way_1_shot.csv``: 5 supports, then the query.
FEWSHOT_EPISODES = (
    ("n01440764/ILSVRC2012_val_00000001.JPEG", "n01443537/ILSVRC2012_val_00000003.JPEG", "n01484850/ILSVRC2012_val_00000005.JPEG",
     "n01491361/ILSVRC2012_val_00000007.JPEG", "n01494475/ILSVRC2012_val_00000009.JPEG", "n01484850/ILSVRC2012_val_00000006.JPEG"),
    ("n01496331/ILSVRC2012_val_00000011.JPEG", "n01491361/ILSVRC2012_val_00000008.JPEG", "n01440764/ILSVRC2012_val_00000002.JPEG",
     "n01443537/ILSVRC2012_val_00000004.JPEG", "n01484850/ILSVRC2012_val_00000005.JPEG", "n01496331/ILSVRC2012_val_00000012.JPEG"),
)


def write_photo(path: Path, photo: int = 0, size: tuple[int, int] = (48, 40), tint: tuple[int, int, int] | None = None) -> Path:
    """One of the bundled photos (``SAMPLE_PHOTOS[photo]``), resized and optionally tinted, saved
    at ``path`` in the format its suffix names."""
    image = Image.open(sample_photo(SAMPLE_PHOTOS[photo])).convert("RGB").resize(size)
    if tint is not None:
        image = ImageOps.colorize(image.convert("L"), black=(0, 0, 0), white=tint)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_coco_karpathy(root: Path) -> Path:
    """Karpathy's ``dataset_coco.json`` with 2 test images, 1 val and 1 restval, and the images."""
    entries = [
        ("val2014", "COCO_val2014_000000391895.jpg", 391895, "test", ["A man with a red helmet on a small moped.", "A man riding a motor bike."]),
        ("val2014", "COCO_val2014_000000522418.jpg", 522418, "val", ["A woman cutting a large white sheet cake."]),
        ("val2014", "COCO_val2014_000000184613.jpg", 184613, "test", ["A child holding a flowered umbrella.", "A boy and a cow.", "Cattle."]),
        ("train2014", "COCO_train2014_000000057870.jpg", 57870, "restval", ["A restaurant with chairs and tables."]),
    ]
    images = []
    for i, (folder, name, cocoid, split, captions) in enumerate(entries):
        write_photo(root / folder / name, photo=i % 2)
        images.append({
            "filepath": folder, "filename": name, "cocoid": cocoid, "split": split, "imgid": i,
            "sentids": list(range(10 * i, 10 * i + len(captions))),
            "sentences": [{"raw": raw, "tokens": raw.lower().rstrip(".").split(), "imgid": i, "sentid": 10 * i + j}
                          for j, raw in enumerate(captions)],
        })
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root


#: SEED-Bench's twelve question types (``question_type`` of SEED-Bench.json).
SEED_TYPES = {
    "Scene Understanding": 1, "Instance Identity": 2, "Instance Attributes": 3, "Instance Location": 4,
    "Instances Counting": 5, "Spatial Relation": 6, "Instance Interaction": 7, "Visual Reasoning": 8,
    "Text Understanding": 9, "Action Recognition": 10, "Action Prediction": 11, "Procedure Understanding": 12,
}


def write_seed_bench(root: Path) -> Path:
    """``SEED-Bench.json`` with 3 image questions (types 1, 5, 9) and 1 video question (type 10,
    whose video is absent as the image-only download has none), and ``SEED-Bench-image/``."""
    def question(qid: str, data_id: str, type_id: int, answer: str, text: str, choices: tuple[str, ...], data_type: str = "image") -> dict[str, Any]:
        return {"question_id": qid, "data_id": data_id, "question_type_id": type_id, "answer": answer, "question": text,
                "data_type": data_type, "data_source": "cc3m",
                **{f"choice_{letter}": choice for letter, choice in zip("abcd", choices)}}

    questions = [
        question("101669", "1454426_2591111986.jpg", 1, "A", "What is the main feature of the scene?",
                 ("A beach", "A city", "A forest", "A desert")),
        question("v1", "v1234.mp4", 10, "B", "What is the person doing?", ("Running", "Cooking", "Reading", "Sleeping"), "video"),
        question("15622", "2342897_1409254137.jpg", 5, "C", "How many animals are there?", ("Three", "Two", "One", "Four")),
        question("39023", "1454426_2591111986.jpg", 9, "D", "What is written on the note?", ("10", "20", "50", "100")),
    ]
    write_photo(root / "SEED-Bench-image" / "1454426_2591111986.jpg", photo=0)
    write_photo(root / "SEED-Bench-image" / "2342897_1409254137.jpg", photo=1)
    (root / "SEED-Bench.json").write_text(json.dumps({"questions": questions, "question_type": SEED_TYPES}))
    return root


def py2_pickle(value: Any) -> bytes:
    """``value`` (lists, dicts, str, int, float) pickled as Python 2's cPickle writes protocol 2:
    ASCII strings as byte strings (SHORT_BINSTRING / BINSTRING), others as unicode, every string
    and container memoised (BINPUT), no class named anywhere."""
    out, memo = bytearray(b"\x80\x02"), [0]

    def put() -> None:
        out.extend(b"q" + bytes([memo[0] % 256]))
        memo[0] += 1

    def save(v: Any) -> None:
        if isinstance(v, str):
            data = v.encode("utf-8")
            if v.isascii():
                out.extend((b"U" + bytes([len(data)])) if len(data) < 256 else (b"T" + struct.pack("<I", len(data))))
            else:
                out.extend(b"X" + struct.pack("<I", len(data)))
            out.extend(data)
            put()
        elif isinstance(v, bool) or v is None:
            raise TypeError(v)
        elif isinstance(v, int):
            out.extend(b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v))
        elif isinstance(v, float):
            out.extend(b"G" + struct.pack(">d", v))
        elif isinstance(v, list):
            out.extend(b"]")
            put()
            if v:
                out.extend(b"(")
                for item in v:
                    save(item)
                out.extend(b"e")
        elif isinstance(v, dict):
            out.extend(b"}")
            put()
            if v:
                out.extend(b"(")
                for key, item in v.items():
                    save(key)
                    save(item)
                out.extend(b"u")
        else:
            raise TypeError(type(v))

    save(value)
    return bytes(out + b".")


#: The refcoco fixture's objects: (ref_id, ann_id, image_id, split, bbox [x, y, w, h], sentences).
REFCOCO_REFS = (
    (0, 1001, 9, "val", [4.5, 6.25, 20.0, 10.5], ["the cow on the left", "brown cow"]),
    (1, 1002, 25, "testA", [10.0, 2.0, 30.0, 35.0], ["chicken"]),
    (2, 1003, 9, "train", [0.0, 0.0, 48.0, 40.0], ["whole picture"]),
    (3, 1004, 25, "val", [1.0, 2.0, 3.0, 4.0], ["caf\u00e9 sign"]),
)


def write_refcoco(root: Path, dataset: str = "refcoco", images: str = "images") -> Path:
    """refer's layout for ``dataset``: ``root/<dataset>/refs(unc).p`` (``refs(umd).p`` for refcocog),
    a Python-2 protocol-2 pickle, ``root/<dataset>/instances.json`` (COCO format) and the COCO
    train2014 images under ``root/<images>/``."""
    files = {9: "COCO_train2014_000000000009.jpg", 25: "COCO_train2014_000000000025.jpg"}
    for photo, (image_id, name) in enumerate(files.items()):
        write_photo(root / images / name, photo=photo)
    refs = [
        {"image_id": image_id, "split": split, "sentences": [{"tokens": s.split(), "raw": s, "sent_id": 10 * ref_id + j, "sent": s}
                                                             for j, s in enumerate(sentences)],
         "file_name": files[image_id].replace(".jpg", f"_{ann_id}.jpg"), "category_id": 21, "ann_id": ann_id,
         "sent_ids": [10 * ref_id + j for j in range(len(sentences))], "ref_id": ref_id}
        for ref_id, ann_id, image_id, split, _, sentences in REFCOCO_REFS
    ]
    instances = {
        "images": [{"id": image_id, "file_name": name, "width": 48, "height": 40, "license": 1} for image_id, name in files.items()],
        "annotations": [{"id": ann_id, "image_id": image_id, "bbox": bbox, "category_id": 21, "area": bbox[2] * bbox[3], "iscrowd": 0}
                        for _, ann_id, image_id, _, bbox, _ in REFCOCO_REFS],
        "categories": [{"id": 21, "name": "cow", "supercategory": "animal"}],
    }
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ("refs(umd).p" if dataset == "refcocog" else "refs(unc).p")).write_bytes(py2_pickle(refs))
    (folder / "instances.json").write_text(json.dumps(instances))
    return root


def write_fewshot(root: Path) -> Path:
    """ImageNet val arranged by class, 6 classes (tinted photos) of 2 images each, the official
    episode file ``fewshot_split/5_way_1_shot.csv`` (2 episodes) and Keras's class index
    ``imagenet_class_index.json`` for the 6 classes."""
    for c, folder in enumerate(FEWSHOT_CLASSES):
        for k in range(2):
            write_photo(root / folder / f"ILSVRC2012_val_{2 * c + k + 1:08d}.JPEG", photo=k, size=(32, 32), tint=TINTS[c])
    csv = root / "fewshot_split" / "5_way_1_shot.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    csv.write_text("".join("".join(f"{image_id}," for image_id in episode) + "\n" for episode in FEWSHOT_EPISODES))
    index = {str(i): [folder, name] for i, (folder, name) in enumerate(FEWSHOT_CLASSES.items())}
    (root / "imagenet_class_index.json").write_text(json.dumps(index))
    return root


def write_image_folder(root: Path) -> Path:
    """An ImageFolder of 2 classes (``chicken_hen``: 2 images, one in a sub-folder; ``cow``: 1),
    a file that is no image beside them, and ``classes.txt`` naming the classes."""
    write_photo(root / "chicken_hen" / "b.jpg", photo=1)
    write_photo(root / "chicken_hen" / "nested" / "a.png", photo=1)
    write_photo(root / "cow" / "cow1.JPEG", photo=0)
    (root / "cow" / "notes.txt").write_text("not an image")
    (root / "classes.txt").write_text("hen\ncow\n")
    return root


def write_kodak(root: Path) -> Path:
    """A Kodak-style folder: kodim02.png, kodim01.png (written in that order) and a README."""
    write_photo(root / "kodim02.png", photo=1, size=(48, 32))
    write_photo(root / "kodim01.png", photo=0, size=(48, 32))
    (root / "README.txt").write_text("Kodak Lossless True Color Image Suite")
    return root
