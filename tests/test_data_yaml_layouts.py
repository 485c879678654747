"""Users' own data.yaml files resolve as in Ultralytics' `check_det_dataset` (docs/datasets.md).

Each layout is a small generated dataset; ours (`open_source` + `scan`) and Ultralytics must agree
on every split's folder(s) and images, or both refuse. Where we differ on purpose, a second table
states what each side does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import run_cli
from PIL import Image

from pipeline.config import DatasetConfig
from pipeline.datasets import prepare
from pipeline.datasets.formats import open_source
from pipeline.datasets.yolo import YoloImporter
from pipeline.errors import UserError

NAMES = "names: [cat, dog]\n"


def images(folder: Path, n: int = 2, labels: Path | None = None) -> None:
    """`n` tiny images in `folder`, their labels in `labels` (default: Ultralytics' images -> labels rule)."""
    folder.mkdir(parents=True, exist_ok=True)
    if labels is None:
        parts = list(folder.parts)
        if "images" in parts:
            parts[len(parts) - 1 - parts[::-1].index("images")] = "labels"
        labels = Path(*parts)
    labels.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (16, 12), (40 * i, 90, 150)).save(folder / f"{folder.parent.name}_{i}.jpg")
        (labels / f"{folder.parent.name}_{i}.txt").write_text(f"{i % 2} 0.5 0.5 0.4 0.4\n")


def roboflow(root: Path, test: bool = False, yaml_text: str | None = None) -> Path:
    """A Roboflow YOLO export: train/ valid/ (test/) beside a data.yaml written with `../` paths."""
    for split in ("train", "valid") + (("test",) if test else ()):
        images(root / split / "images")
    text = yaml_text or "train: ../train/images\nval: ../valid/images\ntest: ../test/images\n\nnc: 2\n" + NAMES
    (root / "data.yaml").write_text(text)
    return root / "data.yaml"


def classic(root: Path, text: str, where: str = "data.yaml") -> Path:
    """images/{train,val} + labels/ under `root`, and a yaml at `root / where`."""
    images(root / "images" / "train", 3)
    images(root / "images" / "val")
    (root / where).parent.mkdir(parents=True, exist_ok=True)
    (root / where).write_text(text)
    return root / where


def _txt_lists(t: Path) -> Path:
    y = classic(t / "ds", "train: train.txt\nval: images/val\n" + NAMES)
    files = sorted((t / "ds" / "images" / "train").glob("*.jpg"))
    (t / "ds" / "train.txt").write_text("".join(f"./images/train/{f.name}\n" for f in files))
    return y


def _txt_absolute(t: Path) -> Path:
    y = classic(t / "ds", "train: lists/train.txt\nval: lists/val.txt\n" + NAMES)
    (t / "ds" / "lists").mkdir()
    for split in ("train", "val"):
        files = sorted((t / "ds" / "images" / split).glob("*.jpg"))
        (t / "ds" / "lists" / f"{split}.txt").write_text("".join(f"{f}\n" for f in files))
    return y


def _txt_from_cwd(t: Path) -> Path:
    """List lines without `./` are read from the working folder (tmp here), as Ultralytics does."""
    y = classic(t / "ds", "train: train.txt\nval: images/val\n" + NAMES)
    files = sorted((t / "ds" / "images" / "train").glob("*.jpg"))
    (t / "ds" / "train.txt").write_text("".join(f"ds/images/train/{f.name}\n" for f in files))
    return y


def _empty_train(t: Path) -> Path:
    y = classic(t / "ds", "train: images/train\nval: images/val\n" + NAMES)
    for f in (t / "ds" / "images" / "train").iterdir():
        f.unlink()
    return y


def _two_yamls(t: Path) -> Path:
    roboflow(t / "ex")
    (t / "ex" / "copy.yaml").write_text((t / "ex" / "data.yaml").read_text())
    return t / "ex"


def _empty_val(t: Path) -> Path:
    """A Roboflow export whose valid/images folder exists but holds no image (its labels do)."""
    y = roboflow(t / "ex")
    for f in (t / "ex" / "valid" / "images").iterdir():
        f.unlink()
    return y


