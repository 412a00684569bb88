from pathlib import Path

from prefect import task

from sparcom.config import IdentificationSettings
from sparcom.identify import identify_store


@task(name="identify instruction-specific neurons")
def identify_components(store: Path, settings: IdentificationSettings, run_dir: Path) -> Path:
    return identify_store(store, settings, run_dir)
