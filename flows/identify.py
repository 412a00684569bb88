"""Identification on its own: a count store in, components and their generality analysis out,
computed on a Dask cluster (a local one sized to the machine, or the scheduler at `dask.address`),
opened only when a stage computes."""

from pathlib import Path

from prefect import flow, get_run_logger

from sparcom.core.cluster import dask_cluster_on_demand
from sparcom.core.settings import DaskSettings
from sparcom.identification.settings import IdentificationSettings
from tasks.caching import Stage, refreshed
from tasks.generality import analyze_generality
from tasks.identification import select_components


@flow(name="sparcom-identify")
def identify_components(
    store: Path,
    out_dir: Path,
    settings: IdentificationSettings = IdentificationSettings(),
    dask: DaskSettings = DaskSettings(),
    refresh: list[Stage] = [],  # noqa: B006
    artifact_prefix: str = "sparcom",
) -> dict:
    def started(client) -> None:
        get_run_logger().info("Dask scheduler %s, %d workers", client.scheduler.address,
                              len(client.scheduler_info()["workers"]))

    # Started by the first computation: a rerun whose two stages are cache hits starts no cluster.
    with dask_cluster_on_demand(dask, started):
        components = refreshed(select_components, "identify", refresh)(store, settings, out_dir)
        summary = refreshed(analyze_generality, "analyse", refresh)(components, out_dir, artifact_prefix)
    get_run_logger().info("Components and their analysis are in %s", out_dir)
    return summary