def _both_parents(t: Path) -> Path:
    """`../x` exists as written and without the `../`: Ultralytics takes the first."""
    images(t / "ds" / "images" / "train")
    images(t / "ds" / "images" / "val")
    images(t / "train" / "images")
    (t / "ds" / "data.yaml").write_text("train: ../train/images\nval: images/val\n" + NAMES)
    return t / "ds" / "data.yaml"


# id -> builder(tmp) -> the path both sides are given. The working folder is tmp.
LAYOUTS: dict[str, Callable[[Path], Path]] = {
    "roboflow_missing_test": lambda t: roboflow(t / "ex"),
    "roboflow_with_test": lambda t: roboflow(t / "ex", test=True),
    "roboflow_by_folder": lambda t: (roboflow(t / "ex"), t / "ex")[1],
    "roboflow_in_subfolder": lambda t: (roboflow(t / "dl" / "Project-1"), t / "dl")[1],
    "roboflow_no_nc": lambda t: roboflow(t / "ex", yaml_text="train: ../train/images\nval: ../valid/images\n" + NAMES),
    "path_absent": lambda t: classic(t / "ds", "train: images/train\nval: images/val\n" + NAMES),
    "path_absolute": lambda t: classic(t / "ds", f"path: {t / 'ds'}\ntrain: images/train\nval: images/val\n" + NAMES,
                                       "cfg/data.yaml"),
    "path_relative_to_cwd": lambda t: classic(t / "ds", "path: ds\ntrain: images/train\nval: images/val\n" + NAMES,
                                              "cfg/data.yaml"),
    "path_nowhere": lambda t: classic(t / "ds", "path: nowhere\ntrain: images/train\nval: images/val\n" + NAMES),
    "path_not_text": lambda t: classic(t / "ds", "path: 5\ntrain: images/train\nval: images/val\n" + NAMES),
    "dotdot_exists_as_written": lambda t: classic(t / "ds", "train: ../images/train\nval: ../images/val\n" + NAMES,
                                                  "cfg/data.yaml"),
    "dotdot_both_exist": _both_parents,
    "list_valued": lambda t: (images(t / "ds" / "images" / "extra"),
                              classic(t / "ds", "train: [images/train, images/extra]\nval: [images/val]\n" + NAMES))[1],
    "list_no_dotdot_retry": lambda t: roboflow(t / "ex", yaml_text="train: [../train/images]\nval: ../valid/images\n"
                                               + NAMES),
    "txt_list_dot_slash": _txt_lists,
    "txt_list_absolute": _txt_absolute,
    "txt_list_from_cwd": _txt_from_cwd,
    "train_empty_folder": _empty_train,
    "test_named_missing": lambda t: classic(t / "ds", "train: images/train\nval: images/val\ntest: images/test\n"
                                            + NAMES),
    "val_missing": lambda t: classic(t / "ds", "train: images/train\nval: images/nope\n" + NAMES),
    "train_missing": lambda t: classic(t / "ds", "train: images/nope\nval: images/val\n" + NAMES),
    "val_empty_folder": _empty_val,
    "validation_key": lambda t: classic(t / "ds", "train: images/train\nvalidation: images/val\n" + NAMES),
    "nc_matches": lambda t: classic(t / "ds", "train: images/train\nval: images/val\nnc: 2\n" + NAMES),
    "nc_mismatch": lambda t: classic(t / "ds", "train: images/train\nval: images/val\nnc: 3\n" + NAMES),
    "nc_as_text": lambda t: classic(t / "ds", "train: images/train\nval: images/val\nnc: '2'\n" + NAMES),
    "nc_fraction": lambda t: classic(t / "ds", "train: images/train\nval: images/val\nnc: 1.5\n" + NAMES),
    "nc_without_names": lambda t: classic(t / "ds", "train: images/train\nval: images/val\nnc: 2\n"),
    "neither_nc_nor_names": lambda t: classic(t / "ds", "train: images/train\nval: images/val\n"),
    "names_dict_text_keys": lambda t: classic(t / "ds", "train: images/train\nval: images/val\n"
                                              "names: {'0': cat, '1': dog}\n"),
    "names_dict_gap": lambda t: classic(t / "ds", "train: images/train\nval: images/val\nnames: {0: cat, 2: dog}\n"),
    "names_dict_null_at_1": lambda t: classic(t / "ds", "train: images/train\nval: images/val\nnames: {1: null}\n"),
    "names_not_a_list": lambda t: classic(t / "ds", "train: images/train\nval: images/val\nnames: cat\n"),
    "two_yamls_in_folder": _two_yamls,
}


