"""The `longctx` command line: one subcommand per job, all configured by YAML + key=value."""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path
from typing import List, Optional


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.micro_batch_size=2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longctx", description=(
        "Continual pretraining of Mamba-2 on 100K-1M token contexts: data preparation with Ray, "
        "DeepSpeed training with a context-length curriculum, state-collapse mitigations, passkey eval."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in SUBCOMMANDS:        # `longctx --help` lists them in this order
        add_command(sub)
    return parser


def _add_prepare(sub) -> None:
    parser = sub.add_parser("prepare", help="tokenize raw text (local or s3://) into MDS shards with Ray")
    _add_config_args(parser)


def _add_train(sub) -> None:
    parser = sub.add_parser("train", help="per-rank training entry point (what the DeepSpeed launcher starts)")
    _add_config_args(parser)
    # set by the DeepSpeed launcher
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def _add_node(sub) -> None:
    parser = sub.add_parser("node", help="one node of a multi-node run: DeepSpeed's launcher for this node's ranks "
                                         "(what launch/slurm/train.sbatch starts on each node through srun, and "
                                         "launch/deepspeed/train.sh on each host of a hostfile when NODE_RANK is set)")
    _add_config_args(parser)
    nodes = parser.add_mutually_exclusive_group(required=True)
    nodes.add_argument("--hosts", help="comma-separated node names, in node-rank order (with --nproc)")
    nodes.add_argument("--hostfile", help="a DeepSpeed hostfile ('host slots=N' per line, in node-rank order)")
    parser.add_argument("--node-rank", type=int, required=True, help="this node's index among the hosts")
    parser.add_argument("--nproc", type=int, default=None, help="ranks per node (GPUs per node), with --hosts")
    parser.add_argument("--master-addr", default=None, help="rendezvous host (default: the first host)")
    parser.add_argument("--master-port", type=int, default=29500)


