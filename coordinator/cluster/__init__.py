"""Many pipelines at once on Ray (`--ray local|auto|ADDRESS`, `--pipelines N`, `--resume DIR`).

Ray is an optional extra (`pip install 'eventspec[cluster]'`); nothing here imports it at module import
time, so the coordinator works without it and `--ray` says how to install it. Layout: `plan` (pure rules:
pipeline count, work queue, progress, resume), `pipeline` (the actor: one Session and its workers),
`ray_cluster` (start/join/leave Ray), `driver` (`coordinator run --ray`), `collect` (`adapter collect --ray`).

Ray moves arguments and results between its processes with pickle: run it only on a network you trust, as
Ray's own documentation says. Every node needs eventspec installed at the same path and the inputs and the
output folder on a shared filesystem.
"""
from __future__ import annotations

INSTALL_HINT = ("--ray needs Ray, an optional extra: pip install 'eventspec[cluster]' (or pip install ray) in "
                "the environment that runs the coordinator and on every node of the cluster")


class RayMissing(RuntimeError):
    pass


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise RayMissing(f"{INSTALL_HINT} ({exc})") from None
    return ray
