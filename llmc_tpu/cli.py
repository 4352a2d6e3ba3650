"""The ``llmc-tpu`` command: one subcommand per stage of a user's day."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from llmc_tpu.config.schema import chooses_codes

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MISMATCH, EXIT_EXPORT_FAILED = 0, 1, 2, 3, 4

EPILOG = """\
examples:
  llmc-tpu quantize --config configs/LLM/demo_rtn.yml          # the embedded demo (no network)
  llmc-tpu check-config my.yml                                 # validate, print every resolved default
  llmc-tpu verify ./save/demo_rtn                              # compile with TPU-MLIR, compare code for code
  llmc-tpu quantize --config configs/LLM/AwqSignRound.yml      # the most accurate template (edit model.path)
  torchrun --standalone --nproc-per-node 2 tpu/llm_quant.py --config my.yml   # GPTQ/AWQ over 2 GPUs, same codes

methods (quant.method): RTN, Awq, GPTQ, SignRound, or [Awq, GPTQ] / [Awq, SignRound]; GPTQ and SignRound
hand over SAVE_PATH/gptq_tpu_model for llm_convert.py -q auto, the others SAVE_PATH/transformed_model

exit codes: 0 ok, 1 run failed, 2 bad config or arguments, 3 verify found mismatches,
            4 run written but a requested GPU export failed (see report.md "GPU exports")
