"""Custom ops. Importing this package registers them with ``torch.library``."""

from aurora_fx.ops.aurora_delta import aurora_delta_add

__all__ = ["aurora_delta_add"]
