"""Where the built-in demo models live (installed with the package)."""

from pathlib import Path

DEMO_MODELS = Path(__file__).resolve().parent / "demo_models"
DEMO_MODEL_DIR = DEMO_MODELS / "dense"
DEMO_MOE_MODEL_DIR = DEMO_MODELS / "moe"
