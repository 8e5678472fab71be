"""``ggml-backend batch --ray``: the lines of ``ggml_backend.batch`` spread over Ray Data actors.

A pool of ``workers`` actors (``map_batches`` with a callable class), each loading the model once (memory-mapped:
actors on one machine share its pages) and running ``batch.generate_record`` on one line at a time, the function
the one-process run uses. The driver reads the input, skips what OUT holds and writes each record as it arrives
(Ray Data streams results, in no particular order), so an interruption loses only the lines in flight and those
computed but not yet written; a rerun computes them again.

The model file must be at the same path on every node (or, with no ``-m``, the default model's packages installed
on every node: each actor assembles it in its own cache).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

from .batch import Job, generate_record, load_llama, pending_jobs, write_records


class LineGenerator:
    """One Ray Data actor: one model, one line per call (a batch of rows in Ray Data's "default" format)."""

    def __init__(self, model_path, n_ctx, n_threads, chat_template):
        self.llm = load_llama(model_path, n_ctx, n_threads, chat_template)

    def __call__(self, batch: dict) -> dict:
        records = []
        for line, job_id, request in zip(batch["line"], batch["id"], batch["request"]):
            job = Job(int(line), json.loads(job_id), request=json.loads(request))
            records.append(json.dumps(generate_record(self.llm, job), ensure_ascii=False))
        return {"record": records}


def check_cpus(workers: int, n_threads: int, cpus: float, own_cluster: bool) -> None:
    """Actors that cannot all be placed: an error on a cluster started for this run (nothing will add CPUs to it,
    the job would wait forever), a warning on a cluster that may grow (an autoscaler adds nodes)."""
    if workers * n_threads <= cpus:
        return
    message = f"{workers} workers of {n_threads} thread(s) need {workers * n_threads} CPUs; the Ray cluster has {cpus:g}"
    if own_cluster:
        raise ValueError(message + ": lower --workers or -t")
    print(f"ggml-backend batch: warning: {message} now (the job waits for more)", file=sys.stderr)


def run_ray(in_path: str, out_path: str, *, model_path: str | None = None, n_ctx: int = 4096,
            n_threads: int | None = None, chat_template: str | None = None, workers: int = 1,
            address: str | None = None, progress: bool = True):
    """The job on a Ray cluster (``address``: an existing cluster, e.g. ``auto`` or ``ray://host:10001``; None:
    a local one for this run). Each actor asks for ``n_threads`` CPUs (default 1)."""
    import ray
    import ray.data

    started = time.monotonic()
    todo, total, skipped = pending_jobs(in_path, out_path)
    if model_path is not None:
        model_path = os.path.abspath(model_path)
    bad = [job for job in todo if job.error is not None]   # no model needed: written by the driver
    good = [job for job in todo if job.error is None]
    n_threads = n_threads or 1

    def records():
        from .batch import error_record
        started_here = bool(good) and not ray.is_initialized()
        if started_here:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        try:
            if good:   # before any record is written: a job that cannot run writes nothing
                check_cpus(workers, n_threads, ray.cluster_resources().get("CPU", 0), started_here)
            for job in bad:
                yield error_record(job, job.error)
            if not good:
                return
            logging.getLogger("ray.data").setLevel(logging.WARNING)   # ours is the progress that counts tokens
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            items = [{"line": j.line, "id": json.dumps(j.id), "request": json.dumps(j.request)} for j in good]
            dataset = ray.data.from_items(items, override_num_blocks=len(items))
            dataset = dataset.map_batches(LineGenerator, batch_size=1, concurrency=workers, num_cpus=n_threads,
                                          fn_constructor_kwargs={"model_path": model_path, "n_ctx": n_ctx,
                                                                 "n_threads": n_threads,
                                                                 "chat_template": chat_template})
            for row in dataset.iter_rows():
                yield json.loads(row["record"])
        finally:
            if started_here:
                ray.shutdown()

    return write_records(records(), len(todo), out_path, total, skipped, started, progress)
