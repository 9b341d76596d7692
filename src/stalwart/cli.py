"""The `stalwart` command: thin subcommands that parse, call one function, and map UserError
to exit code 2 with a single `error:` line (code 1 is left to bugs, with their traceback).

The top of the tree: it imports everything, and nothing imports it. Each command imports its
module when it runs (a dispatch table, not a hidden cycle: tests/test_imports.py checks that),
so `stalwart --help` and `stalwart config` answer at once instead of loading torch (~1 s)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from stalwart.config import help_text  # the config tree alone: no torch
from stalwart.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one `error:` line and exit 2, like every user error."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _config_args(p: argparse.ArgumentParser) -> None:
    """A command that takes the config: --config, and every field in its --help."""
    p.add_argument("--config", help="TOML recipe, e.g. configs/tiny-cpu.toml")
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the fields' layout
    p.epilog = help_text()


def cmd_prepare(args, rest) -> int:
    from stalwart.data.prepare import prepare

    meta = prepare(
        args.inputs, args.tokenizer, args.out, val_frac=args.val_frac, force=args.force,
        val_tokens=args.val_tokens, workers=args.workers, shard_tokens=args.shard_tokens,
        text_field=args.text_field, hf_dataset=args.hf_dataset,
        bpe_sample_bytes=args.bpe_sample_bytes, progress=not args.quiet,
    )  # fmt: skip
    base = meta["baselines_bits_per_byte"]
    print(
        f"{args.out}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
        f"vocab {meta['vocab_size']} ({meta['tokenizer']}); held-out bits/byte: "
        f"gzip -9 {base['gzip-9']:.3f}, xz -9 {base['xz-9']:.3f}, unigram {base['unigram']:.3f}"
    )
    return 0


def cmd_train(args, rest) -> int:
    from stalwart.config import load_config
    from stalwart.eval.report import print_run_summary
    from stalwart.train import train

    cfg = load_config(args.config, rest)
    result = train(cfg, progress=not args.quiet)
    if result.is_main:  # one report per job, not one per rank
        if result.health_stop is None:
            print_run_summary(cfg, result)
        if cfg.train.dashboard:
            from stalwart.health.dashboard import write_dashboard_quietly

            write_dashboard_quietly(cfg.run.dir, say=lambda m: print(m, file=sys.stderr))
    if result.health_stop is not None:  # the doctor stopped the run: exit 3 (docs/doctor.md)
        from stalwart.health.recovery import EXIT_HEALTH_STOP

        d = result.health_stop
        print(
            f"stopped by the doctor at step {result.step}: {d['symptom']}: {d['evidence']}. "
            f"Likely cause: {d['cause']}. Fix: {d['fix']} (details: stalwart doctor {cfg.run.dir})",
            file=sys.stderr,
        )
        return EXIT_HEALTH_STOP
    # Stopped by SIGTERM/SIGINT after saving: 128 + signum (143, 130), the shell's convention,
    # so a scheduler sees "interrupted, resumable", not "finished" (0 would end a k8s Job)
    return 128 + result.stop_signal if getattr(result, "stop_signal", None) else 0


def cmd_doctor(args, rest) -> int:
    from stalwart.health.doctor import run_doctor

    return run_doctor(args.run_dir, as_json=args.json)


def cmd_dashboard(args, rest) -> int:
    from stalwart.health.dashboard import write_dashboard

    png, page, _ = write_dashboard(args.run_dir)  # not a run dir: the usual `error:` line
    print(f"wrote {png} and {page}")
    return 0


def cmd_plan(args, rest) -> int:
    from stalwart.memory.plan import cmd_plan as plan

    return plan(args, rest)


def cmd_bench(args, rest) -> int:
    import json

    from stalwart.bench import format_compare, format_report, run_bench, run_compare, run_memory
    from stalwart.config import load_config, with_overrides

    cfg = load_config(args.config, rest)
    if args.peak_flops is not None:  # --peak-flops is --train.peak_flops under a shorter name
        cfg = with_overrides(cfg, {"train.peak_flops": args.peak_flops})
    if args.memory_only:
        print(json.dumps(run_memory(cfg)))
    elif args.compare:
        say = (lambda m: print(m, file=sys.stderr)) if args.json else print
        res = run_compare(cfg, args.compare, args.steps, args.warmup, say=say)
        print(json.dumps(res, indent=2) if args.json else format_compare(res))
    else:
        res = run_bench(cfg, args.steps, args.warmup)
        print(json.dumps(res, indent=2) if args.json else format_report(res))
    return 0


def cmd_sample(args, rest) -> int:
    from stalwart.eval.sample import load_any, sample_text

    model, tok = load_any(args.path, args.device)

    def stream(s):
        sys.stdout.write(s)
        sys.stdout.flush()

    sys.stdout.write(args.prompt)
    sample_text(
        model,
        tok,
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.seed,
        stream=stream,
    )
    sys.stdout.write("\n")
    return 0


def cmd_eval(args, rest) -> int:
    import json

    from stalwart.eval.run import format_result, run_eval

    r = run_eval(args.path, args.task, args.data, args.out, args.device)
    print(json.dumps(r) if args.json else format_result(r))
    return 0


def cmd_export(args, rest) -> int:
    from stalwart.export import export

    r = export(args.path, args.format, args.out, args.dtype, args.force)
    print(
        f"{r['out']}: {args.format} export of {r['checkpoint']} (step {r['step']}), "
        f"{r['params'] / 1e6:.2f}M parameters, {args.dtype}"
    )
    for note in r["notes"]:
        print(f"note: {note}")
    return 0


def cmd_ckpt(args, rest) -> int:
    from stalwart.checkpoint.cli import run_ckpt

    return run_ckpt(args.action, Path(args.run_dir))


def cmd_experiment(args, rest) -> int:
    from stalwart.experiments import run_experiment

    report = run_experiment(args.name, args.out, args.quick, args.data)
    print(f"report: {report}")
    return 0


def cmd_config(args, rest) -> int:
    from stalwart.config import load_config, to_toml

    if args.config or rest:
        print(to_toml(load_config(args.config, rest)))
    else:
        print(help_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="stalwart",
        description="A production pretraining loop for GPT models.",
        allow_abbrev=False,
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_prepare(sub)
    _add_training(sub)
    _add_artifacts(sub)
    _add_inspection(sub)
    return p


def _add_prepare(sub) -> None:
    """Subcommands: the dataset."""
    s = sub.add_parser("prepare", help="tokenize text into a dataset directory")
    s.add_argument(
        "inputs", nargs="*",
        help="files/dirs: text, .jsonl[.gz|.zst], .txt.gz, .parquet; none = the Python stdlib",
    )  # fmt: skip
    s.add_argument(
        "--tokenizer", default="byte", help="byte | bpe:N | gpt2 | gpt2:FILE (a local .tiktoken)"
    )
    s.add_argument("--out", required=True, help="dataset directory to create")
    s.add_argument("--val-frac", type=float, default=0.1, help="held-out fraction (0.1)")
    s.add_argument("--val-tokens", type=int, default=10_000_000, help="held-out cap (10M)")
    s.add_argument("--workers", type=int, default=0, help="tokenizing processes (0 = every core)")
    s.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    s.add_argument("--text-field", default="text", help="jsonl/parquet/HF text field (text)")
    s.add_argument("--hf-dataset", help="NAME[:SPLIT] of the HF hub, streamed (needs datasets)")
    s.add_argument(
        "--bpe-sample-bytes", type=int, default=100_000_000, help="bpe:N trains on this much"
    )
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.add_argument("--force", action="store_true", help="replace an existing dataset")
    s.set_defaults(fn=cmd_prepare)


def _add_training(sub) -> None:
    """Subcommands: train, and what plans and measures it."""
    s = sub.add_parser("train", help="train (resumes from the run dir's newest valid checkpoint)")
    _config_args(s)
    s.add_argument("--quiet", action="store_true", help="no progress display")
    s.set_defaults(fn=cmd_train, overrides=True)

    s = sub.add_parser("plan", help="memory budget: breakdown, fits?, largest micro-batch")
    _config_args(s)
    s.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (1)")
    s.add_argument(
        "--zero", type=int, choices=[0, 1, 2, 3], help="ZeRO stage, 3 = FSDP (from parallel.mode)"
    )
    s.add_argument("--device", help="cpu or a GPU of the table (H100, A100-40GB, ...)")
    s.add_argument("--headroom", type=float, help="share of device memory kept free (0.1)")
    s.add_argument("--tokens-per-step", type=int, help="target tokens per optimizer step")
    s.add_argument("--context", type=int, help="inference: KV-cache tokens (block_size)")
    s.add_argument("--lesson-table", action="store_true", help="the lesson's model-scale table")
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")
    s.set_defaults(fn=cmd_plan, overrides=True)

    s = sub.add_parser("bench", help="measured tokens/s, MFU, step-time breakdown, peak memory")
    _config_args(s)
    s.add_argument("--steps", type=int, default=10, help="timed steps (10)")
    s.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps first (3)")
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")
    s.add_argument(
        "--compare",
        choices=["precision", "activation_checkpointing", "compile", "fused_gelu", "cpu_kernels"],
        help="run the variants of one setting in this process and print ratios",
    )
    s.add_argument("--peak-flops", type=float, help="peak FLOP/s for MFU (= --train.peak_flops)")
    s.add_argument(
        "--memory-only",
        action="store_true",
        help="JSON: only one step's peak memory, measured in this process (bench runs it in a "
        "fresh one on CPU)",
    )
    s.set_defaults(fn=cmd_bench, overrides=True)


def _add_artifacts(sub) -> None:
    """Subcommands: what reads checkpoints and exports."""
    s = sub.add_parser("sample", help="generate text from a run, checkpoint or exported dir")
    s.add_argument("path", help="RUN_DIR, CKPT_DIR or an exported dir (hf or safetensors)")
    s.add_argument("--prompt", default="", help="text to continue")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=50, help="0 = no top-k filter")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.set_defaults(fn=cmd_sample)

    s = sub.add_parser("eval", help="downstream evaluation: hellaswag, any multiple-choice, bpb")
    s.add_argument("path", help="RUN_DIR, CKPT_DIR or an exported dir (hf or safetensors)")
    s.add_argument("--task", required=True, choices=["hellaswag", "mc", "bpb"])
    s.add_argument("--data", required=True, help="the task's jsonl file (bpb: any text file)")
    s.add_argument("--out", help="write per-example results (jsonl) here")
    s.add_argument("--json", action="store_true", help="one JSON object (acc, acc_norm, ...)")
    s.add_argument("--device", default="cpu")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("export", help="write a checkpoint as a Hugging Face / safetensors dir")
    s.add_argument("path", help="RUN_DIR (its newest valid checkpoint) or CKPT_DIR")
    s.add_argument("--format", choices=["hf", "safetensors"], default="hf")
    s.add_argument("--out", required=True, help="directory to create")
    s.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    s.add_argument("--force", action="store_true", help="replace an existing --out")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("ckpt", help="list or verify a run's checkpoints")
    s.add_argument("action", choices=["list", "verify"])
    s.add_argument("run_dir")
    s.set_defaults(fn=cmd_ckpt)


def _add_inspection(sub) -> None:
    """Subcommands: runs, the config, experiments."""
    s = sub.add_parser("doctor", help="diagnose a run (running, finished or crashed)")
    s.add_argument("run_dir")
    s.add_argument("--json", action="store_true", help="one JSON object instead of the report")
    s.epilog = "Exit codes: 0 healthy, 4 warnings, 3 critical, 2 not a run dir (docs/doctor.md)."
    s.set_defaults(fn=cmd_doctor)

    s = sub.add_parser("dashboard", help="write RUN_DIR/dashboard.png and dashboard.html")
    s.add_argument("run_dir")
    s.set_defaults(fn=cmd_dashboard)

    s = sub.add_parser("config", help="print every config field, or the resolved config")
    _config_args(s)
    s.set_defaults(fn=cmd_config, overrides=True)

    s = sub.add_parser("experiment", help="run a reproducible experiment: report.md + plots")
    s.add_argument("name", help="e.g. optimizers (see docs/)")
    s.add_argument("--out", help="results directory (default experiments/NAME)")
    s.add_argument("--quick", action="store_true", help="CI-sized smoke run (seconds)")
    s.add_argument(
        "--data", help="prepared dataset dir (default data/stdlib-byte, made if missing)"
    )
    s.set_defaults(fn=cmd_experiment)


def main(argv: list[str] | None = None) -> int:
    return _leave_if_torchrun_worker(_run(sys.argv[1:] if argv is None else argv))


def _run(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if rest and not getattr(args, "overrides", False):
            raise UserError(f"unrecognized arguments: {' '.join(rest)}")
        return args.fn(args, rest)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _leave_if_torchrun_worker(code: int) -> int:
    """A torchrun worker other than rank 0 that is done exits without interpreter teardown.

    Its work is over: files closed, the last checkpoint written, the process group left
    (`parallel.shutdown`). But gloo's worker threads may still be dropping their last
    references to finished collectives, whose tensors are Python objects; once teardown has
    begun, such a thread cannot take the GIL, and the C++ runtime aborts the process
    (std::terminate, exit -6: 'terminate called without an active exception'), failing the
    whole job. Caught in a core dump: ProcessGroupGloo::runLoop destroying an AsyncBarrierWork
    while the main thread was in Py_FinalizeEx. Rank 0 keeps the ordinary exit (its end-of-run
    report runs long after the group is gone)."""
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None and os.environ.get("RANK", "0") != "0":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
