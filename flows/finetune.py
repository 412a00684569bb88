"""Fine-tuning on its own: a model in, a cached safetensors checkpoint directory out."""

from pathlib import Path

from prefect import flow, get_run_logger

from sparcom.config import PipelineSettings
from tasks.finetuning import finetune_model


@flow(name="sparcom-finetune")
def sparcom_finetune(settings: PipelineSettings = PipelineSettings(), held_out_dataset: Path | None = None) -> Path:
    tuned = finetune_model(settings.model, settings.finetune, settings.work_dir, settings.cache_dir,
                           held_out_dataset)
    get_run_logger().info("Fine-tuned checkpoint: %s", tuned.name)
    return Path(tuned.name)
