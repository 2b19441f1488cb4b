"""The model a scoring run names, resolved once in the driver: its config, where its checkpoint lies, whether
its heads were trained, and (only when asked) its id. Read from files, never built: no torch here. A
checkpoint on object storage is read no further than its config, small files and weights header."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..checkpoint import (NeedsWeights, checkpoint_dir, fetch_checkpoint, fetch_checkpoint_head, load_config,
                          model_id_of, read_config, trained_at, untrained_message)
from ..config import ModelConfig
from ..errors import JobConfigError
from ..uris import is_remote, redact, redact_text

log = logging.getLogger("ma_agiqa.scoring")


@dataclass(frozen=True)
class ResolvedModel:
    """One model reference, resolved. ``ref`` is what the workers load (a remote checkpoint is fetched whole
    once per node); ``directory`` is the driver's local copy of its checkpoint (of a remote one, only what
    the driver reads: ``checkpoint.fetch_checkpoint_head``), None for a registered config without shipped
    weights."""

    ref: str
    config: ModelConfig
    directory: Path | None
    trained: bool

    @cached_property
    def model_id(self) -> str:
        """What this model's score rows say in their ``model`` column (``checkpoint.model_id``). Worked out on
        first use only: it hashes the weights (a remote checkpoint's header records their hash; one saved
        before it did is fetched whole here), and a first run never needs it before its rows name it."""
        try:
            return model_id_of(self.config, self.directory)
        except NeedsWeights:
            log.info(f"--model {redact(self.ref)}: its header records no weights hash (an older checkpoint): fetching it whole")
            full = remote_read(self.ref, fetch_checkpoint)
            return model_id_of(read_config(full), full)

    def check(self, allow_untrained: bool) -> None:
        """The checks a run makes of its model before Ray starts, cheapest first: untrained heads (from the
        files at hand, no network), then the MLLM's config on its hub (its width sizes the job), whose
        absence is one JobConfigError naming the way out."""
        self.refuse_untrained(allow_untrained)
        if self.config.semantic is not None:
            self.config.semantic.hidden_size  # noqa: B018 - read (and kept) now, not in the JobSpec

    def refuse_untrained(self, allowed: bool) -> None:
        """Scores of heads never trained mean nothing: refused unless ``allowed`` (smoke runs, tests)."""
        if not allowed and not self.trained:
            raise JobConfigError(untrained_message(self.ref))


def remote_read(ref: str, read):
    """``read(ref)`` of a checkpoint on object storage, any failure to reach it (no credentials, no bucket,
    endpoint down) a one-line JobConfigError."""
    try:
        return read(ref)
    except KeyError as e:
        raise JobConfigError(f"--model {redact(ref)}: {e.args[0]}") from None
    except Exception as e:  # noqa: BLE001 - botocore, aiohttp and fsspec errors share no base class
        reason = (redact_text(str(e)).strip().splitlines() or [""])[0][:300]
        raise JobConfigError(
            f"--model {redact(ref)}: the checkpoint cannot be read ({type(e).__name__}: {reason}); check the "
            "store's credentials (AWS_* variables), the bucket and path, and the endpoint (--s3-endpoint)"
        ) from None


def resolve_model(ref: str) -> ResolvedModel:
    """A registered name, a local checkpoint directory or one on object storage -> ResolvedModel; anything
    else is a JobConfigError. Reads the config and the weights file's metadata, nothing more."""
    if is_remote(ref):
        directory = remote_read(str(ref), fetch_checkpoint_head)
        return ResolvedModel(str(ref), read_config(directory), directory, trained_at(directory))
    try:
        directory = checkpoint_dir(ref)
        config = read_config(directory) if directory is not None else load_config(ref)
    except KeyError as e:  # neither a checkpoint directory nor a registered name
        raise JobConfigError(f"--model {ref}: {e.args[0]}") from None
    return ResolvedModel(str(ref), config, directory, trained_at(directory))
