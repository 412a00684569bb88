"""The ablation on its own: a finished identification folder in (its components and the count
store they came from), each group's components switched off on held-out records, figures out."""

from pathlib import Path

from prefect import flow, get_run_logger

from sparcom.ablation.ablate import components_in, find_store
from sparcom.ablation.schema import ABLATION
from sparcom.ablation.settings import AblationSettings
from sparcom.core.settings import DaskSettings, default_cache_dir
from sparcom.extraction.settings import ExtractionSettings
from tasks.ablation import measure_ablation
from tasks.caching import Stage, refreshed


@flow(name="sparcom-ablate")
def ablate(
    components: Path,
    out_dir: Path,
    store: Path | None = None,
    settings: AblationSettings = AblationSettings(),
    extraction: ExtractionSettings = ExtractionSettings(),
    cache_dir: Path = default_cache_dir(),
    refresh: list[Stage] = [],  # noqa: B006
    dask: DaskSettings | None = None,
) -> dict:
    """`components`: a run folder or its components.zarr; `store`: none finds it beside the run;
    `dask`: the cluster the passes run on (none: this process)."""
    components = components_in(components)
    summary = refreshed(measure_ablation, "ablate", refresh)(
        components, store or find_store(components), settings, extraction, cache_dir, out_dir, dask=dask)
    get_run_logger().info("Ablation is in %s", Path(out_dir) / ABLATION)
    return summary
