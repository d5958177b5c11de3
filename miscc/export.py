"""A trained generator as one folder that travels (docs/DESIGN.md §15): everything it needs to
draw, as safetensors (no pickle: loading runs no code), its resolved config and a model card
with the Hugging Face Hub's YAML header, so the folder is what `hf upload` publishes.

    OUT/export.json            the manifest, written last: format, kind, each part's size
    OUT/generator.safetensors  DM-GAN's EMA generator, or CLIP-GEN's transformer
    OUT/encoder.safetensors    the stage-1 CLIP encoder
    OUT/tokenizer.safetensors  CLIP-GEN's VQGAN tokenizer
    OUT/config.yml             the run's config, its model paths naming these files
    OUT/README.md              the model card (metrics, training commands, how to load)
    OUT/metrics.json, encoder_config.yml, tokenizer_config.yml  when the run has them

`open_export` checks a folder against its manifest (a missing or truncated part is one error
naming the file) and gives the config with absolute paths, which every loader of the
repository reads as it reads a run's (`load_checkpoint` reads safetensors).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from miscc.config import dump_config, load_config
from miscc.utils import (
    CheckpointError,
    atomic_safetensors_save,
    atomic_write_bytes,
    load_checkpoint,
)

EXPORT_FORMAT = "clip-t2i-export/1"
MANIFEST = "export.json"
FILES = {"generator": "generator.safetensors", "encoder": "encoder.safetensors",
         "tokenizer": "tokenizer.safetensors"}
# the config key each part's path goes to, per kind
KEYS = {"DM-GAN": {"generator": "TRAIN.NET_G", "encoder": "TRAIN.NET_E"},
        "CLIP-GEN": {"generator": "CLIPGEN.NET", "encoder": "TRAIN.NET_E",
                     "tokenizer": "CLIPGEN.VQGAN"}}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
EXAMPLES = {"shapes": "a large red star in the top left on a black background",
            "birds": "a small bird with a red head, a white belly and black wings",
            "coco": "a man riding a horse on a beach"}  # the model card's example caption
REEXPORT = "export it again with: python export.py RUN FOLDER"


class ExportError(CheckpointError):
    """A folder that is not a usable export (a user error: one `error:` line, exit code 2)."""


@dataclass
class Export:
    """An export on disk: its kind (DM-GAN / CLIP-GEN), folder, config (model paths absolute)
    and part files."""

    kind: str
    folder: Path
    cfg: dict
    files: dict[str, Path]


def is_export(path: str | Path) -> bool:
    """Whether `path` is a folder with an export manifest."""
    return (Path(path) / MANIFEST).is_file()


def _set(cfg: dict, key: str, value) -> None:
    section, _, name = key.rpartition(".")
    node = cfg
    for part in section.split("."):
        node = node[part]
    node[name] = value


def _get(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


# --------------------------------------------------------------------------------- writing
def _model_files(run) -> dict[str, Path]:
    """The checkpoint files of each part of a run (see `drawing.find_run`)."""
    from miscc.training import resolve_checkpoint

    cfg = run.cfg
    files = {"generator": run.checkpoint,
             "encoder": resolve_checkpoint(str(cfg.TRAIN.NET_E), "clip*.pth",
                                           "stage-1 encoder", "TRAIN.NET_E")}
    if run.kind == "CLIP-GEN":
        from clipgen.models import tokenizer_path

        files["tokenizer"] = resolve_checkpoint(tokenizer_path(cfg), "vqgan*.pth",
                                                "VQGAN tokenizer", "CLIPGEN.VQGAN")
    return files


def _run_config(checkpoint: Path) -> Path | None:
    """The config.yml of the run a checkpoint (in <run>/Model/) belongs to, if any."""
    folder = checkpoint.parent.parent if checkpoint.parent.name == "Model" else checkpoint.parent
    found = folder / "config.yml"
    return found if found.is_file() else None


def export_run(run_path: str | Path, out: str | Path) -> Path:
    """Write the export of the generator at `run_path` (a run folder, its Model/ or a
    checkpoint) into `out` (new, empty, or an earlier export, which is replaced); returns
    `out`. The manifest is written last: an export cut short is not taken for a whole one."""
    from drawing import find_run

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not is_export(out):
        raise ExportError(f"{out} exists and is not an export: choose a new or empty folder")
    run = find_run(run_path)
    sources = _model_files(run)
    (out / MANIFEST).unlink(missing_ok=True)
    parts = {}
    for part, src in sources.items():
        state = load_checkpoint(src, f"{part} checkpoint")
        target = out / FILES[part]
        atomic_safetensors_save(state, target)
        parts[part] = {"file": FILES[part], "bytes": target.stat().st_size, "from": str(src)}
    cfg = load_config(run.folder / "config.yml", quiet=True)
    for part, key in KEYS[run.kind].items():
        _set(cfg, key, FILES[part])
    cfg.OUTPUT_DIR = ""
    atomic_write_bytes(out / "config.yml", dump_config(cfg).encode())
    extras = {"metrics.json": run.folder / "metrics.json",
              "encoder_config.yml": _run_config(sources["encoder"]),
              "tokenizer_config.yml": _run_config(sources["tokenizer"])
              if "tokenizer" in sources else None}
    for name, src in extras.items():
        if src is not None and Path(src).is_file():
            shutil.copyfile(src, out / name)
    metrics = (json.loads((out / "metrics.json").read_text())
               if (out / "metrics.json").is_file() else {})
    atomic_write_bytes(out / "README.md", model_card(run.kind, cfg, metrics, out.name,
                                                      extras).encode())
    manifest = {"format": EXPORT_FORMAT, "kind": run.kind, "parts": parts,
                "run": str(run.folder), "checkpoint": str(run.checkpoint)}
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return out


def _metric_rows(metrics: dict) -> list[tuple[str, str, float]]:
    """(Hub metric type, name, value) of a run's metrics.json, in percent where fractions."""
    rows = []
    if "r_precision" in metrics:  # a fraction in metrics.json
        rows.append(("r-precision", "R-precision (%)",
                     round(100 * float(metrics["r_precision"]), 2)))
    if "clip_score" in metrics:
        rows.append(("clip-score", "CLIP score", round(float(metrics["clip_score"]), 2)))
    judge = metrics.get("judge") or {}
    for attribute in ("shape", "colour", "size", "pos", "bg", "mean"):
        if judge.get(attribute) is not None:
            rows.append(("accuracy", f"shapes judge: {attribute} (%)",
                         round(100 * float(judge[attribute]), 1)))
    fd = (metrics.get("judge_fd") or {}).get("generated")
    if fd is not None:
        rows.append(("frechet-distance", "Fréchet distance in the judge's features",
                     round(float(fd), 3)))
    for key, name in (("fid", "FID"), ("is_mean", "Inception Score")):
        if key in metrics:
            rows.append((key.split("_")[0], name, round(float(metrics[key]), 3)))
    return rows


