"""What every stage shares; imports no stage.

- `settings`: strict settings models, the Dask cluster's settings, the cache folder.
- `code_version`: which code made a result (the code versions in every cache key).
- `hashing`: content hashes of values and files.
- `outputs`: every output built beside its target and moved into place, with a marker and a lock.
- `models`: a model by name (default, hub id, folder, .gguf): resolved, fingerprinted, loaded.
- `cluster`: the Dask cluster a stage runs on (an existing one, or a local one).
- `children`: child processes (a temporary server) that end with this process, however it ends.
- `threads`: torch's CPU threads on a shared machine (passive OpenMP waits, no more threads than cores).
- `markdown`: markdown tables and report sections.
- `drawing`: plots drawn on the cluster's workers while the client writes data.
"""
