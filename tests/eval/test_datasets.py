"""comneck.eval.datasets: each reader on a tiny dataset in its published format gives exactly the
items the published files say (expected values written out here), and bad input is refused in
one line naming the file."""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import re
from pathlib import Path

import pytest
from eval_fixtures import (
    FEWSHOT_CLASSES, REFCOCO_REFS, py2_pickle, write_coco_karpathy, write_fewshot, write_image_folder, write_kodak,
    write_refcoco, write_seed_bench,
)

from comneck.errors import ComneckInputError, ErrorCode
from comneck.eval import datasets
from comneck.eval.datasets import (
    DATASETS, coco_karpathy, fewshot_episodes, image_folder, kodak, read_dataset, refcoco, sample_episodes, save_episodes,
    seed_bench,
)
from comneck.eval.items import EVAL_TASKS, Item, Support

ROOT = Path(__file__).resolve().parents[2]


def refused(call, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    """The one-line BAD_DATASET message ``call`` refuses with."""
    with pytest.raises(ComneckInputError) as caught:
        call(*args, **kwargs)
    assert caught.value.code is ErrorCode.BAD_DATASET
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_coco_karpathy_gives_the_test_split_with_raw_captions(tmp_path):
    root = write_coco_karpathy(tmp_path)
    assert coco_karpathy(root) == [
        Item(id="391895", image=root / "val2014" / "COCO_val2014_000000391895.jpg",
             reference=["A man with a red helmet on a small moped.", "A man riding a motor bike."]),
        Item(id="184613", image=root / "val2014" / "COCO_val2014_000000184613.jpg",
             reference=["A child holding a flowered umbrella.", "A boy and a cow.", "Cattle."]),
    ]
    assert [item.id for item in coco_karpathy(root, split="restval")] == ["57870"]
    assert coco_karpathy(root, split="restval")[0].image == root / "train2014" / "COCO_train2014_000000057870.jpg"
    assert "unknown Karpathy split 'testing'" in refused(coco_karpathy, root, split="testing")


def test_seed_bench_keeps_image_dimensions_with_letters_choices_and_dimension_names(tmp_path):
    root = write_seed_bench(tmp_path)
    images = root / "SEED-Bench-image"
    assert seed_bench(root) == [
        Item(id="101669", image=images / "1454426_2591111986.jpg", prompt="What is the main feature of the scene?",
             choices=("A beach", "A city", "A forest", "A desert"), reference="A", group="Scene Understanding"),
        Item(id="15622", image=images / "2342897_1409254137.jpg", prompt="How many animals are there?",
             choices=("Three", "Two", "One", "Four"), reference="C", group="Instances Counting"),
        Item(id="39023", image=images / "1454426_2591111986.jpg", prompt="What is written on the note?",
             choices=("10", "20", "50", "100"), reference="D", group="Text Understanding"),
    ]


@pytest.mark.parametrize("dataset, images", [("refcoco", "images"), ("refcoco+", "train2014"), ("refcocog", "images")])
def test_refcoco_gives_one_item_per_sentence_with_xyxy_boxes(tmp_path, dataset, images):
    root = write_refcoco(tmp_path, dataset, images)
    cow, chicken = root / images / "COCO_train2014_000000000009.jpg", root / images / "COCO_train2014_000000000025.jpg"
    assert refcoco(root, dataset, "val") == [
        Item(id="0_0", image=cow, prompt="the cow on the left", reference=[4.5, 6.25, 24.5, 16.75], group="val"),
        Item(id="0_1", image=cow, prompt="brown cow", reference=[4.5, 6.25, 24.5, 16.75], group="val"),
        Item(id="3_0", image=chicken, prompt="caf\u00e9 sign", reference=[1.0, 2.0, 4.0, 6.0], group="val"),
    ]
    assert refcoco(root, dataset, "val")[0].extra == {"ref_id": 0, "ann_id": 1001, "image_id": 9}
    if dataset == "refcocog":
        assert "unknown refcocog split 'testA'" in refused(refcoco, root, dataset, "testA")
    else:
        assert refcoco(root, dataset, "testA") == [
            Item(id="1_0", image=chicken, prompt="chicken", reference=[10.0, 2.0, 40.0, 37.0], group="testA")]


def test_the_refs_fixture_is_a_python2_protocol2_pickle_of_plain_data(tmp_path):
    """What the reader is tested on: Python 2's byte strings (SHORT_BINSTRING) and no global."""
    data = (write_refcoco(tmp_path) / "refcoco" / "refs(unc).p").read_bytes()
    opcodes = {op.name for op, _, _ in pickletools.genops(data)}
    assert data[:2] == b"\x80\x02" and "SHORT_BINSTRING" in opcodes and "BINUNICODE" in opcodes
    assert not opcodes & {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ"}
    refs = pickle.loads(data, encoding="latin1")
    assert [(r["ref_id"], r["ann_id"], r["image_id"], r["split"], [s["sent"] for s in r["sentences"]]) for r in refs] == [
        (ref_id, ann_id, image_id, split, sentences) for ref_id, ann_id, image_id, split, _, sentences in REFCOCO_REFS]


@pytest.mark.parametrize("dump", [py2_pickle, lambda refs: pickle.dumps(refs, protocol=0), lambda refs: pickle.dumps(refs, protocol=2)])
def test_refs_pickles_of_every_protocol_refer_used_are_read(tmp_path, dump):
    root = write_refcoco(tmp_path)
    path = root / "refcoco" / "refs(unc).p"
    path.write_bytes(dump(pickle.loads(path.read_bytes(), encoding="latin1")))
    assert [item.prompt for item in refcoco(root)] == ["the cow on the left", "brown cow", "caf\u00e9 sign"]


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return os.system, (f"touch {self.marker}",)


def test_a_refs_pickle_that_names_a_function_is_refused_and_not_run(tmp_path):
    root = write_refcoco(tmp_path / "data")
    path = root / "refcoco" / "refs(unc).p"
    marker = tmp_path / "ran"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "payload": _RunsACommand(marker)}], protocol=2))
    message = refused(refcoco, root)
    assert message.startswith(f"{path}: not a plain-data refs pickle") and "system" in message
    assert not marker.exists()


