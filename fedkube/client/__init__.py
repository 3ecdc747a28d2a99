"""The model owner's side: a Python client of the director, and its terminal renderings.

    from fedkube.client import DirectorClient, experiment_archive
"""

from fedkube.client.director_client import (
    DirectorClient,
    EnvoyView,
    ExperimentView,
    Metric,
    experiment_archive,
)

__all__ = ["DirectorClient", "EnvoyView", "ExperimentView", "Metric", "experiment_archive"]
