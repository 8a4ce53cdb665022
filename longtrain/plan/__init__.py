"""Plan a training step before launching it: peak memory, its breakdown, FLOPs and a time at the rates
kernels reach (the clock), of one step of longtrain's own code path, run on fake tensors
(docs/PLANNING.md)."""
from longtrain.plan.gpus import GPUS, Gpu, get_gpu
from longtrain.plan.step import StepPlan, run_step
from longtrain.plan.tracker import StepTracker

__all__ = ["GPUS", "Gpu", "StepPlan", "StepTracker", "get_gpu", "run_step"]
