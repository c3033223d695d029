"""Zero-shot tasks matching lm-evaluation-harness 0.4.x: declarative specs, a registry and data loading.

``TASKS.get(name)`` answers an unknown name with near matches and the valid names; ``load_task_data`` reads
a task's split from the hub or a local JSONL in the dataset's own schema.
"""

from esa.evals.tasks.data import TaskData, TaskItem, load_task_data, subsample
from esa.evals.tasks.definitions import TASKS
from esa.evals.tasks.spec import TARGET_DELIMITER, Prompt, TaskSpec


def task_names() -> list[str]:
    return TASKS.names()


__all__ = [
    "TARGET_DELIMITER",
    "TASKS",
    "Prompt",
    "TaskData",
    "TaskItem",
    "TaskSpec",
    "load_task_data",
    "subsample",
    "task_names",
]