def _add_run(sub) -> None:
    parser = sub.add_parser("run", help="prepare data if missing, train on N local processes, write the report")
    _add_config_args(parser)
    parser.add_argument("--nproc", type=int, default=None, help="local processes (DeepSpeed launcher); "
                                                                  "default launch.local_procs")
    parser.add_argument("--plan", action="store_true", help="print the stage table and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="show everything the launcher and the ranks write (by default the known third-party "
                             "noise is left out: DeepSpeed's INFO lines, torch's and streaming's repeated warnings)")


def _add_eval(sub) -> None:
    parser = sub.add_parser("eval", help="passkey retrieval, RULER-style needles in a haystack (niah), loss past the "
                                         "training length, state statistics")
    parser.add_argument("kind", choices=["passkey", "niah", "length", "states"])
    parser.add_argument("checkpoint", help="our checkpoint directory or a mamba_ssm / Hugging Face model directory")
    parser.add_argument("--lengths", default="", help="comma-separated context lengths, e.g. 4096,65536")
    parser.add_argument("--depths", default="", help="passkey: comma-separated depths in [0, 1]")
    parser.add_argument("--tasks", default="",
                        help="niah: comma-separated tasks, e.g. single_1,multikey_1,vt (default: every task; "
                             "docs/guides/research.md lists them)")
    parser.add_argument("--samples", type=int, default=None,
                        help="passkey: keys per length and depth; niah: prompts per task and length, their needle "
                             "depths spread evenly over [0, 1] (default 2)")
    parser.add_argument("--out", default=None, help="output directory")
    parser.add_argument("--tokenizer", default=None, help="'byte' or the path of a tokenizer.json")
    parser.add_argument("--mitigations", nargs="*", default=[], metavar="KEY=VAL",
                        help="mitigations keys, on top of the model's own (scales saved by `longctx calibrate`, a "
                             "training stage's): a key given replaces the model's value for it, the others are kept")
    parser.add_argument("--compare", action="store_true",
                        help="run the model as loaded and with --mitigations side by side")
    parser.add_argument("--variants", nargs="+", default=[], metavar="NAME=KEY=VAL[,KEY=VAL...]",
                        help="variants side by side on the same prompts: NAME= (as it is), mitigations keys "
                             "(decay_scale, a_scale, state_norm.every, window, ...) and/or checkpoint=PATH; one JSON, "
                             "table.md and plot. Keys compose with the model's own mitigations: one the variant sets "
                             "replaces the model's value (a_scale=1 removes it), the others (e.g. calibrated scales) "
                             "are kept")
    parser.add_argument("--data", default=None,
                        help="length/states: a `longctx prepare` output; its held-out split is read "
                             "(default: synthetic documents)")
    parser.add_argument("--buckets", type=int, default=16, help="length: position buckets")
    parser.add_argument("--margin", type=float, default=0.5, help="length: nats above the running minimum = collapse")
    parser.add_argument("--min-position", type=int, default=64,
                        help="length: buckets ending before this position are not judged (e.g. the training length)")
    parser.add_argument("--sequences", type=int, default=1, metavar="N",
                        help="length: N consecutive rows of --lengths tokens, the same for every variant, each read "
                             "on its own; their loss is averaged position by position before bucketing (one row's "
                             "buckets mostly show where its documents start), and each bucket records the spread "
                             "over rows")
    parser.add_argument("--prefill-chunk", type=int, default=4096, help="tokens read per forward call")
    parser.add_argument("--calibration-length", type=int, default=None,
                        help="state_norm without thresholds: calibrate at this length (default: the training length)")
    parser.add_argument("--seed", type=int, default=0)


def _add_calibrate(sub) -> None:
    parser = sub.add_parser("calibrate",
                            help="fit one scale per layer (decay or A) to the held-out loss at a length, "
                                 "on top of the model's own (a fitted scale multiplies it); writes a model "
                                 "directory that loads with its scales")
    parser.add_argument("checkpoint", help="our checkpoint directory or a mamba_ssm / Hugging Face model directory")
    parser.add_argument("--length", type=int, required=True, help="tokens per calibration sequence (the target length)")
    parser.add_argument("--data", required=True, help="a `longctx prepare` output: its held-out split is read")
    parser.add_argument("--param", choices=["decay", "A"], default="decay",
                        help="decay: decay_scale in (0, 1] (MambaExtend); A: a_scale on A (Mamba Modulation)")
    parser.add_argument("--per-head", action="store_true", help="one scale per layer x head (default: per layer)")
    parser.add_argument("--samples", type=int, default=16,
                        help="held-out sequences to fit on; the loss before (the model as loaded) and after is "
                             "reported on the next --samples held-out sequences, never fitted on")
    parser.add_argument("--batch", type=int, default=4, help="sequences per gradient step")
    parser.add_argument("--steps", type=int, default=40, help="Adam steps on the scales")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="order of the held-out documents")
    parser.add_argument("--tokenizer", default=None, help="'byte' or the path of a tokenizer.json")
    parser.add_argument("--out", required=True, help="the calibrated model directory")


def _add_launch(sub) -> None:
    parser = sub.add_parser("launch", help="render (and submit) SLURM / DeepSpeed hostfile / Ray job scripts")
    parser.add_argument("target", choices=["slurm", "deepspeed", "ray"])
    _add_config_args(parser)
    parser.add_argument("--nodes", type=int, default=None, help="default launch.nodes")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="default launch.gpus_per_node")
    parser.add_argument("--partition", default="", help="slurm: partition (default launch.partition)")
    parser.add_argument("--time", default="", help="slurm: time limit (default launch.time)")
    parser.add_argument("--hostfile", default=None, help="deepspeed: the hostfile ('host slots=N' lines)")
    parser.add_argument("--address", default="", help="ray: the job server, e.g. http://head:8265")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the script")
    mode.add_argument("--submit", action="store_true", help="write it and submit it (sbatch / bash)")


def _add_export(sub) -> None:
    parser = sub.add_parser("export", help="write a model directory in the mamba_ssm or Hugging Face layout")
    parser.add_argument("source", help="a training checkpoint (checkpoints/step_XXXXXXX, or a run's checkpoints/ for "
                                       "the latest) or a mamba_ssm / Hugging Face Mamba2 directory")
    parser.add_argument("out_pos", nargs="?", metavar="out", help="output directory (or --out)")
    parser.add_argument("--out", default=None, help="output directory")
    parser.add_argument("--format", choices=["mamba_ssm", "hf"], default="mamba_ssm")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="cast weights before writing")
    parser.add_argument("--safetensors", action="store_true",
                        help="mamba_ssm layout: model.safetensors instead of mamba_ssm's pytorch_model.bin (the hf "
                             "layout always writes safetensors)")


