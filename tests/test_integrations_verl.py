"""The verl adapter is tested against real verl in its own environment (tests_verl/, make test-verl); here,
only what a user without verl sees."""

import importlib.util
import subprocess
import sys

import pytest


@pytest.mark.skipif(importlib.util.find_spec("verl") is not None, reason="verl is installed here")
def test_importing_the_verl_adapter_without_verl_says_how_to_install_it():
    with pytest.raises(ImportError, match=r"pip install dgg\[verl\]"):
        import dgg.integrations.verl  # noqa: F401


def test_import_dgg_does_not_import_verl():
    code = "import sys, dgg; sys.exit('verl' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
