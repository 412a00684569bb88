"""Identification on its own: a count store in, components and their generality analysis out,
computed on a Dask cluster (a local one sized to the machine, or the scheduler at `dask.address`),
opened only when a stage computes. With several rules (`settings.rules`), one pass selects with
each and each rule's run is analysed in its own folder."""

from pathlib import Path

from prefect import flow, get_run_logger

from sparcom.core.cluster import dask_cluster_on_demand
from sparcom.core.settings import DaskSettings
from sparcom.identification.identify import rule_dirs
from sparcom.identification.settings import IdentificationSettings
from tasks.caching import Stage, refreshed
from tasks.generality import analyze_generality
from tasks.identification import select_components


def artifact_prefixes(prefix: str, rules: list[str]) -> dict[str, str]:
    """Each rule's artifact keys: `prefix` for the first rule, `prefix-<rule>` for the others."""
    return {rule: prefix if k == 0 else f"{prefix}-{rule.replace('_', '-')}" for k, rule in enumerate(rules)}


@flow(name="sparcom-identify")
def identify_components(
    store: Path,
    out_dir: Path | dict[str, Path],
    settings: IdentificationSettings = IdentificationSettings(),
    dask: DaskSettings = DaskSettings(),
    refresh: list[Stage] = [],  # noqa: B006
    artifact_prefix: str = "sparcom",
) -> dict[str, dict]:
    """rule -> its summary. `out_dir`: a folder (`rule_dirs`: itself for one rule, a folder per
    rule inside it for several) or each rule's run folder."""
    def started(client) -> None:
        get_run_logger().info("Dask scheduler %s, %d workers", client.scheduler.address,
                              len(client.scheduler_info()["workers"]))

    out_dirs = out_dir if isinstance(out_dir, dict) else rule_dirs(out_dir, settings)
    prefixes = artifact_prefixes(artifact_prefix, settings.selected_rules())
    # Started by the first computation: a rerun whose two stages are cache hits starts no cluster.
    with dask_cluster_on_demand(dask, started):
        components = refreshed(select_components, "identify", refresh)(store, settings, out_dirs)
        summaries = {rule: refreshed(analyze_generality, "analyse", refresh)(components[rule], out_dirs[rule],
                                                                            prefixes[rule])
                     for rule in settings.selected_rules()}
    get_run_logger().info("Components and their analysis are in %s", ", ".join(map(str, out_dirs.values())))
    return summaries
