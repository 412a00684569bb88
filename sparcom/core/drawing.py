"""Plots drawn where cores are free: on the workers of the current Dask cluster while this
process goes on with its own work, or here where there is no cluster.

- `start_drawing(plots)`: plots as {file name: (draw, data)}, each `draw(data, target)` saving
  its figure as PNG to a path or a file object; returns a `Drawing`, whose `write(out_dir)`
  waits for the images, writes them into out_dir and returns file name -> path.

Drawing a figure is Python work under the interpreter lock (matplotlib lays out and renders
every tick and text), a second of it for a MoE report's four figures on a slow core: in this
process it would neither overlap the data's writing nor spread over cores. The workers send the
PNG bytes back, so they need no access to out_dir.
"""

from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import distributed

# matplotlib is not thread-safe: a worker with several threads draws one figure at a time.
_MATPLOTLIB = threading.Lock()

Draw = Callable[[Any, Any], None]


def png(draw: Draw, data: Any) -> bytes:
    buffer = io.BytesIO()
    with _MATPLOTLIB:
        draw(data, buffer)
    return buffer.getvalue()


def current_client() -> distributed.Client | None:
    """The distributed client that is the default Dask scheduler now, if one is."""
    try:
        client = distributed.default_client()
    except ValueError:  # no client in this process
        return None
    return client if dask.base.get_scheduler() == client.get else None


class Drawing:
    def __init__(self, images: dict[str, distributed.Future | bytes]) -> None:
        self._images = images

    def write(self, out_dir: Path) -> dict[str, str]:
        paths = {}
        for name, image in self._images.items():
            path = Path(out_dir) / name
            path.write_bytes(image if isinstance(image, bytes) else image.result())
            paths[name] = str(path)
        return paths


def start_drawing(plots: dict[str, tuple[Draw, Any]]) -> Drawing:
    client = current_client()
    if client is None:
        return Drawing({name: png(draw, data) for name, (draw, data) in plots.items()})
    return Drawing({name: client.submit(png, draw, data, pure=False, key=f"sparcom-plot-{name}-{uuid.uuid4().hex}")
                    for name, (draw, data) in plots.items()})