@pytest.fixture
def ultralytics(tmp_path, monkeypatch):
    """Ultralytics' check_det_dataset with an empty datasets_dir (nothing found there, nothing downloaded)."""
    import ultralytics.data.utils as du
    from ultralytics.data.base import BaseDataset

    monkeypatch.setattr(du, "DATASETS_DIR", tmp_path / "ultralytics-datasets")
    monkeypatch.chdir(tmp_path)
    lister = SimpleNamespace(prefix="", fraction=1.0)

    def resolve(path: Path) -> dict[str, tuple[list[Path], set[Path]]] | None:
        """Each usable split's folders and images, or None where Ultralytics refuses the dataset."""
        try:
            data = du.check_det_dataset(str(path))
        except Exception:  # noqa: BLE001 - Ultralytics refuses with SyntaxError, KeyError, AssertionError...
            return None
        out = {}
        for split in ("train", "val", "test"):
            if not data.get(split):
                continue
            paths = [Path(p) for p in (data[split] if isinstance(data[split], list) else [data[split]])]
            try:
                # The trainer lists train and val with get_img_files, which refuses a missing or empty one;
                # test is read only by `val split=test`, so a missing one is no error.
                found = {Path(f).resolve() for f in BaseDataset.get_img_files(lister, [str(p) for p in paths])}
            except FileNotFoundError:
                if split == "test":
                    continue
                return None
            out[split] = (paths, found)
        return out

    return resolve


def ours(path: Path) -> dict[str, tuple[list[Path], set[Path]]] | None:
    try:
        importer = open_source(str(path), "auto")
        assert isinstance(importer, YoloImporter)
        source = importer.scan()
    except UserError as exc:
        assert "\n" not in str(exc)
        return None
    return {split: (paths, {i.image.resolve() for i in source.items if i.split == split})
            for split, paths in importer.splits.items()}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_resolves_as_ultralytics(layout, tmp_path, ultralytics):
    path = LAYOUTS[layout](tmp_path)
    theirs, mine = ultralytics(path), ours(path)
    assert (mine is None) == (theirs is None), f"ours: {mine}\nUltralytics: {theirs}"
    assert mine == theirs


def test_enough_layouts_are_accepted_and_refused():
    # The table must keep exercising both sides of the rules, not only refusals.
    assert len(LAYOUTS) >= 20


def test_roboflow_missing_test_is_noted_not_refused(tmp_path):
    importer = open_source(str(roboflow(tmp_path / "ex")), "auto")
    source = importer.scan()
    assert sorted(importer.splits) == ["train", "val"]
    assert f"test: ../test/images points nowhere (neither {tmp_path / 'test' / 'images'} nor " \
           f"{tmp_path / 'ex' / 'test' / 'images'} exists): the test split is not imported" in source.notes
    assert importer.splits["train"] == [(tmp_path / "ex" / "train" / "images").resolve()]


def test_folder_beside_its_yaml_uses_it(tmp_path):
    """dataset.path=export/train: the export's data.yaml beside it names that folder, so it is used."""
    roboflow(tmp_path / "ex")
    importer = open_source(str(tmp_path / "ex" / "train"), "auto")
    assert isinstance(importer, YoloImporter) and importer.yaml_file == tmp_path / "ex" / "data.yaml"
    assert "dataset.path is a folder: using" in importer.scan().notes[0]


def test_unrelated_yaml_beside_a_folder_is_not_used(tmp_path):
    roboflow(tmp_path / "ex")
    images(tmp_path / "ex" / "other" / "images")
    (tmp_path / "ex" / "other" / "classes.txt").write_text("a\nb\n")
    assert open_source(str(tmp_path / "ex" / "other"), "auto").format == "darknet"


