"""Weight perturbations: ops, targets, the ``perturbed`` context manager and prefix-cached trials.

``perturbed`` (in :mod:`esa.perturb.context`) is the only code in ESA that writes model weights.
"""

from esa.perturb.bits import BitLayout, bit_string, flip_bit, layout, parse_bit
from esa.perturb.context import PerturbationError, PerturbRecord, Touched, perturbed
from esa.perturb.ops import OPS, Op, make_op, parse_op, register_op
from esa.perturb.targets import (
    TargetSet,
    from_coordinates,
    from_file,
    from_glob,
    from_ranking,
    parse_coordinate,
    parse_targets,
    random_k,
)

__all__ = [
    "OPS", "BitLayout", "Op", "PerturbRecord", "PerturbationError", "TargetSet", "Touched", "bit_string",
    "flip_bit", "from_coordinates", "from_file", "from_glob", "from_ranking", "layout", "make_op",
    "parse_bit", "parse_coordinate", "parse_op", "parse_targets", "perturbed", "random_k", "register_op",
]
