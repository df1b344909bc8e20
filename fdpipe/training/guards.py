"""Stop a training loop at the first non-finite loss, gradient or reward.

A NaN or an infinity that reaches the optimizer poisons every parameter it touches, and a
state written afterwards would carry the poison into every resume. The loops call `check`
before the optimizer step and before writing a state, so the last good state on disk is
never overwritten by a bad one; the error names the step, the quantity and what to do.
"""
from __future__ import annotations

import torch

from fdpipe.common.errors import FdpipeError


class NonFiniteError(FdpipeError):
    """A loss, gradient norm or reward was NaN or infinite."""


def check(step: int, state_path=None, **values) -> None:
    """Raise `NonFiniteError` if any of `values` (numbers or tensors) is not finite.

    ``step`` is the 1-based step being computed; the message names it, the first bad
    quantity and the state a rerun will resume from.
    """
    for name, value in values.items():
        tensor = torch.as_tensor(value)
        if not bool(torch.isfinite(tensor).all()):
            bad = tensor[~torch.isfinite(tensor)].flatten()[0].item() if tensor.dim() else tensor.item()
            where = f"; the last good state is kept in {state_path}" if state_path else ""
            raise NonFiniteError(f"step {step}: non-finite {name} ({bad}){where}; lower the learning rate "
                                 "or check the inputs, then rerun to resume")
