"""The model from ModelScope, fetched with ModelScope's own client (modelscope-hub) into a models folder.

    folder = ensure_model(models_dir, progress=..., cancelled=...)

- Which repo: only the model's id (and its old name); nothing a caller passes can name another repo.
- Which files: only those the loaders read (configs, tokenizer, one weights set per component), chosen from the
  hub's listing, which is untrusted: an entry whose path is not one of those names is skipped, never written; an
  entry without a proper size or sha256 is refused.
- Never half a model: files land in `<models_dir>/.downloading/<folder>/` (a hidden folder the loaders never list;
  the client resumes its partial files there), the client checks each file's sha256, and the folder moves into
  place only when every file is complete. A record of what was verified is left in the model folder, so a later
  load checks sizes only: no network, no re-hash.
- One download at a time per models folder (a file lock): a second caller waits and then finds the model there.

Nothing here knows about ComfyUI's UI: progress(done_bytes, total_bytes) and cancelled() -> bool come from the
caller. modelscope-hub and filelock are imported only when a download is asked for.
"""

import json
import logging
import os
import re
import shutil
import threading
import time

from .errors import ModelLoadError

log = logging.getLogger(__name__)

MODEL_ID = "iic/multi-modal_chinese_stable_diffusion_v1.0"
OLD_IDS = ("damo/multi-modal_chinese_stable_diffusion_v1.0",)  # the same repo under its former owner's name
FOLDER = MODEL_ID.split("/", 1)[1]  # its folder in models/diffusers/: the name workflows store
APPROX_SIZE = "about 5 GB"  # what the loaders need of it; the exact size is said from the listing when it starts
CLIENT = "modelscope-hub"  # the pip name of ModelScope's own client
ENDPOINT_ENV = "MODELSCOPE_ENDPOINT"  # the client's own variable: a mirror, or https://www.modelscope.ai
DEFAULT_ENDPOINT = "https://modelscope.cn"
STAGING = ".downloading"  # in the models folder: hidden, never listed by the loaders
RECORD = ".chinese_sd_download.json"  # in a downloaded model folder: what was verified
MAX_FILE_BYTES = 64 * 1024 ** 3
SPARE_BYTES = 256 * 1024 ** 2  # free space kept beyond the model's own bytes

# the files the loaders read, besides each component's weights
CONFIGS = ("model_index.json", "configuration.json", "scheduler/scheduler_config.json",
           "text_encoder/config.json", "unet/config.json", "vae/config.json",
           "tokenizer/vocab.txt", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
           "tokenizer/special_tokens_map.json", "tokenizer/added_tokens.json")
REQUIRED = ("model_index.json", "text_encoder/config.json", "unet/config.json", "vae/config.json")
COMPONENTS = ("unet", "text_encoder", "vae")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Cancelled(Exception):
    """The caller's cancelled() said so; what was fetched stays in the staging folder for the next try."""


class _Stop(BaseException):
    """Raised inside the client's progress callbacks to stop its worker threads (the client retries on any
    Exception, so only a BaseException gets through)."""


def repo_for(name):
    """The canonical repo id for the model's id or old name (any case); None for anything else."""
    key = (name or "").strip().lower()
    return MODEL_ID if key in {i.lower() for i in (MODEL_ID, *OLD_IDS)} else None


def endpoint():
    return (os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT).rstrip("/")


def by_hand(models_dir):
    """How to place the folder without this pack's download (for error messages)."""
    return (f"or place the folder by hand: `modelscope download --model {MODEL_ID} --local_dir "
            f"{os.path.join(models_dir, FOLDER)}`, or download it in a browser from ModelScope")


# ----------------------------------------------------------------------------------------------
# a downloaded folder: the record of what was verified


