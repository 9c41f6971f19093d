"""The one error type users see from this pack's loaders."""

import os


class ModelLoadError(Exception):
    """A file or folder the user chose cannot be loaded.

    The message names the file, says what was found and what was expected, so ComfyUI shows
    one readable line instead of a traceback from deep inside torch.
    """

    def __init__(self, path, found, expected):
        self.path = os.fspath(path) if path is not None else None
        self.found = found
        self.expected = expected
        super().__init__(f"Cannot load '{self.path}': found {found}; expected {expected}.")


class PromptError(ValueError):
    """A prompt the encode node cannot turn into finite conditioning (said in one line, like ModelLoadError)."""


def check_keys(path, expected, found, what):
    """ModelLoadError unless the tensor names found are exactly the expected ones."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. '{missing[0]}')")
        if unexpected:
            parts.append(f"{len(unexpected)} unknown tensors (e.g. '{unexpected[0]}')")
        raise ModelLoadError(path, " and ".join(parts), what)
