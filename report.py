"""Write a Markdown report of a pipeline run: loss curves, sample grid, attention map, metrics.

    python report.py --stage1 cfg/DAMSM/shapes.yml --stage2 cfg/clip_shapes_DMGAN.yml \
        --out output/demo [--fid output/demo/fid.json] [--is output/demo/is.json] \
        [--clipgen cfg/clipgen_shapes.yml [--clipgen-fid output/demo/fid_clipgen.json]]

It reads only what the stages wrote (TensorBoard logs, PNGs, metrics.json), so it can be
re-run at any time and works for any dataset's configs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from miscc.config import ConfigError, load_config
from miscc.inception import inception_filename, inception_url
from miscc.utils import DiskError, atomic_write_bytes, disk_writes

FID_HINT = (f"FID / IS need torch-fidelity's Inception weights (`{inception_filename()}`), "
            "downloaded automatically when the machine has internet access. Offline, fetch the "
            f"file from {inception_url()} elsewhere and run `make demo INCEPTION_WEIGHTS=/path/"
            "to/file.pth` (or pass `--weights` to fid_score.py / inception_score.py).")


def read_scalars(log_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar series in the TensorBoard event files under `log_dir` (any depth)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, tuple[list[int], list[float]]] = {}
    folders = sorted({p.parent for p in log_dir.rglob("events.out.tfevents.*")})
    for folder in folders:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            steps, values = series.setdefault(tag, ([], []))
            for event in acc.Scalars(tag):
                steps.append(event.step)
                values.append(event.value)
    return series


def plot_curves(series: dict[str, tuple[list[int], list[float]]], title: str,
                path: Path, columns: int = 4) -> Path | None:
    """One small panel per scalar series (losses of very different sizes stay readable);
    None if there is nothing to draw."""
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = sorted(series)
    cols = min(columns, len(tags))
    rows = (len(tags) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat[len(tags):]:
        ax.set_visible(False)
    for ax, tag in zip(axes.flat, tags, strict=False):
        steps, values = series[tag]
        ax.plot(steps, values, linewidth=1.0)
        ax.set_title(tag, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title} (x: step)")
    fig.tight_layout()
    try:
        with disk_writes(path, cleanup=[path]):
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=90)
    finally:
        plt.close(fig)
    return path


def newest_png(folder: Path, pattern: str = "*.png") -> Path | None:
    """The most recently written PNG under `folder` matching `pattern`, if any."""
    found = [p for p in folder.rglob(pattern) if p.is_file()] if folder.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _read_json(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        print(f"warning: {path} is not readable JSON ({err}); left out of the report",
              file=sys.stderr)
        return None


def metrics_rows(metrics: dict | None, fid: dict | None, isc: dict | None) -> list[str]:
    """The metrics table of the report (Markdown lines)."""
    rows = ["| metric | value |", "| --- | --- |"]
    if metrics is None:
        rows.append("| R-precision | not computed (run the evaluation config) |")
    else:
        if metrics.get("r_precision") is not None:
            rows.append(f"| R-precision (top-1 of 1 + {metrics.get('negatives', 99)}) | "
                        f"{100 * metrics['r_precision']:.2f} ± "
                        f"{100 * metrics['r_precision_std']:.2f} % |")
        else:
            rows.append(f"| R-precision | undefined: {metrics.get('note', '')} |")
        rows.append(f"| CLIP score | {metrics['clip_score']:.2f} |")
        other = metrics.get("independent")
        if other is not None:
            name = f"independent scorer `{other['encoder']}`"
            if other.get("r_precision") is not None:
                rows.append(f"| R-precision, {name} | {100 * other['r_precision']:.2f} ± "
                            f"{100 * other['r_precision_std']:.2f} % |")
            else:
                rows.append(f"| R-precision, {name} | undefined: {other.get('note', '')} |")
            rows.append(f"| CLIP score, {name} | {other['clip_score']:.2f} |")
        rows.append(f"| generated test images | {metrics['images']} |")
    if fid is not None and "fid" in fid:
        rows.append(f"| FID | {fid['fid']:.3f} |")
        if "kid_mean" in fid:
            rows.append(f"| KID | {fid['kid_mean']:.4f} ± {fid['kid_std']:.4f} |")
    if isc is not None and "is_mean" in isc:
        rows.append(f"| Inception Score | {isc['is_mean']:.2f} ± {isc['is_std']:.2f} |")
    return rows


JUDGE_COLUMNS = (("shape", "shape"), ("colour", "colour"), ("size", "size"),
                 ("pos", "position"), ("bg", "background"), ("mean", "mean"))


def judge_rows(metrics: dict | None) -> list[str]:
    """The shapes judge's table (Markdown lines; none without judge entries): per attribute,
    the % of generated images showing what their caption names, of the real test pictures,
    and chance."""
    if not metrics or "judge" not in metrics:
        return []

    def cells(entry: dict) -> str:
        return " | ".join("–" if entry.get(k) is None else f"{100 * entry[k]:.1f}"
                          for k, _ in JUDGE_COLUMNS)

    rows = ["Shapes judge (`miscc/judge.py`, a CNN that never saw the CLIP encoder): % of images "
            "showing the attribute their caption names.", "",
            "| images | " + " | ".join(title for _, title in JUDGE_COLUMNS) + " |",
            "| --- |" + " --- |" * len(JUDGE_COLUMNS)]
    for title, key in (("generated", "judge"), ("real test pictures", "judge_real"),
                       ("chance", "judge_chance")):
        entry = metrics.get(key)
        if entry is not None:
            count = f" ({entry['images']})" if "images" in entry else ""
            rows.append(f"| {title}{count} | {cells(entry)} |")
    return rows


def pair_rows(metrics: dict | None) -> list[str]:
    """The generated images' minimal-pair accuracy (Markdown lines; none without it): per word
    category, % of images whose own caption scores above every one-edit variant of it, for the
    training encoder and the independent scorer, with chance."""
    scorers = [(title, (entry or {}).get("minimal_pairs")) for title, entry in
               (("training encoder", metrics), ("independent scorer",
                                                 (metrics or {}).get("independent")))]
    scorers = [(t, p) for t, p in scorers if p]
    if not scorers:
        return []
    categories = list(dict.fromkeys(k for _, p in scorers for k in p))
    rows = ["Minimal pairs (`miscc/pair_metric.py`): % of generated images whose own caption "
            "scores above every variant with one word of the category changed.", "",
            "| scorer | " + " | ".join(categories) + " |",
            "| --- |" + " --- |" * len(categories)]
    for title, pairs in scorers:
        rows.append(f"| {title} | " + " | ".join(_pct(pairs.get(k), "accuracy")
                                                for k in categories) + " |")
    first = scorers[0][1]
    rows.append("| chance | " + " | ".join(_pct(first.get(k), "chance") for k in categories)
                + " |")
    return rows


def picture_lines(heading: str, found: Path | None, out: Path, name: str) -> list[str]:
    """A report section showing the PNG `found` (copied to `out/name`), or saying it is
    missing."""
    title = heading.lstrip("# ")
    if found is None:
        return [heading, "", "Not found (the stage has not written it yet).", ""]
    shutil.copyfile(found, out / name)
    return [heading, "", f"![{title}]({name})", "", f"(copied from `{found}`)", ""]


def _pct(entry: dict | None, key: str, std: str | None = None) -> str:
    if not entry or entry.get(key) is None:
        return "–"
    text = f"{100 * entry[key]:.1f}"
    return f"{text} ± {100 * entry[std]:.1f}" if std and entry.get(std) is not None else text


def comparison_rows(columns: list[tuple[str, dict | None, dict | None]]) -> list[str]:
    """One table, a column per generator (title, metrics.json, fid_score.py --json result):
    R-precision with the training encoder and with the independent scorer, CLIP score, the
    shapes judge per attribute, FID / IS when measured."""
    def row(title: str, cell) -> str:
        return f"| {title} | " + " | ".join(cell(m, f) for _, m, f in columns) + " |"

    rows = ["| | " + " | ".join(t for t, _, _ in columns) + " |",
            "| --- |" + " --- |" * len(columns),
            row("R-precision, training encoder (%)",
                lambda m, f: _pct(m, "r_precision", "r_precision_std")),
            row("R-precision, independent scorer (%)",
                lambda m, f: _pct((m or {}).get("independent"), "r_precision",
                                  "r_precision_std")),
            row("CLIP score", lambda m, f: f"{m['clip_score']:.2f}" if m else "–")]
    for key, title in JUDGE_COLUMNS:
        rows.append(row(f"judge: {title} (%)", lambda m, f, k=key: _pct((m or {}).get("judge"),
                                                                         k)))
    rows.append(row("minimal pairs, training encoder (%)",
                    lambda m, f: _pct((m or {}).get("minimal_pairs", {}).get("mean"),
                                      "accuracy")))
    rows.append(row("minimal pairs, independent scorer (%)",
                    lambda m, f: _pct(((m or {}).get("independent") or {})
                                      .get("minimal_pairs", {}).get("mean"), "accuracy")))
    rows.append(row("FID", lambda m, f: f"{f['fid']:.2f}" if f and "fid" in f else "–"))
    rows.append(row("Inception Score", lambda m, f: f"{f['is_mean']:.2f}"
                    if f and "is_mean" in f else "–"))
    rows.append(row("test images", lambda m, f: str(m["images"]) if m else "not run"))
    return rows


def comparison_section(dmgan_dir: Path, clipgen_dir: Path, out: Path,
                       dmgan_fid: Path | None = None, clipgen_fid: Path | None = None
                       ) -> list[str]:
    """Markdown lines putting DM-GAN and CLIP-GEN side by side on the same test captions:
    metrics, the image-conditioned upper bound, the modality gap, both sample grids and
    CLIP-GEN's training curves (PNGs copied into `out`)."""
    dmgan = _read_json(dmgan_dir / "metrics.json")
    clipgen = _read_json(clipgen_dir / "metrics.json")
    upper = _read_json(clipgen_dir / "image_condition" / "metrics.json")
    lines = ["## DM-GAN and CLIP-GEN side by side", "",
             f"DM-GAN: `{dmgan_dir}`; CLIP-GEN: `{clipgen_dir}`. Both draw one image per test "
             "caption; CLIP-GEN prompted with the caption's CLIP text embedding, and (last "
             "column) with the test image's own CLIP image embedding, the kind of input it was "
             "trained on: the upper bound that shows what the text-image gap costs.", ""]
    lines += comparison_rows([("DM-GAN", dmgan, _read_json(dmgan_fid)),
                              ("CLIP-GEN (text)", clipgen, _read_json(clipgen_fid)),
                              ("CLIP-GEN (image embedding)", upper, None)])
    gap = (clipgen or {}).get("modality_gap")
    if gap:
        lines += ["", f"Modality gap of the CLIP encoder over {gap['images']} test images and "
                  f"{gap['captions']} captions (unit vectors): a caption's cosine with its own "
                  f"image {gap['paired_cosine']:.3f}, with another image "
                  f"{gap['unpaired_cosine']:.3f}; distance between the mean text and the mean "
                  f"image embedding {gap['mean_offset']:.3f}."]
    lines.append("")
    for title, folder, name in (("DM-GAN samples", dmgan_dir, "dmgan_samples.png"),
                                ("CLIP-GEN samples", clipgen_dir, "clipgen_samples.png")):
        lines += picture_lines(f"### {title}", newest_png(folder / "Image", "G_*.png"), out,
                               name)
    picture = plot_curves(read_scalars(clipgen_dir), "CLIP-GEN transformer",
                          out / "clipgen_losses.png")
    if picture:
        lines += ["### CLIP-GEN training curves", "", "![CLIP-GEN curves](clipgen_losses.png)",
                  ""]
    return lines


