"""fisher_callbacks: Lightning callbacks that watch fine-tuning through diagonal Fisher information."""

from .layouts import AttentionLayout, LayoutError, QKOVConfig, register_layout, registered_layouts

__version__ = "0.1.0"

__all__ = [
    "AttentionLayout",
    "LayoutError",
    "QKOVConfig",
    "__version__",
    "register_layout",
    "registered_layouts",
]
