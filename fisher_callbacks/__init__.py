"""fisher_callbacks: Lightning callbacks that watch fine-tuning through diagonal Fisher information.

Public API (DESIGN section 3): :class:`AttentionLayout` (alias :data:`QKOVConfig`),
:func:`register_layout`, :func:`per_sample_gradients`, :class:`FisherCollector`,
:class:`QKOVInterferenceMetric`, and the callbacks :class:`FisherMonitor`,
:class:`QKOVInterferenceMonitor`, :class:`ForgettingRiskMonitor`. Pure kernels live in
:mod:`fisher_callbacks.functional`, the Fisher toolkit in :mod:`fisher_callbacks.toolkit`.
"""

from . import functional, toolkit
from ._validate import SetupError
from .callbacks import FisherMonitor, ForgettingRiskMonitor, QKOVInterferenceMonitor
from .capture import PerSampleGradientCapture, ProbeResult, per_sample_gradients, probe_pass
from .fisher import FisherCollector
from .interference import QKOVHeatmap, QKOVInterferenceMetric
from .layouts import AttentionLayout, LayoutError, QKOVConfig, register_layout, registered_layouts
from .losses import per_sample_loss, per_sample_losses, reduction_scale

__version__ = "0.1.0"

__all__ = [
    "AttentionLayout",
    "FisherCollector",
    "FisherMonitor",
    "ForgettingRiskMonitor",
    "LayoutError",
    "PerSampleGradientCapture",
    "ProbeResult",
    "QKOVConfig",
    "QKOVHeatmap",
    "QKOVInterferenceMetric",
    "QKOVInterferenceMonitor",
    "SetupError",
    "__version__",
    "functional",
    "per_sample_gradients",
    "per_sample_loss",
    "per_sample_losses",
    "probe_pass",
    "reduction_scale",
    "register_layout",
    "registered_layouts",
    "toolkit",
]
