"""tools/gpu_tests.sh names test files that exist, among them every one that follows TANDEM_TEST_DEVICE."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _listed() -> set[str]:
    return set(re.findall(r"tests/[\w/]+\.py", (ROOT / "tools" / "gpu_tests.sh").read_text()))


def test_listed_files_exist():
    listed = _listed()
    assert listed
    assert [p for p in sorted(listed) if not (ROOT / p).is_file()] == []


def test_every_test_that_follows_the_device_setting_is_listed():
    follows = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
               if "TEST_DEVICE" in p.read_text() and p.name != Path(__file__).name}
    assert follows and follows <= _listed(), sorted(follows - _listed())
