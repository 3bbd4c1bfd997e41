"""Where things are by default, for training, serving, the bench and the tests alike."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The directory the trainer writes to and the service serves; SIGNSERVE_CHECKPOINT_DIR moves it for both.
CHECKPOINT_DIR_VARIABLE = "SIGNSERVE_CHECKPOINT_DIR"
DEFAULT_CHECKPOINT_DIR = PROJECT_ROOT / "models" / "checkpoints"


def checkpoint_dir() -> Path:
    """$SIGNSERVE_CHECKPOINT_DIR, else models/checkpoints in the project."""
    return Path(os.environ.get(CHECKPOINT_DIR_VARIABLE) or DEFAULT_CHECKPOINT_DIR)


def default_data_root() -> str:
    """$GTSRB_ROOT, else ../shared/data next to the project (the folder that holds `gtsrb/`)."""
    return os.environ.get("GTSRB_ROOT") or str(PROJECT_ROOT.parent / "shared" / "data")
