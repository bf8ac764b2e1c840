"""Lineage: the data a run trained and was scored on, as MLflow datasets (the runs table's
Dataset column), named by the data folder and split, with the feature cache key as digest."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

# MLflow's context tag values, as ``mlflow.log_input(..., context=...)`` writes them
CONTEXTS = {"train": "training", "validation": "validation", "test": "test"}
DIGEST_CHARS = 16  # the cache key's start, as the cache entry's folder name shows it


def dataset_inputs(
    data_dir: str, cache_key: str, sizes: Mapping[str, int], splits: tuple[str, ...]
) -> list[Any]:
    """One ``DatasetInput`` per split of ``splits`` that holds images: name ``<folder>/<split>``,
    digest the cache key's first :data:`DIGEST_CHARS` hex digits (MLflow keeps 36), source the
    data folder, profile the number of images, context tag training / validation / test."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    folder = os.path.basename(os.path.normpath(data_dir)) or data_dir
    out = []
    for split in splits:
        n = int(sizes.get(split, 0))
        if not n:
            continue
        ds = Dataset(
            name=f"{folder}/{split}",
            digest=cache_key[:DIGEST_CHARS],
            source_type="local",
            source=json.dumps({"uri": str(data_dir)}),
            profile=json.dumps({"num_rows": n}),
        )
        out.append(DatasetInput(ds, [InputTag(MLFLOW_DATASET_CONTEXT, CONTEXTS[split])]))
    return out


def log_trial_inputs(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """A trial's training and validation data, from the parameters it logs (``cache_key``,
    ``data_dir``, ``train_size``, ``validation_size``); nothing when they are missing."""
    if not params.get("cache_key") or not params.get("data_dir"):
        return
    sizes = {s: params.get(f"{s}_size", 0) for s in ("train", "validation")}
    inputs = dataset_inputs(
        str(params["data_dir"]), str(params["cache_key"]), sizes, ("train", "validation")
    )
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
