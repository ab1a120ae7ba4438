import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ranks spawned in-process build the compiled kernels with the venv's ninja, as launch/train.py
# makes every launched rank do (prefer_this_environments_tools): one ninja, no rebuilds.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])

PRETRAIN_STEPS = 20  # a quick embedded build; the default recipe uses the full one


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One quick embedded base model for every test that trains it."""
    from moe_dist.models.embedded import ensure_embedded_model

    cache = tmp_path_factory.mktemp("cache")
    ensure_embedded_model(cache, 0, PRETRAIN_STEPS)
    return cache
