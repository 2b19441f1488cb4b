"""Scoring as a library call: a ScoreRequest in, the run's summary out (``jobs.score`` is its command line).

The modules follow the run's data flow: ``request`` (the options) -> ``model_ref`` (the model, resolved once)
-> ``plan`` (the input's rows, the JobSpec) -> ``layout`` (actors on the cluster) -> ``steps`` (the Ray Data
steps) -> ``run`` (``score``: the wiring and the summary).
"""
from ..errors import JobConfigError
from ..manifests import ManifestError
from .request import ScoreRequest
from .run import SUMMARY_FILE, score

__all__ = ["JobConfigError", "ManifestError", "SUMMARY_FILE", "ScoreRequest", "score"]
