"""The Lightning callbacks: thin adapters over the tested kernels."""

from .fisher_monitor import FisherMonitor
from .forgetting_monitor import ForgettingRiskMonitor
from .qkov_monitor import QKOVInterferenceMonitor

__all__ = ["FisherMonitor", "ForgettingRiskMonitor", "QKOVInterferenceMonitor"]
