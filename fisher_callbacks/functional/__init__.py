"""Pure kernels: no state, no hooks, no Lightning. Callbacks and the toolkit call these."""

from fisher_callbacks.functional.fisher_ops import ACCUM_DTYPE as ACCUM_DTYPE
from fisher_callbacks.functional.fisher_ops import KeyMismatchError as KeyMismatchError
from fisher_callbacks.functional.fisher_ops import as_fp32 as as_fp32
from fisher_callbacks.functional.fisher_ops import as_tensor_dict as as_tensor_dict
from fisher_callbacks.functional.fisher_ops import check_keys as check_keys
from fisher_callbacks.functional.fisher_ops import check_matching as check_matching
from fisher_callbacks.functional.fisher_ops import check_shapes as check_shapes
from fisher_callbacks.functional.fisher_ops import cosine_fp32 as cosine_fp32
from fisher_callbacks.functional.fisher_ops import fisher_overlap_tensor as fisher_overlap_tensor
from fisher_callbacks.functional.fisher_ops import flatten_fp32 as flatten_fp32
from fisher_callbacks.functional.fisher_ops import sum_fp32 as sum_fp32
from fisher_callbacks.functional.fisher_ops import unflatten_like as unflatten_like
from fisher_callbacks.functional.forgetting import DAMAGE_LOG_FLOOR as DAMAGE_LOG_FLOOR
from fisher_callbacks.functional.forgetting import (
    FirstOrderForgettingAccumulator as FirstOrderForgettingAccumulator,
)
from fisher_callbacks.functional.forgetting import WarningDecision as WarningDecision
from fisher_callbacks.functional.forgetting import early_warning as early_warning
from fisher_callbacks.functional.forgetting import ewc_penalty as ewc_penalty
from fisher_callbacks.functional.forgetting import (
    first_order_forgetting as first_order_forgetting,
)
from fisher_callbacks.functional.forgetting import (
    fisher_damage_asymmetry as fisher_damage_asymmetry,
)
from fisher_callbacks.functional.forgetting import (
    fisher_weighted_damage as fisher_weighted_damage,
)
from fisher_callbacks.functional.forgetting import measured_forgetting as measured_forgetting
from fisher_callbacks.functional.forgetting import parameter_delta as parameter_delta
from fisher_callbacks.functional.forgetting import probe_loss as probe_loss
from fisher_callbacks.functional.forgetting import warning_active as warning_active
from fisher_callbacks.functional.interference import block_head_scores as block_head_scores
from fisher_callbacks.functional.interference import conflict_cosine as conflict_cosine
from fisher_callbacks.functional.interference import (
    directional_mean_over_a as directional_mean_over_a,
)
from fisher_callbacks.functional.interference import inverse_fisher as inverse_fisher
from fisher_callbacks.functional.interference import pooled_fisher as pooled_fisher
from fisher_callbacks.functional.interference import whiten as whiten
