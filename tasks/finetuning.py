"""The finetune stage as a Prefect task: a model in, a cached fine-tuned checkpoint out.

- `finetune_model(model, settings, work_dir, cache_dir, held_out_dataset)`:
  `sparcom.comparison.finetune.train_checkpoint`, cached on the checkpoint's own key, with a progress
  artifact and a markdown one saying how the checkpoint was trained.
"""

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from sparcom.comparison.finetune import checkpoint_markdown, held_out_ids, train_checkpoint
from sparcom.comparison.keys import planned_finetune_key
from sparcom.comparison.settings import FinetuneSettings
from sparcom.extraction.settings import ModelSettings
from tasks.caching import cached


@task(name="fine-tune model", **cached(lambda model, settings, work_dir, cache_dir, held_out_dataset=None: (
    planned_finetune_key(model, settings, held_out_dataset, cache_dir), str(Path(work_dir).resolve()))))
def finetune_model(
    model: ModelSettings, settings: FinetuneSettings, work_dir: Path, cache_dir: Path,
    held_out_dataset: Path | None = None,
) -> ModelSettings:
    """The tuned model (a cached checkpoint directory); records of `held_out_dataset` are not trained on."""
    artifact = create_progress_artifact(0.0, description=f"Fine-tuning {model.name}")

    def report(step: int, steps: int, loss: float) -> None:
        update_progress_artifact(artifact, 100.0 * step / steps)

    checkpoint = train_checkpoint(model, settings, Path(work_dir) / "checkpoints", cache_dir,
                                  held_out_ids(held_out_dataset), report)
    update_progress_artifact(artifact, 100.0)
    create_markdown_artifact(checkpoint_markdown(checkpoint), key="sparcom-finetune",
                             description="The fine-tuned checkpoint and how it was trained")
    return ModelSettings(name=str(checkpoint))
