"""The attribute stage as a Prefect task: a model and a dataset in, a finished attribution store out.

- `attribute_responses(model, dataset_dir, settings, extraction, work_dir, cache_dir)`:
  `sparcom.attribution.stage.attribute_dataset`, cached on the store's own attribution key, with
  a progress artifact.
"""

from pathlib import Path

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from sparcom.attribution.keys import planned_attribution_key
from sparcom.attribution.settings import AttributionSettings
from sparcom.attribution.stage import attribute_dataset
from sparcom.core.settings import DaskSettings
from sparcom.extraction.settings import ExtractionSettings, ModelSettings
from tasks.caching import cached


@task(name="attribute response losses", **cached(
    lambda model, dataset_dir, settings, extraction, work_dir, cache_dir, dask: (
        planned_attribution_key(model, dataset_dir, settings, extraction, cache_dir), str(Path(work_dir).resolve()))))
def attribute_responses(
    model: ModelSettings, dataset_dir: Path, settings: AttributionSettings, extraction: ExtractionSettings,
    work_dir: Path, cache_dir: Path, dask: DaskSettings = DaskSettings(),
) -> Path:
    """Where the shards run never changes the estimates beyond rounding, so it is not part of the key."""
    artifact = create_progress_artifact(0.0, description=f"Attributing response losses of {model.name}")

    def report(done: int, total: int) -> None:
        update_progress_artifact(artifact, 100.0 * done / total)

    store = attribute_dataset(model, dataset_dir, settings, extraction, Path(work_dir) / "attributions", cache_dir,
                              report, dask)
    update_progress_artifact(artifact, 100.0)
    return store
