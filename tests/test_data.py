"""cellembed.data: readers on files written in each real layout, splits, synthetic generator, writer."""

from __future__ import annotations

import json
import mmap
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import (H, TISSUES, W, folder_arrays, pannuke_tile_zero, write_conic, write_cytodark0,
                           write_folder_files, write_folder_npz, write_folds_csv, write_pannuke)

from cellembed.data import (DATASETS, SplitSelection, Tile, TileSource, make_synthetic_tile, open_dataset, relabel,
                            resolve_split, write_folder_dataset, write_synthetic_dataset)


def assert_tile_contract(tile: Tile) -> None:
    assert isinstance(tile, Tile)
    assert tile.image.dtype == np.uint8 and tile.image.ndim == 3 and tile.image.shape[2] == 3
    assert tile.inst_map.dtype == np.int32 and tile.inst_map.shape == tile.image.shape[:2]
    assert tile.type_map.dtype == np.uint8 and tile.type_map.shape == tile.image.shape[:2]
    ids = np.unique(tile.inst_map)
    assert np.array_equal(ids[ids > 0], np.arange(1, tile.inst_map.max() + 1))
    assert not tile.type_map[tile.inst_map == 0].any()
    for arr in tile[1:4]:                       # writable arrays, not views into memory-mapped files
        assert arr.flags.writeable and not backed_by_file(arr)
    json.dumps(tile.meta)


def backed_by_file(arr) -> bool:
    while arr is not None:
        if isinstance(arr, (np.memmap, mmap.mmap)):
            return True
        arr = getattr(arr, "base", None)
    return False


