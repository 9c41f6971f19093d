#!/usr/bin/env python3
"""Chinese Stable Diffusion from the command line, through a real ComfyUI.

    python3 run.py "中国山水画，远山，云雾" [--model FOLDER_OR_CHECKPOINT] [--out picture.png] [...]
    python3 run.py "中国山水画" --comfyui path/to/ComfyUI         (your ComfyUI and its Python; nothing installed)
    python3 run.py --serve [--model FOLDER_OR_CHECKPOINT] [--comfyui path/to/ComfyUI]
    python3 run.py --prompts prompts.csv --out pictures [--server http://host:8188 ...]   (a picture per row)

Without --comfyui the first run sets up an environment of its own (Python alone: venv + pip; torch and an
unmodified ComfyUI, in ~/.cache/comfyui-chinese-sd or %LOCALAPPDATA%\\comfyui-chinese-sd). `--help` lists the
options; the code is in runner/ (runner/launcher.py).
"""

import os
import sys

# before anything else: an embedded Python (the Windows portable build's) does not put the script's folder on
# sys.path by itself
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from runner.launcher import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