def test_dot_path_means_the_yamls_folder_wherever_it_is_run_from(tmp_path, monkeypatch):
    """Ultralytics reads `path: .` from the working folder; ours from the yaml's folder where its splits are."""
    yaml_file = classic(tmp_path / "ds", "path: .\ntrain: images/train\nval: images/val\n" + NAMES)
    images(tmp_path / "images" / "train")
    images(tmp_path / "images" / "val")
    monkeypatch.chdir(tmp_path)
    assert YoloImporter(yaml_file).root == (tmp_path / "ds").resolve()
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "data.yaml").write_text(yaml_file.read_text())
    importer = YoloImporter(tmp_path / "cfg" / "data.yaml")  # no splits beside it: the working folder's, as Ultralytics
    assert importer.root == tmp_path.resolve() and "read from the working folder" in importer.notes[0]


def test_several_yamls_name_the_key_that_picks_one(tmp_path):
    folder = _two_yamls(tmp_path)
    with pytest.raises(UserError, match=r"has 2 dataset YAMLs \(.*copy\.yaml, .*data\.yaml\); "
                                        r"pick one with dataset.path=<the yaml>, e\.g\. dataset\.path=.*copy\.yaml"):
        open_source(str(folder), "auto")
    assert open_source(str(folder / "data.yaml"), "auto").format == "yolo"


# Where we differ from Ultralytics on purpose (docs/datasets.md): layout, what Ultralytics does, what we do.
DIFFERENCES: list[tuple[str, Callable[[Path], Path], bool, str | None]] = [
    # A train-only data.yaml: Ultralytics wants `val:`; we make a seeded split (dataset.val_fraction).
    ("no_val_key", lambda t: classic(t / "ds", "train: images/train\n" + NAMES), False, None),
    # `path:` relative to the yaml, run from elsewhere: Ultralytics looks in its datasets_dir; we in the yaml's folder.
    ("path_relative_to_yaml", lambda t: classic(t / "ds", "path: ..\ntrain: images/train\nval: images/val\n" + NAMES,
                                                "cfg/data.yaml"), False, None),
    # A null name: Ultralytics names the class "None"; we refuse.
    ("null_name", lambda t: classic(t / "ds", "train: images/train\nval: images/val\nnames: [cat, null]\n"), True,
     r"names: class 1 has no name \(null\); write a name for every class"),
]


@pytest.mark.parametrize(("layout", "build", "ultralytics_accepts", "refusal"), DIFFERENCES,
                         ids=[d[0] for d in DIFFERENCES])
def test_documented_differences(layout, build, ultralytics_accepts, refusal, tmp_path, ultralytics):
    path = build(tmp_path)
    assert (ultralytics(path) is not None) == ultralytics_accepts
    if refusal is None:
        assert ours(path) is not None
    else:
        with pytest.raises(UserError, match=refusal):
            open_source(str(path), "auto").scan()


@pytest.mark.parametrize(("layout", "message"), [
    ("nc_mismatch", r"nc: 3 but names lists 2 classes; fix or remove `nc:`"),
    ("names_dict_null_at_1", r"names ids must run 0..0 without gaps, got \[1\]"),
    ("val_empty_folder", r"val: \.\./valid/images holds no image; add its images, or remove the `val:` line to get "
                         r"a seeded split"),
    ("val_missing", r"val: images/nope points nowhere \(.*images/nope does not exist\); fix the data.yaml"),
    ("path_nowhere", r"path: nowhere points nowhere .*Ultralytics' datasets_dir is not searched"),
])
def test_refusals_are_one_line_naming_the_key(layout, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message) as exc:
        open_source(str(LAYOUTS[layout](tmp_path)), "auto").scan()
    assert "\n" not in str(exc.value)


def test_empty_val_folder_is_not_replaced_by_a_seeded_split(tmp_path):
    path = LAYOUTS["val_empty_folder"](tmp_path)
    with pytest.raises(UserError, match="holds no image"):
        prepare(DatasetConfig(path=str(path)), tmp_path / "r", 0, logging.getLogger("test"))


@pytest.mark.parametrize("by", ["yaml", "folder"])
def test_roboflow_export_imports_from_the_command_line(by, tmp_path):
    yaml_file = roboflow(tmp_path / "ex")
    target = yaml_file if by == "yaml" else yaml_file.parent
    proc = run_cli("stage=dataset", "experiment=smoke", f"results_dir={tmp_path / 'r'}", f"dataset.path={target}",
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = next((tmp_path / "r").rglob("validation_report.txt")).read_text()
    assert "note: test: ../test/images points nowhere" in report
