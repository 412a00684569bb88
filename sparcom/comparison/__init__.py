"""Stage 5, before and after fine-tuning (docs/method.md section 5).

- `training_data`, `finetune`: what a fine-tune trains on, and the training (full or LoRA).
- `compare`: two checkpoints' sets, frequencies and distributions side by side.
- `report`: the comparison's markdown, JSON, plots and `comparison.zarr`.
- `schema`: output file names.
- `settings`, `keys`: the stage's settings, the fine-tune's key, the comparison's code.
"""
