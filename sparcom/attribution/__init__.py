"""The attribution stage: per record, a first-order estimate of what switching each component
off would do to the loss of its reference response (docs/method.md section 6a).

- `schema`: the store's variable names, and the rules that read it.
- `settings`: the scored response tokens and the precision.
- `estimate`: the estimate itself, one forward and one backward pass per batch.
- `keys`: the stage's code and the key of a store's content.
- `store`: ATTR.zarr written by shard, resumed, verified; locally or on a Dask cluster.
- `stage`: the stage as the pipeline runs it: one store per key, reused when finished.
"""
