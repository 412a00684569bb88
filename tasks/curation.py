from pathlib import Path

from prefect import task

from sparcom.config import DatasetSettings
from sparcom.dataset import prepare_dataset


@task(name="curate dataset")
def curate_dataset(settings: DatasetSettings, work_dir: Path) -> Path:
    return prepare_dataset(settings.path, Path(work_dir) / "datasets")
