"""The Ray engine: the job table through Ray Data `map_batches` on a pool of actors.

Each actor loads the model once (a `BatchRunner`, the same code the local engine runs), writes
images and its batches' manifest parts straight to the output (a shared folder or an fsspec URL),
and returns a small status table the driver counts. Job ids come from the plan and images from
each job's seed, so a Ray run and a local run of the same recipe give the same ids and, on the
same device type, the same image hashes (tested).

    chexforge generate recipe.yaml --out /shared/out --engine ray --ray-address auto \\
        --ray-actors 8 --gpus-per-actor 1
"""

from __future__ import annotations

import pyarrow as pa

from ..contracts.jobs import job_schema
from .batch import RunSpec
from .progress import Tracker


class RayBatch:
    """A Ray Data actor: `__call__(batch)` makes, writes and commits one batch."""

    def __init__(self, spec: RunSpec, device: str | None):
        import os

        os.environ["CHEXFORGE_WORKER"] = "ray"
        self.spec = spec
        self.runner = spec.runner(device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        bid = int(batch.column("_batch")[0].as_py())
        rows = batch.drop_columns(["_batch"]).to_pylist()
        r = self.runner.run(bid, rows, 1, self.spec.part(bid, "-ray"))
        return pa.table({"batch": [bid], "ok": [r.ok], "failed": [r.failed], "seconds": [r.seconds_device],
                         "errors": [r.errors]})


def run_ray(batches, spec: RunSpec, tracker: Tracker, address: str | None, actors: int | None,
            gpus_per_actor: float) -> bool:
    """Returns True if interrupted."""
    import logging
    import os

    import ray
    from ray.data import ActorPoolStrategy, DataContext

    for name in ("ray", "ray.data"):  # chexforge reports progress and errors itself
        logging.getLogger(name).setLevel(logging.ERROR)
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:  # a private local Ray: its core log lines would only repeat what Python raises
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
            ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.verbose_stats_logs = False
    schema = job_schema()
    blocks, size = [], 1
    for start, rows in batches:  # the blocks live in Ray's object store, not the driver's heap
        block = pa.Table.from_pylist(rows, schema=schema)
        blocks.append(block.append_column("_batch", pa.repeat(pa.scalar(start, pa.int64()), block.num_rows)))
        size = max(size, block.num_rows)
    if not blocks:
        return False
    n_actors = actors or max(1, int(ray.available_resources().get("GPU" if gpus_per_actor else "CPU", 1) // max(gpus_per_actor, 1)))
    device = "cuda" if gpus_per_actor else "cpu"
    dataset = ray.data.from_arrow(blocks).map_batches(
        RayBatch,
        fn_constructor_kwargs={"spec": spec, "device": device},
        batch_size=size, batch_format="pyarrow", compute=ActorPoolStrategy(size=min(n_actors, len(blocks))),
        num_gpus=gpus_per_actor or None,
    )
    try:
        for result in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in result.to_pylist():
                tracker.add(row["ok"], row["failed"], row["errors"], row["seconds"])
    except KeyboardInterrupt:
        return True
    return False
