import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REFERENCE = Path(os.environ.get("COOPER_REFERENCE_DIR", ROOT / "tests" / "fixtures" / "reference"))