def model_card(kind: str, cfg: dict, metrics: dict, name: str, extras: dict) -> str:
    """README.md of an export: the Hub's YAML header (licence, data set, tags, metrics), then
    what it is, how to draw with it and how it was trained."""
    dataset = str(cfg.DATASET_NAME) or "custom"
    rows = _metric_rows(metrics)
    header = {
        "license": "mit", "library_name": "pytorch", "pipeline_tag": "text-to-image",
        "tags": ["text-to-image", "clip", "dm-gan" if kind == "DM-GAN" else "clip-gen",
                 "clip-t2i"],
        "datasets": [dataset],
    }
    if rows:
        header["model-index"] = [{"name": name, "results": [{
            "task": {"type": "text-to-image", "name": "Text-to-image"},
            "dataset": {"type": dataset, "name": dataset, "split": "test"},
            "metrics": [{"type": t, "name": n, "value": v} for t, n, v in rows]}]}]
    method = ("DM-GAN conditioned on a CLIP encoder fine-tuned with DAMSM and contrastive losses"
              if kind == "DM-GAN" else
              "CLIP-GEN: a VQGAN tokenizer and a transformer conditioned on CLIP embeddings")
    example = EXAMPLES.get(dataset, EXAMPLES["coco"])
    stage1 = "encoder_config.yml" if extras.get("encoder_config.yml") else "<stage-1 config>"
    if kind == "DM-GAN":
        train = [f"python pretrain_DAMSM.py --cfg {stage1}",
                 "python main.py --cfg config.yml --set TRAIN.FLAG=True "
                 "--set TRAIN.NET_E=<stage-1 OUTPUT_DIR>/Model --set TRAIN.NET_G=''"]
    else:
        tok = "tokenizer_config.yml" if extras.get("tokenizer_config.yml") else "<tokenizer config>"
        train = [f"python pretrain_DAMSM.py --cfg {stage1}", f"python train_vqgan.py --cfg {tok}",
                 "python train_clipgen.py --cfg config.yml --set TRAIN.NET_E=<stage-1 "
                 "OUTPUT_DIR>/Model --set CLIPGEN.VQGAN=<tokenizer OUTPUT_DIR>/Model "
                 "--set CLIPGEN.NET=''"]
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             f"# {name}", "", f"{method}, trained on the {dataset} set with the clip-t2i "
             "repository. Everything it needs to draw is in this folder, as safetensors.", "",
             "## Draw", "", "```bash", f'python generate.py {name} "{example}" --n 4', "```",
             "",
             "`generate.py` takes this folder or its Hub id (`owner/name`); from Python: "
             f"`drawing.load(\"{name}\")` then `drawer(captions, n, seed)`.", ""]
    if rows:
        lines += ["## Metrics (test split)", "", "| metric | value |", "| --- | --- |",
                  *[f"| {n} | {v} |" for _, n, v in rows], ""]
    lines += ["## Training", "", "```bash", *train, "```", "",
              "`config.yml` is the resolved config of the run (its model paths name the files "
              "here).", "", "## Files", "",
              *[f"- `{f}`" for f in sorted([*FILES.values(), "config.yml"])
                if f != FILES["tokenizer"] or kind == "CLIP-GEN"], ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- reading
def open_export(path: str | Path) -> Export:
    """The export in folder `path`, checked against its manifest; its config with the model
    paths made absolute. One ExportError naming the file for a missing, truncated or foreign
    part."""
    folder = Path(path)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"{folder / MANIFEST} cannot be read ({err}); {REEXPORT}") from err
    if manifest.get("format") != EXPORT_FORMAT or manifest.get("kind") not in KEYS:
        raise ExportError(f"{folder / MANIFEST} is not a {EXPORT_FORMAT} manifest of a DM-GAN "
                          f"or CLIP-GEN export")
    kind, files = manifest["kind"], {}
    for part in KEYS[kind]:
        entry = manifest["parts"].get(part) or {}
        file = folder / str(entry.get("file", FILES[part]))
        if not file.is_file():
            raise ExportError(f"export {folder} is missing {file.name} (its {part}); {REEXPORT}")
        if file.stat().st_size != entry.get("bytes"):
            raise ExportError(f"export {folder}: {file.name} has {file.stat().st_size} bytes, "
                              f"the manifest says {entry.get('bytes')} (a partial copy?); "
                              f"{REEXPORT}")
        files[part] = file.resolve()
    if not (folder / "config.yml").is_file():
        raise ExportError(f"export {folder} is missing config.yml; {REEXPORT}")
    cfg = load_config(folder / "config.yml", quiet=True)
    for part, key in KEYS[kind].items():
        _set(cfg, key, str(files[part]))
    return Export(kind, folder, cfg, files)


