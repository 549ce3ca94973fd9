"""Merging a run's index shards into one table (read by :class:`~counterlens.runs.store.reader.Run`).

Every shard is read; where shards hold the same key (a batch redone after a crash, two processes
that did the same case), a ``done`` case row wins over a ``failed`` one and then the newest row
wins. A shard written by an older version lacks the newer tables (read as empty) and columns
(read as None).
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import InputError
from .layout import INDEX_DIR, KEYS, SCHEMA


def shards(root: Path) -> list[Path]:
    return sorted((Path(root) / INDEX_DIR).glob("*.sqlite"))


EMPTY_TABLES: dict[str, pd.DataFrame] = {}


def empty_table(table: str) -> pd.DataFrame:
    if table not in EMPTY_TABLES:
        con = sqlite3.connect(":memory:")
        con.executescript(SCHEMA)
        EMPTY_TABLES[table] = pd.read_sql_query(f"SELECT * FROM {table}", con)
        con.close()
    return EMPTY_TABLES[table].assign(shard=pd.Series(dtype=str))


def merged(root: Path, table: str) -> pd.DataFrame:
    frames = []
    for shard in shards(root):
        try:
            con = sqlite3.connect(f"file:{shard}?mode=ro", uri=True, timeout=60)
            try:
                df = pd.read_sql_query(f"SELECT * FROM {table}", con)
            finally:
                con.close()
        except (sqlite3.DatabaseError, pd.errors.DatabaseError) as exc:
            if "no such table" in str(exc):
                continue
            raise InputError(f"{shard} cannot be read ({exc}); move it aside to read the rest of the run") from exc
        if len(df):
            for col in empty_table(table).columns.drop("shard"):      # a shard of an older version lacks newer columns
                if col not in df:
                    df[col] = None
            frames.append(df.assign(shard=shard.stem))
    if not frames:
        return empty_table(table)
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if len(frames) > 1:
        order = ["written"]
        if table == "cases":
            # A case is written once per stage (explain, then counterfactual into the same run): the first done
            # row is the case as the run first read it (its label, ground-truth mask); a later stage's row (with
            # the editable mask, or none) must not replace it. Done beats failed; among failed rows the newest.
            df["_done"] = (df["status"] == "done").astype(int)
            df["_first"] = np.where(df["_done"] == 1, -df["written"], df["written"])   # kept: the largest
            order = ["_done", "_first"]
        df = df.sort_values(order, kind="stable").drop_duplicates(KEYS[table], keep="last")
        df = df.drop(columns=[c for c in ("_done", "_first") if c in df]).sort_values(KEYS[table], kind="stable")
    elif table != "tabular_counterfactuals":
        df = df.sort_values(KEYS[table], kind="stable")
    if table == "metrics":                     # millions of rows at 100,000 cases: repeated strings as categories
        df = df.astype({"case_id": "category", "method": "category", "metric": "category", "shard": "category"})
    return df.reset_index(drop=True)