def touching_pairs(inst: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of different instances with 4-adjacent pixels."""
    pairs = set()
    for a, b in ((inst[:, 1:], inst[:, :-1]), (inst[1:], inst[:-1])):
        hit = (a > 0) & (b > 0) & (a != b)
        pairs |= set(zip(np.minimum(a[hit], b[hit]).tolist(), np.maximum(a[hit], b[hit]).tolist()))
    return pairs


def save_jpeg(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path, quality=95)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------- registry and helpers

def test_registry_lists_the_datasets_and_fails_loudly():
    assert DATASETS.names() == ["conic", "cytodark0", "folder", "pannuke", "semantic_folder", "synthetic"]
    with pytest.raises(KeyError, match="valid names: conic, cytodark0, folder, pannuke, semantic_folder, synthetic"):
        open_dataset("pannuk", "/nowhere")
    with pytest.raises(TypeError, match="unknown option.*n_tile.*valid options: n_tiles, seed, size, n_types"):
        open_dataset("synthetic", n_tile=3)


def test_relabel_keeps_order_and_handles_big_and_float_ids():
    arr = np.array([[0, 7, 7], [3000, 0, 7], [1 << 40, 3000, 0]], np.int64)
    assert relabel(arr).tolist() == [[0, 1, 1], [2, 0, 1], [3, 2, 0]]
    assert relabel(arr.astype(np.float64)).tolist() == [[0, 1, 1], [2, 0, 1], [3, 2, 0]]
    assert relabel(np.full((2, 2), 9, np.uint16)).tolist() == [[1, 1], [1, 1]]   # no background pixel
    assert relabel(np.array([[4, 4]], np.uint16)).dtype == np.int32


# ---------------------------------------------------------------- PanNuke

def test_pannuke_merges_channels_by_channel_and_id(tmp_path):
    written = write_pannuke(tmp_path)
    source = open_dataset("pannuke", tmp_path)
    assert len(source) == 7 and source.folds == [1, 2, 3]
    assert source.keys[:3] == ["pannuke_breast_fold1_0", "pannuke_bile-duct_fold1_1", "pannuke_adrenal_gland_fold1_2"]
    assert source.keys[3] == "pannuke_colon_fold2_0"
    assert source.class_names == ("background", "neoplastic", "inflammatory", "connective", "dead", "epithelial")
    tile = source[0]
    assert_tile_contract(tile)
    _, inst, types = pannuke_tile_zero()
    assert np.array_equal(tile.inst_map, inst)     # same id in two channels -> two instances; overlap -> later wins
    assert np.array_equal(tile.type_map, types)
    assert np.array_equal(tile.image, written[1][0][0].astype(np.uint8))
    assert tile.meta == {"tissue": "Breast", "fold": 1, "index_in_fold": 0, "group": tile.key, "stratum": "breast"}
    assert source.meta_of(4) == {"tissue": "Breast", "fold": 2, "index_in_fold": 1,
                                 "group": "pannuke_breast_fold2_1", "stratum": "breast"}
    assert source[-1].key == "pannuke_colon_fold3_1"


def test_pannuke_reads_present_folds_and_refuses_none(tmp_path):
    write_pannuke(tmp_path, folds=(2,))
    source = open_dataset("pannuke", tmp_path)
    assert source.folds == [2] and len(source) == len(TISSUES[2])
    with pytest.raises(FileNotFoundError) as err:
        open_dataset("pannuke", tmp_path, folds=[1])
    assert "Fold 1/images/fold1/images.npy" in one_line(err)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no 'Fold 1'"):
        open_dataset("pannuke", empty)


def test_pannuke_wrong_shape_names_the_file(tmp_path):
    write_pannuke(tmp_path, folds=(1,))
    bad = tmp_path / "Fold 1" / "masks" / "fold1" / "masks.npy"
    np.save(bad, np.zeros((3, H, W, 5)))
    with pytest.raises(ValueError) as err:
        open_dataset("pannuke", tmp_path)
    assert str(bad) in one_line(err)


def test_pannuke_nan_image_names_the_file_and_tile(tmp_path):
    write_pannuke(tmp_path, folds=(1,))
    path = tmp_path / "Fold 1" / "images" / "fold1" / "images.npy"
    images = np.load(path)
    images[1, 5, 5, 0] = np.nan
    np.save(path, images)
    source = open_dataset("pannuke", tmp_path)
    assert source[0].image.dtype == np.uint8  # other tiles still read
    with pytest.raises(ValueError) as err:
        source[1]
    assert f"{path}[1]" in one_line(err) and "NaN" in one_line(err)


# ---------------------------------------------------------------- CoNIC

def test_conic_reads_uint16_labels_and_patch_names(tmp_path):
    images, labels, names = write_conic(tmp_path)
    source = open_dataset("conic", tmp_path)
    assert source.keys == names and source.class_names[1] == "neutrophil" and len(source.class_names) == 7
    tile = source[3]
    assert_tile_contract(tile)
    assert tile.key == "crag_14-0001"
    assert np.array_equal(tile.image, images[3])
    expected = np.zeros((H, W), np.int32)
    expected[1:4, 1:4], expected[8:12, 8:12] = 1, 2          # ids 300, 1000 -> 1, 2
    assert np.array_equal(tile.inst_map, expected)
    assert tile.type_map[2, 2] == 6 and tile.type_map[9, 9] == 2 and tile.type_map[0, 15] == 0
    assert tile.meta == {"group": "crag_14", "stratum": "crag"}


def test_conic_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        open_dataset("conic", tmp_path / "missing")
    assert str(tmp_path / "missing") in one_line(err)
    write_conic(tmp_path)
    np.save(tmp_path / "images.npy", np.zeros((6, H, W, 3), np.float32))
    with pytest.raises(ValueError) as err:
        open_dataset("conic", tmp_path)
    assert str(tmp_path / "images.npy") in one_line(err)
    write_conic(tmp_path)
    (tmp_path / "patch_info.csv").write_text("patch_info\nconsep_1-0000\n")
    with pytest.raises(ValueError, match="1 patch names for 6 images"):
        open_dataset("conic", tmp_path)
    (tmp_path / "patch_info.csv").unlink()
    with pytest.raises(FileNotFoundError, match="patch_info.csv"):
        open_dataset("conic", tmp_path)


# ---------------------------------------------------------------- CytoDArk0

def test_cytodark0_png_tiff_natural_order_and_folds(tmp_path):
    write_cytodark0(tmp_path, folds={"ID1_1": 0, "ID1_2": 0, "ID1_10": 1, "ID2_1": 2})
    source = open_dataset("cytodark0", tmp_path, magnification="20x", size=H)
    assert source.keys == ["ID1_1", "ID1_2", "ID1_10", "ID2_1"]
    assert source.class_names == ("background", "cell")
    tile = source[1]
    assert_tile_contract(tile)
    assert tile.meta == {"group": "ID1", "roi": "ID1", "magnification": "20x"}
    expected = np.zeros((H, W), np.int32)
    expected[9:13, 9:13], expected[2:6, 2:6] = 1, 2                    # ids 7 < 42 keep their order
    assert np.array_equal(tile.inst_map, expected)
    assert np.array_equal(tile.type_map, (expected > 0).astype(np.uint8))
    test = resolve_split(source, "test")
    assert test.scheme == "folds-csv" and test.indices == [3]
    assert resolve_split(source, "train").indices == [0, 1]


def test_cytodark0_missing_label_and_folder(tmp_path):
    folder = write_cytodark0(tmp_path)
    (folder / "label" / "ID1_2.tiff").unlink()
    with pytest.raises(FileNotFoundError) as err:
        open_dataset("cytodark0", tmp_path, size=H)
    assert str(folder / "label" / "ID1_2.tiff") in one_line(err)
    with pytest.raises(FileNotFoundError, match="40x/16x16/image"):
        open_dataset("cytodark0", tmp_path, magnification="40x", size=H)


# ---------------------------------------------------------------- folder

@pytest.mark.parametrize("compressed", [False, True])
def test_folder_npz_layout(tmp_path, compressed):
    names = ["train_2_000", "train_10_001", "train_1_000"]      # npz order, not sorted order
    images, inst, cls = write_folder_npz(tmp_path, names, compressed, class_names=np.array(["background", "x", "y", "z"]),
                                         split=np.array(["train", "train", "test"]))
    source = open_dataset("folder", tmp_path)
    assert source.layout == "npz" and source.keys == names
    assert source.class_names == ("background", "x", "y", "z")
    for i in range(3):
        tile = source[i]
        assert_tile_contract(tile)
        assert np.array_equal(tile.image, images[i])
        assert np.array_equal(tile.inst_map, relabel(inst[i])) and np.array_equal(tile.type_map, cls[i])
    assert source.meta_of(2) == {"group": "train_1_000", "source_split": "test"}
    assert touching_pairs(source[0].inst_map) == {(1, 2)}


def test_folder_files_layout_every_label_variant(tmp_path):
    names, images, inst, cls = write_folder_files(tmp_path)
    source = open_dataset("folder", tmp_path)
    assert source.layout == "files" and source.keys == names and source.class_names == ("background", "a", "b", "c")
    for i in range(3):
        tile = source[i]
        assert_tile_contract(tile)
        assert np.array_equal(tile.image, images[i])
        assert np.array_equal(tile.inst_map, relabel(inst[i])) and np.array_equal(tile.type_map, cls[i])
    assert source[2].inst_map.max() == 3                               # ids 6, 17, 250 -> 1, 2, 3


def test_folder_without_types_groups_and_regex(tmp_path):
    images, inst, _ = folder_arrays(4)
    names = ["img_a_0", "img_a_1", "img_b_0", "img_b_1"]
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name, image, label in zip(names, images, inst):
        save_jpeg(tmp_path / "images" / f"{name}.jpg", image)
        np.save(tmp_path / "labels" / f"{name}.npy", label)
    source = open_dataset("folder", tmp_path)
    assert source.class_names == ("background", "nucleus")
    tile = source[0]
    assert_tile_contract(tile)
    assert np.array_equal(tile.type_map, (tile.inst_map > 0).astype(np.uint8))
    assert source.meta_of(1) == {"group": "img_a_1"}
    regex = open_dataset("folder", tmp_path, group_regex=r"(.+)_\d+$")
    assert [regex.meta_of(i)["group"] for i in range(4)] == ["img_a", "img_a", "img_b", "img_b"]
    (tmp_path / "groups.csv").write_text("img_id,group,stratum\nimg_a_0,A,s1\nimg_a_1,A,s1\n")
    grouped = open_dataset("folder", tmp_path)
    assert grouped.meta_of(0) == {"group": "A", "stratum": "s1"} and grouped.meta_of(2) == {"group": "img_b_0"}
    (tmp_path / "groups.csv").write_text("img_id,group\nnot_here,A\n")
    with pytest.raises(ValueError, match="not_here"):
        open_dataset("folder", tmp_path)


def test_folder_errors_are_one_line_and_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        open_dataset("folder", tmp_path / "nope")
    assert str(tmp_path / "nope") in one_line(err)
    with pytest.raises(ValueError, match="needs a root folder"):
        open_dataset("folder")
    names, *_ = write_folder_files(tmp_path)
    (tmp_path / "labels" / "t_2.tif").unlink()
    with pytest.raises(FileNotFoundError) as err:
        open_dataset("folder", tmp_path)
    assert "t_2.png" in one_line(err) and str(tmp_path / "labels" / "t_2.npy") in str(err.value)


def test_folder_bad_label_arrays(tmp_path):
    write_folder_files(tmp_path)
    np.save(tmp_path / "labels" / "t_1.npy", np.zeros((H, W, 3), np.int32))
    source = open_dataset("folder", tmp_path)
    with pytest.raises(ValueError) as err:
        source[0]
    assert str(tmp_path / "labels" / "t_1.npy") in one_line(err)
    np.save(tmp_path / "labels" / "t_1.npy", np.zeros((H + 1, W, 2), np.int32))
    with pytest.raises(ValueError, match="does not match image"):
        source[0]
    np.save(tmp_path / "labels" / "t_1.npy", np.array([{"inst_map": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="without pickle"):
        source[0]
    np.save(tmp_path / "types" / "t_10.npy", np.full((H, W), 9, np.uint8))
    with pytest.raises(ValueError, match=r"types/t_10.npy: type ids span 9\.\.9, expected 0\.\.3"):
        source[2]


def test_folder_types_need_class_names(tmp_path):
    write_folder_files(tmp_path)
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(ValueError, match="classes.txt"):
        open_dataset("folder", tmp_path)
    assert open_dataset("folder", tmp_path, class_names=["background", "a", "b", "c"]).class_names[3] == "c"


def test_folder_refuses_16_bit_images(tmp_path):
    from PIL import Image

    write_folder_files(tmp_path)
    Image.fromarray(np.zeros((H, W), np.uint16)).save(tmp_path / "images" / "t_1.png")
    with pytest.raises(ValueError) as err:
        open_dataset("folder", tmp_path)[0]
    assert str(tmp_path / "images" / "t_1.png") in one_line(err) and "8-bit" in str(err.value)



# ---------------------------------------------------------------- pickling and identity

def test_sources_pickle_cheaply_and_describe_without_paths(tmp_path):
    write_pannuke(tmp_path / "pn")
    write_folder_npz(tmp_path / "fd", ["a", "b"], compressed=True, class_names=np.array(["background", "x", "y", "z"]))
    for source in (open_dataset("pannuke", tmp_path / "pn"), open_dataset("folder", tmp_path / "fd"),
                   open_dataset("synthetic", n_tiles=3, size=64)):
        first = source[0]
        blob = pickle.dumps(source)
        assert len(blob) < 4000, (source.name, len(blob))          # no arrays, no memory maps
        again = pickle.loads(blob)[0]
        assert np.array_equal(again.inst_map, first.inst_map) and np.array_equal(again.image, first.image)
        ident = json.dumps(source.describe())
        assert str(tmp_path) not in ident and source.name in ident


# ---------------------------------------------------------------- splits

def test_folds_csv_dedups_repeated_rows(tmp_path):
    write_cytodark0(tmp_path)
    source = open_dataset("cytodark0", tmp_path, size=H)
    csv = write_folds_csv(tmp_path / "f.csv", [("ID1_1", 0), ("ID1_1", 0), ("ID1_1", 0), ("ID1_10", 1), ("ID2_1", 2)])
    train = resolve_split(source, "train", folds=csv)
    assert train == SplitSelection("train", "folds-csv", [0], train.detail)
    assert train.detail["n_tiles"] == {"train": 1, "val": 1, "test": 1} and train.detail["n_unlisted"] == 1
    assert resolve_split(source, "val", folds=csv).indices == [2]
    assert len(train.detail["sha256"]) == 64 and str(tmp_path) not in json.dumps(train.detail)


def test_folds_csv_errors(tmp_path):
    write_cytodark0(tmp_path)
    source = open_dataset("cytodark0", tmp_path, size=H)
    unknown = write_folds_csv(tmp_path / "u.csv", [("ID1_1", 0), ("ID9_9", 2), ("ID8_8", 1)])
    with pytest.raises(ValueError) as err:
        resolve_split(source, "train", folds=unknown)
    assert str(unknown) in one_line(err) and "ID9_9" in str(err.value) and "2 img_id(s)" in str(err.value)
    conflict = write_folds_csv(tmp_path / "c.csv", [("ID1_1", 0), ("ID1_1", 2)])
    with pytest.raises(ValueError, match="listed in folds 0 and 2"):
        resolve_split(source, "train", folds=conflict)
    bad = write_folds_csv(tmp_path / "b.csv", [("ID1_1", 3)])
    with pytest.raises(ValueError, match="b.csv:2: fold '3'"):
        resolve_split(source, "train", folds=bad)
    (tmp_path / "h.csv").write_text("name,split\nID1_1,0\n")
    with pytest.raises(ValueError, match="missing column"):
        resolve_split(source, "train", folds=tmp_path / "h.csv")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        resolve_split(source, "train", folds=tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="ships no folds.csv"):
        resolve_split(source, "train", scheme="folds-csv")
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        resolve_split(source, "valid")


def test_pannuke_official_default_and_rotation(tmp_path):
    write_pannuke(tmp_path)
    source = open_dataset("pannuke", tmp_path)
    assert resolve_split(source, "train").indices == [0, 1, 2]
    sel = resolve_split(source, "test")
    assert sel.scheme == "pannuke-official" and sel.indices == [5, 6] and sel.detail["test_fold"] == 3
    rotated = resolve_split(source, "train", scheme="pannuke-official:2,3,1")
    assert rotated.indices == [3, 4] and rotated.detail["scheme"] == "pannuke-official:2,3,1"
    assert resolve_split(source, "test", scheme="pannuke-official:2,3,1").indices == [0, 1, 2]
    assert resolve_split(source, "all").indices == list(range(7))
    with pytest.raises(ValueError, match="permutation of 1,2,3"):
        resolve_split(source, "train", scheme="pannuke-official:1,1,2")
    with pytest.raises(KeyError, match="valid names: cisca, folds-csv, pannuke-official"):
        resolve_split(source, "train", scheme="official")


def test_pannuke_official_missing_fold(tmp_path):
    write_pannuke(tmp_path, folds=(1, 3))
    source = open_dataset("pannuke", tmp_path)
    assert resolve_split(source, "test").indices == [3, 4]
    with pytest.raises(ValueError, match="fold 2 \\(val\\) is not in the dataset"):
        resolve_split(source, "val")
    assert resolve_split(source, "test", scheme="cisca").scheme == "cisca"


def cisca_script_split(names: list[str]) -> dict[str, set[str]]:
    """A literal transcription of CISCA's generate_split_conic2.py (CISCA.md §4.2), for comparison."""
    from sklearn.model_selection import StratifiedShuffleSplit

    sources = np.unique([n.split("-")[0] for n in names])
    _, cohorts = np.unique([s.split("_")[0] for s in sources], return_inverse=True)
    splits = list(StratifiedShuffleSplit(10, train_size=0.8, test_size=0.2, random_state=5).split(sources, cohorts))
    trainval, test = sources[splits[1][0]], sources[splits[1][1]]
    tv_sources = np.unique(trainval)
    _, tv_cohorts = np.unique([s.split("_")[0] for s in tv_sources], return_inverse=True)
    train, val = next(StratifiedShuffleSplit(1, train_size=0.9, test_size=0.1, random_state=5)
                      .split(tv_sources, tv_cohorts))
    unit_split = {**{s: "test" for s in test}, **{s: "train" for s in tv_sources[train]},
                  **{s: "val" for s in tv_sources[val]}}
    out = {"train": set(), "val": set(), "test": set()}
    for n in names:
        out[unit_split[n.split("-")[0]]].add(n)
    return out


def test_cisca_split_on_fake_conic_matches_recipe_without_leakage(tmp_path):
    sources = [f"{c}_{i}" for c, n in (("consep", 14), ("crag", 20), ("glas", 16)) for i in range(1, n + 1)]
    write_conic(tmp_path, sources=sources, patches_per_source=3, size=4)
    source = open_dataset("conic", tmp_path)
    sel = {s: resolve_split(source, s) for s in ("train", "val", "test")}
    assert all(v.scheme == "cisca" for v in sel.values())
    groups = {s: {source.meta_of(i)["group"] for i in v.indices} for s, v in sel.items()}
    assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"] or groups["val"] & groups["test"])
    assert sorted(i for v in sel.values() for i in v.indices) == list(range(len(source)))
    n_units = sel["train"].detail["n_units"]
    assert n_units == {"train": 36, "val": 4, "test": 10}                 # 50 units: 72 / 8 / 20
    assert sel["test"].detail["outer"]["stratified"] and sel["test"].detail["inner"]["stratified"]
    expected = cisca_script_split(source.keys)
    assert {s: {source.keys[i] for i in v.indices} for s, v in sel.items()} == expected
    again = resolve_split(open_dataset("conic", tmp_path), "test")
    assert again == sel["test"]


def test_cisca_split_tiny_datasets_fall_back_and_say_so(caplog):
    from cellembed.data import _splits

    _splits._WARNED.clear()
    eight = open_dataset("synthetic", n_tiles=8, size=32)
    with caplog.at_level("WARNING"):
        sel = {s: resolve_split(eight, s) for s in ("train", "val", "test")}
    said = [r.getMessage() for r in caplog.records if "cisca split over" in r.getMessage()]
    # the outer (test) and inner (val) splits each fall back: each said once, not once per split extracted
    assert len(said) == 2 and len(set(said)) == 2 and any("unstratified ShuffleSplit" in m for m in said)
    assert sorted(i for v in sel.values() for i in v.indices) == list(range(8))
    detail = sel["train"].detail
    assert detail["outer"]["stratified"] is False and detail["outer"]["fallback"] == "unstratified ShuffleSplit"
    one = open_dataset("synthetic", n_tiles=2, size=32)
    sel_one = resolve_split(one, "train")
    assert sel_one.indices == [0, 1] and resolve_split(one, "test").indices == []
    assert sel_one.detail["outer"]["fallback"] == "every unit on the first side"
    assert resolve_split(open_dataset("synthetic", n_tiles=0), "test").indices == []


def test_cisca_refuses_a_group_with_two_strata(tmp_path):
    images, inst, _ = folder_arrays(2)
    write_folder_dataset(tmp_path / "d", [Tile(f"t{i}", images[i], relabel(inst[i]), (inst[i] > 0).astype(np.uint8),
                                               {"group": "g", "stratum": f"s{i}"}) for i in range(2)],
                         ("background", "nucleus"))
    with pytest.raises(ValueError, match="group 'g' has tiles in strata"):
        resolve_split(open_dataset("folder", tmp_path / "d"), "train")


def test_folder_default_split_uses_its_folds_csv(tmp_path):
    write_folder_files(tmp_path)
    write_folds_csv(tmp_path / "folds.csv", [("t_1", 2), ("t_10", 0)])
    source = open_dataset("folder", tmp_path)
    assert resolve_split(source, "test").indices == [0]
    assert resolve_split(source, "train").indices == [2]
    with pytest.raises(ValueError, match="implies 'folds-csv'"):
        resolve_split(source, "train", folds=tmp_path / "folds.csv", scheme="cisca")


# ---------------------------------------------------------------- synthetic

def test_synthetic_tiles_are_deterministic_and_typed():
    a, b = make_synthetic_tile(7, 3), make_synthetic_tile(7, 3)
    for x, y in zip(a[1:4], b[1:4]):
        assert np.array_equal(x, y)
    assert a.key == "synth_7_00003" and a.meta == {"group": "synth_0", "stratum": "s0", "seed": 7, "index": 3}
    assert not np.array_equal(make_synthetic_tile(7, 4).image, a.image)
    assert not np.array_equal(make_synthetic_tile(8, 3).inst_map, a.inst_map)
    assert_tile_contract(a)
    source = open_dataset("synthetic", n_tiles=5, seed=7)
    assert source.keys[3] == "synth_7_00003" and np.array_equal(source[3].image, a.image)
    assert source.class_names == ("background", "epithelial", "lymphocyte", "spindle", "plasma")
    assert source.meta_of(4)["group"] == "synth_1"


def test_synthetic_nuclei_touch_and_types_differ():
    tiles = [make_synthetic_tile(1, i) for i in range(12)]
    counts = [t.inst_map.max() for t in tiles]
    assert all(20 <= c <= 60 for c in counts)
    assert all(len(touching_pairs(t.inst_map)) >= 3 for t in tiles)
    assert sum(len(np.unique(t.type_map)) - 1 >= 2 for t in tiles) >= 9
    types_seen = set(np.unique(np.concatenate([t.type_map.ravel() for t in tiles])).tolist())
    assert types_seen == {0, 1, 2, 3, 4}
    inst, types = np.concatenate([t.inst_map.ravel() + 1000 * k for k, t in enumerate(tiles)]), \
        np.concatenate([t.type_map.ravel() for t in tiles])
    on = inst % 1000 > 0
    areas = np.bincount(inst[on])
    type_of = np.zeros_like(areas)
    type_of[inst[on]] = types[on]
    med = {t: np.median(areas[type_of == t]) for t in (1, 2, 3)}
    assert med[1] > 2 * med[2]                                   # epithelial nuclei are much larger than lymphocytes
    tile = tiles[0]
    grey = tile.image.mean(-1)
    assert grey[tile.inst_map > 0].mean() < grey[tile.inst_map == 0].mean() - 40   # nuclei are dark


def test_synthetic_options_are_checked():
    with pytest.raises(ValueError, match="n_types"):
        make_synthetic_tile(0, 0, n_types=7)
    small = make_synthetic_tile(0, 0, size=64, n_types=2)
    assert small.image.shape == (64, 64, 3) and set(np.unique(small.type_map)) <= {0, 1, 2}


# ---------------------------------------------------------------- writer

def test_write_synthetic_dataset_round_trips_through_the_folder_reader(tmp_path):
    done = []
    out = write_synthetic_dataset(tmp_path / "synth", 6, seed=2, size=48, progress=done.append)
    assert out == tmp_path / "synth" and done == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]           # no temporary folder left behind
    source, original = open_dataset("folder", out), open_dataset("synthetic", n_tiles=6, seed=2, size=48)
    assert source.keys == original.keys and source.class_names == original.class_names
    for i in (0, 5):
        a, b = source[i], original[i]
        assert np.array_equal(a.image, b.image) and np.array_equal(a.inst_map, b.inst_map)
        assert np.array_equal(a.type_map, b.type_map)
        assert source.meta_of(i) == {"group": b.meta["group"], "stratum": b.meta["stratum"]}
    assert resolve_split(source, "test").indices == resolve_split(original, "test").indices


