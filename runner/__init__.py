"""The run command (`python3 run.py`): small plain modules under the thin run.py.

    bootstrap  the command's own environment (venv + pip + an unmodified ComfyUI), Python alone
    comfyui    a ComfyUI folder: its version, its Python (probed), started with the pack and model visible
    process    ComfyUI's main.py as a child process (the one supervisor; the test bed builds on it too)
    client     the one websocket follower of a ComfyUI server
    demo       the demo model (random weights, built once)
    workflow   the shipped txt2img workflow filled with one picture's settings (and its UI form for the PNG)
    options    the per-picture options' checks, shared by the command line and the prompts file
    prompts_file  a batch's prompts file (.txt, .csv, .jsonl) read into rows and line-numbered errors
    batch      a batch of rows on one or several ComfyUI servers (queueing, resuming, lost servers, Ctrl+C)
    console    the command's output lines above its one progress bar
    launcher   the command line, standard library only: checks, finds the environment, runs again in it
    generate   there: a picture, or a batch (--prompts, --server)
    serve      there: --serve
    convert    the converter's command line (python -m runner.convert; the conversion is loaders/convert.py)

Nothing here imports ComfyUI, torch or the pack's nodes at import time; the launcher and what it imports need
only the standard library (they run in whatever Python the user typed run.py with).
"""


class RunError(Exception):
    """Something the user should read: one line, no traceback."""
