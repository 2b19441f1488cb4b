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


def _image_dir(root: str, sub: str | list[str], probe: str) -> str:
    """The first ``root/sub`` that holds the probe image, else ``root`` (the public archives differ on this)."""
    fs, _ = fsspec.core.url_to_fs(root)
    for d in [sub] if isinstance(sub, str) else sub:
        if fs.exists(_join(root, d, probe)):
            return _join(root, d)
    return root


def _read_csv(uri: str, **kwargs) -> pd.DataFrame:
    with fsspec.open(uri) as f:
        return pd.read_csv(f, **kwargs)


def load_agiqa3k(root: str, labels: str | None = None, target: str = "quality") -> pd.DataFrame:
    """AGIQA-3K (Li et al. 2023): ``name, prompt, adj1, adj2, style, mos_quality, std_quality, mos_align,
    std_align`` (+ an optional ``split`` column). The generator is the file-name prefix before the index."""
    if target not in ("quality", "align"):
        raise ValueError("AGIQA-3K targets are 'quality' and 'align'")
    labels = labels or _first_existing(root, ["labels.csv", "data.csv"])
    df = _read_csv(labels)
    images = _image_dir(root, "images", df["name"].iloc[0])
    return pd.DataFrame({
        "image_id": df["name"].str.rsplit(".", n=1).str[0],
        "uri": [_join(images, n) for n in df["name"]],
        "mos": df[f"mos_{target}"].astype(float),
        "prompt": df["prompt"].fillna("").astype(str),
        "generator": df["name"].str.rsplit("_", n=1).str[0],
        "split": df["split"] if "split" in df.columns else None,
    })


def _first_existing(root: str, names: list[str]) -> str:
    fs, _ = fsspec.core.url_to_fs(root)
    for n in names:
        if fs.exists(_join(root, n)):
            return _join(root, n)
    raise FileNotFoundError(f"none of {names} under {root}")


# AGIQA-1K's file names encode the prompt: <model>_<main object>_<second object>_<place>_<style>.jpg
# (the database README's table).
_AGIQA1K_MAIN = ["bird", "cat", "dog", "batman", "snoopy", "teddy bear", "kid", "man", "woman", "alien", "demon", "witch"]
_AGIQA1K_SECOND = ["driving aircraft", "driving bike", "driving car", "having hamburger", "having icecream",
                   "having pizza", "playing baseball", "playing football", "playing yoga", "using CD", "using laptop",
                   "using phone", "wearing coat", "wearing hat", "wearing shirt"]
_AGIQA1K_PLACE = ["city", "wild"]
_AGIQA1K_STYLE = ["anime style", "realistic style"]


def agiqa1k_prompt(name: str) -> str:
    """The prompt an AGIQA-1K file name encodes; the parts it cannot decode are left out."""
    parts = name.rsplit(".", 1)[0].split("_")[1:]
    words = []
    for table, value in zip((_AGIQA1K_MAIN, _AGIQA1K_SECOND, _AGIQA1K_PLACE, _AGIQA1K_STYLE), parts):
        if value.isdigit() and int(value) < len(table):
            words.append(table[int(value)])
    return ", ".join([" ".join(words[:2])] + words[2:]) if words else ""


def load_agiqa1k(root: str, labels: str | None = None, target: str = "quality") -> pd.DataFrame:
    """AGIQA-1K (Zhang et al. 2023): ``AIGC_all.csv`` (``Image, Score``) from its repository, or the release's
    ``AIGC_MOS_Zscore`` table saved as CSV (image name, prompt, MOS by position). Images in ``file/``.
    Without a prompt column the prompt is decoded from the file name; the generator is its first part
    (deepai: Stable Diffusion 2.0, dreamStudio: Stable Inpainting 1.0)."""
    if target != "quality":
        raise ValueError("AGIQA-1K has one target: 'quality'")
    labels = labels or _first_existing(root, ["AIGC_all.csv", "AIGC_MOS_Zscore.csv"])
    df = _read_csv(labels)
    if list(df.columns[:2]) == ["Image", "Score"]:
        names, mos, prompts = df["Image"].astype(str), df["Score"], None
    elif df.shape[1] >= 3:
        names, prompts, mos = (df.iloc[:, i] for i in range(3))
        names = names.astype(str)
    else:
        raise ValueError(f"{labels}: expected columns Image,Score or name,prompt,MOS; got {list(df.columns)}")
    images = _image_dir(root, ["file", "images"], names.iloc[0])
    return pd.DataFrame({
        "image_id": names.str.rsplit(".", n=1).str[0],
        "uri": [_join(images, n) for n in names],
        "mos": mos.astype(float),
        "prompt": prompts.fillna("").astype(str) if prompts is not None else names.map(agiqa1k_prompt),
        "generator": names.str.split("_", n=1).str[0],
        "split": None,
    })


