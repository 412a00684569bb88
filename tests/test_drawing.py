"""Plots drawn where cores are free (`sparcom.core.drawing`): on the workers of the current Dask
client, or here; the images written are the bytes each draw function saved."""

from __future__ import annotations

import dask
import pytest
from distributed import Client, get_task_stream

from sparcom.core.drawing import current_client, start_drawing


def draw_label(label: str, target) -> None:
    target.write(f"image of {label}".encode())


def draw_nothing(label: str, target) -> None:
    raise ValueError(f"cannot draw {label}")


PLOTS = {"a.png": (draw_label, "a"), "b.png": (draw_label, "b")}


def assert_written(out_dir, paths: dict) -> None:
    assert paths == {name: str(out_dir / name) for name in PLOTS}
    for name, (_, label) in PLOTS.items():
        assert (out_dir / name).read_bytes() == f"image of {label}".encode()


def test_without_a_client_the_plots_are_drawn_here(tmp_path):
    assert current_client() is None
    assert_written(tmp_path, start_drawing(PLOTS).write(tmp_path))


@pytest.fixture(scope="module")
def client():
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as client:
        yield client


def test_with_a_client_the_workers_draw_them(client, tmp_path):
    assert current_client() is client
    with get_task_stream(client) as stream:
        assert_written(tmp_path, start_drawing(PLOTS).write(tmp_path))
    drawn = sorted(task["key"].rsplit("-", 1)[0] for task in stream.data)
    assert drawn == ["sparcom-plot-a.png", "sparcom-plot-b.png"]


def test_a_client_that_is_not_the_scheduler_draws_nothing(client, tmp_path):
    with dask.config.set(scheduler="sync"), get_task_stream(client) as stream:
        assert current_client() is None
        assert_written(tmp_path, start_drawing(PLOTS).write(tmp_path))
    assert stream.data == []


def test_a_failed_drawing_is_raised_where_it_is_written(client, tmp_path):
    drawing = start_drawing({"bad.png": (draw_nothing, "this")})
    with pytest.raises(ValueError, match="cannot draw this"):
        drawing.write(tmp_path)
    assert not (tmp_path / "bad.png").exists()
