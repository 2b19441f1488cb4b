"""Training runs as ``jobs.train`` asks for them: the split (label, seeded, reference, a generator held
out, a split file), the config's fields set from the options, a run resumed or found finished, and repeats or
one run per generator summarised. ``run_training(args)`` takes jobs.train's parsed options."""
from __future__ import annotations

import copy
import json
import os
import statistics
import sys
from pathlib import Path

import pandas as pd


class TrainingRunError(ValueError):
    """Options that cannot make a run: jobs.train stops with its message."""


def split_scheme(args) -> str:
    if args.test_generator is not None:
        return f"generator:{args.test_generator}"
    if args.split is not None:
        return args.split
    if args.split_file:
        return "label"
    return "random" if args.split_seed is not None or args.repeats > 1 else "label"


def splits(args, df: pd.DataFrame, repeat: int):
    """(train, val, test); test is empty where the split has no test part."""
    from ma_agiqa.datasets import REFERENCE_SPLIT_SEED, generator_split, reference_split, split_three

    scheme = split_scheme(args)
    if args.test_generator is not None:
        try:
            return generator_split(df, args.test_generator, args.split_seed or 0, args.val_fraction)
        except ValueError as e:
            raise TrainingRunError(f"--test-generator {e}")
    if scheme == "all":  # the shipped weights' run: every labelled image trains, for a fixed epoch count
        return df, df.iloc[:0], df.iloc[:0]
    if args.test_fraction and scheme != "random":
        raise TrainingRunError("--test-fraction applies to --split random (the reference split has its own 20 % test)")
    if args.split_file:
        s = pd.read_csv(args.split_file, dtype={"image_id": str})[["image_id", "split"]]
        df = df.drop(columns="split").merge(s, on="image_id", how="inner")
    if scheme == "reference":
        return reference_split(df, (REFERENCE_SPLIT_SEED if args.split_seed is None else args.split_seed) + repeat)
    if scheme == "label":
        return split_three(df)
    return split_three(df, (args.split_seed or 0) + repeat, args.split_by_prompt, args.val_fraction, args.test_fraction)


def _set_field(obj, path: list[str], value, full: str):
    import dataclasses

    names = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
    if path[0] not in names:
        raise TrainingRunError(f"--set {full}: {type(obj).__name__} has no field {path[0]!r}")
    current = getattr(obj, path[0])
    if len(path) > 1:
        value = _set_field(current, path[1:], value, full)
    elif isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return dataclasses.replace(obj, **{path[0]: value})


# The command line's options that set a TrainConfig field of the same name.
TRAIN_OPTIONS = ("backbone_lr", "epochs", "lr", "seed", "batch_size", "scheduler", "t_max", "warmup_epochs",
                 "normalize_mos", "drop_prompt", "plcc_loss", "rank_loss", "precision")


def apply_train_args(t, args):
    """``t`` (a TrainConfig) with the command line's training options on top (an option not given, None,
    keeps the config's value; 0 is a value); returns it."""
    for name in TRAIN_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            setattr(t, name, value)
    return t


def trained_config(model: str):
    """The config a run with ``--model`` trains: a registered name's registry entry (a run starts from scratch,
    whatever checkpoint ships under that name, and the recipe may have changed since it shipped), a
    checkpoint directory's own (fine-tuned)."""
    from ma_agiqa.checkpoint import directory_of, read_config
    from ma_agiqa.registry import get_config

    directory = directory_of(model)
    return read_config(directory) if directory is not None else get_config(model)


def is_registered(model: str) -> bool:
    from ma_agiqa.checkpoint import directory_of
    from ma_agiqa.registry import list_models

    return directory_of(model) is None and str(model) in list_models()


def config_overrides(args) -> dict:
    """The quality and MoE configs that --backbone and --set change, as create_model overrides."""
    import dataclasses
    import json as _json

    stages = getattr(args, "trainable_stages", None)
    if args.backbone == "config" and not args.set and stages is None:
        return {}
    cfg = trained_config(args.model)
    parts = {"quality": cfg.quality, "moe": cfg.moe, "ensemble": cfg.ensemble}
    if args.backbone != "config":
        parts["quality"] = dataclasses.replace(parts["quality"], freeze_backbone=args.backbone == "frozen")
    if stages is not None:
        if args.backbone == "trainable":
            raise TrainingRunError("--trainable-stages is for a frozen backbone: --backbone trainable trains every stage")
        try:
            parts["quality"] = dataclasses.replace(parts["quality"], freeze_backbone=True, trainable_stages=stages)
        except ValueError as e:
            raise TrainingRunError(f"--trainable-stages {stages}: {e}")
    for item in args.set:
        path, eq, text = item.partition("=")
        if not eq or path.split(".")[0] not in parts or "." not in path:
            raise TrainingRunError(f"--set {item!r}: expected quality.FIELD=VALUE, moe.FIELD=VALUE or ensemble.FIELD=VALUE")
        try:
            value = _json.loads(text)
        except ValueError:
            value = text
        top, *rest = path.split(".")
        try:
            parts[top] = _set_field(parts[top], rest, value, item)
        except (TypeError, ValueError) as e:
            raise TrainingRunError(f"--set {item}: {e}") from None
    return {k: v for k, v in parts.items() if v is not getattr(cfg, k)}


