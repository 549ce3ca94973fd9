"""DICOM folders: which files of a folder are DICOM, which series a folder holds (by
SeriesInstanceUID, named by their SeriesDescription), and the cases a volume dataset makes of them
(one per series folder, or ``folder/<name>`` per series of a folder holding several).

Headers only (no pixel data); reading a series into a volume is :func:`counterlens.data.series.read_series`.
"""
from __future__ import annotations

from pathlib import Path

from ._formats import DICOM_SUFFIXES, NIFTI_SUFFIXES, PIL_SUFFIXES, TIFF_SUFFIXES, is_dicom_file, suffix_of

_OTHER_SUFFIXES = (*PIL_SUFFIXES, *TIFF_SUFFIXES, *NIFTI_SUFFIXES, ".npy", ".txt", ".csv", ".json", ".md")


def _is_dicom_path(path: Path) -> bool:
    """A ``.dcm``/``.dicom`` file, or any other file with the DICM marker (names like ``IM0001`` or
    UIDs such as ``1.2.840.113619.2.55.3``, whose "suffix" is a number)."""
    if path.name.startswith(".") or not path.is_file() or path.name.upper() == "DICOMDIR":
        return False
    suffix = suffix_of(path)
    return suffix in DICOM_SUFFIXES or (suffix not in _OTHER_SUFFIXES and is_dicom_file(path))


def dicom_files(folder) -> list[Path]:
    """The DICOM files directly in ``folder`` (``.dcm``/``.dicom``, or other names with the DICM
    marker; hidden files and DICOMDIR skipped), sorted by name."""
    folder = Path(folder)
    return sorted((p for p in folder.iterdir() if _is_dicom_path(p)), key=lambda p: p.name)


_SAFE = str.maketrans({c: "_" for c in '/\\:*?"<>|'})
_TABLES: dict[Path, tuple] = {}          # folder -> (its files' names, mtimes and sizes, its series table)


def _series_table(folder: Path) -> list[tuple[str, str, list[Path]]]:
    """``(uid, description, files)`` per series of the DICOM files directly in ``folder`` (headers only:
    SeriesInstanceUID and SeriesDescription), in order of their first file; cached while the folder's
    files are unchanged."""
    files = dicom_files(folder)
    key = tuple((f.name, st.st_mtime_ns, st.st_size) for f in files for st in [f.stat()])
    hit = _TABLES.get(folder)
    if hit is not None and hit[0] == key:
        return hit[1]
    import pydicom

    groups: dict[str, tuple[str, list[Path]]] = {}
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True,
                                 specific_tags=["SeriesInstanceUID", "SeriesDescription"])
        except Exception:  # noqa: BLE001 - read_series names the unreadable file
            ds = {}
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        groups.setdefault(uid, (" ".join(str(ds.get("SeriesDescription", "") or "").split()), []))[1].append(f)
    table = [(uid, desc, paths) for uid, (desc, paths) in groups.items()]
    if len(_TABLES) > 64:
        _TABLES.clear()
    _TABLES[folder] = (key, table)
    return table


def series_names(folder) -> dict[str, str]:
    """``{case name: SeriesInstanceUID}`` of the series in ``folder``: the SeriesDescription with path
    characters replaced by ``_``, or the UID when the description is empty, repeated or names a file
    of the folder (``"(no SeriesInstanceUID)"`` for files without one); sorted by name."""
    folder = Path(folder)
    table = _series_table(folder)
    descs = [d.translate(_SAFE).strip(". ") for _, d, _ in table]
    taken = {p.name for p in folder.iterdir()}
    names = {(d if d and descs.count(d) == 1 and d not in taken else uid or "(no SeriesInstanceUID)"): uid
             for (uid, _, _), d in zip(table, descs)}
    return dict(sorted(names.items()))


def series_of_case(path) -> tuple[Path, str] | None:
    """``(folder, SeriesInstanceUID)`` when ``path`` is a case ``folder/<name>`` of a folder holding
    several series (see :func:`series_names`) rather than a file; else None."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return None
    names = series_names(path.parent) if dicom_files(path.parent) else {}
    return (path.parent, names[path.name]) if len(names) > 1 and path.name in names else None


def series_files(path) -> list[Path]:
    """The DICOM files of a series folder, or of one series case ``folder/<name>``."""
    case = series_of_case(path)
    if case is None:
        return dicom_files(path)
    return next(files for uid, _, files in _series_table(case[0]) if uid == case[1])


def group_series(paths: list[Path]) -> list[Path]:
    """``paths`` (image files) with the DICOM files of every folder holding two or more of them
    replaced by that folder, once, where its first file was: the cases of a volume dataset. A folder
    holding several series gives one case per series, ``folder/<name>`` (:func:`series_names`)."""
    per_dir: dict[Path, int] = {}
    for p in paths:
        if _is_dicom_path(p):
            per_dir[p.parent] = per_dir.get(p.parent, 0) + 1
    out, seen = [], set()
    for p in paths:
        if _is_dicom_path(p) and per_dir[p.parent] >= 2:
            if p.parent not in seen:
                seen.add(p.parent)
                names = series_names(p.parent)
                out.extend([p.parent / n for n in names] if len(names) > 1 else [p.parent])
        else:
            out.append(p)
    return out


def series_cases(found: list[tuple[Path, str | None]], root: Path) -> list[tuple[Path, str | None]]:
    """Volume mode: the DICOM slices of one folder become one case, the folder (a series, read by
    :func:`counterlens.data.series.read_series`). When every "class folder" is itself one series (or
    a folder of several), the folder is a flat set of series (no labels)."""
    by_class: dict[str | None, list[Path]] = {}
    for p, name in found:
        by_class.setdefault(name, []).append(p)
    out = [(p, name) for name, paths in by_class.items() for p in group_series(paths)]
    if out and all(name is not None and (p == root / name or (p.parent == root / name and not p.exists()))
                   for p, name in out):                      # series folders (or folders of several series)
        out = [(p, None) for p, _ in out]
    return out