def read_record(folder):
    """The download record of a model folder ({path: {'size', 'sha256'}} under 'files'), None if it has none."""
    try:
        with open(os.path.join(folder, RECORD), encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ModelLoadError(os.path.join(folder, RECORD), f"an unreadable download record ({e})",
                             "the JSON this pack writes after a verified download (delete the folder to download "
                             "it again)") from None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise ModelLoadError(os.path.join(folder, RECORD), "a download record without 'files'",
                             "the JSON this pack writes after a verified download")
    return record


def check_downloaded(folder):
    """A folder this pack downloaded still holds every verified file at its size (sizes only: no re-hash)."""
    record = read_record(folder)
    if record is None:
        return
    for rel, entry in sorted(record["files"].items()):
        path = os.path.join(folder, *rel.split("/"))
        size = os.path.getsize(path) if os.path.isfile(path) else None
        expected = entry.get("size") if isinstance(entry, dict) else None
        if size != expected:
            found = "no such file" if size is None else f"{size} bytes"
            raise ModelLoadError(path, f"{found} in a downloaded model",
                                 f"the {expected} bytes verified when it was downloaded from {record.get('repo')} "
                                 f"(delete {folder} to download it again)")


# ----------------------------------------------------------------------------------------------
# the listing: untrusted input


def wanted_files(entries, where):
    """{path: (size, sha256)} of the files to fetch, from the hub's listing entries (dicts with Path, Size,
    Sha256). Paths other than the names the loaders read are skipped (so nothing outside the model folder can be
    named); a wanted entry with a bad size or checksum, a duplicate, or a listing without the model's essential
    files is refused."""
    from .weights import _SHARD, weight_candidates

    if not isinstance(entries, list):
        raise ModelLoadError(where, f"a file listing of type {type(entries).__name__}", "a list of files")
    listed = {}
    for entry in entries:
        if not isinstance(entry, dict) or (entry.get("Type") or entry.get("type") or "blob") == "tree":
            continue
        path = entry.get("Path") or entry.get("path")
        if not isinstance(path, str):
            continue
        if path in listed:
            raise ModelLoadError(where, f"the file {path!r} listed twice", "each file listed once")
        listed[path] = entry
    names = set(CONFIGS)
    for component in COMPONENTS:
        candidates = weight_candidates()
        for name in candidates:
            rel = f"{component}/{name}"
            if rel not in listed:
                continue
            names.add(rel)
            if name.endswith(".json"):  # a sharded set: its index and the shards of the same stem and format
                stem = re.sub(r"\.(safetensors|bin)\.index(\.fp16)?\.json$", "", name)
                ext = "safetensors" if ".safetensors." in name else "bin"
                for other in listed:
                    shard = _SHARD.match(other[len(component) + 1:]) if other.startswith(component + "/") else None
                    if shard and shard.group("stem") in (stem, stem + ".fp16") and shard.group("ext") == ext:
                        names.add(other)
            break
        else:
            raise ModelLoadError(where, f"no weights for {component}/ in the listing",
                                 f"one of {', '.join(component + '/' + c for c in candidates[:4])}")
    missing = [r for r in REQUIRED if r not in listed]
    if missing:
        raise ModelLoadError(where, f"a listing without {', '.join(missing)}", "the ModelScope Chinese SD layout")
    out = {}
    for rel in sorted(names & listed.keys()):
        entry = listed[rel]
        size, sha = entry.get("Size", entry.get("size")), entry.get("Sha256") or entry.get("sha256")
        if type(size) is not int or not 0 <= size <= MAX_FILE_BYTES:
            raise ModelLoadError(where, f"size {size!r} for {rel}", f"a whole number of bytes up to {MAX_FILE_BYTES}")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha.lower()):
            raise ModelLoadError(where, f"checksum {sha!r} for {rel}", "a sha256 of 64 hex digits")
        out[rel] = (size, sha.lower())
    return out


# ----------------------------------------------------------------------------------------------
# the download


def _client():
    try:
        from modelscope_hub import HubApi
        from modelscope_hub._download import ProgressCallback
    except ImportError as e:
        raise ModelLoadError(MODEL_ID, f"no ModelScope client in this Python ({e})",
                             f"`{CLIENT}` installed: run `python -m pip install {CLIENT}` with ComfyUI's Python "
                             "(ComfyUI-Manager and comfy-cli install it with this pack)") from None
    return HubApi, ProgressCallback


def _hub_error(e, models_dir, what):
    """One message for whatever the client raised: the endpoint, what it did, what was expected, what to do."""
    text = " ".join(str(e).split())[:400]
    failed = getattr(e, "failed_files", None)
    if failed:  # the client names each file that failed (a checksum or size that did not match, a broken transfer)
        text = "; ".join(f"{path}: {' '.join(str(err).split())[:200]}" for path, err in sorted(failed.items())[:3])
    return ModelLoadError(f"{endpoint()} ({MODEL_ID})", f"{type(e).__name__} while fetching the {what}: {text}",
                          f"the ModelScope hub to serve the model's {what} (check the network and try again: what "
                          f"was fetched is kept and resumed; or set {ENDPOINT_ENV} to another endpoint; "
                          f"{by_hand(models_dir)})")


def list_files(api, models_dir):
    """The hub's listing of the model, checked: {path: (size, sha256)}."""
    try:
        raw = api.legacy.list_repo_files(repo_id=MODEL_ID, repo_type="model", revision="master", recursive=True)
    except Exception as e:  # noqa: BLE001  (anything the network or the hub does becomes one clear message)
        raise _hub_error(e, models_dir, "file listing") from None
    return wanted_files(raw, f"{endpoint()}'s file listing of {MODEL_ID}")


def _free_space(path):
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def _bytes_present(staging, rel, size):
    """Bytes of a file already in the staging folder (complete, or the client's partial pieces)."""
    path = os.path.join(staging, *rel.split("/"))
    if os.path.isfile(path) and os.path.getsize(path) == size:
        return size
    done = 0
    folder, name = os.path.split(path)
    if os.path.isdir(folder):
        for other in os.listdir(folder):
            if other == name + ".incomplete" or re.fullmatch(re.escape(name) + r"_\d+_\d+", other):
                done += os.path.getsize(os.path.join(folder, other))
    return min(done, size)