# Options that change how a run is shown or where its inputs are cached, not what it trains.
NOT_SETTINGS = ("progress", "address", "cache_dir")


def run_settings(args) -> dict:
    """What a finished run records of how it was made; a run with the same settings is not trained again."""
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}, default=str))


def finished_run(output: Path, settings: dict) -> dict | None:
    """The metrics of a run that finished in ``output`` with these settings, else None."""
    try:
        saved = json.loads((output / "train_config.json").read_text())
        metrics = json.loads((output / "metrics.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    # Where a run was written is not how it was made: a moved run, or `--test-generator G` trained into an
    # `--each-generator` run's generator-G folder (so its ten runs can be spread over processes), is the same run.
    if (output / STATE_FILE).exists() or _how(saved) != _how(settings):
        return None
    return metrics


def _how(settings: dict) -> dict:
    # An option not given (None) is the config's default, as it was before the option existed.
    return {k: v for k, v in settings.items() if k not in ("train", "output") and v is not None}


STATE_FILE = "train_state.pt"


def train_once(args, df, output: Path, repeat: int = 0) -> dict:
    import torch

    from ma_agiqa import create_model
    from ma_agiqa.training import prepare, train

    settings = run_settings(args)
    done = finished_run(output, settings)
    if done is not None:
        print(f"{output}: trained already with these settings (delete its metrics.json to train again)", file=sys.stderr)
        return done
    output.mkdir(parents=True, exist_ok=True)
    log_file = output / "train.log"

    def log(line: str) -> None:
        print(line, flush=True)
        with open(log_file, "a") as f:
            f.write(line + "\n")

    train_df, val_df, test_df = splits(args, df, repeat)
    if args.limit:
        train_df, val_df, test_df = train_df.head(args.limit), val_df.head(args.limit), test_df.head(args.limit)
    torch.manual_seed(0)
    # A registered name trains from scratch, even where trained heads ship with it; a directory fine-tunes.
    overrides = config_overrides(args)
    try:
        model = create_model(args.model, with_semantic=False, shipped=False, **overrides)
    except ValueError as e:  # a checkpoint that --set or --backbone reshapes, or a config they make invalid
        raise TrainingRunError(str(e) if str(args.model) in str(e) else f"--model {args.model}: {e}") from None
    if model.cfg.ensemble.heads > 1 or model.cfg.ensemble.probe:
        return train_ensemble(args, df, output, repeat, model.cfg, settings, log)
    t = apply_train_args(model.cfg.train, args)
    train_in, stats_train = prepare(model, args.model, train_df, args.cache_dir, args.address)
    val_in, stats_val = prepare(model, args.model, val_df, args.cache_dir, args.address) if len(val_df) else (None, {})
    test_in, stats_test = prepare(model, args.model, test_df, args.cache_dir, args.address) if len(test_df) else (None, {})
    if args.workers > 1:
        import ray

        from ma_agiqa.training import train_distributed

        ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "local", ignore_reinit_error=True)
        result = train_distributed(args.model, vars(t), train_in, val_in, output, args.workers, use_gpu=bool(args.gpu),
                                   model_overrides=overrides)
        from ma_agiqa.checkpoint import model_id

        checkpoint = model_id(output)
    else:
        gpu = torch.cuda.is_available() if args.gpu is None else args.gpu
        model.to("cuda" if gpu else "cpu")
        result = train(model, train_in, val_in, log=log, state_path=output / STATE_FILE, progress=args.progress)
        model.save_pretrained(output)
        checkpoint = model.model_id
    test = None
    if test_in is not None:  # scored once, with the weights of the epoch that val chose
        from ma_agiqa.metrics import iqa_metrics
        from ma_agiqa.training import predict

        scorer = model if args.workers == 1 else create_model(str(output), with_semantic=False)
        test = {**iqa_metrics(predict(scorer, test_in), test_in.mos), "epoch": result["best_epoch"]}
    from ma_agiqa.datasets import split_table

    split_table(train_df, val_df, test_df).to_csv(output / "split.csv", index=False)
    metrics = {
        "dataset": args.dataset, "model": args.model, "checkpoint": checkpoint, "workers": args.workers,
        "split": split_scheme(args), "n_train": len(train_df), "n_val": len(val_df), "n_test": len(test_df),
        "test": test, "cache": {"train": stats_train, "val": stats_val, "test": stats_test}, **result,
    }
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (output / "train_config.json").write_text(json.dumps({**settings, "train": vars(t)}, indent=2, default=str) + "\n")
    (output / STATE_FILE).unlink(missing_ok=True)  # finished: the checkpoint and metrics.json say the rest
    return metrics


def check_ensemble(args, ensemble, frozen: bool, scheme: str) -> None:
    """Before any head trains: what an ensemble run needs."""
    if not ensemble.heads > 1 and not ensemble.probe:
        return
    if not frozen:
        raise TrainingRunError("an ensemble's heads and probe read one frozen backbone's maps: --backbone frozen, "
                               "no --trainable-stages")
    if ensemble.probe and scheme == "all" and args.probe_alpha is None:
        raise TrainingRunError("--split all leaves no val rows to choose the probe's ridge strength on: "
                               "give --probe-alpha (the split runs' choice)")


def train_ensemble(args, df, output: Path, repeat: int, cfg, settings: dict, log) -> dict:
    """A config with ``ensemble`` set, trained as its parts are: each head a run of its own on the same split
    (the config without the ensemble, seeds S, S + 1, ...: ``output/head-K``, each resumable and reused once
    finished), then the probe fitted on the train rows (its ridge strength chosen on val, or
    ``--probe-alpha``), all assembled into one checkpoint in ``output`` and scored on val and test once."""
    from ma_agiqa import create_model
    from ma_agiqa.datasets import split_table
    from ma_agiqa.ensemble import fit_probe, fit_ridge
    from ma_agiqa.metrics import iqa_metrics
    from ma_agiqa.model import assemble_ensemble
    from ma_agiqa.training import pooled_backbone_stats, predict, prepare

    ens = cfg.ensemble
    check_ensemble(args, ens, cfg.quality.freeze_backbone and not cfg.quality.trainable_stages, split_scheme(args))
    seed = cfg.train.seed if args.seed is None else args.seed
    # A head's settings leave out the ensemble's own (K, the probe): the same output trained again with another
    # K reuses the heads it finished.
    head_set = [item for item in args.set if not item.startswith("ensemble.")] + ["ensemble.heads=1", "ensemble.probe=false"]
    heads = []
    for k in range(ens.heads):
        one = copy.copy(args)
        one.set, one.seed, one.probe_alpha = head_set, seed + k, None
        heads.append(train_once(one, df, output / f"head-{k}", repeat))
    members = [create_model(str(output / f"head-{k}"), with_semantic=False) for k in range(ens.heads)]
    train_df, val_df, test_df = splits(args, df, repeat)
    if args.limit:
        train_df, val_df, test_df = train_df.head(args.limit), val_df.head(args.limit), test_df.head(args.limit)
    probe = alpha = None
    if ens.probe:
        x, y = pooled_backbone_stats(members[0], train_df, args.cache_dir), train_df["mos"].to_numpy()
        if args.probe_alpha is not None:
            probe, alpha = fit_ridge(x, y, args.probe_alpha), args.probe_alpha
        else:
            probe, alpha = fit_probe(x, y, pooled_backbone_stats(members[0], val_df, args.cache_dir), val_df["mos"].to_numpy())
    model = assemble_ensemble(members, probe, ens.probe_weight, cfg.name)
    model.save_pretrained(output)

    def scored(part):
        if not len(part):
            return None
        inputs, _ = prepare(model, args.model, part, args.cache_dir, args.address)
        return iqa_metrics(predict(model, inputs), inputs.mos)

    val, test = scored(val_df), scored(test_df)
    best = {f"val_{k}": (val or {}).get(k) for k in ("srcc", "plcc", "krcc", "rmse")}
    log(json.dumps({"ensemble": {"heads": ens.heads, "probe_alpha": alpha}, **best}))
    split_table(train_df, val_df, test_df).to_csv(output / "split.csv", index=False)
    metrics = {
        "dataset": args.dataset, "model": args.model, "checkpoint": model.model_id, "workers": args.workers,
        "split": split_scheme(args), "n_train": len(train_df), "n_val": len(val_df), "n_test": len(test_df),
        "test": test, "best": best, "probe_alpha": alpha,
        "heads": [{"seed": seed + k, "best_epoch": h["best_epoch"], **h["best"], "test": h["test"]} for k, h in enumerate(heads)],
    }
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    # the heads' training settings (one config, seeds S, S + 1, ...), as a single run's train_config.json has them
    train = json.loads((output / "head-0" / "train_config.json").read_text())["train"]
    (output / "train_config.json").write_text(json.dumps({**settings, "train": train}, indent=2, default=str) + "\n")
    return metrics


def summarise(runs: list[dict]) -> dict:
    keys = ["val_srcc", "val_plcc"] + (["test_srcc", "test_plcc", "test_krcc", "test_rmse"] if "test_srcc" in runs[0] else [])
    return {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                "max": max(r[k] for r in runs)} for k in keys}


