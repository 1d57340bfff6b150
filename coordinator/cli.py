"""The `coordinator` command line (click). Parses flags into a RunConfig and hands over; no logic here.
Longer than most modules because it is the flag table of every command; each command's logic lives elsewhere.

Never imports torch: commands that need it (make-tiny, adapter training) import it lazily in the
worker-side modules they call.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from .runner import RunConfig, run
from .session import StartupError, WorkerSpec

MODES = ("baseline", "parallel", "speculative")


def _kv(pairs: tuple[str, ...], flag: str) -> dict:
    """KEY=VALUE pairs; values parsed as int/float/bool where they look like one."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint=flag)
        key, value = pair.split("=", 1)
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        if value in ("true", "false"):
            value = value == "true"
        out[key.replace("-", "_")] = value
    return out


def model_options(f):
    """Flags shared by `run` and `bench`: which backends, which weights, where."""
    opts = [
        click.option("--draft-backend", default="eventgpt", show_default=True, help="eventgpt | fake"),
        click.option("--target-backend", default="videollava", show_default=True, help="videollava | fake"),
        click.option("--draft-model", type=click.Path(), help="EventGPT checkpoint folder"),
        click.option("--target-model", type=click.Path(), help="Video-LLaVA checkpoint folder (-hf layout)"),
        click.option("--clip-path", type=click.Path(), help="local CLIP folder (overrides mm_visual_tower)"),
        click.option("--precision", type=click.Choice(["nf4", "bf16", "fp16", "fp32"]),
                     help="both models (default: nf4 on a GPU, fp32 on the CPU)"),
        click.option("--draft-precision", type=click.Choice(["nf4", "bf16", "fp16", "fp32"]),
                     help="the draft's precision (overrides --precision; e.g. nf4 beside a bf16 target)"),
        click.option("--target-precision", type=click.Choice(["nf4", "bf16", "fp16", "fp32"]),
                     help="the target's precision (overrides --precision)"),
        click.option("--device", help="both workers: cpu, cuda, cuda:N (default: cuda if available)"),
        click.option("--draft-device", help="the draft worker's device (overrides --device)"),
        click.option("--target-device", help="the target worker's device (overrides --device)"),
        click.option("--temperature", type=float, default=0.0, show_default=True,
                     help="0 = greedy; > 0 = speculative rejection sampling"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--synthetic-weights", type=click.Choice(["7b"]),
                     help="random full-size weights (no checkpoint needed; results are labelled synthetic)"),
        click.option("--adapter", type=click.Path(), help="draft-to-target adapter checkpoint (draft worker)"),
        click.option("--no-cuda-graphs", is_flag=True, help="eager decoding even on a GPU"),
        click.option("--draft-option", multiple=True, metavar="KEY=VALUE", help="extra draft backend option"),
        click.option("--target-option", multiple=True, metavar="KEY=VALUE", help="extra target backend option"),
        click.option("--draft-endpoint", help="attach a draft worker started elsewhere: the coordinator binds here"),
        click.option("--target-endpoint", help="attach a target worker started elsewhere: the coordinator binds here"),
        click.option("--allow-public-endpoint", is_flag=True, help="allow endpoints on non-loopback interfaces"),
        click.option("--allow-vocab-mismatch", is_flag=True, help="run although the tokenizers differ"),
        click.option("--mps", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                     help="private CUDA MPS daemon for the run (auto: where a GPU and the MPS tools exist)"),
        click.option("--no-mps", is_flag=True, help="same as --mps off"),
        click.option("--draft-sm-percent", type=click.IntRange(1, 100), help="MPS SM share of the draft"),
        click.option("--target-sm-percent", type=click.IntRange(1, 100), help="MPS SM share of the target"),
        click.option("--startup-timeout", type=float, default=600.0, show_default=True,
                     help="seconds to wait for both workers to be READY"),
        click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=600.0,
                     show_default=True, help="seconds without an answer from the workers before a request fails"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def cluster_options(f):
    """--ray / --pipelines / --resume: many pipelines at once on Ray (coordinator.cluster)."""
    opts = [
        click.option("--ray", "ray_address", metavar="local|auto|HOST:PORT",
                     help="run pipelines as Ray actors: local starts a private Ray on this machine (shut down at "
                          "the end), auto or HOST:PORT joins a running cluster (needs eventspec[cluster])"),
        click.option("--pipelines", type=click.IntRange(1),
                     help="with --ray: how many pipelines (default: one per GPU, two GPUs each for two-gpu "
                          "placements; on a CPU-only cluster one per 2 CPUs)"),
        click.option("--resume", type=click.Path(file_okay=False),
                     help="with --ray: continue the run in this output folder, skipping finished samples"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def check_cluster_flags(kw: dict) -> None:
    if not kw.get("ray_address"):
        for flag in ("pipelines", "resume"):
            if kw.get(flag):
                raise click.UsageError(f"--{flag} needs --ray local|auto|HOST:PORT")
        return
    for role in ("draft", "target"):
        if kw.get(f"{role}_endpoint"):
            raise click.UsageError(f"--{role}-endpoint cannot be used with --ray: each pipeline starts its own "
                                   "workers")
    if kw.get("resume") and kw.get("output_dir") and Path(kw["output_dir"]).resolve() != Path(kw["resume"]).resolve():
        raise click.UsageError("--resume DIR writes into DIR: leave out --output-dir or give the same folder")


def build_specs(kw: dict) -> tuple[WorkerSpec, WorkerSpec]:
    specs = []
    for role in ("draft", "target"):
        backend = kw[f"{role}_backend"]
        options = {"temperature": kw["temperature"], "seed": kw["seed"], "cuda_graphs": not kw["no_cuda_graphs"]}
        model = kw.get(f"{role}_model")
        if backend != "fake" and not model and not kw.get("synthetic_weights"):
            raise click.UsageError(f"--{role}-model PATH is required for the {backend} backend "
                                   f"(or --synthetic-weights 7b, or --{role}-backend fake)")
        if model:
            options["model"] = model
        if kw.get("synthetic_weights"):
            options["synthetic_weights"] = kw["synthetic_weights"]
        if kw.get("clip_path") and role == "draft":
            options["clip_path"] = kw["clip_path"]
        if kw.get("adapter") and role == "draft":
            options["adapter"] = kw["adapter"]
        precision = kw.get(f"{role}_precision") or kw.get("precision")
        if precision:
            options["precision"] = precision
        device = kw.get(f"{role}_device") or kw.get("device")
        if device:
            options["device"] = device
        options.update(_kv(kw[f"{role}_option"], f"--{role}-option"))
        specs.append(WorkerSpec(role=role, backend=backend, options=options, endpoint=kw.get(f"{role}_endpoint")))
    return specs[0], specs[1]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main():
    """eventspec: EventGPT drafts while Video-LLaVA prefills; lossless speculative decoding."""


@main.command("run")
@click.option("--input", "input_", required=True, type=click.Path(), help="sequence/dataset/clip folder")
@click.option("--output-dir", type=click.Path(), help="default runs/<timestamp>/")
@click.option("--samples", type=click.IntRange(1), help="use at most N samples")
@click.option("--question", help="ask this question of every sample")
@click.option("--question-set", type=click.Choice(["dataset", "top10"]), default="dataset", show_default=True)
@click.option("--split", help="dataset split to use (e.g. test)")
@click.option("--input-format", type=click.Choice(["auto", "dataset", "clip", "dsec", "folder"]), default="auto",
              show_default=True)
@click.option("--clip-ms", type=click.IntRange(1), default=1000, show_default=True, help="DSEC clip length")
@click.option("--clip-stride-ms", type=click.IntRange(1), help="DSEC clip stride (default: --clip-ms)")
@click.option("--event-frames", type=click.IntRange(1), default=5, show_default=True)
@click.option("--event-window-ms", type=float, help="use only the last W ms of events of each clip")
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1), default=50, show_default=True)
@click.option("--mode", type=click.Choice(MODES + ("all",)), default="all", show_default=True)
@click.option("--k-max", type=click.IntRange(0, 64), default=16, show_default=True,
              help="most drafted tokens per verification")
@click.option("--no-adaptive", is_flag=True, help="always verify up to --k-max drafts")
@click.option("--max-ahead", type=click.IntRange(1), default=32, show_default=True,
              help="the draft pauses this many tokens beyond the committed prefix")
@click.option("--wait-for-drafts", type=click.IntRange(0, 64), default=0, show_default=True,
              help="speculative: hold each verification until this many drafts exist (0: never wait, the "
                   "target decodes a token itself when none are ready)")
@click.option("--pipeline", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="the draft runs ahead along its own guess and the target verifies whatever exists (auto: on when "
                   "the workers report different devices)")
@click.option("--draft-policy", type=click.Choice(["auto", "always"]), default="auto", show_default=True,
              help="auto: on a GPU, draft only when the costs measured so far say drafting pays, else the target "
                   "runs alone and the record says why; always: draft every parallel/speculative request")
@click.option("--ignore-eos", is_flag=True, help="fixed-length outputs (benchmarks)")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True,
              help="unmeasured requests per mode on the first sample before the measured ones")
