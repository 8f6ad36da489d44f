import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GQA_SHARED", ROOT.parent / "shared"))
REFERENCE_DIR = SHARED / "reference-tables"


@pytest.fixture
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"published tables not found at {REFERENCE_DIR} (set GQA_SHARED)")
    return REFERENCE_DIR