_AIGCIQA2023_TARGETS = {"quality": "quality_mos", "authenticity": "authenticity_mos",
                        "correspondence": "correspondence_mos", "align": "correspondence_mos"}


def load_aigciqa2023(root: str, labels: str | None = None, target: str = "quality") -> pd.DataFrame:
    """AIGCIQA2023 (Wang et al. 2023): ``AIGCIQA2023.csv`` (``name, prompt, style, class, quality_mos,
    authenticity_mos, correspondence_mos`` and their stds; MOS on 0-100). Targets: quality, authenticity,
    correspondence (or align). The label file does not name the six generators; its images come in blocks
    of 400 (100 prompts x 4) per generator, so ``generator`` is ``model0`` ... ``model5`` by block."""
    if target not in _AIGCIQA2023_TARGETS:
        raise ValueError(f"AIGCIQA2023 targets are {sorted(_AIGCIQA2023_TARGETS)}")
    labels = labels or _first_existing(root, ["AIGCIQA2023.csv"])
    df = _read_csv(labels)
    names = df["name"].astype(str)
    images = _image_dir(root, ["Image/allimg", "allimg", "images", "Image"], names.iloc[0])
    index = names.str.rsplit(".", n=1).str[0]
    return pd.DataFrame({
        "image_id": index,
        "uri": [_join(images, n) for n in names],
        "mos": df[_AIGCIQA2023_TARGETS[target]].astype(float),
        "prompt": df["prompt"].fillna("").astype(str),
        "generator": [f"model{int(i) // 400}" if i.isdigit() else None for i in index],
        "split": None,
    })


def load_aigiqa20k(root: str, labels: str | None = None, target: str = "quality") -> pd.DataFrame:
    """AIGIQA-20K (NTIRE 2024, released as AIGCQA-30K-Image): ``info_train.csv``, ``info_val.csv`` (and
    ``info_test.csv``) with ``name, prompt, mos`` (0-5), images under ``train/``, ``val/``, ``test/``. The
    file each row comes from is its split; rows without a MOS (the challenge's withheld test labels) are
    left out. The generator is the name's prefix (``DALLE2_0000.png`` -> DALLE2)."""
    if target != "quality":
        raise ValueError("AIGIQA-20K has one target: 'quality'")
    fs, _ = fsspec.core.url_to_fs(root)
    files = [labels] if labels else [_join(root, f"info_{s}.csv") for s in ("train", "val", "test")]
    frames = []
    for uri in files:
        if not labels and not fs.exists(uri):
            continue
        df = _read_csv(uri)
        if "mos" not in df.columns or df["mos"].isna().all():
            continue
        split = re.sub(r"^info_|\.csv$", "", posixpath.basename(uri)) if not labels else df.get("split")
        df = df[df["mos"].notna()]
        names = df["name"].astype(str)
        images = _image_dir(root, [split, "images"] if isinstance(split, str) else ["images"], names.iloc[0])
        frames.append(pd.DataFrame({
            "image_id": names.str.rsplit(".", n=1).str[0].to_numpy(),
            "uri": [_join(images, n) for n in names],
            "mos": df["mos"].astype(float).to_numpy(),
            "prompt": df["prompt"].fillna("").astype(str).to_numpy(),
            "generator": names.str.rsplit("_", n=1).str[0].to_numpy(),
            "split": split if isinstance(split, str) else (split.to_numpy() if split is not None else None),
        }))
    if not frames:
        raise FileNotFoundError(f"no labelled info_train/val/test.csv under {root}")
    return pd.concat(frames, ignore_index=True)


LOADERS = {"agiqa3k": load_agiqa3k, "agiqa1k": load_agiqa1k, "aigciqa2023": load_aigciqa2023, "aigiqa20k": load_aigiqa20k}


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
