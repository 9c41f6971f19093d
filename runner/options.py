"""The run command's per-picture options and their checks, shared by the command line (argparse types) and the
prompts file's columns (runner.prompts_file). Standard library only."""

MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION
MAX_SEED = 2 ** 64 - 1
LONG_PROMPT = ("truncate", "chunk")


class BadValue(ValueError):
    """A value an option does not take; the message says why (argparse shows it as the option's error)."""


def whole_number(text, lo, hi):
    try:
        value = int(text)
    except (ValueError, TypeError):
        raise BadValue(f"{text!r} is not a whole number") from None
    if not lo <= value <= hi:
        raise BadValue(f"{value} is outside {lo}..{hi}")
    return value


def size(text):
    value = whole_number(text, 16, MAX_RESOLUTION)
    if value % 8:
        raise BadValue(f"{value} is not a multiple of 8 (the VAE works in 8-pixel blocks)")
    return value


def guidance(text):
    try:
        value = float(text)
    except (ValueError, TypeError):
        raise BadValue(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 100.0:  # also refuses nan
        raise BadValue(f"{value} is outside 0..100")
    return value


def steps(text):
    return whole_number(text, 1, 10000)


def seed(text):
    return whole_number(text, 0, MAX_SEED)


def long_prompt(text):
    if text not in LONG_PROMPT:
        raise BadValue(f"{text!r} is not one of {', '.join(LONG_PROMPT)}")
    return text


def name(text):
    """A sampler or scheduler name (checked against the server's list later)."""
    if not text or not text.strip():
        raise BadValue("is empty")
    return text.strip()


def png_name(text):
    """A row's own file name for its picture: a plain .png name inside the --out folder."""
    if not text.lower().endswith(".png") or len(text) <= 4:
        raise BadValue(f"{text!r} is not a .png file name")
    if any(c in text for c in '<>:"/\\|?*') or text != text.strip() or text.startswith(".") or \
            any(ord(c) < 32 for c in text):
        raise BadValue(f"{text!r} is not a plain file name (no folders, none of < > : \" / \\ | ? *)")
    return text


def text(value):
    return value


def prompt(value):
    if not value.strip():
        raise BadValue("is empty")
    return value


# a prompts file's columns (or JSON keys): the command's own options, by their dest names
COLUMNS = {"prompt": prompt, "negative": text, "seed": seed, "steps": steps, "cfg": guidance, "width": size,
           "height": size, "sampler": name, "scheduler": name, "long_prompt": long_prompt, "out": png_name}
NUMBERS = ("seed", "steps", "cfg", "width", "height")