def _add_bench(sub) -> None:
    parser = sub.add_parser("bench", help="benchmarks: kernels (SSD scan), data (prepare + loader), train (tokens/s), "
                                          "sp (sequence-parallel step time, bytes and memory per layer of a "
                                          "hybrid's Mamba and attention layers), models (each variant of a study: "
                                          "training and decoding tokens/s, decoding state bytes)")
    parser.add_argument("what", choices=list(BENCHES))
    parser.add_argument("--lengths", default=None,
                        help="comma-separated sequence lengths (kernels: 512,1024,2048,4096; sp: 2048,8192,16384; "
                             "models: the decoding lengths, 256,1024,4096)")
    parser.add_argument("--study", default=None, help="models: the study file whose variants' models to compare")
    parser.add_argument("--nproc", type=int, default=2, help="sp: processes in the sequence-parallel group")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--d-state", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-max-len", type=int, default=8192, help="skip the slow reference above this length")
    parser.add_argument("--dtypes", default="float32", help="kernels: comma-separated input dtypes (float32,bfloat16)")
    parser.add_argument("--devices", default="cpu,cuda", help="kernels: comma-separated devices to time on")
    parser.add_argument("--out", default=None, help="JSON results file (default bench_results/WHAT.json)")
    parser.add_argument("--megabytes", type=float, default=100, help="data: size of the generated jsonl corpus")
    parser.add_argument("--workers", type=int, default=2,
                        help="data: Ray workers for prepare (and cores for the baseline)")
    parser.add_argument("--tokenizer", default=None, help="data: a tokenizer.json (default: train a BPE on the corpus)")
    parser.add_argument("--ranks", default="8,64",
                        help="data: simulated ranks sharing each step (loader tokens/s per rank)")
    parser.add_argument("--vs-minimal", action="store_true",
                        help="kernels: our torch scan against mamba_ssm's ssd_minimal_discrete (transcribed), each at "
                             "every --chunk-sizes, on CPU")
    parser.add_argument("--chunk-sizes", default="64,128,256", help="kernels --vs-minimal: chunk sizes to try")
    parser.add_argument("--vs-bare", action="store_true",
                        help="train: the trainer (a real `longctx run` of each stage of --config) against a bare "
                             "PyTorch loop of the same model, shapes and optimizer, for each --procs")
    parser.add_argument("--compile", action="store_true",
                        help="train: each stage of --config, one process: the first step under train.compile (its "
                             "compile) and eager against compiled steps, in turn")
    parser.add_argument("--plateau", action="store_true",
                        help="train: the first stage of --config in one process on its prepared shards, loss and the "
                             "loss on the passkey's digits (the key, its repeat in the needle, the answer) every 100 "
                             "steps: how soon the model learns to copy")
    parser.add_argument("--config", dest="bench_config", default="configs/demo-from-scratch.yaml",
                        help="train --vs-bare / --compile / --plateau: the model, batch and data")
    parser.add_argument("--procs", default="1,2", help="train --vs-bare: comma-separated process counts")
    parser.add_argument("--steps", type=int, default=None,
                        help="train --vs-bare: optimizer steps per measurement (default 20, the first 3 are warm-up); "
                             "--compile: steps per block (default 20); --plateau: steps to train (default and at "
                             "most: the stage's)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="train --plateau: config overrides, e.g. train.betas=[0.9,0.999] run.seed=1")


def _add_study(sub) -> None:
    parser = sub.add_parser("study", help="a grid of variants x seeds over a base config: train every cell, "
                                          "evaluate each final checkpoint, summarize with confidence intervals")
    parser.add_argument("study", help="the study file (pipeline/study/spec.py, docs/guides/research.md)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells, their commands and how far each got")


SUBCOMMANDS = (_add_prepare, _add_train, _add_node, _add_run, _add_eval, _add_calibrate, _add_launch,
               _add_export, _add_bench, _add_study)


def _ints(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"longctx: expected comma-separated integers, got {text!r}")


def export_tokenizer_record(source: Path, out: Path) -> list:
    """A training checkpoint's tokenizer record (and a Hugging Face tokenizer's file) copied beside the exported
    weights: `longctx eval` then decodes with it, and a run continuing the export refuses another tokenizer; and
    the tokenizer as transformers loads it (data/hf_tokenizer.py), so AutoTokenizer takes the directory."""
    import shutil

    from longctx.pipeline.model.load import find_checkpoint
    from longctx.pipeline.training.checkpoint import TOKENIZER_FILE, TOKENIZER_INFO
    found = find_checkpoint(source)
    where = source if found is None else found[0] / found[1]       # a checkpoint, or an earlier export
    names = [n for n in (TOKENIZER_INFO, TOKENIZER_FILE) if (where / n).exists()]
    for name in names:
        if (where / name).resolve() != (out / name).resolve():
            shutil.copyfile(where / name, out / name)
    if TOKENIZER_INFO in names:       # and as a transformers tokenizer, for the tools that take a model directory
        from longctx.data.hf_tokenizer import write_hf_tokenizer
        names += [n for n in write_hf_tokenizer(out, json.loads((out / TOKENIZER_INFO).read_text()))
                  if n not in names]
    return names


def cmd_export(args) -> int:
    import torch

    from longctx.pipeline.model.load import load_any
    out = args.out or args.out_pos
    if not out:
        raise SystemExit("longctx export: give the output directory (positional or --out)")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    model = load_any(args.source)
    if args.dtype:
        model = model.to(dtypes[args.dtype])
    model.save_pretrained(out, format=args.format, safe_serialization=True if args.safetensors else None)
    carried = export_tokenizer_record(Path(args.source), Path(out))
    print(f"wrote {out} ({args.format} layout{', with ' + ' and '.join(carried) if carried else ''})")
    return 0


def cmd_launch(args) -> int:
    import subprocess

    from longctx.launch.render import render
    from longctx.pipeline.config import load_config
    cfg = load_config(args.config, args.overrides)
    nodes = args.nodes or cfg.launch.nodes
    gpus = args.gpus_per_node or cfg.launch.gpus_per_node
    script = render(args.target, cfg, args.config, args.overrides, nodes, gpus, args.partition, args.time,
                    args.hostfile, args.address)
    if args.dry_run:
        print(script, end="")
        return 0
    path = Path(cfg.run.dir) / "launch" / f"{args.target}.{'sbatch' if args.target == 'slurm' else 'sh'}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    print(f"wrote {path}")
    if args.submit:
        return subprocess.call(["sbatch", str(path)] if args.target == "slurm" else ["bash", str(path)])
    return 0


def _floats(text: str) -> List[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"longctx: expected comma-separated numbers, got {text!r}")


def cmd_eval(args) -> int:
    from longctx.pipeline.evaluate.any_checkpoint import evaluate_checkpoint
    evaluate_checkpoint(args.kind, args.checkpoint, lengths=_ints(args.lengths), depths=_floats(args.depths),
                        samples=args.samples or 2, out=args.out, tokenizer=args.tokenizer,
                        mitigations=args.mitigations, compare=args.compare, data=args.data, buckets=args.buckets,
                        margin=args.margin, min_position=args.min_position, prefill_chunk=args.prefill_chunk,
                        calibration_length=args.calibration_length, seed=args.seed, variant_specs=args.variants,
                        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()], sequences=args.sequences)
    return 0


