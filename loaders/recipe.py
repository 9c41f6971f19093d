"""Which vocabulary and encode recipe belong to a text encoder: the one resolver the loader, the encode node and
the token counter share.

A recipe says how prompts become conditioning: the window length and whether padding is masked out of
attention. ModelScope's Chinese SD pipeline (text encoder ChineseCLIPTextModel) uses 52 tokens with an attention
mask; a stock diffusers StableDiffusionPipeline pads to its tokenizer's model_max_length and masks only when the
text config sets use_attention_mask. `resolve` finds the vocabulary and recipe of a text_encoder/ folder or a
weights file reading only small files (configs, tokenizer files, a safetensors header), never the weights;
`tokenizer_data` turns them into the tokenizer_data ComfyUI hands to the CLIP's tokenizer.

A leaf module: it imports no module of the pack that imports it.
"""

import dataclasses
import os

from . import metadata, tokenizer_files
from .errors import ModelLoadError
from .values import Values, read_json
from .weights import locate_weights, read_metadata

KEY = "chinese_clip"  # ComfyUI's embedding key / tokenizer_data prefix of the pack's CLIP
TEXT_STEMS = ("model", "pytorch_model", "diffusion_pytorch_model")
DEFAULT_HIDDEN = 1024  # the embedding size of the ModelScope model, when none is known


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How prompts become conditioning: window length and whether padding is masked out of attention."""
    name: str
    max_length: int
    attention_mask: bool
    origin: tuple = dataclasses.field(default=(), compare=False)  # (file, key) the window length came from

    def describe(self):
        source = {"modelscope": "ModelScope Chinese SD pipeline", "diffusers": "diffusers StableDiffusionPipeline"}
        mask = "attention mask" if self.attention_mask else "no attention mask"
        return f"{source.get(self.name, self.name)}: {self.max_length} tokens, {mask}"


MODELSCOPE = Recipe("modelscope", 52, True)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `resolve` found for a text encoder."""
    tokenizer: tokenizer_files.Tokenizer
    recipe: Recipe
    config: Values         # the BERT shape as written: a config.json's (text) section or the converter's metadata
    weights: str           # the weights file
    converted: bool        # the weights file carries the converter's metadata

    @property
    def hidden(self):
        """The text tower's width as its config says it (None when not said or not plausible)."""
        value = self.config.raw("hidden_size")
        return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 65536 else None


def from_metadata(text_meta, path):
    """(Tokenizer, Recipe) of a converted file's metadata.read_text_encoder entry."""
    r = text_meta["recipe"]
    recipe = Recipe(r["name"], r["max_length"], r["attention_mask"], origin=(path, r["origin"]))
    return text_meta["tokenizer"] or tokenizer_files.shipped(), recipe


def tokenizer_folder(candidates):
    """The first folder holding vocab.txt or tokenizer.json (None: use the vocabulary shipped with the pack)."""
    return next((f for f in candidates if tokenizer_files.is_tokenizer_folder(f)), None)


def text_encoder_class(model_folder):
    """The text encoder class a model folder's model_index.json names (None if it names none)."""
    path = os.path.join(model_folder, "model_index.json")
    if not os.path.isfile(path):
        return None
    index = Values(read_json(path), path)
    entry = index.raw("text_encoder")
    if entry is None:
        return None
    if not isinstance(entry, list) or len(entry) != 2 or not all(isinstance(e, (str, type(None))) for e in entry):
        index.fail("text_encoder", entry, '["library", "class name"], e.g. ["transformers", "ChineseCLIPTextModel"]')
    return entry[1]


def recipe_for_folder(model_folder, tokenizer, text_config):
    """The encode recipe a model folder implies (MODELSCOPE when there is no model folder around)."""
    if not model_folder or not os.path.isfile(os.path.join(model_folder, "model_index.json")):
        return MODELSCOPE
    pipeline = ""
    conf_path = os.path.join(model_folder, "configuration.json")
    if os.path.isfile(conf_path):
        pipeline = Values(read_json(conf_path), conf_path).section("pipeline").text("type", default="")
    if text_encoder_class(model_folder) == "ChineseCLIPTextModel" or "chinese-stable-diffusion" in pipeline:
        return MODELSCOPE
    if tokenizer.model_max_length is None:
        raise ModelLoadError(tokenizer.source, "no model_max_length in its tokenizer_config.json",
                             "the prompt length a stock diffusers pipeline pads to")
    mask = text_config.boolean("use_attention_mask", default=False)
    return Recipe("diffusers", tokenizer.model_max_length, mask,
                  origin=(os.path.join(os.path.dirname(tokenizer.source), "tokenizer_config.json"), "model_max_length"))


