"""`qtrain train|generate|merge|eval|compare|plan ...`.

    qtrain train RECIPE [key.sub=value ...]
    qtrain generate --adapter DIR [--adapter NAME=DIR ...] (--prompt TEXT | --input FILE.jsonl) [...]
    qtrain merge --adapter DIR --out DIR [--dtype bf16|fp16|fp32] [...]
    qtrain eval RECIPE [--adapter DIR | --no-adapter] [key.sub=value ...]
    qtrain compare RECIPE [key.sub=value ...]
    qtrain plan RECIPE [--gpus N] [--gpu-mem 24GiB] [--engine E] [--device cpu|cuda] [--json] [key.sub=value ...]

User errors (`QtrainError`) print one message and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from qtrain.errors import EXIT_DISK_FULL, EXIT_USER_ERROR, QtrainError, TrainingStopped


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qtrain", description="Fine-tune LLMs with LoRA on a 4-bit NF4 base.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train an adapter from a YAML recipe")
    t.add_argument("recipe", help="path of the YAML recipe, e.g. configs/quickstart.yaml")
    t.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="override recipe keys, e.g. train.max_steps=20 data.path=my.jsonl model.tokenizer=null")
    _add_generate(sub)
    _add_merge(sub)
    _add_eval(sub)
    c = sub.add_parser("compare", help="base vs full fine-tune vs LoRA vs QLoRA on one recipe: report.md + plots")
    c.add_argument("recipe", help="path of the YAML recipe (its compare: section picks variants and scoring)")
    c.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys, as for train")
    _add_plan(sub)
    return p


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="per-device memory of a recipe's run, from config.json only: fits or not, and how")
    p.add_argument("recipe", help="path of the YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys, as for train")
    p.add_argument("--gpus", type=int, default=1, help="processes, one device each (default 1)")
    p.add_argument("--gpu-mem", metavar="SIZE", help="memory per device, e.g. 24GiB, 80GB, 81920MiB "
                   "(default: the visible GPU's, or this machine's RAM with --device cpu)")
    p.add_argument("--engine", default="auto", choices=("auto", "plain", "ddp", "zero1", "zero2", "zero3", "fsdp"),
                   help="default: what the recipe's distributed section gives on --gpus processes")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when a GPU is visible or --gpu-mem is given, else cpu")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _add_base_options(p: argparse.ArgumentParser, dtype_flag: str, dtype_help: str) -> None:
    g = p.add_argument_group("base model")
    g.add_argument("--base", metavar="DIR", help="base model dir (default: the adapter's base_model_name_or_path)")
    g.add_argument("--no-quant", action="store_true", help="load the base unquantized instead of NF4")
    g.add_argument(dtype_flag, dest="base_dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help=dtype_help)
    g.add_argument("--blocksize", type=int, default=64, help="NF4 block size the adapter was trained with")
    g.add_argument("--no-double-quant", action="store_true", help="NF4 without double quantization")
    g.add_argument("--kernels", choices=("auto", "torch", "triton"), default="auto")


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate text with one or more adapters (inference only)")
    g.add_argument("--adapter", action="append", required=True, metavar="[NAME=]DIR",
                   help="adapter dir, optionally named (repeat for several; the first is the default)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt; the completion streams to stdout")
    src.add_argument("--input", metavar="FILE.jsonl",
                     help='prompts, one {"prompt": ..., "adapter": NAME|null (optional)} per line')
    g.add_argument("--output", metavar="FILE.jsonl",
                   help="write {prompt, completion, adapter} rows here (default stdout)")
    g.add_argument("--use", metavar="NAME", help="adapter for prompts that name none (default: the first --adapter)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=8)
    _add_base_options(g, "--dtype", "dtype the base is loaded and run in (default auto: bf16 where the device "
                      "computes it natively, else fp16 on older GPUs, fp32 on CPUs without native bf16)")


def _add_merge(sub) -> None:
    m = sub.add_parser("merge", help="fold an adapter into its base; write a plain Hugging Face model dir")
    m.add_argument("--adapter", required=True, metavar="DIR")
    m.add_argument("--out", required=True, metavar="DIR")
    m.add_argument("--dtype", choices=("bf16", "fp16", "fp32", "nf4"), default="bf16",
                   help="dtype of the written weights (nf4 is refused, with the reason)")
    m.add_argument("--max-shard-size", default="2GB", help="safetensors shard size, e.g. 2GB, 500MB")
    _add_base_options(m, "--base-dtype", "dtype the NF4 base is loaded and quantized in: the recipe's model.dtype "
                      "(default auto, as in training); with --no-quant the base is read in fp32")


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="eval loss, perplexity and (instruction/summarization) ROUGE of a recipe's run")
    e.add_argument("recipe", help="path of the YAML recipe the adapter was trained with")
    e.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys, as for train")
    e.add_argument("--adapter", metavar="DIR", help="adapter dir (default: <output_dir>/adapter)")
    e.add_argument("--no-adapter", action="store_true", help="evaluate the base model alone")
    e.add_argument("--out-dir", metavar="DIR", help="where eval.json goes (default: the recipe's output_dir)")
    e.add_argument("--batch-size", type=int, default=None, help="default: train.micro_batch_size")
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--max-gen-rows", type=int, default=None, help="generate for at most this many eval rows")
    e.add_argument("--no-generate", action="store_true", help="loss and perplexity only, no ROUGE")


def _base_options(args: argparse.Namespace, merge: bool = False):
    import torch

    from qtrain.distributed.env import read_env
    from qtrain.infer.load import DTYPES, BaseOptions
    from qtrain.models.precision import resolve_precision
    from qtrain.quant.nf4 import NF4Spec

    device = read_env().device()
    quant = None if args.no_quant else NF4Spec(args.blocksize, not args.no_double_quant)
    if merge and args.no_quant:
        dtype = torch.float32
    elif args.base_dtype == "auto":
        dtype = resolve_precision("auto", device).dtype
    else:
        dtype = DTYPES[args.base_dtype]
    return BaseOptions(dtype=dtype, quant=quant, device=device, kernels=args.kernels)


def _sampling(args: argparse.Namespace):
    from qtrain.infer.sampling import SamplingConfig

    return SamplingConfig(args.max_new_tokens, getattr(args, "temperature", 0.0), getattr(args, "top_p", 1.0),
                          getattr(args, "seed", 0))


def _generate(args: argparse.Namespace) -> int:
    from qtrain.infer.generate import GenerateOptions, run_generate

    return run_generate(GenerateOptions(args.adapter, args.prompt, args.input, args.output, args.use, args.batch_size,
                                        _sampling(args), args.base, _base_options(args)))


def _merge(args: argparse.Namespace) -> int:
    from qtrain.infer.merge import MergeOptions, merge_to_dir

    report = merge_to_dir(MergeOptions(args.adapter, args.out, args.dtype, args.base, _base_options(args, merge=True),
                                       args.max_shard_size))
    print(f"merged {report['merged_layers']} layers into {args.out} ({report['dtype']}); probe max |logit diff| "
          f"vs base+adapter: {report['probe_max_abs_logit_diff']:.3g} (mean {report['probe_mean_abs_logit_diff']:.3g})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from qtrain.config import load_recipe
    from qtrain.eval.run import EvalOptions, evaluate_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    opts = EvalOptions(args.adapter, args.no_adapter, args.out_dir, args.batch_size, not args.no_generate,
                       args.max_gen_rows, _sampling(args))
    report = evaluate_recipe(recipe, opts, args.recipe)
    rouge = report["rouge"]
    rouge_text = "" if rouge is None else "; " + ", ".join(f"{k} {v:.4f}" for k, v in rouge.items())
    out = Path(args.out_dir or recipe.output_dir) / "eval.json"
    print(f"eval loss {report['eval_loss']:.4f}, perplexity {report['perplexity']:.3f}{rouge_text}\nreport: {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from qtrain.config import load_recipe
    from qtrain.train.run import train

    train(load_recipe(args.recipe, args.overrides))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from qtrain.eval.compare import compare

    report = compare(args.recipe, args.overrides)
    print(f"report: {report}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from qtrain.config import load_recipe
    from qtrain.plan import plan_recipe, suggestions
    from qtrain.plan.planner import resolve_target
    from qtrain.plan.render import to_json_text, to_text

    target = resolve_target(args.device, args.gpus, args.gpu_mem)  # a bad --gpu-mem fails before the recipe
    plan = plan_recipe(load_recipe(args.recipe, args.overrides), target, args.engine)
    found = suggestions(plan)
    print(to_json_text(plan, found) if args.json else to_text(plan, found, args.recipe))
    return 0


def _quiet_optional_backends() -> None:
    """bitsandbytes warns at import that an optional CPU kernel package (`kernels`) is missing;
    qtrain never uses that path, so the CLI keeps it off the user's terminal."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse; `eval` and `plan` also take key=value overrides after their options (argparse alone
    would refuse `qtrain eval R --no-generate a=b`, since the overrides positional was already consumed)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command in ("eval", "plan") and not any(e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _quiet_optional_backends()
    try:
        commands = {"train": _train, "generate": _generate, "merge": _merge, "eval": _eval, "compare": _compare,
                    "plan": _plan}
        return commands[args.command](args)
    except QtrainError as exc:
        print(f"qtrain: {exc.kind}: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingStopped as exc:
        print(f"qtrain: stopped: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - a full disk anywhere outside a checkpoint save; the rest re-raises
        from qtrain.checkpoint.space import is_disk_full

        if not is_disk_full(exc):
            raise
        print(f"qtrain: stopped: no space left on device writing {getattr(exc, 'filename', None) or 'a file'}; "
              "free space and run "
              "the same command again", file=sys.stderr)
        return EXIT_DISK_FULL


if __name__ == "__main__":
    sys.exit(main())