def flat(m: dict) -> dict:
    return {**m["best"], **{f"test_{key}": v for key, v in (m["test"] or {}).items() if key != "epoch"}}


def run_training(args) -> dict:
    """Trains as the options say (one run, K repeats or one run per generator) into ``args.output`` and returns
    what jobs.train prints; a TrainingRunError for options that cannot make a run."""
    from ..datasets import load_dataset

    if sum([args.repeats > 1, args.test_generator is not None, args.each_generator]) > 1:
        raise TrainingRunError("--repeats, --test-generator and --each-generator choose the split each their own way: "
                               "use one of them")
    if args.split == "all" and (args.repeats > 1 or args.split_file or args.split_seed is not None or args.test_fraction
                                or args.split_by_prompt):
        raise TrainingRunError("--split all trains on every labelled image, one split: drop --repeats, --split-file, "
                               "--split-seed, --test-fraction and --split-by-prompt (vary --seed for runs that differ)")
    if (args.test_generator is not None or args.each_generator) and (args.split or args.split_file or args.test_fraction):
        raise TrainingRunError("--test-generator and --each-generator make their own split (the generator's images as "
                               "test, --val-fraction of the others' as val): drop --split, --split-file and --test-fraction")
    if args.workers > 1:
        from ..model import create_model
        from .loop import check_data_parallel

        try:  # before the data is read: its features take minutes
            model = create_model(args.model, with_semantic=False, shipped=False, **config_overrides(args))
            check_data_parallel(model, apply_train_args(model.cfg.train, args), args.workers)
        except ValueError as e:
            raise TrainingRunError(str(e) if str(args.model) in str(e) else f"--model {args.model}: {e}") from None
    overrides, base = config_overrides(args), trained_config(args.model)
    if (base.ensemble.heads > 1 or base.ensemble.probe) and not is_registered(args.model):
        raise TrainingRunError(f"--model {args.model} is an ensemble checkpoint ({base.ensemble.heads} head(s)"
                               f"{', a probe' if base.ensemble.probe else ''}): it is not fine-tuned as a whole; "
                               "give one of its head-K runs, or the registered name to train the recipe anew")
    quality = overrides.get("quality", base.quality)
    check_ensemble(args, overrides.get("ensemble", base.ensemble), quality.freeze_backbone and not quality.trainable_stages,
                   split_scheme(args))
    df = load_dataset(args.dataset, args.data_root, args.labels, args.target)
    output = Path(args.output)
    if args.each_generator:
        generators = sorted(df["generator"].dropna().unique())
        if len(generators) < 2:
            raise TrainingRunError("--each-generator needs a dataset with at least two generators")
        runs = {}
        for g in generators:
            one = copy.copy(args)
            one.each_generator, one.test_generator = False, g
            runs[g] = flat(train_once(one, df, output / f"generator-{g}"))
        summary = summarise(list(runs.values()))
        (output / "metrics.json").write_text(json.dumps({"by_generator": runs, "summary": summary}, indent=2) + "\n")
        return {"by_generator": {g: {k: r[k] for k in ("test_srcc", "test_plcc")} for g, r in runs.items()},
                "summary": summary}
    if args.repeats == 1:
        m = train_once(args, df, output)
        return {"best": m["best"], "test": m["test"], "checkpoint": str(output)}
    runs = [flat(train_once(args, df, output / f"repeat-{k}", k)) for k in range(args.repeats)]
    summary = summarise(runs)
    (output / "metrics.json").write_text(json.dumps({"repeats": runs, "summary": summary}, indent=2) + "\n")
    return summary