def test_write_refuses_to_overwrite_unless_asked(tmp_path):
    out = write_synthetic_dataset(tmp_path / "d", 2, seed=0, size=32)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_synthetic_dataset(out, 3, seed=1, size=32)
    write_synthetic_dataset(out, 3, seed=1, size=32, overwrite=True)
    assert open_dataset("folder", out).keys == ["synth_1_00000", "synth_1_00001", "synth_1_00002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_write_failure_leaves_nothing_behind(tmp_path):
    def tiles():
        yield make_synthetic_tile(0, 0, size=32)
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError):
        write_folder_dataset(tmp_path / "x", tiles(), ("background", "a", "b", "c", "d"))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- real data (skips when absent)

def realdata_root() -> Path:
    env = os.environ.get("CELLEMBED_REALDATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "realdata"


def test_real_consep_tiles_through_the_folder_reader():
    root = realdata_root() / "consep_tiles256"
    if not (root / "labels.npz").is_file():
        pytest.skip(f"real data not found at {root} (set CELLEMBED_REALDATA)")
    source = open_dataset("folder", root, group_regex=r"(.+)_\d+$")
    assert isinstance(source, TileSource) and source.layout == "npz"
    assert len(source) == len(list((root / "images").glob("*.jpg")))
    assert source.class_names == ("background", "other", "inflammatory", "epithelial", "spindle-shaped")
    n_nuclei = []
    for i in np.linspace(0, len(source) - 1, 12).astype(int):
        tile = source[int(i)]
        assert_tile_contract(tile)
        assert tile.image.shape == (256, 256, 3) and tile.meta["source_split"] in ("train", "test")
        assert np.array_equal(tile.type_map > 0, tile.inst_map > 0) and tile.type_map.max() <= 4
        n_nuclei.append(tile.inst_map.max())
    assert sum(n > 0 for n in n_nuclei) >= 9                  # a few real tiles are empty (no nuclei)
    splits = {s: resolve_split(source, s) for s in ("train", "val", "test")}
    groups = [{source.meta_of(i)["group"] for i in v.indices} for v in splits.values()]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])

