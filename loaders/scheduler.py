"""Noise schedules: a diffusers scheduler_config.json (or the converter's metadata) read and checked, and the
ComfyUI model_sampling object for it, as ComfyUI's own ModelSamplingDiscrete node makes one."""

import logging
import types

import comfy.model_sampling

from .errors import ModelLoadError
from .metadata import PREDICTION_TYPES
from .values import Values, read_json, show

log = logging.getLogger(__name__)

# diffusers beta_schedule -> ComfyUI beta_schedule (ComfyUI's "linear" is diffusers' "scaled_linear")
BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "squaredcos_cap_v2"}
# Stable Diffusion's training schedule, used when nothing says otherwise
SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "num_train_timesteps": 1000, "rescale_betas_zero_snr": False}
MAX_TRAIN_TIMESTEPS = 10000
# noise levels ComfyUI can sample with (Stable Diffusion's span 0.029 to 14.6; zero-SNR schedules end near 4096)
SIGMA_RANGE = (1e-5, 1e5)


class EpsilonSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
    """What ComfyUI's ModelSamplingDiscrete node patches in for sampling 'eps'."""


class VSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
    """What ComfyUI's ModelSamplingDiscrete node patches in for sampling 'v_prediction'."""


SAMPLING = {"epsilon": EpsilonSampling, "v_prediction": VSampling}


def model_sampling(prediction, settings):
    """The model_sampling object for a prediction type and normalized diffusers settings (scheduler_settings)."""
    return SAMPLING[prediction](types.SimpleNamespace(sampling_settings=comfy_sampling(settings)))


def comfy_sampling(settings):
    """ComfyUI sampling_settings for ModelSamplingDiscrete from normalized diffusers settings."""
    return {"beta_schedule": BETA_SCHEDULES[settings["beta_schedule"]], "linear_start": settings["beta_start"],
            "linear_end": settings["beta_end"], "timesteps": settings["num_train_timesteps"],
            "zsnr": settings["rescale_betas_zero_snr"]}


def scheduler_settings(cfg):
    """(prediction type, normalized diffusers schedule settings) from a diffusers scheduler config (Values)."""
    prediction = cfg.choice("prediction_type", PREDICTION_TYPES, default="epsilon")
    if cfg.has("trained_betas"):
        cfg.fail("trained_betas", cfg.raw("trained_betas"), "no explicit list (a beta_schedule with beta_start/beta_end)")
    schedule = cfg.choice("beta_schedule", tuple(BETA_SCHEDULES), default="linear")  # diffusers' defaults
    start = cfg.number("beta_start", default=0.0001, lo=0, hi=0.5)
    end = cfg.number("beta_end", default=0.02, lo=0, hi=0.5)
    if not start < end:
        cfg.fail("beta_end", end, f"a number above beta_start ({start:g})")
    settings = {"beta_schedule": schedule, "beta_start": start, "beta_end": end,
                "num_train_timesteps": cfg.integer("num_train_timesteps", default=1000, lo=2, hi=MAX_TRAIN_TIMESTEPS),
                "rescale_betas_zero_snr": cfg.boolean("rescale_betas_zero_snr", default=False)}
    sigmas = model_sampling(prediction, settings).sigmas
    lo, hi = SIGMA_RANGE
    if not (sigmas.isfinite().all() and sigmas.min() >= lo and sigmas.max() <= hi):
        raise ModelLoadError(cfg.path, f"{cfg.where}beta settings {show(settings)} giving noise levels from "
                             f"{sigmas.min().item():.3g} to {sigmas.max().item():.3g}",
                             f"noise levels between {lo:g} and {hi:g} (Stable Diffusion's: 0.029 to 14.6)")
    return prediction, settings


def resolve_sampling(unet_file, scheduler_config_path=None, prediction_override="auto"):
    """(prediction type, diffusers schedule settings) for a UNet: an explicit scheduler config, else the
    converter's metadata, else the scheduler config that belongs to the file, else Stable Diffusion's
    defaults (with a warning). A prediction override other than 'auto' wins."""
    if prediction_override not in ("auto", *PREDICTION_TYPES):
        raise ValueError(f"prediction must be auto or one of {', '.join(PREDICTION_TYPES)}, not {prediction_override!r}")
    path = scheduler_config_path or (None if unet_file.meta else unet_file.scheduler_config)
    if path is not None:
        prediction, settings = scheduler_settings(Values(read_json(path), path))
    elif unet_file.meta is not None:
        _, settings = scheduler_settings(unet_file.meta["scheduler"])
        prediction = unet_file.meta["prediction"]
    else:
        prediction, settings = "epsilon", dict(SD_SCHEDULER)
        if prediction_override == "auto":
            log.warning("No scheduler config for %s: assuming epsilon prediction and Stable Diffusion's "
                        "scaled_linear betas (0.00085-0.012). Set the prediction input if images come out grey "
                        "or burnt.", unet_file.path)
    if prediction_override != "auto":
        prediction = prediction_override
    return prediction, settings
