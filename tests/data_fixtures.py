"""Writers of tiny datasets in each real on-disk layout (PanNuke, CoNIC, CytoDArk0, folder), quirks included.

Every writer returns the root and the exact arrays it wrote, so tests can assert decoded values.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

H = W = 16
TISSUES = {1: ["Breast", "Bile-duct", "Adrenal_gland"], 2: ["Colon", "Breast"], 3: ["HeadNeck", "Colon"]}


def pannuke_tile_zero() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first tile of fold 1 with every quirk, and the inst/type maps a correct reader must return.

    Quirks: id 5 in channels 0 and 1 (two instances); channel 2 (id 900) overlaps channel 0's
    instance and wins; channel 3's id 7 is fully covered by channel 4 (disappears); ids are
    non-contiguous; channel 5 is background.
    """
    mask = np.zeros((H, W, 6), np.float64)
    mask[1:5, 1:5, 0] = 5        # neoplastic, id 5
    mask[10:14, 1:5, 1] = 5      # inflammatory, the same id 5
    mask[3:7, 3:7, 2] = 900      # connective, overlaps the neoplastic one at [3:5, 3:5]
    mask[10:12, 10:12, 3] = 7    # dead, hidden under the epithelial one below
    mask[9:14, 9:14, 4] = 3000   # epithelial
    mask[:, :, 5] = (mask[:, :, :5].sum(-1) == 0).astype(np.float64)
    inst = np.zeros((H, W), np.int32)
    types = np.zeros((H, W), np.uint8)
    for (rows, cols), new_id, typ in [((slice(1, 5), slice(1, 5)), 1, 1), ((slice(10, 14), slice(1, 5)), 2, 2),
                                      ((slice(3, 7), slice(3, 7)), 3, 3), ((slice(9, 14), slice(9, 14)), 4, 5)]:
        inst[rows, cols] = new_id
        types[rows, cols] = typ
    return mask, inst, types


def write_pannuke(root: Path, folds=(1, 2, 3)) -> dict:
    """``root/Fold k/{images,masks}/foldk/*.npy`` with float64 images and masks."""
    rng = np.random.default_rng(0)
    written = {}
    for k in folds:
        n = len(TISSUES[k])
        images = rng.integers(0, 256, (n, H, W, 3)).astype(np.float64)
        masks = np.zeros((n, H, W, 6), np.float64)
        masks[:, :, :, 5] = 1
        for i in range(n):
            masks[i, 2:6, 2:6, 0] = 10 + i
            masks[i, 2:6, 2:6, 5] = 0
        if k == 1:
            masks[0] = pannuke_tile_zero()[0]
        img_dir = root / f"Fold {k}" / "images" / f"fold{k}"
        mask_dir = root / f"Fold {k}" / "masks" / f"fold{k}"
        img_dir.mkdir(parents=True)
        mask_dir.mkdir(parents=True)
        np.save(img_dir / "images.npy", images)
        np.save(img_dir / "types.npy", np.array(TISSUES[k]))
        np.save(mask_dir / "masks.npy", masks)
        written[k] = (images, masks)
    return written


def write_conic(root: Path, sources: list[str] | None = None, patches_per_source: int = 2,
                size: int = H) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``images.npy`` uint8, ``labels.npy`` uint16 (instance ids > 255, class 0–6), ``patch_info.csv``."""
    sources = sources or ["consep_1", "crag_14", "glas_31"]
    names = [f"{s}-{p:04d}" for s in sources for p in range(patches_per_source)]
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (len(names), size, size, 3), dtype=np.uint8)
    labels = np.zeros((len(names), size, size, 2), np.uint16)
    labels[:, 1:4, 1:4, 0] = 300
    labels[:, 1:4, 1:4, 1] = 6
    labels[:, 8:12, 8:12, 0] = 1000
    labels[:, 8:12, 8:12, 1] = 2
    labels[:, 0, size - 1, 1] = 3          # a class pixel off any nucleus: must read as background
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "images.npy", images)
    np.save(root / "labels.npy", labels)
    with open(root / "patch_info.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patch_info"])
        writer.writerows([n] for n in names)
    return images, labels, names


def write_cytodark0(root: Path, names=("ID1_1", "ID1_10", "ID1_2", "ID2_1"), folds: dict | None = None,
                    mag: str = "20x") -> Path:
    """``root/<mag>/16x16/{image/*.png, label/*.tiff}`` (+ folds.csv); returns the size folder."""
    folder = root / mag / f"{H}x{W}"
    (folder / "image").mkdir(parents=True)
    (folder / "label").mkdir()
    rng = np.random.default_rng(2)
    for j, name in enumerate(names):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(folder / "image" / f"{name}.png")
        label = np.zeros((H, W), np.uint16)
        label[2:6, 2:6] = 40 + j
        label[9:13, 9:13] = 7
        tifffile.imwrite(folder / "label" / f"{name}.tiff", label)
    if folds is not None:
        write_folds_csv(folder / "folds.csv", folds.items())
    return folder


def write_folds_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["img_id", "fold"])
        writer.writerows(rows)
    return path


def folder_arrays(n: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, H, W, 3) uint8 images, (n, H, W) non-contiguous instance ids, (n, H, W) types 0..3."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    inst = np.zeros((n, H, W), np.int32)
    cls = np.zeros((n, H, W), np.uint8)
    for i in range(n):
        inst[i, 1:5, 1:5], cls[i, 1:5, 1:5] = 17, 3
        inst[i, 1:5, 5:9], cls[i, 1:5, 5:9] = 4 + i, 1   # touches id 17
        inst[i, 10:14, 10:14], cls[i, 10:14, 10:14] = 250, 2
    return images, inst, cls


def write_folder_npz(root: Path, names: list[str], compressed: bool = False, **extra) -> tuple:
    """``images/<name>.png`` + one ``labels.npz`` (inst, cls, names, + extra arrays)."""
    images, inst, cls = folder_arrays(len(names))
    (root / "images").mkdir(parents=True)
    for name, image in zip(names, images):
        Image.fromarray(image).save(root / "images" / f"{name}.png")
    save = np.savez_compressed if compressed else np.savez
    save(root / "labels.npz", inst=inst, cls=cls, names=np.array(names), **extra)
    return images, inst, cls


def write_folder_files(root: Path) -> tuple:
    """Per-file labels in every accepted variant: (H,W,2) .npy; (H,W) .tif + types/*.png; (H,W) .png + types/*.npy."""
    images, inst, cls = folder_arrays(3)
    for sub in ("images", "labels", "types"):
        (root / sub).mkdir(parents=True)
    names = ["t_1", "t_2", "t_10"]
    for name, image in zip(names, images):
        Image.fromarray(image).save(root / "images" / f"{name}.png")
    np.save(root / "labels" / "t_1.npy", np.stack([inst[0], cls[0].astype(np.int32)], -1))
    tifffile.imwrite(root / "labels" / "t_2.tif", inst[1].astype(np.uint16))
    Image.fromarray(cls[1]).save(root / "types" / "t_2.png")
    Image.fromarray(inst[2].astype(np.uint16)).save(root / "labels" / "t_10.png")
    np.save(root / "types" / "t_10.npy", cls[2])
    (root / "classes.txt").write_text("background\na\nb\nc\n")
    return names, images, inst, cls
