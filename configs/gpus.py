"""GPU memory by name, for the launch plan's fit check (ray_job/plan.py): scaling.gpu names the
GPU the workers get, in Google Cloud's accelerator names (cluster.yaml's guestAccelerators
acceleratorType) or Ray's accelerator types; scaling.gpu_memory_gb overrides it. GB here and
in the plan are 2^30 bytes (what torch.cuda reports)."""

from __future__ import annotations

GPU_MEMORY_GB = {
    # Google Cloud accelerator types (cluster.yaml)
    "nvidia-tesla-a100": 40,
    "nvidia-a100-80gb": 80,
    "nvidia-h100-80gb": 80,
    "nvidia-h100-mega-80gb": 80,
    "nvidia-h200-141gb": 141,
    "nvidia-l4": 24,
    "nvidia-tesla-t4": 16,
    "nvidia-tesla-v100": 16,
    "nvidia-tesla-p100": 16,
    # Ray's accelerator types (ray.util.accelerators)
    "A100-40G": 40,
    "A100-80G": 80,
    "H100": 80,
    "H200": 141,
    "L4": 24,
    "T4": 16,
    "V100": 16,
    "A10G": 24,
}


def memory_gb(gpu: str, override: float = 0.0) -> float | None:
    """The GPU's memory in GB: the override when set, else by name; None when unknown."""
    if override:
        return float(override)
    return float(GPU_MEMORY_GB[gpu]) if gpu in GPU_MEMORY_GB else None
