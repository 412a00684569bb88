"""The attribution stage: per record, a first-order estimate of what switching each component
off would do to the loss of its reference response (docs/method.md section 6a).

- `schema`: the store's variable names, and the rules that read it.
- `settings`: the scored response tokens and the precision.
- `estimate`: the estimate itself, one forward and one backward pass per batch.
"""
