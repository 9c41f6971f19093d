"""Registry-ready metadata: pyproject.toml as ComfyUI's own parser (comfy_config) and the Comfy Registry's
rules read it, requires-comfyui matching the oldest ComfyUI this suite runs, and the registry's own validator
(`comfy node validate`, comfy-cli) finding nothing in a clean copy of the repository."""

import os
import re
import shutil
import subprocess

import pytest

from conftest import PACK_DIR


def test_pyproject_as_comfyui_reads_it():
    import tomllib

    from comfy_config import config_parser
    config = config_parser.extract_node_configuration(PACK_DIR)
    project, comfy = config.project, config.tool_comfy
    with open(os.path.join(PACK_DIR, "pyproject.toml"), "rb") as f:
        written = tomllib.load(f)  # what ComfyUI's parser must have read, value for value
    # registry rules for the node id: < 100 characters, letters/digits/-/_/., no consecutive specials,
    # starting with a letter; and the advice not to put "ComfyUI" in it
    assert len(project.name) < 100 and re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*", project.name)
    assert "comfyui" not in project.name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project.version)
    assert (project.name, project.version, project.description, project.urls.repository) == (
        written["project"]["name"], written["project"]["version"], written["project"]["description"],
        written["project"]["urls"]["Repository"])
    assert project.urls.repository.startswith("https://")
    assert project.license.file == "LICENSE" and os.path.getsize(os.path.join(PACK_DIR, "LICENSE")) > 500
    assert project.supported_os == ["OS Independent"]
    assert "GPU :: NVIDIA CUDA" in project.supported_accelerators  # only the registry's known values pass the parser
    assert (comfy.publisher_id, comfy.display_name) == (written["tool"]["comfy"]["PublisherId"],
                                                        written["tool"]["comfy"]["DisplayName"])


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
    """pyproject's requires-comfyui, the run command's oldest ComfyUI and the oldest host of the test matrix
    (CNSD_MATRIX, as tests/run.sh gives it: HOST:TRANSFORMERS ...) are one version."""
    from comfy_config import config_parser

    from runner.comfyui import OLDEST
    config = config_parser.extract_node_configuration(PACK_DIR)
    matrix = os.environ.get("CNSD_MATRIX", "").split()
    if not matrix:
        pytest.fail("CNSD_MATRIX is not set (tests/run.sh sets it to its matrix of ComfyUI and transformers)")
    oldest = min((combo.split(":")[0] for combo in matrix), key=lambda v: tuple(map(int, v.split("."))))
    assert config.project.supported_comfyui_version == f">={oldest}" == f">={OLDEST}"


COMFY_CLI = os.environ.get("CNSD_COMFY_CLI", "")
VALIDATOR_CLEAN = "All validation checks passed successfully"
# what `comfy node validate` prints besides its findings (comfy-cli 1.23)
VALIDATOR_PROGRESS = ("Validating node configuration...", "Running security checks...")


def clean_copy(dest):
    """The files a clone of the repository has (tracked, and new files git does not ignore), as they are in
    the working tree: what the registry gets when this version is published, nothing built or cached."""
    listed = subprocess.run(["git", "-C", PACK_DIR, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode("utf-8").split("\0")
    copied = 0
    for rel in filter(None, listed):
        src = os.path.join(PACK_DIR, rel)
        if os.path.isfile(src):  # a tracked file deleted in the working tree is not published
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
            copied += 1
    assert copied > 20 and os.path.isfile(os.path.join(dest, "pyproject.toml"))
    return dest


def validate(folder):
    """`comfy node validate` as the registry's publishing runs it, in folder: (exit status, output lines)."""
    if not os.path.isfile(COMFY_CLI):
        pytest.fail("CNSD_COMFY_CLI does not name comfy-cli's `comfy` (tests/run.sh installs comfy-cli and sets it)")
    result = subprocess.run([COMFY_CLI, "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=folder,
                            capture_output=True, timeout=300, env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"})
    out = (result.stdout + result.stderr).decode("utf-8", errors="replace")
    return result.returncode, [line.rstrip() for line in out.splitlines() if line.strip()]


def findings(lines):
    return [line for line in lines if line not in VALIDATOR_PROGRESS and VALIDATOR_CLEAN not in line]


def test_registry_validator_finds_nothing(tmp_path):
    """The registry flags a version for any finding, warnings included (the command itself exits 0 on them)."""
    rc, lines = validate(clean_copy(tmp_path / "pack"))
    assert rc == 0, lines
    assert findings(lines) == []
    assert any(VALIDATOR_CLEAN in line for line in lines), lines


def test_registry_validator_findings_are_seen(tmp_path):
    """The check above can fail: a copy with an exec (S102) in it gives a finding this test's reading sees."""
    folder = clean_copy(tmp_path / "pack")
    with open(os.path.join(folder, "benchmarks", "planted.py"), "w", encoding="utf-8") as f:
        f.write('exec("x = 1")\n')
    rc, lines = validate(folder)
    assert rc == 0  # the validator only warns: the output has to be read
    found = "\n".join(findings(lines))
    assert "S102" in found and "benchmarks/planted.py" in found, lines
    assert not any(VALIDATOR_CLEAN in line for line in lines)