def cmd_study(args) -> int:
    from longctx.launch.noise import quiet_in_process
    from longctx.pipeline.study.runner import main
    quiet_in_process()          # the evaluations' third-party log lines (each cell's run keeps its own log)
    return main(args.study, dry_run=args.dry_run)


def cmd_calibrate(args) -> int:
    from longctx.pipeline.evaluate.calibrate import calibrate
    calibrate(args.checkpoint, length=args.length, data=args.data, out=args.out, param=args.param,
              per_head=args.per_head, samples=args.samples, batch=args.batch, steps=args.steps, lr=args.lr,
              seed=args.seed, tokenizer=args.tokenizer)
    return 0


def cmd_train(args) -> int:
    from longctx.launch.local import free_port
    from longctx.pipeline.config import load_config
    from longctx.pipeline.training.trainer import train
    if "RANK" not in os.environ:          # started by hand, not by a launcher: one process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    rc = train(load_config(args.config, args.overrides), where=args.config)
    # Leave without interpreter teardown: a communication library's background thread otherwise
    # aborts the finished process now and then ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def cmd_node(args) -> int:
    """Replace this process by DeepSpeed's launcher for this node, so that the signals a scheduler sends
    to the task (SIGTERM on pre-emption) reach the launcher, which passes them on to the ranks."""
    from longctx.launch.hostfile import read_hostfile, uniform_slots
    from longctx.launch.local import launch_command
    if args.hostfile:
        if args.nproc is not None:
            raise ValueError("--nproc goes with --hosts; with --hostfile the ranks per node are its slots")
        world = read_hostfile(args.hostfile)
        uniform_slots(args.hostfile, world)
    else:
        if args.nproc is None or args.nproc < 1:
            raise ValueError("--hosts needs --nproc N (ranks per node, N >= 1)")
        world = {h: args.nproc for h in args.hosts.split(",") if h}
    hosts = list(world)
    if not 0 <= args.node_rank < len(hosts):
        raise ValueError(f"--node-rank {args.node_rank} is not an index of the {len(hosts)} hosts {hosts}")
    # one host: rendezvous on the loopback (its name in a hostfile may be an ssh alias that does not resolve)
    master = args.master_addr or (hosts[0] if len(hosts) > 1 else "127.0.0.1")
    cmd = launch_command(args.config, args.overrides, world, args.master_port, node_rank=args.node_rank,
                         master_addr=master)
    print(f"node {args.node_rank} ({hosts[args.node_rank]}) of {hosts}:", " ".join(cmd), flush=True)
    os.execv(cmd[0], cmd)


