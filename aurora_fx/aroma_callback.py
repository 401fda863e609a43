"""``AromaCallback``: AROMA's loops inside an HF ``Trainer`` (the one module here that needs transformers).

``aurora_fx.AromaCallback`` is loaded on first use, so ``import aurora_fx`` does not import transformers.
"""

from __future__ import annotations

from transformers import TrainerCallback

from aurora_fx.aroma import AromaController

__all__ = ["AromaCallback"]


class AromaCallback(TrainerCallback):
    """HF ``Trainer`` callback: builds the controller at train start, steps it, stops when done.

    ``trainer.add_callback(AromaCallback(inner_check_every=10, ...))``; keyword arguments go to
    ``AromaController``. The Trainer's own (closed-form) LR schedule is re-warmed after merges by
    the controller. ``converged_early`` tells whether AROMA stopped training by itself.
    At the end of training, ``finalize()`` keeps the active pieces of unconverged sites.
    """

    def __init__(self, **controller_kwargs) -> None:
        self.controller_kwargs = controller_kwargs
        self.controller: AromaController | None = None
        self.converged_early = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Build the controller around the Trainer's model and optimizer."""
        self.controller = AromaController(model, optimizer, None, **self.controller_kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        """Advance the controller; stop training once every site has converged."""
        self.controller.step()
        if self.controller.done:
            self.converged_early = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        """Merge the active pieces and freeze every site."""
        if self.controller is not None:
            self.controller.finalize()