@click.option("--heartbeat-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="seconds an attached worker may send nothing, not even a heartbeat (sent every second, also "
                   "while it computes), before it counts as lost")
@click.option("--quiet", is_flag=True)
@model_options
@cluster_options
def run_command(input_, **kw):
    """Run samples through baseline / parallel / speculative decoding and write the reports."""
    check_cluster_flags(kw)
    draft, target = build_specs(kw)
    if kw["ignore_eos"]:
        for spec in (draft, target):
            spec.options["ignore_eos"] = True
    cfg = RunConfig(
        input=input_, output_dir=kw["output_dir"], modes=list(MODES) if kw["mode"] == "all" else [kw["mode"]],
        max_new_tokens=kw["max_new_tokens"], samples=kw["samples"], question=kw["question"],
        question_set=kw["question_set"], split=kw["split"], input_format=kw["input_format"],
        clip_ms=kw["clip_ms"], clip_stride_ms=kw["clip_stride_ms"], event_frames=kw["event_frames"],
        event_window_ms=kw["event_window_ms"], on_error=kw["on_error"], draft=draft, target=target,
        mps="off" if kw["no_mps"] else kw["mps"], draft_sm_percent=kw["draft_sm_percent"],
        target_sm_percent=kw["target_sm_percent"], startup_timeout_s=kw["startup_timeout"],
        request_timeout_s=kw["request_timeout"], heartbeat_timeout_s=kw["heartbeat_timeout"],
        allow_public_endpoint=kw["allow_public_endpoint"],
        allow_vocab_mismatch=kw["allow_vocab_mismatch"], k_max=kw["k_max"], adaptive=not kw["no_adaptive"],
        max_ahead=kw["max_ahead"], ignore_eos=kw["ignore_eos"], quiet=kw["quiet"],
        wait_for_drafts=kw["wait_for_drafts"], pipeline=kw["pipeline"], draft_policy=kw["draft_policy"],
        warmup=kw["warmup"],
        command=shlex.join(["coordinator"] + sys.argv[1:]))
    from workers.inputs.errors import InputError
    try:
        if kw["ray_address"]:
            from .cluster import RayMissing
            from .cluster.driver import run_on_ray
            try:
                code = run_on_ray(cfg, address=kw["ray_address"], pipelines=kw["pipelines"], resume=kw["resume"])
            except RayMissing as exc:
                raise click.ClickException(str(exc))
        else:
            code = run(cfg)
    except (StartupError, InputError, ValueError) as exc:
        raise click.ClickException(str(exc))
    sys.exit(code)


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated numbers", param_hint=flag) from None


@main.command("bench")
@click.option("--input", "input_", type=click.Path(), help="samples to use (default: generated demo data)")
@click.option("--output-dir", type=click.Path(), help="default runs/bench-<timestamp>/")
@click.option("--samples", type=click.IntRange(1), default=10, show_default=True,
              help="measured samples per configuration (clips are reused when there are fewer)")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True)