def cmd_run(args) -> int:
    from longctx.launch.local import run_local
    from longctx.pipeline.config import load_config, model_chunk_size, planning_architecture
    from longctx.pipeline.training.curriculum import format_model, format_plan, plan
    from longctx.pipeline.training.eval_budget import budget_lines
    cfg = load_config(args.config, args.overrides)
    if not args.plan:
        from longctx.pipeline.training.preflight import check_model
        check_model(cfg, args.config)     # a missing or damaged base is refused before any data is prepared
    nproc = args.nproc or cfg.launch.local_procs
    arch, note = planning_architecture(cfg)
    chunk, note = (arch.chunk_size, note) if args.plan else (model_chunk_size(cfg), "")
    plans = plan(cfg, nproc, chunk, args.config)
    text = "\n".join([format_model(arch), format_plan(plans, nproc), *budget_lines(cfg, plans, nproc)])
    if args.plan:
        print(text + (f"\n{note}" if note else ""))
        return 0
    return run_local(cfg, args.config, args.overrides, nproc, text, verbose=args.verbose)


EXIT_REJECTED = 3      # `longctx prepare`: the output is complete, but records or files were rejected


def cmd_prepare(args) -> int:
    from longctx.data.prepare import prepare
    from longctx.pipeline.config import load_config
    cfg = load_config(args.config, args.overrides)
    manifest = prepare(cfg.data, cfg.tokenizer)
    if manifest["rejected"]:
        print(f"longctx prepare: complete, but {sum(manifest['rejected'].values()):,} records or files were rejected "
              f"({', '.join(f'{k}: {v}' for k, v in manifest['rejected'].items())}; where: rejected_examples in "
              f"{cfg.data.prepare.output}/manifest.json): exit status {EXIT_REJECTED}", file=sys.stderr)
        return EXIT_REJECTED
    return 0


