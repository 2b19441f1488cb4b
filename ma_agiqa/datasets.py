"""Label files of AGI quality datasets, read into one frame: image_id, uri, mos, prompt, generator, split.

``uri`` is absolute (a path or an fsspec URI under the data root), so that the same frame feeds training,
evaluation and the scoring job's manifests.
"""
from __future__ import annotations

import posixpath
import re

import fsspec
import numpy as np
import pandas as pd

COLUMNS = ["image_id", "uri", "mos", "prompt", "generator", "split"]


def _join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts)


def _image_dir(root: str, sub: str, probe: str) -> str:
    """``root/sub`` if the probe image is there, else ``root`` (the public archives differ on this)."""
    fs, _ = fsspec.core.url_to_fs(root)
    return _join(root, sub) if fs.exists(_join(root, sub, probe)) else root


def load_agiqa3k(root: str, labels: str | None = None, target: str = "quality") -> pd.DataFrame:
    """AGIQA-3K (Li et al. 2023): ``name, prompt, adj1, adj2, style, mos_quality, std_quality, mos_align,
    std_align`` (+ an optional ``split`` column). The generator is the file-name prefix before the index."""
    if target not in ("quality", "align"):
        raise ValueError("AGIQA-3K targets are 'quality' and 'align'")
    labels = labels or _first_existing(root, ["labels.csv", "data.csv"])
    with fsspec.open(labels) as f:
        df = pd.read_csv(f)
    images = _image_dir(root, "images", df["name"].iloc[0])
    return pd.DataFrame({
        "image_id": df["name"].str.rsplit(".", n=1).str[0],
        "uri": [_join(images, n) for n in df["name"]],
        "mos": df[f"mos_{target}"].astype(float),
        "prompt": df["prompt"].fillna("").astype(str),
        "generator": df["name"].str.rsplit("_", n=1).str[0],
        "split": df["split"] if "split" in df.columns else None,
    })


def load_csv_labels(root: str, labels: str, name_col: str = "name", mos_col: str = "mos",
                    prompt_col: str | None = "prompt") -> pd.DataFrame:
    """Any label file with an image-name column and a MOS column (for datasets not listed here)."""
    with fsspec.open(labels) as f:
        df = pd.read_csv(f)
    return pd.DataFrame({
        "image_id": df[name_col].astype(str).str.rsplit(".", n=1).str[0],
        "uri": [_join(root, n) for n in df[name_col].astype(str)],
        "mos": df[mos_col].astype(float),
        "prompt": df[prompt_col].fillna("").astype(str) if prompt_col and prompt_col in df else "",
        "generator": df[name_col].astype(str).map(lambda n: re.sub(r"_\d+(\.\w+)?$", "", n)),
        "split": df["split"] if "split" in df.columns else None,
    })


def _first_existing(root: str, names: list[str]) -> str:
    fs, _ = fsspec.core.url_to_fs(root)
    for n in names:
        if fs.exists(_join(root, n)):
            return _join(root, n)
    raise FileNotFoundError(f"none of {names} under {root}")


LOADERS = {"agiqa3k": load_agiqa3k}


def load_dataset(name: str, root: str, labels: str | None = None, target: str = "quality") -> pd.DataFrame:
    if name not in LOADERS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(LOADERS)}")
    df = LOADERS[name](root, labels, target)
    if df["image_id"].duplicated().any():
        raise ValueError(f"{name}: duplicate image ids in the label file")
    return df[COLUMNS]


def split_frame(df: pd.DataFrame, seed: int | None = None, by_prompt: bool = False, val_fraction: float = 0.2):
    """(train, val). The label file's ``split`` column as given when ``seed`` is None; else a seeded random
    split, by prompt when ``by_prompt`` so that no prompt is on both sides."""
    if seed is None:
        if df["split"].isna().all():
            raise ValueError("the label file has no split column: pass a split seed")
        return df[df["split"] == "train"].reset_index(drop=True), df[df["split"].isin(["val", "test"])].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    if by_prompt:
        prompts = df["prompt"].unique()
        val_prompts = set(rng.choice(prompts, size=max(1, round(len(prompts) * val_fraction)), replace=False))
        is_val = df["prompt"].isin(val_prompts).to_numpy()
    else:
        is_val = np.zeros(len(df), bool)
        is_val[rng.choice(len(df), size=max(1, round(len(df) * val_fraction)), replace=False)] = True
    return df[~is_val].reset_index(drop=True), df[is_val].reset_index(drop=True)