@click.option("--max-new-tokens", "lengths", default="50,200", show_default=True, help="comma-separated")
@click.option("--alphas", default="0,0.28,0.5,0.7,0.9,1.0", show_default=True,
              help="oracle acceptance per position, comma-separated ('' for none)")
@click.option("--oracle-profile", "profiles", default="seed", show_default=True,
              help="per-position profiles, comma-separated: seed ('' for none)")
@click.option("--modes", default="parallel,speculative", show_default=True)
@click.option("--bench-mps", "mps_list", default="on,off", show_default=True,
              help="MPS settings to measure, in this order (on needs nvidia-cuda-mps-control)")
@click.option("--hf-generate/--no-hf-generate", default=True, show_default=True,
              help="also time the target alone through transformers' generate()")
@click.option("--ignore-eos/--respect-eos", default=True, show_default=True, help="fixed-length outputs")
@click.option("--draft-alone-steps", type=click.IntRange(1), default=32, show_default=True)
@click.option("--k-max", type=click.IntRange(0, 64), default=16, show_default=True)
@click.option("--no-adaptive", is_flag=True)
@click.option("--wait-for-drafts", type=click.IntRange(0, 64), default=0, show_default=True)
@click.option("--pipeline", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="as in `run`: auto pipelines the draft when the workers are on different devices")
@click.option("--draft-policy", type=click.Choice(["auto", "always"]), default="auto", show_default=True,
              help="as in `run`: always = draft every request (what drafting costs when it cannot pay)")