def use_export(cfg: dict, key: str) -> Export | None:
    """When config key `key` (TRAIN.NET_G or CLIPGEN.NET) names an export (a folder or a Hub
    id), point `cfg` at its files and take its architecture sections (TREE, GAN, CLIP, TEXT,
    the CLIPGEN sizes), so an evaluation config can name an export as it names a checkpoint;
    returns the export, or None."""
    value = str(_get(cfg, key))
    if not value:
        return None
    folder = Path(value)
    if not folder.exists() and HUB_ID.fullmatch(value):
        folder = hub_folder(value)
    if not is_export(folder):
        return None
    exported = open_export(folder)
    expected = "DM-GAN" if key == "TRAIN.NET_G" else "CLIP-GEN"
    if exported.kind != expected:
        raise ExportError(f"{key}: {folder} is a {exported.kind} export, not a {expected} one")
    for section in ("TREE", "GAN", "CLIP"):
        cfg[section] = exported.cfg[section]
    for name in ("EMBEDDING_DIM", "WORDS_NUM"):
        cfg.TEXT[name] = exported.cfg.TEXT[name]
    if expected == "CLIP-GEN":
        for name in ("N_LAYER", "N_EMBD", "N_HEAD", "CFG_DROP"):
            cfg.CLIPGEN[name] = exported.cfg.CLIPGEN[name]
    for part, config_key in KEYS[exported.kind].items():
        _set(cfg, config_key, str(exported.files[part]))
    return exported


def hub_folder(repo_id: str) -> Path:
    """The local folder of Hub model `repo_id` (downloaded into huggingface_hub's cache, or
    found there offline)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as err:  # pragma: no cover - huggingface_hub comes with open_clip
        raise ExportError(f"{repo_id}: reading a Hub model needs huggingface_hub") from err
    try:
        return Path(snapshot_download(repo_id=repo_id))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        raise ExportError(f"{repo_id} is neither a folder here nor a Hub model that can be "
                          f"fetched ({type(err).__name__}: {str(err).splitlines()[0][:160]})") \
            from err
