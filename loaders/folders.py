"""Model folders below ComfyUI's models/diffusers/: what the loader dropdowns list.

The listing runs on every /object_info request, so it must stay cheap and finish whatever the folder
holds: symlinked model folders (the big folder often lives on another disk) are followed, but each real
directory is entered once, a link to a folder holding the root (`/`, `..`) is never entered, the depth
is limited, at most MAX_DIRS directories are looked at, and unreadable and hidden (.name) directories are
skipped (a download in progress stages its files in models/diffusers/.downloading/).
"""

import logging
import os
from collections import deque

log = logging.getLogger(__name__)

MAX_DEPTH = 4  # model folders are found at most this many folders below a root (root/a/b/c/model)
MAX_DIRS = 3000  # directories looked at per listing, all roots together


def is_model_folder(path):
    """A folder in the diffusers layout holding at least a UNet and a text encoder."""
    return os.path.isfile(os.path.join(path, "model_index.json")) or (
        os.path.isdir(os.path.join(path, "unet")) and os.path.isdir(os.path.join(path, "text_encoder")))


def _identity(path):
    """What makes a directory the same one under another name: (device, inode), else its real path."""
    st = os.stat(path)
    if st.st_ino:
        return st.st_dev, st.st_ino
    return os.path.normcase(os.path.realpath(path))  # file systems that report no inode numbers


def _root_and_ancestors(root):
    """The identities of root and of every folder holding it: a link to any of them leads back to root."""
    found, path = set(), os.path.realpath(root)
    while True:
        try:
            found.add(_identity(path))
        except OSError:
            pass
        parent = os.path.dirname(path)
        if parent == path:
            return found
        path = parent


def _subfolders(path):
    """(name, path) of the directories in path, real ones before links; none if path can't be read."""
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except OSError:
        return []
    found = []
    for entry in entries:
        if entry.name.startswith("."):  # hidden: a download's staging folder (loaders/download.py), .git, ...
            continue
        try:
            if entry.is_dir():
                found.append((entry.is_symlink(), entry.name, entry.path))
        except OSError:  # a link loop (a -> a), a vanished entry
            continue
    return [(name, p) for _, name, p in sorted(found)]


def find_model_folders(roots, component=None):
    """Model folders below the given roots, as paths relative to their root (with '/' separators).

    component: only folders having that subfolder (e.g. 'unet', 'text_encoder').
    """
    found = set()
    budget = MAX_DIRS
    for root in roots:
        if not os.path.isdir(root):
            continue
        seen = _root_and_ancestors(root)  # real directories entered (or never to enter) in this root
        queue = deque([(root, "", 0)])  # breadth first: shallow folders are listed before the budget runs out
        while queue:
            path, rel, depth = queue.popleft()
            for name, sub in _subfolders(path):
                if budget <= 0:
                    log.warning("Listing model folders in %s stopped after %d folders; move model folders "
                                "closer to the top of models/diffusers/", root, MAX_DIRS)
                    return sorted(found)
                budget -= 1
                sub_rel = f"{rel}/{name}" if rel else name
                if is_model_folder(sub):
                    if component is None or os.path.isdir(os.path.join(sub, component)):
                        found.add(sub_rel)
                    continue  # a model folder's own subfolders are components, not models
                if depth + 1 >= MAX_DEPTH:
                    continue
                try:
                    identity = _identity(sub)
                except OSError:
                    continue
                if identity in seen:  # a loop, a second name of a folder already walked, or a parent of root
                    continue
                seen.add(identity)
                queue.append((sub, sub_rel, depth + 1))
    return sorted(found)
