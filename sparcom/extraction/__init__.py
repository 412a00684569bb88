"""Stage 2, extraction: activation counts of a model over the records, into a Zarr store
(docs/method.md sections 2, 3 and 7).

- `architectures`: where each supported family keeps its FFN, router and experts.
- `counting`, `expert_counting`: the hooks and experts backend that count inside the forward pass.
- `batching`: length-sorted, padded batches under a token budget (the ablation's too).
- `extract`: shards and the store filled in this process (resumable, repairable).
- `distributed`: the same shards counted on a Dask cluster's workers.
- `stage`: the stage as the pipeline runs it, here or on the cluster.
- `model_stage`: the steps every stage that runs the model into a store shares (attribution's too).
- `store`, `integrity`: the count store (layout, shards, status) and its chunk manifest.
- `schema`: the store's dimension and variable names, the component families.
- `settings`, `keys`: the stage's settings and cache keys.
"""
