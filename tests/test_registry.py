"""Registry-ready metadata: pyproject.toml as ComfyUI's own parser (comfy_config) and the Comfy Registry's
rules read it, and requires-comfyui matching the oldest ComfyUI this suite runs."""

import os
import re

from conftest import PACK_DIR


def test_pyproject_as_comfyui_reads_it():
    from comfy_config import config_parser
    config = config_parser.extract_node_configuration(PACK_DIR)
    project, comfy = config.project, config.tool_comfy
    # registry rules for the node id: < 100 characters, letters/digits/-/_/., no consecutive specials,
    # starting with a letter; and the advice not to put "ComfyUI" in it
    assert len(project.name) < 100 and re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*", project.name)
    assert "comfyui" not in project.name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project.version)
    assert project.description and project.urls.repository.startswith("https://")
    assert project.license.file == "LICENSE" and os.path.getsize(os.path.join(PACK_DIR, "LICENSE")) > 500
    assert project.supported_os == ["OS Independent"]
    assert "GPU :: NVIDIA CUDA" in project.supported_accelerators  # only the registry's known values pass the parser
    assert comfy.publisher_id and comfy.display_name


def test_icon_is_the_repository_file_the_registry_accepts():
    """[tool.comfy] Icon: a URL of the repository's own square PNG of at most 400x400 pixels."""
    from comfy_config import config_parser
    from PIL import Image
    config = config_parser.extract_node_configuration(PACK_DIR)
    repo = config.project.urls.repository.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert config.tool_comfy.icon.startswith(prefix)
    path = os.path.join(PACK_DIR, *config.tool_comfy.icon[len(prefix):].split("/"))
    with Image.open(path) as icon:
        assert icon.format == "PNG" and icon.width == icon.height <= 400


def test_requires_comfyui_is_the_oldest_tested_host():
    from comfy_config import config_parser
    config = config_parser.extract_node_configuration(PACK_DIR)
    with open(os.path.join(PACK_DIR, "tests", "run.sh"), encoding="utf-8") as f:
        matrix = re.search(r'^MATRIX="([^"]+)"', f.read(), re.M).group(1).split()
    oldest = min((combo.split(":")[0] for combo in matrix), key=lambda v: tuple(map(int, v.split("."))))
    assert config.project.supported_comfyui_version == f">={oldest}"
