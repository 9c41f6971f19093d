"""Draw the template browser's cards: workflows/<name>.jpg for every shipped workflow.

ComfyUI's template browser shows a custom node pack's workflows under their file names, with a same-named .jpg
as the card's picture, about 250 px wide. A screenshot of a whole graph is unreadable at that size, so each card
says in large type what the workflow does, in Chinese and English, and lists its key settings, read from the
workflow's API twin (workflows/api/<name>.json) so that the card cannot disagree with the graph.

    python docs/thumbnails.py            # rewrite workflows/*.jpg
    python docs/thumbnails.py --out DIR  # write them elsewhere (the tests compare that with the shipped cards)

Needs Pillow and the Noto Sans CJK fonts (Debian: fonts-noto-cjk). Deterministic: the same workflows and fonts
give the same pixels.
"""

import argparse
import json
import os
import sys

from PIL import Image, ImageDraw, ImageFont

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(PACK_DIR, "workflows")
FONT_DIRS = ("/usr/share/fonts/opentype/noto", "/usr/share/fonts/noto-cjk", "/usr/share/fonts/google-noto-cjk")
SIZE = (600, 450)  # 4:3 as the cards; twice the card's width, sharp on high-density screens
BRAND = "中文 Stable Diffusion"

# what each workflow is, for people: Chinese title, English title, and the accent colour of its kind
CARDS = {
    "chinese_sd_txt2img": ("文生图", "Text to image", "#4c8bf5"),
    "chinese_sd_checkpoint_txt2img": ("文生图 · 单文件模型", "Text to image, checkpoint file", "#4c8bf5"),
    "chinese_sd_txt2img_fast": ("快速文生图", "Fast text to image", "#4c8bf5"),
    "chinese_sd_img2img": ("图生图", "Image to image", "#2bb673"),
    "chinese_sd_hires_fix": ("高清修复", "Hires fix", "#9b6cf0"),
    "chinese_sd_lora": ("LoRA", "Text to image with a LoRA", "#f08c2e"),
    "chinese_sd_low_vram": ("低显存", "Low VRAM", "#7a8699"),
    "chinese_sd_controlnet": ("ControlNet 线稿", "ControlNet from edges", "#e0508a"),
    "chinese_sd_inpaint": ("局部重绘", "Inpainting", "#2bb673"),
}


def font(size, bold=False):
    name = "NotoSansCJK-Bold.ttc" if bold else "NotoSansCJK-Regular.ttc"
    for folder in FONT_DIRS:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            for index in range(8):  # the collection's Simplified Chinese face
                face = ImageFont.truetype(path, size, index=index)
                if face.getname()[0] == "Noto Sans CJK SC":
                    return face
    raise SystemExit(f"no {name} (Noto Sans CJK) in {', '.join(FONT_DIRS)}: install fonts-noto-cjk")


def by_type(workflow, class_type):
    return [n["inputs"] for n in workflow.values() if n["class_type"] == class_type]


def settings(workflow):
    """The card's lines of key settings (Chinese · English), from the API workflow."""
    lines = []
    samplers = by_type(workflow, "KSampler")
    first = samplers[0]
    lines.append(f"{first['sampler_name']} + {first['scheduler']} · {first['steps']} 步 steps · CFG {first['cfg']:g}")
    for latent in by_type(workflow, "EmptyLatentImage"):
        size = f"{latent['width']}×{latent['height']}"
        for upscale in by_type(workflow, "LatentUpscaleBy"):
            scale = upscale["scale_by"]
            size += f" → ×{scale:g} = {round(latent['width'] * scale)}×{round(latent['height'] * scale)}"
        lines.append(size)
    if by_type(workflow, "LoadImage") and not by_type(workflow, "EmptyLatentImage"):
        lines.append("输出与输入同尺寸 · output = input size")
    for control in by_type(workflow, "ControlNetApplyAdvanced"):
        lines.append(f"Canny → SD 2.1 ControlNet · 强度 strength {control['strength']:g}")
    if by_type(workflow, "SetLatentNoiseMask"):
        lines.append("只重绘蒙版 · repaints the mask only")
    for later in samplers[1:]:
        lines.append(f"第二遍 2nd pass · {later['steps']} 步 steps · 降噪 denoise {later['denoise']:g}")
    if len(samplers) == 1 and (first["denoise"] != 1.0 or by_type(workflow, "SetLatentNoiseMask")):
        lines.append(f"降噪 denoise {first['denoise']:g}")
    for lora in by_type(workflow, "LoraLoader"):
        lines.append(f"LoRA · 强度 strength {lora['strength_model']:g} / {lora['strength_clip']:g}")
    for loader in by_type(workflow, "ChineseSD_ModelScopeLoader") + by_type(workflow, "ChineseSD_CheckpointLoader"):
        if loader.get("text_encoder_device") == "cpu":
            lines.append("文本编码器在 CPU · text encoder on CPU")
        dtypes = {loader.get("unet_dtype"), loader.get("text_encoder_dtype")} - {"default"}
        if dtypes:
            lines.append(" / ".join(sorted(dtypes)) + " 权重 weights")
    if by_type(workflow, "ChineseSD_CheckpointLoader"):
        lines.append("models/checkpoints/*.safetensors")
    return lines


def fit(draw, text, face_of, size, width):
    """The largest font from size down whose rendering of text is at most width wide."""
    while size > 12:
        face = face_of(size)
        if draw.textlength(text, font=face) <= width:
            return face
        size -= 1
    return face_of(size)


def card(name, workflow):
    zh, en, accent = CARDS[name]
    image = Image.new("RGB", SIZE, "#1f2128")
    draw = ImageDraw.Draw(image)
    w, h = SIZE
    margin = 36
    draw.rectangle([0, 0, w, 14], fill=accent)
    y = 36
    face = fit(draw, zh, lambda s: font(s, bold=True), 76, w - 2 * margin)
    draw.text((margin, y), zh, font=face, fill="#ffffff")
    y += face.size + 22
    face = fit(draw, en, lambda s: font(s, bold=True), 38, w - 2 * margin)
    draw.text((margin, y), en, font=face, fill=accent)
    y += face.size + 26
    draw.line([margin, y, w - margin, y], fill="#3a3d48", width=2)
    y += 16
    for line in settings(workflow):
        face = fit(draw, line, font, 28, w - 2 * margin)
        draw.text((margin, y), line, font=face, fill="#d8dae0")
        y += 40
    if y > h - 64:
        raise SystemExit(f"{name}: too many settings for the card")
    face = font(24)
    draw.text((margin, h - 30 - face.size), BRAND, font=face, fill="#8a8f9c")
    return image


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=WORKFLOWS, help="folder for the .jpg files (default: workflows/)")
    args = parser.parse_args(argv)
    names = sorted(n[:-5] for n in os.listdir(WORKFLOWS) if n.endswith(".json"))
    unknown = sorted(set(names) - set(CARDS))
    if unknown:
        raise SystemExit(f"no card text for {', '.join(unknown)}: add it to CARDS in {__file__}")
    os.makedirs(args.out, exist_ok=True)
    for name in names:
        with open(os.path.join(WORKFLOWS, "api", name + ".json"), encoding="utf-8") as f:
            workflow = json.load(f)
        card(name, workflow).save(os.path.join(args.out, name + ".jpg"), quality=90, optimize=True)
    return names


if __name__ == "__main__":
    sys.stdout.reconfigure(encoding="utf-8")
    print("\n".join(f"{name}.jpg" for name in main()))
