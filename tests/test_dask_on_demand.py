"""The on-demand cluster: nothing starts until a computation needs it, it starts once, computes
right, and the default scheduler is what it was afterwards."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np

from sparcom.core.cluster import dask_cluster_on_demand
from sparcom.core.settings import DaskSettings


def test_no_computation_starts_no_cluster():
    started = []
    before = dask.config.get("scheduler", None)
    with dask_cluster_on_demand(DaskSettings(n_workers=1), started.append):
        pass
    assert started == [] and dask.config.get("scheduler", None) == before


def test_first_computation_starts_the_cluster_once():
    started = []
    before = dask.config.get("scheduler", None)
    values = np.arange(100).reshape(10, 10)
    with dask_cluster_on_demand(DaskSettings(n_workers=1, memory_limit="1GB"), started.append):
        array = da.from_array(values, chunks=5)
        assert int(array.sum().compute()) == values.sum()
        np.testing.assert_array_equal((array * 2).compute(), values * 2)
        assert len(started) == 1 and len(started[0].scheduler_info()["workers"]) == 1
    assert dask.config.get("scheduler", None) == before
    assert started[0].status == "closed"
