"""`megatron-vita data inspect|make-demo`: look at a recipe's data, generate the demo dataset.

Owns the command line of the data component. `inspect` prints the recipe settings, per-dataset
sizes / ratios / caps / selected counts, a token-length histogram of the first documents of
the stream (their media decoded, so that files which only fail when decoded count as bad),
the packing efficiency of the first packed sequences, one rendered sample (text with runs of
feature placeholders collapsed) and writes a PNG of that sample's tiles, each captioned with the
image / tile / video frame it is (matplotlib). Heavy imports stay inside functions.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("inspect", help="sizes, token-length histogram, packing efficiency, a rendered sample + PNG")
    p.add_argument("--recipe", required=True, help="recipe YAML (e.g. data_recipes/stage1.yaml)")
    p.add_argument("--data-root", default=".", help="folder the recipe's dataset paths are relative to")
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer dir (default: the recipe's `tokenizer`, relative to the data root)")
    p.add_argument("--model", default=None, help="model preset / HF dir for tile size and tokens per tile "
                   "(default: the recipe's `model`)")
    p.add_argument("--samples", type=int, default=200, help="documents for the length histogram")
    p.add_argument("--packs", type=int, default=20, help="packed sequences for the packing efficiency")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--png", default=None, help="where to write the sample's tiles (default: inspect_<recipe>.png)")
    p.add_argument("--cache-dir", default=None, help="index cache (default: $MEGATRON_VITA_CACHE or ~/.cache/megatron_vita)")
    m = sub.add_parser("make-demo", help="generate the synthetic demo dataset + tokenizer")
    m.add_argument("out", help="output folder")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--scale", type=float, default=1.0, help="multiply the number of samples")
    m.add_argument("--overwrite", action="store_true", help="regenerate into a folder that already has a demo")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "make-demo":
        return _make_demo(args)
    return _inspect(args)


def _make_demo(args) -> int:
    import time

    from megatron_vita.data.demo import make_demo

    t0 = time.time()
    m = make_demo(args.out, seed=args.seed, scale=args.scale, overwrite=args.overwrite)
    print(f"demo dataset written to {args.out} in {time.time() - t0:.1f}s (seed {args.seed})")
    for k, v in m["train"].items():
        print(f"  train {k:<13} {v['count']:>5} records  {v['file']}")
    print(f"  heldout       {m['heldout']['count']:>5} records  {m['heldout']['file']} (answer sets + chance: "
          f"{m['heldout']['meta']})")
    print(f"  tokenizer     {os.path.join(args.out, m['tokenizer'])} (512 tokens, matches the `tiny` preset)")
    print(f"next: megatron-vita data inspect --recipe data_recipes/demo.yaml --data-root {args.out}")
    return 0


def histogram(values: List[int], bins: int = 10, width: int = 40) -> List[str]:
    """Text histogram lines: range, count and a bar."""
    if not values:
        return ["  (no documents)"]
    lo, hi = min(values), max(values)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = [0] * bins
    for v in values:
        counts[min((v - lo) // step, bins - 1)] += 1
    top = max(counts)
    out = []
    for i, c in enumerate(counts):
        a = lo + i * step
        if a > hi:
            break
        out.append(f"  {a:>9}-{min(a + step - 1, hi):<9} {c:>6} {'#' * max(1 if c else 0, round(width * c / top))}")
    return out


def render_ids(tok, ids: List[int], collapse: set) -> str:
    """Decode ids, writing each run of a placeholder token as `<TOKEN>x N`."""
    parts, run = [], []
    i = 0
    while i < len(ids):
        if ids[i] in collapse:
            if run:
                parts.append(tok.decode(run))
                run = []
            j = i
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            parts.append(f"{tok.convert_ids_to_tokens(ids[i])}x{j - i}")
            i = j
        else:
            run.append(ids[i])
            i += 1
    if run:
        parts.append(tok.decode(run))
    return "".join(parts)


def _resolve_tokenizer(args, recipe) -> Optional[str]:
    spec = args.tokenizer or recipe.tokenizer
    if spec is None:
        return None
    if not os.path.isabs(spec) and not os.path.isdir(spec):
        spec = os.path.join(args.data_root, spec)
    return spec


def _inspect(args) -> int:
    from megatron_vita.config.model import resolve_model_config
    from megatron_vita.data.image import MediaError
    from megatron_vita.data.loader import RecordEvaluator, build_planner
    from megatron_vita.data.readers import RecordFile
    from megatron_vita.data.recipe import load_recipe
    from megatron_vita.data.sampler import MixtureOrder, used_count
    from megatron_vita.data.template import SampleError, load_tokenizer

    recipe = load_recipe(args.recipe, args.data_root)
    r = recipe
    print(f"recipe {r.name} ({r.path}): stage {r.stage}, seq_length {r.seq_length}, model {r.model}")
    print(f"  tiles {r.image.min_tiles}..{r.image.max_tiles}, video <= {r.video.max_frames} frames at <= "
          f"{r.video.max_fps} fps, packing {r.packing.mode} (reset {r.packing.reset}, oversize {r.packing.oversize})")
    tok_path = _resolve_tokenizer(args, recipe)
    model_cfg = resolve_model_config(args.model or r.model)

    enabled = r.enabled_datasets
    sizes = {}
    from tqdm import tqdm  # bars only on a terminal (disable=None): logs and pipes get the report alone

    for d in tqdm(enabled, desc="indexing dataset files", unit="file",
                  disable=True if len(enabled) < 20 else None):
        sizes[d.path] = len(RecordFile(r.resolve(args.data_root, d.path), d.format, args.cache_dir))
    total_used = sum(used_count(sizes[d.path], d) for d in enabled)
    print(f"\ndatasets: {len(enabled)} enabled of {len(r.datasets)} listed; {total_used} records per epoch")
    print(f"  {'group':<28} {'records':>9} {'ratio':>6} {'cap':>8} {'used':>9} {'share':>7}  path")
    for d in enabled:
        n, u = sizes[d.path], used_count(sizes[d.path], d)
        cap = "-" if d.cap is None else str(d.cap)
        print(f"  {d.group[:28]:<28} {n:>9} {d.ratio:>6g} {cap:>8} {u:>9} {u / max(total_used, 1):>7.1%}  {d.path}")
    if tok_path is None:
        print("\nno tokenizer (pass --tokenizer DIR, e.g. the Qwen2.5 tokenizer): token lengths and packing skipped")
        return 0
    tok = load_tokenizer(tok_path)
    ev = RecordEvaluator(r, tok, model_cfg, args.data_root, args.cache_dir)
    order = MixtureOrder(ev.sizes, r.datasets, args.seed)

    lengths, outcomes, sample = [], {}, None
    for p in tqdm(range(min(args.samples, order.total * 4)), desc="planning documents", unit="doc", leave=False,
                  disable=None):
        ds, rec = order.at(p)
        ref, outcome, loc, _ = ev.evaluate(ds, rec)
        if ref is not None:
            # Decoded as training would: a file whose header is fine but whose pixels are not
            # (a truncated JPEG) is bad here too, and is never the rendered sample.
            try:
                doc = ev.materialize(ref)
            except (SampleError, MediaError) as e:
                outcome = f"bad:{e.reason}"
            except Exception:
                outcome = "bad:unexpected"
            else:
                lengths.append(ref[2])
                if sample is None or (not len(sample[2][2]) and len(doc[2])):
                    sample = (ref, loc, doc)  # the first document with pictures, else the first usable one
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(f"\ntoken lengths of the first {sum(outcomes.values())} documents of the stream, media decoded "
          f"(outcomes: {', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))}):")
    if lengths:
        print(f"  min {min(lengths)}, mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)} "
              f"(seq_length {r.seq_length})")
    print("\n".join(histogram(lengths)))

    # Inspecting reports bad samples rather than stopping at the limit; a stream with nothing
    # usable still ends (UnusableDataError, one line) instead of being walked forever.
    planner = build_planner(r, ev, args.seed, enforce_bad_limit=False)
    try:
        packs = [planner.next_pack() for _ in tqdm(range(args.packs), desc="packing", unit="seq", leave=False,
                                                            disable=None)]
    finally:
        planner.close()
    used = sum(ref[2] for pk in packs for ref in pk)
    eff = used / (len(packs) * r.seq_length) if packs else 0.0
    print(f"\npacking efficiency over {len(packs)} sequences: {eff:.1%} real tokens "
          f"({sum(len(pk) for pk in packs) / max(len(packs), 1):.1f} documents per sequence)")
    if planner.stats.bad_total():
        print(planner.stats.summary())

    if sample is None:
        print("\nno usable document to render")
        return 0
    ref, loc, (ids, labels, pix) = sample
    collapse = set(ev.tokens.context_ids)
    print(f"\nsample {loc} ({len(ids)} tokens, {len(pix)} tiles, {sum(x != -100 for x in labels)} supervised):")
    print("  " + render_ids(tok, ids, collapse).replace("\n", "\n  "))
    png = args.png or f"inspect_{r.name}.png"
    if len(pix):
        labels = tile_labels(ids, ev.tokens, ev.num_image_token)
        write_tiles_png(png, pix, labels if len(labels) == len(pix) else [f"tile {i}" for i in range(len(pix))],
                        f"{loc}: {len(ids)} tokens, {len(pix)} tile{'s' if len(pix) != 1 else ''} in token-block order")
        print(f"\nwrote {png} ({len(pix)} tiles of {pix.shape[1]}x{pix.shape[2]}, in token-block order)")
    return 0


def tile_labels(ids: List[int], tokens, tokens_per_tile: int) -> List[str]:
    """A caption per tile, read from the runs of context tokens (each tile is `tokens_per_tile` of
    them): `<IMG_CONTEXT>` starts an image (its only tile, or its thumbnail when `<PATCH_CONTEXT>`
    tiles follow), `<VID_CONTEXT>` is a video frame."""
    kinds = {tokens.img_context: "image", tokens.patch_context: "tile", tokens.vid_context: "frame"}
    labels: List[str] = []
    image = tile = frame = 0
    i = 0
    while i < len(ids):
        kind = kinds.get(ids[i])
        j = i
        while j < len(ids) and ids[j] == ids[i]:
            j += 1
        for _ in range((j - i) // tokens_per_tile if kind else 0):
            if kind == "image":
                image, tile = image + 1, 0
                labels.append(f"image {image}")
            elif kind == "tile":
                if tile == 0 and labels:  # the image's first block was its thumbnail
                    labels[-1] = f"image {image} thumbnail"
                tile += 1
                labels.append(f"image {image} tile {tile}")
            else:
                frame += 1
                labels.append(f"frame {frame}")
        i = j
    return labels


def write_tiles_png(path: str, tiles, labels: List[str], title: str, columns: int = 8) -> None:
    """The tiles (uint8 [n, H, W, 3]) in a grid, each captioned, drawn with matplotlib's Agg canvas
    (no display, no pyplot state). Tiles are shown at 112-224 pixels, unsmoothed."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(tiles)
    cols = max(1, min(columns, n))
    rows = -(-n // cols)
    side = min(max(tiles.shape[1], 112), 224) / 100  # inches at dpi 100
    fig = Figure(figsize=(max(cols * (side + 0.1), 4.0), rows * (side + 0.3) + 0.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    # ~13 characters per inch; a long path is cut at the width, not at each of its hyphens.
    fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 13), break_on_hyphens=False), fontsize=9)
    for k, ax in enumerate(fig.subplots(rows, cols, squeeze=False).flat):
        ax.set_axis_off()
        if k < n:
            ax.imshow(tiles[k], interpolation="nearest")
            ax.set_title(labels[k], fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
