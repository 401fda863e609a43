"""``AromaCallback``: AROMA's loops inside an HF ``Trainer`` (the one module here that needs transformers).

``aurora_fx.AromaCallback`` is loaded on first use, so ``import aurora_fx`` does not import transformers.
"""

from __future__ import annotations

from transformers import TrainerCallback

from aurora_fx.adapter_record import controller_from_json
from aurora_fx.aroma import AromaController
from aurora_fx.model_state import model_state, update_model_state

__all__ = ["AromaCallback"]


class AromaCallback(TrainerCallback):
    """HF ``Trainer`` callback: builds the controller at train start, steps it, stops when done.

    ``trainer.add_callback(AromaCallback(inner_check_every=10, ...))``; keyword arguments go to
    ``AromaController``. The Trainer's own (closed-form) LR schedule is re-warmed after merges by
    the controller. ``converged_early`` tells whether AROMA stopped training by itself.
    At the end of training, ``finalize()`` keeps the active pieces of unconverged sites.

    Checkpoints: while a controller drives the model, ``model.state_dict()``'s adapter record carries the
    controller's state, so every Trainer checkpoint holds it beside the grown AROMA factors.
    ``trainer.train(resume_from_checkpoint=...)`` loads the model (the record reshapes the factors) and this
    callback resumes the controller from the loaded record, so a resumed run makes the decisions an uninterrupted
    one makes.
    """

    def __init__(self, **controller_kwargs) -> None:
        self.controller_kwargs = controller_kwargs
        self.controller: AromaController | None = None
        self.converged_early = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Build the controller around the Trainer's model and optimizer (resumed from a checkpoint's state)."""
        resumed = getattr(model_state(model), "resumed_controller", None)
        self.controller = AromaController(model, optimizer, None, **self.controller_kwargs)
        if resumed is not None and state.global_step > 0:  # a Trainer resuming from a checkpoint
            self.controller.load_state_dict(controller_from_json(resumed))
            update_model_state(model, resumed_controller=None)

    def on_step_end(self, args, state, control, **kwargs):
        """Advance the controller; stop training once every site has converged."""
        self.controller.step()
        if self.controller.done:
            self.converged_early = True
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        """The Trainer's logged training loss feeds the rollback guarantee (every ``logging_steps``)."""
        if self.controller is not None and logs and "loss" in logs:
            self.controller.observe_loss(logs["loss"])

    def on_train_end(self, args, state, control, **kwargs):
        """Merge the active pieces and freeze every site."""
        if self.controller is not None:
            self.controller.finalize()
