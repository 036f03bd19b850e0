"""fisher_callbacks: Lightning callbacks that watch fine-tuning through diagonal Fisher information."""

from .capture import PerSampleGradientCapture, per_sample_gradients
from .fisher import FisherCollector
from .layouts import AttentionLayout, LayoutError, QKOVConfig, register_layout, registered_layouts
from .losses import per_sample_loss, per_sample_losses, reduction_scale

__version__ = "0.1.0"

__all__ = [
    "AttentionLayout",
    "FisherCollector",
    "LayoutError",
    "PerSampleGradientCapture",
    "QKOVConfig",
    "__version__",
    "per_sample_gradients",
    "per_sample_loss",
    "per_sample_losses",
    "reduction_scale",
    "register_layout",
    "registered_layouts",
]
