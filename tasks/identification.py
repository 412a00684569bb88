"""The identify stage as a Prefect task: a count store in, the selected components out.

- `select_components(store_path, settings, out_dirs)`:
  `sparcom.identification.identify.identify_store_rules` (each rule's components.zarr in
  `out_dirs[rule]`, from one pass), cached on the store's extraction key and each rule's
  one-rule settings; it computes on the Dask client the calling flow opened.
"""

from prefect import task

from sparcom.identification.identify import identify_store_rules
from sparcom.identification.keys import identification_key
from tasks.caching import cached

select_components = task(
    identify_store_rules, name="identify instruction-specific components", **cached(
        lambda store_path, settings, out_dirs: [(identification_key(store_path, settings.for_rule(rule)),
                                                 str(out_dirs[rule])) for rule in settings.selected_rules()]))