@click.option("--bandwidth-gbs", type=click.FloatRange(min=0, min_open=True),
              help="memory bandwidth (GB/s) for the floor columns when the card is not in the datasheet table")
@click.option("--measure-bandwidth/--no-measure-bandwidth", default=True, show_default=True,
              help="measure each device's read bandwidth (python -m workers.bandwidth) before the workers start")
@click.option("--demo-profile", type=click.Choice(["small", "dsec"]), default="small", show_default=True,
              help="without --input: generated data of this profile (dsec: DSEC-size clips, see make-demo)")
@click.option("--placement", "placements", default="same-gpu", show_default=True,
              help="same-gpu and/or two-gpu, comma-separated, measured in this order in one run; two-gpu puts "
                   "the draft on cuda:1 and the target on cuda:0 unless --draft-device/--target-device say otherwise")
@model_options
@cluster_options
def bench_command(input_, **kw):
    """Measure hf-generate, baseline, parallel and speculative on the same samples in one run, with an
    oracle sweep of draft acceptance, MPS on and off; writes bench.json, bench.md and plots."""
    import datetime as dt

    from .bench import BenchConfig, run_bench

    check_cluster_flags(kw)
    if kw["resume"]:
        raise click.UsageError("--resume is for `coordinator run --ray`; a bench is measured in one go")

    placements = [x.strip() for x in kw["placements"].split(",") if x.strip()]
    if not placements or set(placements) - {"same-gpu", "two-gpu"}:
        raise click.BadParameter(f"{kw['placements']!r}: use same-gpu and/or two-gpu", param_hint="--placement")
    draft, target = build_specs(kw)
    user_devices = tuple(role for role in ("draft", "target") if kw.get(f"{role}_device") or kw.get("device"))
    out = Path(kw["output_dir"] or Path("runs") / dt.datetime.now().strftime("bench-%Y%m%d-%H%M%S"))
    if not input_:
        input_ = str(out / "data" / "dataset")
        if not Path(input_).exists():
            if kw["demo_profile"] == "dsec":
                from workers.inputs.dsec_demo import make_dsec_demo
                make_dsec_demo(out / "data")
            else:
                from workers.inputs.demo import make_demo
                make_demo(out / "data")
    mps_list = [x.strip() for x in kw["mps_list"].split(",") if x.strip()]
    if kw["no_mps"] or kw["mps"] == "off":
        mps_list = ["off"]
    bad = set(mps_list) - {"on", "off"}
    if bad:
        raise click.BadParameter(f"{sorted(bad)}: use on and/or off", param_hint="--bench-mps")
    modes = [x.strip() for x in kw["modes"].split(",") if x.strip()]
    if set(modes) - {"parallel", "speculative"}:
        raise click.BadParameter("choose from parallel, speculative", param_hint="--modes")
    cfg = BenchConfig(
        input=input_, output_dir=out, draft=draft, target=target, samples=kw["samples"], warmup=kw["warmup"],
        max_new_tokens=[int(x) for x in _floats(kw["lengths"], "--max-new-tokens")],
        alphas=_floats(kw["alphas"], "--alphas"),
        profiles=[p.strip() for p in kw["profiles"].split(",") if p.strip()], modes=modes, mps=mps_list,
        hf_generate=kw["hf_generate"], ignore_eos=kw["ignore_eos"], draft_alone_steps=kw["draft_alone_steps"],
        k_max=kw["k_max"], adaptive=not kw["no_adaptive"], seed=kw["seed"], wait_for_drafts=kw["wait_for_drafts"],
        pipeline=kw["pipeline"], draft_policy=kw["draft_policy"],
        startup_timeout_s=kw["startup_timeout"], request_timeout_s=kw["request_timeout"],
        draft_sm_percent=kw["draft_sm_percent"], target_sm_percent=kw["target_sm_percent"],
        placements=placements, user_devices=user_devices, measure_bandwidth=kw["measure_bandwidth"],
        bandwidth_gbs=kw["bandwidth_gbs"], command=shlex.join(["coordinator"] + sys.argv[1:]))
    try:
        if kw["ray_address"]:
            from .cluster import RayMissing
            from .cluster.bench import run_bench_on_ray
            try:
                code = run_bench_on_ray(cfg, address=kw["ray_address"], pipelines=kw["pipelines"])
            except RayMissing as exc:
                raise click.ClickException(str(exc))
        else:
            code = run_bench(cfg)
    except (StartupError, ValueError) as exc:
        raise click.ClickException(str(exc))
    click.echo((out / "bench.md").read_text())
    click.echo(f"bench outputs in {out}/ (bench.json, bench.md, speedup_vs_alpha.png, timeline.png)")
    sys.exit(code)