def test_fewshot_csv_episodes_as_the_official_reader_parses_them(tmp_path):
    root = write_fewshot(tmp_path)
    classes = root / "imagenet_class_index.json"
    episodes = fewshot_episodes(root, classes=classes)
    # the official parse: each line's ids are line.strip("\n").split(",")[:-1]; supports, then the query
    lines = (root / "fewshot_split" / "5_way_1_shot.csv").read_text().splitlines(keepends=True)
    official = [line.strip("\n").split(",")[:-1] for line in lines]
    assert [len(ids) for ids in official] == [6, 6]
    assert [[str(s.image.relative_to(root)) for s in e.support] + [str(e.image.relative_to(root))] for e in episodes] == official
    assert episodes[0] == Item(
        id="0", image=root / "n01484850" / "ILSVRC2012_val_00000006.JPEG", reference="great_white_shark",
        support=(Support(root / "n01440764" / "ILSVRC2012_val_00000001.JPEG", "tench"),
                 Support(root / "n01443537" / "ILSVRC2012_val_00000003.JPEG", "goldfish"),
                 Support(root / "n01484850" / "ILSVRC2012_val_00000005.JPEG", "great_white_shark"),
                 Support(root / "n01491361" / "ILSVRC2012_val_00000007.JPEG", "tiger_shark"),
                 Support(root / "n01494475" / "ILSVRC2012_val_00000009.JPEG", "hammerhead")))
    assert [e.reference for e in episodes] == ["great_white_shark", "electric_ray"]
    assert [s.label for s in episodes[1].support] == ["electric_ray", "tiger_shark", "tench", "goldfish", "great_white_shark"]
    assert [e.reference for e in fewshot_episodes(root)] == ["n01484850", "n01496331"]  # no class file: the folder names