def _gib(n):
    return f"{n / 1024 ** 3:.2f} GiB"


def ensure_model(models_dir, progress=None, cancelled=None, announce=None):
    """The model's folder in models_dir: there already (checked against its download record, if any), or
    downloaded from ModelScope. progress(done, total) is called from this thread at least every half second
    while downloading; cancelled() -> True stops the download (Cancelled) within about a second; announce(text)
    is told once what will be downloaded, how big, and where."""
    import filelock

    models_dir = os.path.abspath(models_dir)
    folder = os.path.join(models_dir, FOLDER)
    if os.path.isdir(folder):
        check_downloaded(folder)
        return folder
    staging_root = os.path.join(models_dir, STAGING)
    os.makedirs(staging_root, exist_ok=True)
    lock = filelock.FileLock(os.path.join(staging_root, FOLDER + ".lock"))
    while True:  # wait for another download of it (another prompt, another process), cancellably
        try:
            lock.acquire(timeout=0.5)
            break
        except filelock.Timeout:
            if cancelled is not None and cancelled():
                raise Cancelled(MODEL_ID) from None
    try:
        if os.path.isdir(folder):  # the other download finished it
            check_downloaded(folder)
            return folder
        return _download(models_dir, folder, os.path.join(staging_root, FOLDER), progress, cancelled, announce)
    finally:
        lock.release()


def _download(models_dir, folder, staging, progress, cancelled, announce):
    HubApi, ProgressCallback = _client()
    api = HubApi(endpoint=endpoint())
    files = list_files(api, models_dir)
    total = sum(size for size, _ in files.values())
    present = sum(_bytes_present(staging, rel, size) for rel, (size, _) in files.items())
    free = _free_space(models_dir)
    if total - present + SPARE_BYTES > free:
        raise ModelLoadError(models_dir, f"{_gib(free)} free", f"{_gib(total - present + SPARE_BYTES)} free for "
                             f"{MODEL_ID} ({_gib(total)}, {_gib(present)} of it already fetched, plus "
                             f"{_gib(SPARE_BYTES)} to spare): free some space, or {by_hand(models_dir)}")
    if announce is not None:
        resumed = f", resuming after {_gib(present)}" if present else ""
        announce(f"Downloading {MODEL_ID} from {endpoint()}: {len(files)} files, {_gib(total)}{resumed}, into {folder}")
    log.info("Downloading %s from %s: %d files, %s into %s", MODEL_ID, endpoint(), len(files), _gib(total), folder)

    state = {"stop": False}
    received = {}  # path -> bytes this file has now (set from callback threads)
    lock = threading.Lock()

    class Callback(ProgressCallback):
        def __init__(self, filename, file_size):
            super().__init__(filename, file_size)
            with lock:
                received[filename] = 0

        def update(self, size):
            if state["stop"]:
                raise _Stop()
            with lock:
                received[self.filename] = received.get(self.filename, 0) + size

    outcome = {}

    def work():
        try:
            api.download_repo(MODEL_ID, "model", local_dir=staging, cache_dir=os.path.dirname(staging),
                              file_list=[{"Path": p, "Size": s, "Sha256": h} for p, (s, h) in files.items()],
                              progress_callbacks=[Callback])
        except BaseException as e:  # noqa: BLE001  (handed to the caller's thread)
            outcome["error"] = e

    thread = threading.Thread(target=work, name="chinese-sd-download", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.25)
            if cancelled is not None and cancelled():
                state["stop"] = True
            if progress is not None:
                with lock:
                    done = sum(min(files[p][0], received.get(p, 0)) if p in received
                               else _bytes_present(staging, p, files[p][0]) for p in files)
                progress(done, total)
    except BaseException:  # Ctrl+C in the caller's thread: stop the workers, keep what they fetched
        state["stop"] = True
        thread.join()
        raise
    error = outcome.get("error")
    if state["stop"]:
        raise Cancelled(MODEL_ID)
    if error is not None:
        raise _hub_error(error, models_dir, "files") from None
    for rel, (size, _) in files.items():  # the client verified each sha256; check nothing is missing
        path = os.path.join(staging, *rel.split("/"))
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            raise ModelLoadError(path, "a file missing or of another size after the download", f"{size} bytes")
    _tidy(staging, files)
    with open(os.path.join(staging, RECORD), "w", encoding="utf-8") as f:
        json.dump({"repo": MODEL_ID, "endpoint": endpoint(), "downloaded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "files": {p: {"size": s, "sha256": h} for p, (s, h) in files.items()}}, f, indent=1, sort_keys=True)
    os.replace(staging, folder)
    if progress is not None:
        progress(total, total)
    log.info("Downloaded and verified %s into %s", MODEL_ID, folder)
    return folder


def _tidy(staging, files):
    """Leave only the verified files in the staging folder (a resumed earlier listing may have left others)."""
    keep = {os.path.join(staging, *rel.split("/")) for rel in files}
    for root, _, names in os.walk(staging):
        for name in names:
            path = os.path.join(root, name)
            if path not in keep:
                os.remove(path)
