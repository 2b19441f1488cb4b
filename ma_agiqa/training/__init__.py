"""Training and prediction on a labelled frame (see datasets.py), with the frozen parts computed once.

- ``features``: the frozen inputs (backbone maps, MLLM vectors, prompt embeddings), cached (``cache``:
  entries published whole, safe under concurrent writers and kills);
- ``loss``: the training loss;
- ``loop``: batches, steps, the epoch kept, resumable state; prediction;
- ``distributed``: the same loop data-parallel, torch DDP on Ray Train workers.
"""
from .features import (
    Inputs, backbone_features, backbone_key, pooled_backbone_stats, prepare, prompt_features, semantic_features,
)
from .loop import (
    TERMS_ADDED_SINCE_STATES, batch_coupled, check_data_parallel, forward_precision, forward_rows, predict,
    prompt_dropout, run_key, train,
)
from .distributed import train_distributed
from .loss import training_loss


__all__ = [
    "Inputs", "TERMS_ADDED_SINCE_STATES", "backbone_features", "backbone_key", "batch_coupled",
    "check_data_parallel", "forward_precision", "forward_rows", "pooled_backbone_stats", "predict", "prepare", "prompt_dropout",
    "prompt_features", "run_key", "semantic_features", "train", "train_distributed", "training_loss",
]
