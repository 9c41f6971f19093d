"""Files and folders -> state dicts, configs and ComfyUI objects. Nothing here knows about the UI."""

from .errors import ModelLoadError

__all__ = ["ModelLoadError"]
