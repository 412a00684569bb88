"""The identify stage as a Prefect task: a count store in, the selected components out.

- `select_components(store, settings, run_dir)`: `sparcom.identification.identify.identify_store`, cached on the
  store's extraction key and the selection settings; it computes on the Dask client the calling
  flow opened.
"""

from pathlib import Path

from prefect import task

from sparcom.identification.settings import IdentificationSettings
from sparcom.identification.identify import identify_store
from sparcom.identification.keys import identification_key
from tasks.caching import cached


@task(name="identify instruction-specific components", **cached(lambda store, settings, run_dir: (
    identification_key(store, settings), str(run_dir))))
def select_components(store: Path, settings: IdentificationSettings, run_dir: Path) -> Path:
    """components.zarr, computed on the Dask scheduler the calling flow opened."""
    return identify_store(store, settings, run_dir)
