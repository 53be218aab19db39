"""Running independent per-model tasks in-process or as Ray tasks, with one callback per finished task.

:func:`run_tasks` is how :func:`patchlab.meta_eval` and :func:`patchlab.audit_many` spread models over a machine or a
cluster: in-process (the default) the tasks run one after the other; with Ray (``pip install 'patchlab[ray]'``) each
is a Ray task (``ray.init()`` locally unless Ray is already initialised, or the cluster at ``address``), with
``num_gpus`` / ``num_cpus`` per task. Either way ``done`` is called in the calling process as each task finishes, so
the caller writes each result at once and a killed run keeps what finished. The task function must be importable (a
module-level function) and its arguments picklable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from patchlab.errors import MissingDependencyError, PatchlabValueError


def check_resources(num_gpus: float, num_cpus: float) -> None:
    """Raise :class:`PatchlabValueError` unless ``num_gpus >= 0`` and ``num_cpus > 0``."""
    if not isinstance(num_gpus, (int, float)) or num_gpus < 0:
        raise PatchlabValueError(f"num_gpus per task must be >= 0, got {num_gpus!r}")
    if not isinstance(num_cpus, (int, float)) or num_cpus <= 0:
        raise PatchlabValueError(f"num_cpus per task must be > 0, got {num_cpus!r}")


def ray_module(address: str | None = None) -> Any:
    """The ``ray`` module, initialised (``ray.init(address=address)``) unless it already is.

    Raises:
        MissingDependencyError: Ray is not installed.
    """
    try:
        import ray
    except ImportError as err:
        raise MissingDependencyError("running tasks on Ray needs ray: pip install 'patchlab[ray]'") from err
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    return ray


def run_tasks(fn: Callable[..., Any], args: Sequence[tuple], done: Callable[[Any], None], *, ray: bool = False,
              ray_address: str | None = None, num_gpus: float = 0, num_cpus: float = 1, progress: bool = True,
              desc: str = "tasks") -> None:
    """Call ``fn(*a)`` for each ``a`` of ``args`` and ``done(result)`` as each finishes: in-process in order, or as
    Ray tasks (``ray`` or ``ray_address``) in completion order. Same function, same arguments: same results."""
    check_resources(num_gpus, num_cpus)
    with tqdm(total=len(args), desc=desc, disable=not progress) as bar:
        if not (ray or ray_address):
            for a in args:
                done(fn(*a))
                bar.update(1)
            return
        module = ray_module(ray_address)
        remote = module.remote(num_gpus=num_gpus, num_cpus=num_cpus)(fn)
        pending = [remote.remote(*a) for a in args]
        while pending:
            ready, pending = module.wait(pending, num_returns=1)
            done(module.get(ready[0]))
            bar.update(1)
