"""CLI commands for inputs: `render-events` (event file -> event images) and `make-demo` (synthetic data).

The main `coordinator` group registers these. Must never import torch.
"""
from __future__ import annotations

from pathlib import Path

import click
from PIL import Image

from workers.inputs import InputError, load_events_file, make_demo, render_event_images


@click.command("render-events")
@click.argument("events_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--frames", "n_frames", type=int, default=5, show_default=True,
              help="Number of event images (equal event count each).")
@click.option("--window-ms", type=float, default=None, help="Keep only the last W milliseconds of events.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for frame_0.png, frame_1.png, ...")
def render_events_command(events_file: Path, n_frames: int, window_ms: float | None, out_dir: Path) -> None:
    """Render EVENTS_FILE (.npy or .h5) as EventGPT's event images."""
    try:
        events = load_events_file(events_file)
        images = render_event_images(events, n_frames, window_ms)
    except InputError as exc:
        raise click.ClickException(str(exc)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    for n, image in enumerate(images):
        path = out_dir / f"frame_{n}.png"
        Image.fromarray(image).save(path)
        click.echo(f"{path}  ({image.shape[1]}x{image.shape[0]})")
    click.echo(f"{len(events)} events, {events.duration_us / 1000:.1f} ms -> {len(images)} images")


@click.command("make-demo")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--clips", "n_clips", type=click.IntRange(min=1), default=4, show_default=True,
              help="Clips in the research-dataset layout (spread over two sequences).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--profile", type=click.Choice(["small", "dsec"]), default="small", show_default=True,
              help="small: tiny clips for tests and the demo; dsec: DSEC-size clips for benchmarks (640x480 "
                   "events at 0.3-3 M events/s, 1 s, 20 fps 1440x1080 mp4; research-dataset layout only)")
def make_demo_command(out_dir: Path, n_clips: int, seed: int, profile: str) -> None:
    """Write synthetic demo data to OUT_DIR: a research-dataset layout and raw DSEC sequences."""
    if profile == "dsec":
        from workers.inputs.dsec_demo import make_dsec_demo
        written = make_dsec_demo(out_dir, n_clips=n_clips, seed=seed)
        for clip in written["clips"]:
            click.echo(f"{clip['id']}: {clip['events']} events ({clip['rate_per_s'] / 1e6:.2f} M/s), "
                       f"{clip['frames']} frames {written['video_size'][0]}x{written['video_size'][1]}")
        click.echo(f"research dataset: {written['dataset']}  (index {written['index']})")
        return
    written = make_demo(out_dir, n_clips=n_clips, seed=seed)
    click.echo(f"research dataset: {written['dataset']}  ({len(written['clips'])} clips, "
               f"{written['n_events']} events, index {written['index']})")
    click.echo(f"raw DSEC:         {written['dsec']}  (sequences {', '.join(written['sequences'])})")
    click.echo(f"try: --input-dir {written['dataset']}   or   --input-dir {written['dsec']}")
