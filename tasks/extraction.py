"""The extract stage as a Prefect task: a model and a dataset in, a finished count store out.

- `extract_activations(model, dataset_dir, settings, work_dir, cache_dir)`:
  `sparcom.extraction.extract.extract_dataset`, cached on the store's own extraction key, with a progress
  artifact.
"""

from pathlib import Path

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from sparcom.core.settings import DaskSettings
from sparcom.extraction.keys import planned_extraction_key
from sparcom.extraction.settings import ExtractionSettings, ModelSettings
from sparcom.extraction.stage import extract_dataset
from tasks.caching import cached


@task(name="extract activation counts", **cached(lambda model, dataset_dir, settings, work_dir, cache_dir, dask: (
    planned_extraction_key(model, dataset_dir, settings, cache_dir), str(Path(work_dir).resolve()))))
def extract_activations(
    model: ModelSettings, dataset_dir: Path, settings: ExtractionSettings, work_dir: Path, cache_dir: Path,
    dask: DaskSettings = DaskSettings(),
) -> Path:
    """Counts on the cluster the `dask` settings choose (or in this process); where the shards
    run never changes the counts, so it is not part of the cache key."""
    artifact = create_progress_artifact(0.0, description=f"Counting FFN activations of {model.name}")

    def report(done: int, total: int) -> None:  # called per instruction here, per shard on a cluster
        update_progress_artifact(artifact, 100.0 * done / total)

    store = extract_dataset(model, dataset_dir, settings, Path(work_dir) / "stores", cache_dir, report, dask)
    update_progress_artifact(artifact, 100.0)
    return store
