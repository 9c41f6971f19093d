"""A UNet shape ComfyUI detects goes through ComfyUI's own loader (comfy.sd.load_diffusion_model_state_dict), with
the prediction type and noise schedule of the model's scheduler_config.json patched in as ComfyUI's
ModelSamplingDiscrete node does (an object patch of model_sampling).

The test UNet has the real SD 2.1 layout (four levels of two ResNets, cross-attention in the first three, linear
projections, 64-channel heads, cross-attention width 1024) at 320 channels on every level instead of
320/640/1280/1280 (110 M parameters instead of 865 M): ComfyUI's table of diffusers UNets takes it for SD 2.1 and
its detection for an SD20 model, as it does the real model. Its prediction type is the opposite of ComfyUI's
guess from the weights (the spread of output_blocks.11.1.transformer_blocks.0.norm1.bias), so the files can be
seen to win. A variant whose config.json gives heads ComfyUI would not assume is built by the pack itself, with
ComfyUI's current patcher class, as are the tiny test models."""

import importlib.util
import json
import math
import os

import pytest
import torch

from conftest import pack

TOLERANCE = 1e-5
BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.001, "beta_end": 0.016, "num_train_timesteps": 1000}
GUESS_KEY = "up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias"  # ComfyUI's output_blocks.11.1...norm1.bias
VARIANTS = {  # name: (prediction in scheduler_config.json, attention_head_dim, ComfyUI's guess from the weights,
    #                cross-attention width: 1024 SD2.x family with linear projections, 768 SD1.x with convolutions)
    "v_guessed_eps": ("v_prediction", 5, "eps", 1024),
    "eps_guessed_v": ("epsilon", 5, "v_prediction", 1024),
    "eps_odd_heads": ("epsilon", 8, "eps", 1024),  # 8 heads of 40 channels: ComfyUI's SD20 assumes 64-channel heads
    "sd1_v_guessed_eps": ("v_prediction", 8, "eps", 768),  # ComfyUI's SD15: 8 heads (of 40 channels here)
}
unet_loader = pack.loaders.unet