def build_report(stage1_dir: Path, stage2_dir: Path, out: Path, metrics_file: Path | None = None,
                 fid_file: Path | None = None, is_file: Path | None = None,
                 clipgen_dir: Path | None = None, clipgen_fid: Path | None = None) -> Path:
    """Write `out/report.md` and its PNGs from the two stages' output folders (and, with
    `clipgen_dir`, CLIP-GEN's beside DM-GAN's)."""
    with disk_writes(out):
        out.mkdir(parents=True, exist_ok=True)
    lines = ["# Pipeline report", "",
             f"Stage 1 output: `{stage1_dir}`; stage 2 output: `{stage2_dir}`.", ""]

    lines += ["## Metrics", ""]
    metrics = _read_json(metrics_file or stage2_dir / "metrics.json")
    fid, isc = _read_json(fid_file), _read_json(is_file)
    if isc is None and fid is not None and "is_mean" in fid:  # fid_score.py --isc: one pass
        isc = fid
    lines += metrics_rows(metrics, fid, isc)
    judge = judge_rows(metrics)
    if judge:
        lines += ["", *judge]
    pairs = pair_rows(metrics)
    if pairs:
        lines += ["", *pairs]
    if fid is None or isc is None:
        lines += ["", FID_HINT]
    lines.append("")

    for stage, folder, name in (("Stage 1 (DAMSM fine-tuning of CLIP)", stage1_dir,
                                 "stage1_losses.png"),
                                ("Stage 2 (DM-GAN)", stage2_dir, "stage2_losses.png")):
        lines += [f"## {stage}: training curves", ""]
        picture = plot_curves(read_scalars(folder), stage, out / name)
        lines += [f"![{stage} curves]({name})" if picture else
                  f"No TensorBoard scalars found under `{folder}`.", ""]

    for title, found, name in (
            ("Generated samples (fixed noise, with their captions)",
             newest_png(stage2_dir / "Image"), "samples.png"),
            ("Word attention over image regions (stage 1)",
             newest_png(stage1_dir, "*att*.png"), "attention.png")):
        lines += picture_lines(f"## {title}", found, out, name)

    if clipgen_dir is not None:
        lines += comparison_section(stage2_dir, clipgen_dir, out, fid_file, clipgen_fid)

    report = out / "report.md"
    atomic_write_bytes(report, "\n".join(lines).encode())
    return report


