"""The ablation's passes on a Dask cluster: one pass a task, each worker's model loaded once.

- `cluster_model(client, model, extraction, cache_dir, resources)`: (fingerprint, dtype, workers):
  the model loaded on every worker that offers `resources` (`sparcom.extraction.distributed`'s
  per-worker model, shared with extraction); refused when workers load it differently.
- `passes_on_cluster(client, model, extraction, cache_dir, inputs, passes, resources, on_finished)`:
  every pass (key -> `AblationPass`) as a task of its own, `on_finished(key, values)` called in
  the client as each one ends. A pass uses its worker's whole model (hooks, zeroed gate rows),
  so a worker runs one pass at a time whatever its threads (`held_model`); tasks are handed to
  whichever worker is free, so all stay busy to the end. A task whose worker is lost is rerun
  elsewhere (the inputs are on every worker); one that fails cancels the others.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from distributed import Client, as_completed

from sparcom.ablation.passes import AblationPass, PassInputs, Prepared, measure_pass, prepared
from sparcom.core.hashing import content_hash
from sparcom.extraction.distributed import ClusterError, held_model, load_on_workers, offering_workers
from sparcom.extraction.settings import ExtractionSettings, ModelSettings

TASK_PREFIX = "sparcom-ablation-pass-"

# The tokenized records of the last inputs, per worker process: every pass of a stage reads them.
_ready: dict[str, Prepared] = {}


def cluster_model(client: Client, model: ModelSettings, extraction: ExtractionSettings, cache_dir: Path,
                  resources: dict[str, float]) -> tuple[str, str, int]:
    workers = offering_workers(client, resources)
    loads = load_on_workers(client, model, extraction, Path(cache_dir), workers)
    kinds = {(load["fingerprint"], str(load["dtype"])) for load in loads}
    if len(kinds) > 1:  # e.g. bfloat16 on GPU workers beside float32 on CPU ones: passes would mix
        raise ClusterError(f"workers load the model differently (fingerprint, dtype): {sorted(kinds)}; "
                           "set extraction.dtype, or restrict the tasks with dask.shard_resources")
    fingerprint, dtype = kinds.pop()
    return fingerprint, dtype, len(workers)


def _measure(model: ModelSettings, extraction: ExtractionSettings, cache_dir: Path, inputs: PassInputs,
             ablation_pass: AblationPass) -> np.ndarray:
    with held_model(model, extraction, cache_dir) as loaded:
        key = content_hash(model, extraction.dtype, inputs.digest())
        if key not in _ready:
            _ready.clear()
            _ready[key] = prepared(inputs, loaded.tokenizer)
        return measure_pass(loaded, ablation_pass, _ready[key], inputs)


def passes_on_cluster(client: Client, model: ModelSettings, extraction: ExtractionSettings, cache_dir: Path,
                      inputs: PassInputs, passes: Mapping[str, AblationPass], resources: dict[str, float],
                      on_finished: Callable[[str, np.ndarray], None]) -> None:
    shared = client.scatter(inputs, broadcast=True, hash=False)  # a lost worker loses no input
    futures = {client.submit(_measure, model, extraction, Path(cache_dir), shared, ablation_pass,
                             resources=resources or None, pure=False, key=f"{TASK_PREFIX}{key[:16]}"): key
               for key, ablation_pass in passes.items()}
    try:
        for future in as_completed(futures):
            on_finished(futures[future], future.result())
    except BaseException:
        client.cancel(list(futures))
        raise