def unet_config(heads, context):
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320,) * 4,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=context,
                attention_head_dim=heads, use_linear_projection=context == 1024, upcast_attention=context == 1024,
                norm_num_groups=32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{variant: model folder with unet/ and scheduler/}, written by diffusers itself."""
    from diffusers import UNet2DConditionModel
    out = {}
    for name, (prediction, heads, guess, context) in VARIANTS.items():
        torch.manual_seed(len(out))
        model = UNet2DConditionModel(**unet_config(heads, context)).eval()
        with torch.no_grad():
            bias = dict(model.named_parameters())[GUESS_KEY]
            bias.normal_(0, 0.2 if guess == "v_prediction" else 0.0)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder / "unet", safe_serialization=True)
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": "DDIMScheduler", "prediction_type": prediction, **BETAS}), encoding="utf-8")
        out[name] = folder
        del model
    return out


def diffusers_state_dict(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def count_comfy_loads(monkeypatch):
    """A list that gets one entry per call of ComfyUI's loader (which still does all the work)."""
    import comfy.sd
    calls, real = [], comfy.sd.load_diffusion_model_state_dict
    monkeypatch.setattr(comfy.sd, "load_diffusion_model_state_dict",
                        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    return calls


def comfy_sampling_class(prediction):
    import comfy.model_sampling
    return comfy.model_sampling.V_PREDICTION if prediction == "v_prediction" else comfy.model_sampling.EPS


def test_comfyui_detects_the_shape(folders):
    import comfy.model_detection
    import comfy.supported_models
    sd = diffusers_state_dict(folders["v_guessed_eps"])
    assert comfy.model_detection.unet_config_from_diffusers_unet(sd)["context_dim"] == 1024  # its table's SD 2.1
    ldm = pack.loaders.unet_file.read_unet_file(os.path.join(folders["v_guessed_eps"], "unet")).sd
    detected = comfy.model_detection.model_config_from_unet(ldm, "")
    assert type(detected) is comfy.supported_models.SD20
    assert detected.unet_config["channel_mult"] == [1, 1, 1, 1]  # read from the weights, not the table's


@pytest.mark.parametrize("name", ["v_guessed_eps", "eps_guessed_v", "sd1_v_guessed_eps"])
def test_a_detected_shape_is_comfyuis_own_model_but_for_model_sampling(folders, name, monkeypatch):
    import comfy.model_patcher
    import comfy.sd

    class Current(comfy.model_patcher.ModelPatcher):
        """Stands for whatever class ComfyUI's CoreModelPatcher is at the time of the load (dynamic VRAM's on NVIDIA)."""

    has_core = hasattr(comfy.model_patcher, "CoreModelPatcher")  # ComfyUI 0.33 has it, 0.3.52 does not
    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", Current, raising=False)
    prediction, _, guess, _ = VARIANTS[name]
    calls = count_comfy_loads(monkeypatch)
    ours = unet_loader.load_unet(os.path.join(folders[name], "unet"), dtype=torch.float32)
    assert calls == [1]  # loaded by ComfyUI's own loader
    ldm = pack.loaders.unet_file.read_unet_file(os.path.join(folders[name], "unet")).sd
    stock = comfy.sd.load_diffusion_model_state_dict(ldm, model_options={"dtype": torch.float32})
    assert type(ours) is type(stock)  # the patcher class ComfyUI's loader uses on this host
    assert type(ours) is (Current if has_core else comfy.model_patcher.ModelPatcher)
    assert type(ours.model) is type(stock.model)
    assert type(ours.model.model_config) is type(stock.model.model_config)
    assert ours.model.model_config.unet_config == stock.model.model_config.unet_config
    assert ours.model.manual_cast_dtype == stock.model.manual_cast_dtype
    # ComfyUI guessed the other prediction type from the weights; the scheduler config wins by an object patch
    assert isinstance(stock.get_model_object("model_sampling"), comfy_sampling_class(guess))
    assert isinstance(ours.get_model_object("model_sampling"), comfy_sampling_class(prediction))
    assert set(ours.object_patches) == {"model_sampling"}
    ours_sd, stock_sd = ours.model.diffusion_model.state_dict(), stock.model.diffusion_model.state_dict()
    assert ours_sd.keys() == stock_sd.keys() and all(torch.equal(ours_sd[k], stock_sd[k]) for k in ours_sd)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_model_sampling_is_the_scheduler_configs(folders, name):
    from diffusers import DDIMScheduler
    import comfy.model_management
    import comfy.model_sampling
    prediction = VARIANTS[name][0]
    patcher = unet_loader.load_unet(os.path.join(folders[name], "unet"), dtype=torch.float32)
    sampling = patcher.get_model_object("model_sampling")
    assert isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete)
    assert isinstance(sampling, comfy_sampling_class(prediction))
    assert isinstance(sampling, comfy.model_sampling.V_PREDICTION) == (prediction == "v_prediction")
    sched = DDIMScheduler.from_pretrained(os.path.join(folders[name], "scheduler"))
    assert (sched.config.prediction_type, sched.config.beta_end) == (prediction, BETAS["beta_end"])
    alphas = sched.alphas_cumprod.double()
    expected = ((1 - alphas) / alphas) ** 0.5
    assert torch.allclose(sampling.sigmas.double(), expected, rtol=1e-4)  # diffusers' betas are float32
    default = comfy.model_sampling.ModelSamplingDiscrete()  # Stable Diffusion's 0.00085-0.012
    assert abs(sampling.sigma_max.item() / default.sigma_max.item() - 1) > 0.05
    # ComfyUI's own machinery puts the patch in place when it loads the model, and takes it out again
    comfy.model_management.load_models_gpu([patcher])
    try:
        assert patcher.model.model_sampling is sampling
    finally:
        comfy.model_management.unload_all_models()
    assert patcher.model.model_sampling is not sampling


