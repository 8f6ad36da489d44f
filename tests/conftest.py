from pathlib import Path

import pytest

from gqa_lut.reference import reference_dir, shared_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED = shared_dir()
REFERENCE_DIR = reference_dir()


@pytest.fixture
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"published tables not found at {REFERENCE_DIR} (set GQA_SHARED)")
    return REFERENCE_DIR