def test_sampled_episodes_follow_the_seed_and_round_trip_through_the_official_csv(tmp_path):
    root = write_fewshot(tmp_path)
    classes = root / "imagenet_class_index.json"
    episodes = sample_episodes(root, 8, seed=3, classes=classes)
    assert episodes == sample_episodes(root, 8, seed=3, classes=classes)
    assert episodes != sample_episodes(root, 8, seed=4, classes=classes)
    names = FEWSHOT_CLASSES
    for episode in episodes:
        folders = [s.image.parent.name for s in episode.support]
        assert len(set(folders)) == 5 and episode.image.parent.name in folders and episode.image not in [s.image for s in episode.support]
        assert [s.label for s in episode.support] == [names[f] for f in folders] and episode.reference == names[episode.image.parent.name]
    path = save_episodes(episodes, root / "fewshot_split" / "seed3.csv")  # beside the official file: no class folder
    assert all(re.fullmatch(r"(n\d{8}/ILSVRC2012_val_\d{8}\.JPEG,){6}", line) for line in path.read_text().splitlines())
    assert fewshot_episodes(root, episodes=path, classes=classes) == episodes
    assert "0 class folders hold over 2 images" in refused(sample_episodes, root, 1, seed=0, shots=2)


def test_image_folder_follows_torchvisions_order_extensions_and_class_names(tmp_path):
    root = write_image_folder(tmp_path)
    expected = [("chicken_hen/b.jpg", "chicken hen"), ("chicken_hen/nested/a.png", "chicken hen"), ("cow/cow1.JPEG", "cow")]
    assert image_folder(root) == [Item(id=i, image=root / i, reference=name) for i, name in expected]
    assert [item.reference for item in image_folder(root, classes=root / "classes.txt")] == ["hen", "hen", "cow"]
    (root / "names.json").write_text(json.dumps({"cow": "Cow", "chicken_hen": "Hen"}))
    assert [item.reference for item in image_folder(root, classes=root / "names.json")] == ["Hen", "Hen", "Cow"]


def test_kodak_is_the_folders_images_sorted(tmp_path):
    root = write_kodak(tmp_path)
    assert kodak(root) == [Item(id="kodim01.png", image=root / "kodim01.png"), Item(id="kodim02.png", image=root / "kodim02.png")]


def test_read_dataset_dispatches_by_task_and_refuses_unknown_tasks_and_options(tmp_path):
    assert set(DATASETS) == set(EVAL_TASKS)
    root = write_seed_bench(tmp_path)
    assert read_dataset("mcq", root) == seed_bench(root)
    assert read_dataset("caption", write_coco_karpathy(tmp_path / "coco"), split="val")[0].id == "522418"
    with pytest.raises(ComneckInputError, match="unknown evaluation task 'vqa': expected one of caption, mcq") as caught:
        read_dataset("vqa", root)
    assert caught.value.code is ErrorCode.UNKNOWN_TASK
    assert "dataset options split do not fit mcq's reader" in refused(read_dataset, "mcq", root, split="test")


def test_every_dataset_is_documented_where_published_in_the_module_and_docs():
    docs = (ROOT / "docs" / "evaluation.md").read_text()
    for task, dataset in DATASETS.items():
        assert dataset.published in docs and dataset.published.split("/")[2] in datasets.__doc__, task
        assert f"`{dataset.reader.__name__}(" in docs and f":func:`{dataset.reader.__name__}`" in datasets.__doc__, task