def output_dir(cfg_or_dir: str) -> Path:
    """A stage's output folder: the folder itself, or the OUTPUT_DIR of a config file."""
    path = Path(cfg_or_dir)
    return path if path.is_dir() else Path(load_config(path, quiet=True).OUTPUT_DIR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage1", required=True,
                        help="the stage-1 config (cfg/DAMSM/*.yml) or its output folder")
    parser.add_argument("--stage2", required=True,
                        help="the stage-2 training config or its output folder")
    parser.add_argument("--metrics", default=None,
                        help="metrics.json of the evaluation (default: <stage-2 OUTPUT_DIR>/"
                             "metrics.json)")
    parser.add_argument("--fid", default=None, help="fid_score.py --json output, if run")
    parser.add_argument("--is", dest="isc", default=None,
                        help="inception_score.py --json output, if run")
    parser.add_argument("--clipgen", default=None,
                        help="CLIP-GEN's config (cfg/clipgen_*.yml) or output folder: adds a "
                             "section with both generators side by side")
    parser.add_argument("--clipgen-fid", default=None,
                        help="fid_score.py --json output for CLIP-GEN's images, if run")
    parser.add_argument("--out", required=True, help="folder for report.md and its PNGs")
    args = parser.parse_args(argv)
    try:
        dirs = [output_dir(c) for c in (args.stage1, args.stage2)]
        clipgen = output_dir(args.clipgen) if args.clipgen else None
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        report = build_report(dirs[0], dirs[1], Path(args.out),
                              Path(args.metrics) if args.metrics else None,
                              Path(args.fid) if args.fid else None,
                              Path(args.isc) if args.isc else None, clipgen,
                              Path(args.clipgen_fid) if args.clipgen_fid else None)
    except DiskError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
