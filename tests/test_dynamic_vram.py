"""ComfyUI 0.33 turns on dynamic VRAM on NVIDIA GPUs: comfy.ops then leaves Linear/Conv weights unset until a
state dict is loaded. The pack's UNet check must list every tensor all the same (it refused every UNet on an H200
before). The GPU state is reproduced here by ComfyUI's own switch, comfy.memory_management.aimdo_enabled; hosts
without dynamic VRAM (0.3.x) have no such state, and this module has no test there."""

import importlib.util
import os
import re

import pytest

from conftest import pack

HAS_DYNAMIC_VRAM = importlib.util.find_spec("comfy.memory_management") is not None

if HAS_DYNAMIC_VRAM:
    import comfy.memory_management
    import comfy.ops

    @pytest.fixture
    def dynamic_vram(monkeypatch):
        monkeypatch.setattr(comfy.memory_management, "aimdo_enabled", True)
        # the state the check has to work in: ComfyUI's own layers come without weights
        assert comfy.ops.disable_weight_init.Linear(4, 4).weight is None

    def test_the_unet_check_lists_every_tensor_with_dynamic_vram(dynamic_vram, model_folders):
        unet = pack.loaders.unet_file.read_unet_file(os.path.join(model_folders["csd_eps_safetensors"], "unet"))
        pack.loaders.unet.check_unet(unet)  # a complete UNet passes
        missing = next(k for k in unet.sd if k.endswith(".weight") and "emb_layers" in k)
        del unet.sd[missing]
        named = rf"1 missing tensors \(e\.g\. '{re.escape(missing)}'\)"  # the tensor removed
        with pytest.raises(pack.loaders.errors.ModelLoadError, match=named):
            pack.loaders.unet.check_unet(unet)  # and an incomplete one is still refused
