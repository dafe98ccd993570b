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


def test_the_verl_workers_settings_and_reuse_index_work_without_verl():
    from dgg.errors import UserError
    from dgg.integrations.verl_settings import (
        mini_batches_per_epoch,
        reuse_index,
        settings_from_environment,
        watch_only_from_environment,
    )

    # k is the epoch: 2 mini-batches per epoch -> steps 0..5 are k = 1, 1, 2, 2, 3, 3
    assert [reuse_index(i, 2) for i in range(6)] == [1, 1, 2, 2, 3, 3]
    assert mini_batches_per_epoch(8, mini_batch_size=4, num_mini_batch=None, data_parallel_size=2) == 4
    spec, settings, tied = settings_from_environment({"DGG_RULE": "gradnorm", "DGG_GRADNORM_WINDOW": "40",
                                                      "DGG_TAU": "0.1"})
    assert (spec, settings.gradnorm_window, settings.tau, tied) == ("gradnorm", 40, 0.1, "output")
    with pytest.raises(UserError, match="DGG_KL_ESTIMATOR=k1"):  # verl has no k3 KL
        settings_from_environment({"DGG_RULE": "kl"})
    with pytest.raises(UserError, match="DGG_WINDOW='many' is not a valid int"):
        settings_from_environment({"DGG_WINDOW": "many"})
    assert watch_only_from_environment({"DGG_WATCH_ONLY": "1"}) and not watch_only_from_environment({})
