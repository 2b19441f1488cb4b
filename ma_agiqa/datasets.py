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
    """(train, val): two parts, the val part both choosing the epoch and reporting. The label file's ``split``
    column as given when ``seed`` is None (its ``test`` rows join val); else a seeded random split, by prompt
    when ``by_prompt`` so that no prompt is on both sides. ``split_three`` gives a separate test part."""
    train, val, test = split_three(df, seed, by_prompt, val_fraction, 0.0, label_test=False)
    return train, val


def split_three(df: pd.DataFrame, seed: int | None = None, by_prompt: bool = False, val_fraction: float = 0.2,
                test_fraction: float = 0.2, label_test: bool = True):
    """(train, val, test): val chooses the epoch, test reports, and neither sees the other's images.

    ``seed`` None: the label file's ``split`` column, its ``test`` rows the test part when it has ``val`` rows
    too (``label_test``; else its ``test`` rows join val and the test part is empty). A seed: val drawn as
    ``split_frame`` draws it (the same images for the same seed), then ``test_fraction`` of the rows (of the
    prompts, ``by_prompt``) drawn from the rest; ``test_fraction`` 0 leaves the test part empty."""
    if not 0.0 <= test_fraction < 1.0 or not 0.0 < val_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(f"fractions must leave a training part: val {val_fraction}, test {test_fraction}")
    if seed is None:
        if df["split"].isna().all():
            raise ValueError("the label file has no split column: pass a split seed")
        split = df["split"]
        if not (label_test and (split == "val").any() and (split == "test").any()):
            split = split.replace("test", "val")
        return tuple(df[split == part].reset_index(drop=True) for part in ("train", "val", "test"))
    rng = np.random.default_rng(seed)
    units = df["prompt"].unique() if by_prompt else np.arange(len(df))
    val = rng.choice(len(units), size=max(1, round(len(units) * val_fraction)), replace=False)
    rest = np.setdiff1d(np.arange(len(units)), val)
    test = rng.choice(rest, size=round(len(units) * test_fraction), replace=False) if test_fraction else rest[:0]
    if by_prompt:
        is_val = df["prompt"].isin(set(units[val])).to_numpy()
        is_test = df["prompt"].isin(set(units[test])).to_numpy()
    else:
        is_val, is_test = np.zeros(len(df), bool), np.zeros(len(df), bool)
        is_val[val], is_test[test] = True, True
    is_train = ~is_val & ~is_test
    return tuple(df[m].reset_index(drop=True) for m in (is_train, is_val, is_test))


def generator_split(df: pd.DataFrame, generator: str, seed: int = 0, val_fraction: float = 0.2):
    """(train, val, test): leave one generator out. Test is every image of ``generator``; val a seeded
    ``val_fraction`` of the others' (as ``split_three`` draws it), train the rest."""
    held = df["generator"] == generator
    if not held.any():
        raise ValueError(f"{generator!r}: no such generator; the label file has "
                         f"{', '.join(sorted(df['generator'].dropna().unique()))}")
    train, val, _ = split_three(df[~held].reset_index(drop=True), seed, False, val_fraction, 0.0)
    return train, val, df[held].reset_index(drop=True)


REFERENCE_SPLIT_SEED = 20


def reference_split(df: pd.DataFrame, seed: int = REFERENCE_SPLIT_SEED, fractions: tuple[float, float] = (0.7, 0.8)):
    """(train, val, test) as MA-AGIQA's training script splits a dataset (utils/process.py,
    ``dataset_general(..., 'random', set_seed=20)``): the row indices in label-file order shuffled by Python's
    ``random`` seeded with 20, the first int(0.7 n) train, the next up to int(0.8 n) val (choosing the epoch),
    the rest test (reported). The same procedure, not the same images: the reference shuffles all 2,982 rows
    of AGIQA-3K's data.csv, so over another set of rows (the 2,385 AGIQA-3K images here) the parts differ."""
    import random

    order = list(range(len(df)))
    random.Random(seed).shuffle(order)
    a, b = int(len(order) * fractions[0]), int(len(order) * fractions[1])
    return tuple(df.iloc[sorted(part)].reset_index(drop=True) for part in (order[:a], order[a:b], order[b:]))


def split_table(train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame | None = None) -> pd.DataFrame:
    """image_id, split for every row of the parts: what ``jobs.train`` writes as split.csv and
    ``jobs.evaluate --split-file`` reads."""
    parts = [("train", train), ("val", val)] + ([("test", test)] if test is not None else [])
    return pd.concat([pd.DataFrame({"image_id": p["image_id"], "split": name}) for name, p in parts], ignore_index=True)
