"""SPARCOM: which sparse components (FFN neurons, MoE experts) an LLM's instruction types rely on.

The library behind the pipeline, one module per stage; it knows nothing of Prefect:
records/hexainst/dataset (curation), models/prompts/architectures/counting/extract/store
(extraction), identify (selection rules), generality and report (generality and uniqueness),
finetune, compare and compare_report (before and after fine-tuning).
"""

__version__ = "0.1.0"
