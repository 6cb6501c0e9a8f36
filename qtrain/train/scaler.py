"""Dynamic loss scaling for fp16 compute (torch's GradScaler), and a no-op stand-in for bf16/fp32.

fp16 has 5 exponent bits: small gradients underflow to zero unless the loss is multiplied by a
large factor before backward and the gradients divided by it before the optimizer step. The
factor starts at 2^16, halves on every step whose gradients overflow (that step is skipped) and
doubles after `growth_interval` clean steps. An overflow is expected now and then and is counted
(`loss_scale_overflows` in summary.json), not treated as a non-finite failure; a scale that
collapses (MAX_OVERFLOWS_IN_ROW overflows in a row: the gradients are inf at any scale) is.

The scaler's state is part of every checkpoint (trainer_state.json), so a resumed fp16 run scales
exactly as the uninterrupted one would.
"""

from __future__ import annotations

import torch

# 2^16 halved 24 times is 2^-8: gradients that still overflow are not an fp16 range problem.
MAX_OVERFLOWS_IN_ROW = 24


class LossScaler:
    """Wraps `torch.amp.GradScaler` when `enabled`; every method is the identity otherwise."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self._scaler = torch.amp.GradScaler(device.type, enabled=enabled)
        self.overflows_in_row = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self._scaler.scale(loss) if self.enabled else loss

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale in place (call once per step, before clipping)."""
        if self.enabled:
            self._scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, apply: bool) -> None:
        """Apply the optimizer step if `apply`, then adapt the scale (backs off after an overflow)."""
        if apply:
            if self.enabled:
                self._scaler.step(optimizer)
            else:
                optimizer.step()
        if self.enabled:
            self._scaler.update()

    def overflowed(self, loss_finite: bool, grads_finite: bool) -> bool:
        """Whether this step was an fp16 overflow (finite loss, non-finite gradients); tracks the streak."""
        overflow = self.enabled and loss_finite and not grads_finite
        self.overflows_in_row = self.overflows_in_row + 1 if overflow else 0
        return overflow

    @property
    def collapsed(self) -> bool:
        return self.overflows_in_row >= MAX_OVERFLOWS_IN_ROW

    def get_scale(self) -> float:
        return float(self._scaler.get_scale()) if self.enabled else 1.0

    def state_dict(self) -> dict:
        """JSON-able state (empty when disabled)."""
        if not self.enabled:
            return {}
        return {**self._scaler.state_dict(), "overflows_in_row": self.overflows_in_row}

    def load_state_dict(self, state: dict) -> None:
        if not self.enabled or not state:
            return
        state = dict(state)
        self.overflows_in_row = int(state.pop("overflows_in_row", 0))
        self._scaler.load_state_dict(state)
