"""Multi-label image folders: a folder of images with a labels table, one 0/1 column per finding.

```
DATA/labels.csv          path,opacity,effusion,cardiomegaly
                         train_00000.png,1,0,1
                         sub/train_00001.png,0,0,0
DATA/*.png ...           the images (paths in the table are relative to its folder)
```

A value is ``1`` / ``0`` (also ``true``/``false``, ``yes``/``no``, ``1.0``/``0.0``); an empty cell or
``-1`` means unknown (left out of training losses and label counts). :class:`~counterlens.data.
images.ImageFolder` reads a folder that holds ``labels.csv`` this way: ``classes`` are the finding
columns (reordered to a model's findings when it gives them; a model finding the table lacks is
unknown for every image), every record has ``findings`` (one 0/1/-1 per class) and ``label`` None.
A ``masks`` folder with one subfolder per finding (``masks/opacity/<stem>.png`` ...) gives each
image one mask per finding (``finding_masks``); any other masks folder gives one mask per image.
"""
from __future__ import annotations

import csv
import warnings
from pathlib import Path

from ..errors import DataFileError, InputError

LABELS_FILE = "labels.csv"
_TRUE, _FALSE, _UNKNOWN = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no"}, {"", "-1", "-1.0"}


def has_label_table(root) -> bool:
    """Whether ``root`` is a folder with a labels table (a multi-label folder)."""
    return Path(root).is_dir() and (Path(root) / LABELS_FILE).is_file()


def read_label_table(root, classes=None) -> tuple[list[str], list[tuple[Path, tuple[int, ...]]]]:
    """``(findings, [(image path, labels)])`` of ``root/labels.csv``; ``labels`` holds one of 1, 0
    or -1 (unknown) per finding, in the order of ``classes`` when given (else the table's)."""
    path = Path(root) / LABELS_FILE
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataFileError(path, f"cannot be read as a CSV table ({exc}); write path,<finding>,... with 0/1 values")
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows or len(rows[0]) < 2 or rows[0][0].strip().lower() != "path":
        raise DataFileError(path, "needs a header path,<finding>,<finding>,... (one 0/1 column per finding)")
    columns = [c.strip() for c in rows[0][1:]]
    if len({c.lower() for c in columns}) != len(columns) or not all(columns):
        raise DataFileError(path, f"has empty or repeated finding columns {columns}; name each finding once")
    findings = [str(c) for c in classes] if classes is not None else columns
    where = {c.lower(): i for i, c in enumerate(findings)}
    unknown = [c for c in columns if c.lower() not in where]
    if unknown:
        raise InputError(f"{path}: columns {unknown} are not findings of the model ({findings}); rename the columns "
                         "or pass the model's findings (--classes)")
    order = [where[c.lower()] for c in columns]
    out, seen = [], set()
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(columns) + 1:
            raise DataFileError(path, f"line {line} has {len(row)} cells, the header {len(columns) + 1}")
        rel = row[0].strip()
        if not rel or rel in seen:
            raise DataFileError(path, f"line {line}: {'an empty' if not rel else 'a repeated'} path {rel!r}; "
                                      "list each image once")
        seen.add(rel)
        labels = [-1] * len(findings)
        for col, cell in zip(order, row[1:]):
            labels[col] = _value(cell, path, line, findings[col])
        image = Path(rel) if Path(rel).is_absolute() else Path(root) / rel
        out.append((image, tuple(labels)))
    if not out:
        raise DataFileError(path, "lists no images; add one row per image: path,<0/1 per finding>")
    return findings, sorted(out, key=lambda item: item[0].as_posix())


def _value(cell: str, path: Path, line: int, finding: str) -> int:
    text = cell.strip().lower()
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    if text in _UNKNOWN:
        return -1
    raise DataFileError(path, f"line {line}, column {finding}: {cell!r} is not a label; write 1 (present), "
                              "0 (absent) or leave it empty (unknown)")


def finding_mask_folders(masks, findings: list[str]) -> dict[str, Path] | None:
    """``{finding: folder}`` when the masks folder has a subfolder per finding (matched without
    case), else None (one mask per image)."""
    if masks is None:
        return None
    subdirs = {d.name.lower(): d for d in Path(masks).iterdir() if d.is_dir()}
    found = {f: subdirs[f.lower()] for f in findings if f.lower() in subdirs}
    return found or None


def unlisted_images(root: Path, listed: list[Path], images: list[Path]) -> None:
    """Warn about image files of the folder that the labels table does not list (they are not used)."""
    missing = sorted(set(p.resolve() for p in images) - {p.resolve() for p in listed})
    if missing:
        warnings.warn(f"{root}: {len(missing)} image file(s) are not in {LABELS_FILE} and are left out "
                      f"(e.g. {missing[0].name})", stacklevel=4)
