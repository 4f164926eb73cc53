"""The collection flow on a Ray cluster: the deployment entry point of Ray mode.

``colorize_collection_ray`` is ``colorize_collection`` with prefect-ray's task
runner connected to ``RAY_ADDRESS`` (``ray://head:10001``; unset: a local Ray).
Run it with ``options.pool = "ray"``: each item task then reserves one GPU on
the cluster and keeps its models in the Ray worker process between items.
"""

from __future__ import annotations

import os

from flows.collection import colorize_collection, ray_runner

colorize_collection_ray = colorize_collection.with_options(
    name="colorize-collection-ray", task_runner=ray_runner(os.environ.get("RAY_ADDRESS"))
)
