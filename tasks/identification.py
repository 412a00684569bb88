"""The identify stage as a Prefect task: a count store in, the selected components out.

- `select_components(store_path, settings, out_dir)`: `sparcom.identification.identify.identify_store`
  (components.zarr), cached on the store's extraction key and the selection settings; it computes
  on the Dask client the calling flow opened.
"""

from prefect import task

from sparcom.identification.identify import identify_store
from sparcom.identification.keys import identification_key
from tasks.caching import cached

select_components = task(
    identify_store, name="identify instruction-specific components", **cached(lambda store_path, settings, out_dir: (
        identification_key(store_path, settings), str(out_dir))))
