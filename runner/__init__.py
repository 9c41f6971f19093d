"""The run command (`python3 run.py`): small plain modules under the thin run.py.

    bootstrap  the command's own environment (venv + pip + an unmodified ComfyUI), Python alone
    comfyui    a ComfyUI folder: its version, its Python, the pack made visible for one run
    process    ComfyUI's main.py as a child process (the one supervisor; the test bed builds on it too)
    client     the one websocket follower of a ComfyUI server
    demo       the demo model (random weights, built once)
    cli        the command line: a picture, or --serve

Nothing here imports ComfyUI, torch or the pack's nodes at import time; bootstrap, comfyui and filelock
need only the standard library (they run in whatever Python the user typed run.py with).
"""


class RunError(Exception):
    """Something the user should read: one line, no traceback."""
