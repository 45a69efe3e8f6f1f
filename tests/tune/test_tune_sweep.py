"""Sweeps refused before any trial runs, on the shared in-process Ray cluster. The real sweep (Ray Tune + OptunaSearch
+ ASHA over real Ray Train runs, interrupted and resumed) is in test_tune_resume.py."""

from __future__ import annotations

import time

import pytest

from tests.tune.tune_helpers import tune_tree
from viscy import api
from viscy.config import ConfigError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


def test_trials_that_never_fit_fail_fast_naming_the_request(plate, tmp_path):
    tree = tune_tree(plate, tmp_path, "too-big")
    tree["search"]["space"]["trainer.cpus_per_worker"] = {"choice": [0.5, 8]}
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        api.tune(tree)
    assert time.monotonic() - start < 60
    message = str(err.value)
    assert "no trial of this sweep can ever run" in message and "trainer.cpus_per_worker 8" in message
    assert "the cluster has 2 CPU(s)" in message


def test_existing_foreign_directory_is_left_untouched(plate, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds files viscy did not write"):
        api.tune(tune_tree(plate, tmp_path, "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