"""

log = logging.getLogger("llmc_tpu")


def _setup_logging(quiet: bool, verbose: bool) -> None:
    quiet = quiet or int(os.environ.get("RANK", "0")) > 0  # torchrun: rank 0 speaks for the run
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "--config_path", dest="config", required=True, metavar="CFG.yml",
                   help="the run config (YAML with sections base, model, calib, eval, quant, save, run)")
    p.add_argument("--overwrite", action="store_true", help="replace save.save_path if it exists (only once the new run is complete)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (same config) from its last finished block")
    p.add_argument("--llmc_tpu_path", help=argparse.SUPPRESS)


def cmd_quantize(args: argparse.Namespace) -> int:
    from llmc_tpu.config import ConfigError, load_config
    from llmc_tpu.pipeline import Quantizer

    if getattr(args, "llmc_tpu_path", None):
        print("note: --llmc_tpu_path is no longer needed and is ignored", file=sys.stderr)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    quantizer = Quantizer(cfg, overwrite=args.overwrite, progress=not args.quiet, resume=args.resume)
    if not quantizer.ranks.main:  # torchrun: the other processes share the calibration work; rank 0 reports
        quantizer.progress = False
        quantizer.run()
        return EXIT_OK
    report = quantizer.run()
    print(report.summary())
    return EXIT_EXPORT_FAILED if report.failed_exports else EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    import yaml

    from llmc_tpu.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(yaml.safe_dump(cfg.model_dump(), sort_keys=False), end="")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    import json

    from llmc_tpu.export.manifest import check_manifest
    from llmc_tpu.tpu.rtn import TpuWeightFormat
    from llmc_tpu.verify import VerifyError, format_verify_table, verify

    save = Path(args.save_path)
    try:
        report = json.loads((save / "report.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        print(f"error: {save}/report.json not found: give the save_path of a finished llmc-tpu run", file=sys.stderr)
        return EXIT_USAGE
    problems = check_manifest(save)
    if problems:  # files changed or missing since the run finished: what would be compiled is not what we scored
        print("error: the run's files do not match its manifest.json:\n  " + "\n  ".join(problems), file=sys.stderr)
        return EXIT_MISMATCH
    f = report["tpu_format"]
    fmt = TpuWeightFormat(f["bits"], f["group_size"], f["symmetric"], f["scale_dtype"], f["chip"])
    if args.onnx:  # the onnx/ folder through model_transform.py + model_deploy.py, as its compile.sh does
        from llmc_tpu.verify.onnx_path import format_onnx_result, verify_saved_onnx

        work = Path(args.work_dir) if args.work_dir else save / "verify" / "onnx"
        try:
            onnx_result = verify_saved_onnx(save, fmt, work, layers=tuple(args.onnx_layers))
        except VerifyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(format_onnx_result(onnx_result))
        return EXIT_OK if onnx_result.ok else EXIT_MISMATCH
    # methods that choose codes hand over a GPTQ checkpoint (-q auto)
    gptq = chooses_codes(str(report.get("config", {}).get("quant", {}).get("method", "")))
    model_dir = save / ("gptq_tpu_model" if gptq else "transformed_model")
    if not model_dir.is_dir():
        why = "the run did not finish writing it" if gptq else "the run had save.save_trans off"
        print(f"error: {model_dir} not found ({why})", file=sys.stderr)
        return EXIT_USAGE
    work = Path(args.work_dir) if args.work_dir else save / "verify"
    try:
        if gptq:
            from llmc_tpu.verify.checkpoint import verify_checkpoint

            result = verify_checkpoint(model_dir, fmt, seq_len=args.seq_len, work_dir=work)
        else:
            result = verify(model_dir, fmt, seq_len=args.seq_len, work_dir=work)
    except VerifyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(format_verify_table(result))
    return EXIT_OK if result.ok else EXIT_MISMATCH


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmc-tpu", description="Prepare LLMs for Sophgo TPUs: RTN/AWQ/GPTQ scored with TPU-MLIR's own quantizer.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final summary; no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("quantize", help="run a config: evaluate, quantize block by block, save, report",
                       description="Run a config end to end and write save.save_path (report.md, transformed_model/, ...).",
                       epilog="example: llmc-tpu quantize --config configs/LLM/demo_rtn.yml --overwrite\n"
                              "several GPUs: torchrun --standalone --nproc-per-node N tpu/llm_quant.py --config my.yml "
                              "(N = 1, 2, 4 or 8; README \"Several GPUs\")",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_quantize_args(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("check-config", help="validate a config and print it with every default filled",
                       epilog="example: llmc-tpu check-config configs/LLM/Awq.yml")
    p.add_argument("config", metavar="CFG.yml")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("verify", help="compile a run's handoff (transformed_model; gptq_tpu_model for GPTQ) with TPU-MLIR and compare its codes with ours",
                       description="Needs TPU-MLIR (tools/install_tpu_mlir.sh). Exits 3 on any mismatch.",
                       epilog="example: llmc-tpu verify ./save/demo_rtn")
    p.add_argument("save_path", help="save.save_path of a finished run")
    p.add_argument("--seq-len", type=int, default=64, help="sequence length to compile with (weights do not depend on it)")
    p.add_argument("--work-dir", help="where TPU-MLIR writes (default SAVE_PATH/verify)")
    p.add_argument("--onnx", action="store_true",
                   help="check SAVE_PATH/onnx (save.save_onnx) instead: compile block_i and block_cache_i as its compile.sh "
                        "does, compare codes, run block_0 on TPU-MLIR's CPU simulator (sequence length: the ONNX's)")
    p.add_argument("--onnx-layers", type=int, nargs="+", default=[0], metavar="I", help="layers --onnx compiles (default 0)")
    p.set_defaults(func=cmd_verify)
    return parser


def _torch_oom() -> type[BaseException]:
    import torch

    return torch.OutOfMemoryError  # CUDA out of memory (a RuntimeError, not a MemoryError)


# Blocks allocate tensors of many sizes (a 70B down_proj's Hessian is 3 GiB, its activations a few hundred MiB):
# with fixed segments, CUDA's cache fragments and a capped run (run.device_memory_gib) fails with gigabytes
# reserved but unused. Segments that grow keep what is reserved close to what is used. A user's setting (under
# either of PyTorch's names) wins.
ALLOCATOR_SETTING = ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def default_allocator_setting() -> None:
    """Set ``ALLOCATOR_SETTING`` unless the user set PyTorch's allocator; read when CUDA is first used (later)."""
    if not any(os.environ.get(k) for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")):
        os.environ[ALLOCATOR_SETTING[0]] = ALLOCATOR_SETTING[1]


def main(argv: list[str] | None = None) -> int:
    default_allocator_setting()
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.quiet, args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; nothing was written to save.save_path", file=sys.stderr)
        return 130
    except (MemoryError, _torch_oom()) as exc:
        print(f"error: out of memory ({str(exc).splitlines()[0] if str(exc) else 'host RAM'}); lower calib.bs, "
              "calib.n_samples, calib.seq_len or eval.bs, or set eval.inference_per_block: true to stream the model "
              "through the device one block at a time", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # known failures print one line; unknown ones keep the traceback under -v
        from llmc_tpu.errors import USER_ERRORS

        if isinstance(exc, USER_ERRORS) and not args.verbose:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())
