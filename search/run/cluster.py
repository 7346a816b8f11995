"""The Ray cluster a search runs on: started here or joined (--address), and how many
trials of the requested size fit on it now, or one line saying why none does."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from search.defaults import DEFAULT_TRIALS
from search.run.request import SearchRequest
from trainable.errors import UserError

AUTOSCALER_CONFIG = Path.home() / "ray_bootstrap_config.yaml"  # present on a `ray up` head


def start_cluster(request: SearchRequest) -> int:
    """Ray started or joined; how many trials run at once."""
    start_ray(request.address)
    fits = check_resources(request)
    return request.max_concurrent or fits


def start_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        else:
            # "local": a new Ray of its own, never a `ray start` cluster that ray.init() would
            # join by itself (--address is how a search joins one)
            ray.init(address="local", dashboard_host="127.0.0.1", log_to_driver=False,
                     logging_level=logging.ERROR)
    except ConnectionError as e:
        raise UserError(f"--address {address}: cannot join the Ray cluster ({e}); start it "
                        "with `ray start --head` or `ray up cluster.yaml`") from None


def node_capacity() -> list[dict[str, float]]:
    import ray

    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def autoscaler_node_types() -> list[dict[str, float]]:
    """Resources of the worker types a `ray up` cluster can still start, if any."""
    if not AUTOSCALER_CONFIG.exists():
        return []
    import yaml

    config = yaml.safe_load(AUTOSCALER_CONFIG.read_text()) or {}
    return [spec.get("resources", {}) for spec in config.get("available_node_types", {}).values()
            if spec.get("max_workers", 0) > 0]


def trials_that_fit(node: dict[str, float], cpus: float, gpus: float) -> int:
    limits = [math.floor(node.get("CPU", 0) / cpus + 1e-9)] if cpus else []
    if gpus:
        limits.append(math.floor(node.get("GPU", 0) / gpus + 1e-9))
    return min(limits) if limits else 1


def check_resources(request: SearchRequest) -> int:
    """Trials that can run at once now; one clear line when a trial fits on no node."""
    cpus, gpus = request.cpus_per_trial, request.gpus_per_trial
    if gpus > 1 and gpus != int(gpus):
        raise UserError(f"--gpus-per-trial {gpus:g}: use a fraction <= 1 or a whole number")
    nodes = node_capacity()
    budget = request.budget
    if budget is not None and budget.unit == "gpu-h":
        cluster_gpus = any(node.get("GPU", 0) for node in [*nodes, *autoscaler_node_types()])
        if not (gpus and cluster_gpus):
            why = ("the Ray cluster has no GPUs" if gpus else
                   "the trials use none (--gpus-per-trial 0)")
            raise UserError(f"--budget {budget}: {why}, so the trials spend no GPU-hours; use "
                            "a wall-time budget (e.g. --budget 2h)" +
                            (" and --gpus-per-trial 0" if gpus else ""))
    fits = sum(trials_that_fit(node, cpus, gpus) for node in nodes)
    if fits:
        return fits
    if any(trials_that_fit(node, cpus, gpus) for node in autoscaler_node_types()):
        print("no node fits a trial yet; the autoscaler will start one", flush=True)
        return request.trials or DEFAULT_TRIALS  # a budget's trials: as many as by default
    total_cpu = sum(node.get("CPU", 0) for node in nodes)
    total_gpu = sum(node.get("GPU", 0) for node in nodes)
    largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    raise UserError(
        f"--gpus-per-trial {gpus:g} --cpus-per-trial {cpus:g}: no node of the Ray cluster "
        f"has that much ({len(nodes)} node(s), {total_cpu:g} CPUs and {total_gpu:g} GPUs in "
        f"all; the largest has {largest.get('CPU', 0):g} CPUs and {largest.get('GPU', 0):g} "
        "GPUs); lower the request" + (" or use --gpus-per-trial 0" if not total_gpu else ""))
