"""Memory and time planning from model configs alone (``trace-transfer plan``).

``plan(cfg, hw)`` builds each model of a pipeline config on the meta device (no weights), then
estimates for every step the per-GPU and host memory by term, FLOPs, a time range and a verdict.
The formulas are in :mod:`trace_transfer.plan.estimate`; docs/PLANNER.md checks one step by hand and
compares the estimates with measured peaks.
"""

from trace_transfer.plan.estimate import Setup, Trainable, activation_bytes, train_flops, train_memory
from trace_transfer.plan.hardware import GPUS, GpuSpec, Hardware, gpu_spec, parse_size
from trace_transfer.plan.planner import Plan, StepPlan, core_trainable, plan
from trace_transfer.plan.shapes import ModelShape, find_config, model_shape

__all__ = [
    "plan", "Plan", "StepPlan", "Hardware", "GpuSpec", "GPUS", "gpu_spec", "parse_size", "ModelShape", "model_shape",
    "find_config", "Setup", "Trainable", "train_memory", "train_flops", "activation_bytes", "core_trainable",
]
