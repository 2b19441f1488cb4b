"""The model a scoring run names, resolved once in the driver: its config, where its checkpoint lies, whether
its heads were trained, and (only when asked) its id. Read from files, never built: no torch here."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..checkpoint import checkpoint_dir, load_config, model_id_of, read_config, trained_at, untrained_message
from ..config import ModelConfig
from ..errors import JobConfigError


@dataclass(frozen=True)
class ResolvedModel:
    """One model reference, resolved. ``ref`` is what the workers load (a remote checkpoint is fetched once
    per node); ``directory`` is the driver's local copy of its checkpoint, None for a registered config
    without shipped weights."""

    ref: str
    config: ModelConfig
    directory: Path | None
    trained: bool

    @cached_property
    def model_id(self) -> str:
        """What this model's score rows say in their ``model`` column (``checkpoint.model_id``). Worked out on
        first use only: it hashes the weights, and a first run never needs it before its rows name it."""
        return model_id_of(self.config, self.directory)

    def refuse_untrained(self, allowed: bool) -> None:
        """Scores of heads never trained mean nothing: refused unless ``allowed`` (smoke runs, tests)."""
        if not allowed and not self.trained:
            raise JobConfigError(untrained_message(self.ref))


def resolve_model(ref: str) -> ResolvedModel:
    """A registered name, a local checkpoint directory or one on object storage (fetched into the node's
    cache) -> ResolvedModel; anything else is a JobConfigError. Reads the config and the weights file's
    metadata, nothing more."""
    try:
        directory = checkpoint_dir(ref)
        config = read_config(directory) if directory is not None else load_config(ref)
    except KeyError as e:  # neither a checkpoint directory nor a registered name
        raise JobConfigError(f"--model {ref}: {e.args[0]}") from None
    return ResolvedModel(str(ref), config, directory, trained_at(directory))