@main.command("make-tiny")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--trained", is_flag=True,
              help="the pair trained on make-demo scenes (shipped weights): real captions, real acceptance")
@click.option("--retrain", is_flag=True, help="with --trained: train the pair here instead (deterministic, minutes)")
@click.option("--release", "release_dir", type=click.Path(file_okay=False),
              help="with --retrain: also store the trained weights here (the shipped copy lives in "
                   "workers/models/tiny_trained)")
@click.option("--share-weights", is_flag=True,
              help="random pair only: the draft's language model copies the target's (attention damped), so "
                   "their greedy tokens agree more often than two independent random models; the text is noise")
@click.option("--seed", type=int, default=0, show_default=True)
def make_tiny_command(out_dir, trained, retrain, release_dir, share_weights, seed):
    """Write tiny EventGPT (released layout) and Video-LLaVA (-hf layout) checkpoints sharing one small offline
    tokenizer, loaded through the same code as the 7B ones: random (tests) or --trained (the demo)."""
    from workers.models.tiny import make_tiny  # imports torch: only for this command

    if (retrain or release_dir) and not trained:
        raise click.UsageError("--retrain and --release go with --trained")
    if release_dir and not retrain:
        raise click.UsageError("--release needs --retrain (it stores newly trained weights)")
    if share_weights and trained:
        raise click.UsageError("--share-weights is for the random pair; drop it with --trained")

    def log(text):
        click.echo(text, err=True)
    paths = make_tiny(out_dir, trained=trained, retrain=retrain, share_weights=share_weights, seed=seed,
                      release_dir=release_dir, log=log)
    report = paths.pop("report", None)
    for name, path in paths.items():
        click.echo(f"{name}: {path}")
    if report:
        click.echo(f"trained in {report['train_s']:.0f} s (+ {report['data_s']:.0f} s of scenes); "
                   f"final losses: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in report["curves"].items()))


@main.command("demo")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="make-demo's dataset folder (DIR/dataset); its test split is run")
@click.option("--models", "models_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="make-tiny --trained's folder")
@click.option("--output-dir", required=True, type=click.Path(file_okay=False))
@click.option("--max-new-tokens", type=click.IntRange(1), default=40, show_default=True)
@click.option("--mps", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True)
@click.option("--no-mps", is_flag=True, help="same as --mps off")
def demo_command(data_dir, models_dir, output_dir, max_new_tokens, mps, no_mps):
    """Every mode on the held-out demo clips with the tiny pair, then a summary a newcomer can read (demo.md)."""
    from .demo import run_demo

    try:
        code = run_demo(data_dir, models_dir, output_dir, max_new_tokens=max_new_tokens,
                        mps="off" if no_mps else mps)
    except (StartupError, ValueError) as exc:
        raise click.ClickException(str(exc))
    sys.exit(code)


def _register_optional() -> None:
    """Commands that live beside the modules they drive."""
    try:
        from .input_commands import make_demo_command, render_events_command
        main.add_command(render_events_command)
        main.add_command(make_demo_command)
    except ImportError:
        pass
    from .adapter_commands import adapter_group
    main.add_command(adapter_group)
    from .ceiling_command import ceiling_command
    main.add_command(ceiling_command)


_register_optional()