@pytest.mark.parametrize("name", list(VARIANTS))
def test_output_matches_diffusers(folders, name, record_parity):
    from diffusers import UNet2DConditionModel
    patcher = unet_loader.load_unet(os.path.join(folders[name], "unet"), dtype=torch.float32)
    _, heads, _, context_dim = VARIANTS[name]
    assert pack.loaders.unet.head_widths(patcher.model.model_config.unet_config) == [320 // heads] * 4
    reference = UNet2DConditionModel.from_pretrained(os.path.join(folders[name], "unet"),
                                                     torch_dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 52, context_dim, generator=gen)
    worst = 0.0
    for t in (999.0, 1.0):
        timesteps = torch.full((1,), t)
        with torch.no_grad():
            ours = patcher.model.diffusion_model(x, timesteps=timesteps, context=context)
            ref = reference(x, timesteps, encoder_hidden_states=context).sample
        assert ours.shape == ref.shape
        worst = max(worst, (ours - ref).abs().max().item())
        assert ref.abs().max().item() > 0.1  # not two near-zero tensors
    assert worst <= TOLERANCE
    record_parity(f"unet {name} (detected shape)", worst, TOLERANCE)


def test_odd_heads_are_built_by_the_pack_with_comfyuis_current_patcher_class(folders, monkeypatch):
    import comfy.model_patcher

    class Current(comfy.model_patcher.ModelPatcher):
        """Stands for whatever class ComfyUI's CoreModelPatcher is at the time of the load."""

    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", Current, raising=False)
    calls = count_comfy_loads(monkeypatch)
    odd = unet_loader.load_unet(os.path.join(folders["eps_odd_heads"], "unet"), dtype=torch.float32)
    assert calls == [] and type(odd) is Current
    assert odd.model.model_config.unet_config["num_head_channels"] == 40


def test_a_latent_scale_other_than_the_familys_is_an_object_patch(folders):
    patcher = unet_loader.load_unet(os.path.join(folders["v_guessed_eps"], "unet"), latent_scale=0.13025)
    assert patcher.get_model_object("latent_format").scale_factor == 0.13025
    assert patcher.model.latent_format.scale_factor == 0.18215  # the model's own, until ComfyUI patches it in
    same = unet_loader.load_unet(os.path.join(folders["v_guessed_eps"], "unet"), latent_scale=0.18215)
    assert "latent_format" not in same.object_patches


SD21_CONFIG = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                   block_out_channels=(320, 640, 1280, 1280),
                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024,
                   attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, norm_num_groups=32)


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """A full-size SD 2.1 UNet (865 M parameters, random fp16 weights) in the ModelScope layout, with an
    epsilon scheduler config (as the real model's) and a norm bias spread that makes ComfyUI guess v-prediction."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet2DConditionModel(**SD21_CONFIG).state_dict().items()}
    # each tensor a window of one random pool at its own offset (drawing 865 M fp16 normals takes ~20 s of CPU)
    pool = torch.randn(1 << 22, generator=torch.Generator().manual_seed(21)).to(torch.float16)
    tiled = pool.repeat(2 + max(math.prod(shape) for shape in shapes.values()) // pool.numel())
    sd = {k: tiled[(i * 1_000_003) % pool.numel():][:math.prod(shape)].reshape(shape) *
          (0.2 if k == GUESS_KEY else 0.02) for i, (k, shape) in enumerate(shapes.items())}
    folder = tmp_path_factory.mktemp("sd21")
    (folder / "unet").mkdir()
    save_file(sd, folder / "unet" / "diffusion_pytorch_model.safetensors")
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **SD21_CONFIG}),
                                                 encoding="utf-8")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "prediction_type": "epsilon", **BETAS}), encoding="utf-8")
    return folder


def test_full_size_sd21_is_comfyuis_own_loaders_model_but_for_model_sampling(full_size, monkeypatch):
    """The real model's shape: the pack's MODEL is what ComfyUI's own loader makes of the same diffusers file
    (patcher class, model class, config, weights), except model_sampling, which is the scheduler config's. On a
    host with dynamic VRAM (ComfyUI 0.33) it is switched on as ComfyUI's main.py does on NVIDIA GPUs (its patcher
    class then reroutes a CPU load to the plain ModelPatcher, as for ComfyUI's own models)."""
    import comfy.model_patcher
    import comfy.model_sampling
    import comfy.ops
    import comfy.sd
    from safetensors.torch import load_file
    if importlib.util.find_spec("comfy.memory_management") is not None:
        import comfy.memory_management
        monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcherDynamic)
        monkeypatch.setattr(comfy.memory_management, "aimdo_enabled", True)
        assert comfy.ops.disable_weight_init.Linear(4, 4).weight is None  # ComfyUI's layers come without weights
    calls = count_comfy_loads(monkeypatch)
    ours = unet_loader.load_unet(os.path.join(full_size, "unet"), dtype=torch.float16)
    assert calls == [1]
    stock = comfy.sd.load_diffusion_model_state_dict(
        load_file(os.path.join(full_size, "unet", "diffusion_pytorch_model.safetensors")),
        model_options={"dtype": torch.float16})
    assert type(ours) is type(stock) and type(ours.model) is type(stock.model)
    assert type(ours.model.model_config) is type(stock.model.model_config)
    assert ours.model.model_config.unet_config == stock.model.model_config.unet_config
    assert ours.model.model_config.unet_config["channel_mult"] == [1, 2, 4, 4]
    assert isinstance(stock.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)  # its guess
    sampling = ours.get_model_object("model_sampling")
    assert isinstance(sampling, comfy.model_sampling.EPS) and not isinstance(sampling, comfy.model_sampling.V_PREDICTION)
    assert set(ours.object_patches) == {"model_sampling"} and not stock.object_patches
    ours_sd, stock_sd = ours.model.diffusion_model.state_dict(), stock.model.diffusion_model.state_dict()
    assert len(ours_sd) == len(stock_sd) == 686
    assert all(ours_sd[k].dtype == torch.float16 and torch.equal(ours_sd[k], stock_sd[k]) for k in stock_sd)


