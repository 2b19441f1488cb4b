"""Assemble one ensemble checkpoint from trained single-head ones: their heads averaged and, with --probe, a
ridge probe on the pooled backbone statistics fitted here (seconds, on the cached backbone maps).

    python -m jobs.ensemble --member CKPT [--member CKPT ...] [--probe] --data-root DIR --output DIR
        [--split-file CSV] [--fit-on train|train+val] [--probe-alpha A] [--probe-weight W]

Members: checkpoint directories (jobs.train runs of the same config, seeds apart) or registered names with
shipped weights. The probe is fitted on the train rows of the label file's split column (or --split-file's,
e.g. the first member's split.csv), its ridge strength chosen on the val rows by SRCC + PLCC; --fit-on
train+val fits it on both, with the strength fixed by --probe-alpha (from a split run: nothing is left to
choose it on). The result loads with from_pretrained and scores with jobs.score --model DIR.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.ensemble", description=__doc__.split("\n")[0])
    p.add_argument("--member", action="append", required=True, help="a trained checkpoint (repeat for K heads)")
    p.add_argument("--probe", action="store_true", help="fit and add the ridge probe")
    p.add_argument("--dataset", default="agiqa3k", choices=["agiqa3k", "agiqa1k", "aigciqa2023", "aigiqa20k"])
    p.add_argument("--data-root", default=None, help="the labelled dataset the probe is fitted on")
    p.add_argument("--labels", default=None)
    p.add_argument("--split-file", default=None, help="CSV with image_id,split instead of the label file's split")
    p.add_argument("--fit-on", choices=["train", "train+val"], default="train")
    p.add_argument("--probe-alpha", type=float, default=None, help="the ridge strength (required with --fit-on train+val)")
    p.add_argument("--probe-weight", type=float, default=0.5, help="the probe's weight against the heads' mean")
    p.add_argument("--name", default=None, help="the config name (default: the first member's)")
    p.add_argument("--cache-dir", default=None, help="feature cache (default ~/.cache/ma_agiqa/features)")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    if args.probe and args.data_root is None:
        p.error("--probe needs --data-root (the labelled images it is fitted on)")
    if args.probe and args.fit_on == "train+val" and args.probe_alpha is None:
        p.error("--fit-on train+val leaves nothing to choose the ridge strength on: give --probe-alpha")
    return args


def run(args) -> dict:
    import pandas as pd

    from ma_agiqa import create_model
    from ma_agiqa.checkpoint import checkpoint_dir
    from ma_agiqa.datasets import load_dataset
    from ma_agiqa.ensemble import fit_probe, fit_ridge
    from ma_agiqa.model import EnsembleError, assemble_ensemble, check_members
    from ma_agiqa.training import pooled_backbone_stats

    members = []
    for m in args.member:
        try:
            members.append(create_model(m, with_semantic=False))
        except (FileNotFoundError, KeyError) as e:  # neither a checkpoint directory nor a registered name
            raise EnsembleError(f"--member {m}: {e.args[0] if e.args else e}") from None
    check_members(members)  # before the probe's minutes of backbone features
    out = {"members": [m.model_id for m in members]}
    probe, roles = None, [member_roles(checkpoint_dir(m)) for m in args.member]
    if args.probe:
        df = load_dataset(args.dataset, args.data_root, args.labels)
        if args.split_file:
            s = pd.read_csv(args.split_file, dtype={"image_id": str})[["image_id", "split"]]
            df = df.drop(columns="split").merge(s, on="image_id", how="inner")
        train = df[df["split"].isin(["train", "val"] if args.fit_on == "train+val" else ["train"])].reset_index(drop=True)
        x, y = pooled_backbone_stats(members[0], train, args.cache_dir), train["mos"].to_numpy()
        roles.append(pd.DataFrame({"image_id": train["image_id"], "split": "train"}))
        if args.probe_alpha is not None:
            probe, alpha = fit_ridge(x, y, args.probe_alpha), args.probe_alpha
        else:
            val = df[df["split"] == "val"].reset_index(drop=True)
            probe, alpha = fit_probe(x, y, pooled_backbone_stats(members[0], val, args.cache_dir), val["mos"].to_numpy())
            roles.append(pd.DataFrame({"image_id": val["image_id"], "split": "val"}))
        out.update({"probe_alpha": alpha, "probe_fitted_on": len(train)})
    model = assemble_ensemble(members, probe, args.probe_weight, args.name)
    model.save_pretrained(args.output)
    known = [r for r in roles if r is not None]
    if len(known) == len(roles):  # every part's rows known: the ensemble's split.csv, for jobs.evaluate's note
        merged = pd.concat(known, ignore_index=True)
        merged["split"] = pd.Categorical(merged["split"], ["train", "val"], ordered=True)
        merged.sort_values("split").drop_duplicates("image_id").to_csv(Path(args.output) / "split.csv", index=False)
    out.update({"output": args.output, "model": model.model_id, "heads": len(members)})
    return out


def member_roles(directory):
    """A member's rows that trained it (train) or chose its epoch (val), from its split.csv (its test rows
    played no role); None where it has none."""
    import pandas as pd

    if directory is None or not (directory / "split.csv").is_file():
        return None
    parts = pd.read_csv(directory / "split.csv", dtype={"image_id": str})
    return parts[parts["split"].isin(["train", "val"])]


def main(argv=None) -> int:
    from ma_agiqa.model import EnsembleError

    try:
        out = run(parse_args(argv))
    except EnsembleError as e:  # members that cannot make one ensemble: one line, exit 2, as argparse's refusals
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