def _remove(path: Path) -> Path:
    path.unlink()
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# each case: (writer, break the written dataset -> the file the refusal must name, read it, what the message says)
BAD = {
    "karpathy json missing": (write_coco_karpathy, lambda r: _remove(r / "dataset_coco.json"), coco_karpathy, "missing"),
    "karpathy image missing": (write_coco_karpathy, lambda r: (_remove(r / "val2014" / "COCO_val2014_000000184613.jpg"), r / "dataset_coco.json")[1],
                               coco_karpathy, "COCO_val2014_000000184613.jpg is missing"),
    "karpathy given COCO's captions file": (write_coco_karpathy, lambda r: _write(r / "dataset_coco.json", json.dumps({"annotations": []})),
                                            coco_karpathy, "has no 'images' (list)"),
    "karpathy caption without raw": (write_coco_karpathy, lambda r: _write(r / "dataset_coco.json", json.dumps({"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "cocoid": 1, "split": "test", "sentences": [{"tokens": []}]}]})),
        coco_karpathy, "images[0].sentences[0] has no 'raw' (str)"),
    "seed json not json": (write_seed_bench, lambda r: _write(r / "SEED-Bench.json", '{"questions": ['), seed_bench, "not JSON"),
    "seed image missing": (write_seed_bench, lambda r: (_remove(r / "SEED-Bench-image" / "2342897_1409254137.jpg"), r / "SEED-Bench.json")[1],
                           seed_bench, "2342897_1409254137.jpg is missing"),
    "seed answer not a letter": (write_seed_bench, lambda r: _write(r / "SEED-Bench.json", (r / "SEED-Bench.json").read_text().replace('"C"', '"3"')),
                                 seed_bench, "has answer '3'"),
    "refs pickle missing": (write_refcoco, lambda r: _remove(r / "refcoco" / "refs(unc).p"), refcoco, "missing"),
    "refs pickle not a pickle": (write_refcoco, lambda r: _write(r / "refcoco" / "refs(unc).p", "{}"), refcoco, "not a plain-data refs pickle"),
    "refs pickle of a dict": (write_refcoco, lambda r: ((r / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps({})), r / "refcoco" / "refs(unc).p")[1],
                              refcoco, "not a list of refs"),
    "refer instances missing": (write_refcoco, lambda r: _remove(r / "refcoco" / "instances.json"), refcoco, "missing"),
    "refer images folder missing": (write_refcoco, lambda r: (r / "images").rename(r / "imgs") and r, refcoco, "no images/ or train2014/ folder"),
    "refer image missing": (write_refcoco, lambda r: (_remove(r / "images" / "COCO_train2014_000000000025.jpg"), r / "refcoco" / "instances.json")[1],
                            refcoco, "COCO_train2014_000000000025.jpg is missing"),
    "fewshot csv missing": (write_fewshot, lambda r: _remove(r / "fewshot_split" / "5_way_1_shot.csv"), fewshot_episodes, "missing"),
    "fewshot line without its last comma": (write_fewshot, lambda r: _write(r / "fewshot_split" / "5_way_1_shot.csv", "a/1,b/2,c/3,d/4,e/5,f/6\n"),
                                            fewshot_episodes, "line 1 is not 6 image ids"),
    "fewshot image missing": (write_fewshot, lambda r: (_remove(r / "n01496331" / "ILSVRC2012_val_00000012.JPEG"), r / "fewshot_split" / "5_way_1_shot.csv")[1],
                              fewshot_episodes, "ILSVRC2012_val_00000012.JPEG is missing"),
    "fewshot class names missing a folder": (write_fewshot, lambda r: _write(r / "names.json", json.dumps({"0": ["n01440764", "tench"]})),
                                             lambda r: fewshot_episodes(r, classes=r / "names.json"), "names no class for folder 'n01443537'"),
    "class names not JSON": (write_image_folder, lambda r: _write(r / "names.json", "{cow: Cow}"),
                             lambda r: image_folder(r, classes=r / "names.json"), "is not JSON"),
    "class names not an object": (write_image_folder, lambda r: _write(r / "names.json", '["hen", "cow"]'),
                                  lambda r: image_folder(r, classes=r / "names.json"), "is no JSON object"),
    "image folder with an empty class": (write_image_folder, lambda r: ((r / "empty").mkdir(), r)[1], image_folder, "Found no valid file for the classes empty"),
    "image folder that is a file": (write_image_folder, lambda r: r / "classes.txt", lambda r: image_folder(r / "classes.txt"), "not a folder"),
    "image folder without classes": (write_kodak, lambda r: r, image_folder, "has no class folders"),
    "kodak folder without images": (write_image_folder, lambda r: r, kodak, "holds no image"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_datasets_are_refused_in_one_line_naming_the_file(tmp_path, case):
    write, damage, read, says = BAD[case]
    root = write(tmp_path)
    path = damage(root)
    message = refused(read, root)
    assert message.startswith(f"{path}:") or f"{path} " in message, message
    assert says in message, message