@pytest.mark.parametrize("name,sampling", [("v_guessed_eps", "v_prediction"), ("eps_guessed_v", "eps")])
def test_sampling_equals_comfyuis_own_loader_with_its_model_sampling_node(folders, tmp_path, name, sampling):
    """With Stable Diffusion's betas (what ComfyUI's ModelSamplingDiscrete node uses), the pack's MODEL samples
    exactly what ComfyUI's own loader followed by that node samples: the same latents, bit for bit."""
    import comfy.sd
    import nodes as comfy_nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    prediction = VARIANTS[name][0]
    config = tmp_path / "scheduler_config.json"
    config.write_text(json.dumps({"prediction_type": prediction, "beta_schedule": "scaled_linear",
                                  "beta_start": 0.00085, "beta_end": 0.012}), encoding="utf-8")
    ours = unet_loader.load_unet(os.path.join(folders[name], "unet"), dtype=torch.float32, scheduler_config=str(config))
    ldm = pack.loaders.unet_file.read_unet_file(os.path.join(folders[name], "unet")).sd
    stock = comfy.sd.load_diffusion_model_state_dict(ldm, model_options={"dtype": torch.float32})
    (stock,) = ModelSamplingDiscrete().patch(stock, sampling, False)
    gen = torch.Generator().manual_seed(3)
    positive = [[torch.randn(1, 52, 1024, generator=gen), {}]]
    negative = [[torch.randn(1, 52, 1024, generator=gen), {}]]
    latents = []
    for model in (ours, stock):
        latent = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        with torch.inference_mode():
            out = comfy_nodes.common_ksampler(model, 7, 3, 7.5, "euler", "simple", positive, negative, latent)[0]
        latents.append(out["samples"])
    assert latents[0].shape == (1, 4, 8, 8) and latents[0].isfinite().all() and latents[0].abs().max() > 0.1
    assert torch.equal(latents[0], latents[1])
