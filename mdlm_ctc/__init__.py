"""mdlm-ctc: fast CTC losses for masked diffusion language models.

``slack_ctc_loss`` is the surface-preserving CTC of arXiv 2601.22947 (a ``<slack>`` token may fill any
canvas position and is deleted afterwards; repeats are kept) and, with ``collapse="standard"``,
classic CTC. ``ctc_loss`` / ``CTCLoss`` are drop-ins for PyTorch's. See SPEC.md §2-§3 for the exact
semantics and README.md for the measured speed.
"""

from .alignment import best_alignment
from .backends import available_backends
from .collapse import collapse
from .linear import LinearSlackCTCLoss, linear_slack_ctc_loss
from .losses import CTCLoss, SlackCTCLoss, ctc_loss, slack_ctc_loss
from .reference import slack_ctc_reference

__version__ = "0.1.0"

__all__ = [
    "slack_ctc_loss",
    "SlackCTCLoss",
    "ctc_loss",
    "CTCLoss",
    "collapse",
    "best_alignment",
    "available_backends",
    "linear_slack_ctc_loss",
    "LinearSlackCTCLoss",
    "slack_ctc_reference",
]
