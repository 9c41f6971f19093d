"""The model folder a loader node asks for, fetched from ModelScope when it is the known model and not there yet:
ComfyUI's own progress bar (in bytes) and a line of text on the node while it downloads, ComfyUI's Cancel stops it."""

import logging

import comfy.model_management
import comfy.utils

from ..loaders import download
from ..loaders.errors import ModelLoadError

log = logging.getLogger(__name__)


def _node_text(node_id, text):
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None and node_id is not None:
        instance.send_progress_text(text, node_id)


def downloadable(name):
    """Whether a model_folder choice is the ModelScope model this pack can fetch."""
    return name == download.FOLDER


def fetch_model_folder(models_dirs, node_id=None):
    """The model's folder in the first of ComfyUI's models/diffusers folders, downloaded if needed."""
    bar = comfy.utils.ProgressBar(1)
    shown = {"at": 0.0}

    def progress(done, total):
        bar.update_absolute(done, total)
        if node_id is not None and (done - shown["at"] >= total / 200 or done == total):
            shown["at"] = done
            _node_text(node_id, f"Downloading {download.MODEL_ID}: {done / 1024 ** 3:.2f} / {total / 1024 ** 3:.2f} GiB")

    def announce(text):
        log.info("%s", text)
        _node_text(node_id, text)

    try:
        folder = download.ensure_model(models_dirs[0], progress=progress,
                                       cancelled=comfy.model_management.processing_interrupted, announce=announce)
    except download.Cancelled:
        _node_text(node_id, f"Download of {download.MODEL_ID} cancelled; the next run resumes it.")
        comfy.model_management.throw_exception_if_processing_interrupted()
        raise
    except ModelLoadError as e:
        _node_text(node_id, str(e))
        raise
    return folder
