"""Transfer plan: new heads and task losses, layer groups, freezing, the BatchNorm policy and
discriminative learning rates."""
from medtransfer.transfer.model import (
    HEADS,
    TASKS,
    EnsembleModel,
    TaskLoss,
    TransferModel,
    build_head,
    class_weights,
    task_probabilities,
)
from medtransfer.transfer.tasks import TaskSpec, ordinal_targets, resolve_task, task_spec
from medtransfer.transfer.plan import (
    BN_POLICIES,
    FREEZE_MODES,
    LayerGroup,
    apply_plan,
    group_learning_rates,
    layer_groups,
)

__all__ = [
    "BN_POLICIES", "FREEZE_MODES", "HEADS", "TASKS", "LayerGroup", "TaskLoss", "EnsembleModel", "TransferModel", "apply_plan",
    "build_head", "class_weights", "group_learning_rates", "layer_groups", "ordinal_targets", "resolve_task",
    "task_probabilities", "TaskSpec", "task_spec",
]
