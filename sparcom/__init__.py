"""SPARCOM: which sparse components (FFN neurons, MoE experts) an LLM's instruction types rely on.

The library behind the pipeline; it knows nothing of Prefect. Its packages follow the pipeline,
each importing only those before it: `core` (what every stage shares), `curation`,
`extraction`, `identification`, then `ablation` and `comparison`. `config` gathers every
stage's settings, and `stages` every stage's code for the caching.
"""

__version__ = "0.1.0"