def _print_rows(rows: List[dict]) -> None:
    for row in rows:
        print("  ".join(f"{k}={v:,.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


def bench_kernels(args, out: Path) -> None:
    if args.vs_minimal:
        from longctx.pipeline.bench.minimal import print_minimal, run_minimal_bench
        rows = run_minimal_bench(_ints(args.lengths or "1024,4096,16384,65536"), args.heads, args.headdim,
                                 args.d_state, _ints(args.chunk_sizes), repeats=args.repeats)
        print_minimal(rows)
        _save_json(rows, out)
        return
    from longctx.pipeline.bench.kernels import print_and_save, run_kernel_bench
    rows = run_kernel_bench(lengths=_ints(args.lengths or "512,1024,2048,4096"), heads=args.heads, headdim=args.headdim,
                            d_state=args.d_state, chunk_size=args.chunk_size, repeats=args.repeats,
                            naive_max_len=args.naive_max_len, dtypes=args.dtypes.split(","),
                            devices=args.devices.split(","))
    print_and_save(rows, out)


def bench_data(args, out: Path) -> None:
    from longctx.pipeline.bench.data import run_data_bench
    result = run_data_bench(megabytes=args.megabytes, workers=args.workers, tokenizer=args.tokenizer,
                            ranks=_ints(args.ranks))
    for k, v in result.items():
        print(f"{k:34s} {v:,.1f}" if isinstance(v, float) else f"{k:34s} {v}")
    _save_json(result, out)


def bench_train(args, out: Path) -> None:
    if args.plateau + args.vs_bare + args.compile > 1:
        raise SystemExit("longctx bench train: --plateau, --vs-bare and --compile are separate benchmarks; give one")
    if args.plateau:
        from longctx.pipeline.bench.plateau import run_plateau
        from longctx.pipeline.config import load_config
        rows = run_plateau(load_config(args.bench_config, args.overrides), args.bench_config, args.steps)
        _save_json(rows, out)           # printed as they came
        return
    steps = 20 if args.steps is None else args.steps
    if args.vs_bare:
        from longctx.pipeline.bench.bare import run_vs_bare
        rows = run_vs_bare(args.bench_config, _ints(args.procs), steps=steps)
    elif args.compile:
        from longctx.pipeline.bench.compiled import run_compile_bench
        rows = run_compile_bench(args.bench_config, steps=steps)
    else:
        from longctx.pipeline.bench.train import run_train_bench
        rows = run_train_bench(repeats=args.repeats)
    _print_rows(rows)
    _save_json(rows, out)


def bench_sp(args, out: Path) -> None:
    from longctx.pipeline.bench.sp import run_sp_bench
    rows = run_sp_bench(_ints(args.lengths or "2048,8192,16384"), nproc=args.nproc, repeats=args.repeats)
    _print_rows(rows)
    _save_json(rows, out)


def bench_models(args, out: Path) -> None:
    from longctx.pipeline.bench.models import run_models_bench
    from longctx.pipeline.study.spec import load_study
    if not args.study:
        raise SystemExit("longctx bench models: give --study STUDY.yaml (the variants whose models to compare)")
    study = load_study(args.study)
    configs = {c.variant: c.config for c in study.cells if c.seed == study.seeds[0]}
    rows = run_models_bench(configs, _ints(args.lengths or "256,1024,4096"), repeats=args.repeats)
    _print_rows(rows)
    _save_json(rows, out)


def _save_json(result, out: Path) -> None:
    import json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


BENCHES = {"kernels": bench_kernels, "data": bench_data, "train": bench_train, "sp": bench_sp, "models": bench_models}


def cmd_bench(args) -> int:
    if args.overrides and not (args.what == "train" and args.plateau):
        raise SystemExit(f"longctx bench: config overrides ({' '.join(args.overrides)}) apply to "
                         "`bench train --plateau` only")
    BENCHES[args.what](args, Path(args.out or f"bench_results/{args.what}.json"))
    return 0


COMMANDS = {"export": cmd_export, "bench": cmd_bench, "prepare": cmd_prepare, "train": cmd_train,
            "node": cmd_node, "run": cmd_run, "eval": cmd_eval, "calibrate": cmd_calibrate,
            "launch": cmd_launch, "study": cmd_study}


ARGV_B64 = "--argv-b64"


def unpack_argv(argv: List[str]) -> List[str]:
    """`--argv-b64 B`: the arguments B encodes (each ended by a NUL byte, then base64), else `argv` as it is.
    launch/deepspeed/train.sh (over ssh) and launch/ray/prepare.sh send `longctx`'s arguments so: DeepSpeed's
    pdsh runner and older `ray job submit` join them into a line for a remote shell with no more than double
    quotes around blanks, so that the shell would read a $, ` or ; in an override; base64 has none."""
    if len(argv) == 2 and argv[0] == ARGV_B64:
        return [os.fsdecode(a) for a in base64.b64decode(argv[1], validate=True).split(b"\0")[:-1]]
    return argv


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(unpack_argv(sys.argv[1:] if argv is None else argv))
    # key=value overrides may also follow options (`run CONFIG --nproc 2 train.lr=1e-4`)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if getattr(args, "config", None):
        from longctx.pipeline.config import ConfigError, load_config
        try:
            load_config(args.config, args.overrides)
        except ConfigError as e:
            print(f"longctx {args.command}: config error: {e}", file=sys.stderr)
            return 1
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as e:  # config, data and checkpoint errors carry their own context
        print(f"longctx {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