def resolve(path, tokenizer_dir=None, recipe=None):
    """The Settings of the text encoder at path (a text_encoder/ folder or any supported weights file).

    A converted file: everything from its metadata. A file keeping its transformers name inside a folder (or the
    folder itself): that folder's config.json, its vocabulary or the one in ../tokenizer/, and the recipe the model
    folder around implies. Any other file: the vocabulary shipped with the pack and the ModelScope recipe.
    tokenizer_dir / recipe override what is found. Raises ModelLoadError for the files it reads."""
    folder, weights, owns_folder = locate_weights(path, TEXT_STEMS)
    if not os.path.isfile(weights):
        raise ModelLoadError(weights, "no such file", "a weights file (.safetensors, .bin, .pt)")
    meta = metadata.read_text_encoder(read_metadata(weights), weights)
    if meta is not None:
        tokenizer, found = from_metadata(meta, weights)
        if tokenizer_dir:
            tokenizer = tokenizer_files.read_folder(tokenizer_dir)
        return Settings(tokenizer, recipe or found, meta["config"], weights, True)
    config_path = os.path.join(folder, "config.json")
    config = Values(read_json(config_path) if owns_folder and os.path.isfile(config_path) else {}, config_path)
    model_folder = os.path.dirname(os.path.normpath(folder)) if owns_folder else None
    if tokenizer_dir is None and owns_folder:
        tokenizer_dir = tokenizer_folder([folder, os.path.join(model_folder, "tokenizer")])
    tokenizer = tokenizer_files.read_folder(tokenizer_dir) if tokenizer_dir else tokenizer_files.shipped()
    if recipe is None:
        text_config = config.section("text_config") if config.has("text_config") else config
        recipe = recipe_for_folder(model_folder, tokenizer, text_config)
    return Settings(tokenizer, recipe, config, weights, False)


def resolve_checkpoint(path):
    """The Settings of the converter's all-in-one checkpoint (None when its chinese_sd metadata has no text
    encoder settings: the checkpoint loader refuses such a file)."""
    if not os.path.isfile(path):
        raise ModelLoadError(path, "no such file", "an all-in-one checkpoint written by this pack's converter")
    meta = metadata.read_text_encoder(read_metadata(path), path)
    if meta is None:
        return None
    tokenizer, recipe = from_metadata(meta, path)
    return Settings(tokenizer, recipe, meta["config"], path, True)


def tokenizer_data(tokenizer=None, recipe=None, hidden=None):
    """The tokenizer_data of the pack's CLIP tokenizer (loaders/chinese_clip.py) for this vocabulary, recipe and
    embedding width (the shipped vocabulary, ModelScope's recipe and 1024 when not given)."""
    tokenizer = tokenizer or tokenizer_files.shipped()
    recipe = recipe or MODELSCOPE
    data = {f"{KEY}_embedding_size": hidden or DEFAULT_HIDDEN, f"{KEY}_max_length": recipe.max_length,
            f"{KEY}_recipe": recipe.describe()}
    if not tokenizer.shipped:
        data[f"{KEY}_tokenizer_files"] = tokenizer.files()
    return data


def watched_files(path):
    """The small files whose change changes resolve(path) (for caching by their stat)."""
    path = os.path.normpath(os.fspath(path))
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    model_folder = os.path.dirname(folder)
    names = [os.path.join(folder, n) for n in ("config.json", *_TOKENIZER_FILES)]
    names += [os.path.join(model_folder, "tokenizer", n) for n in _TOKENIZER_FILES]
    names += [os.path.join(model_folder, n) for n in ("model_index.json", "configuration.json")]
    if os.path.isdir(path):
        try:
            names += sorted(os.path.join(path, n) for n in os.listdir(path))[:256]
        except OSError:
            pass
    else:
        names.append(path)
    return names


_TOKENIZER_FILES = (tokenizer_files.VOCAB, tokenizer_files.TOKENIZER_JSON, tokenizer_files.CONFIG,
                    "special_tokens_map.json", "added_tokens.json")
