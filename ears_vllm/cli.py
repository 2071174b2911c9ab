"""The ``ears-vllm`` command."""

from __future__ import annotations

import argparse
import json
import sys


def _bench_synthetic(args: argparse.Namespace) -> int:
    from ears_vllm.bench.synthetic import markdown_table, run_synthetic

    rows = run_synthetic(batch=args.batch, num_speculative_tokens=args.k, vocab=args.vocab, seed=args.seed)
    print(markdown_table(rows))
    return 0


def _demo(args: argparse.Namespace) -> int:
    print(
        "Synthetic policy comparison (random target, draft = target + noise, k=4).\n"
        "A real vLLM run on the Qwen2.5-Coder pair replaces this once the end-to-end benchmark lands.\n"
    )
    return _bench_synthetic(args)


def _doctor(args: argparse.Namespace) -> int:
    from ears_vllm.doctor import diagnose

    additional = json.loads(args.additional_config) if args.additional_config else None
    rows = diagnose(additional)
    width = max(len(label) for label, _ in rows)
    for label, finding in rows:
        print(f"{label:<{width}}  {finding}")
    return 1 if any(finding.startswith("INVALID") for _, finding in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ears-vllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def synthetic_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--batch", type=int, default=512, help="requests per step (default 512)")
        p.add_argument("--k", type=int, default=4, help="draft tokens per request (default 4)")
        p.add_argument("--vocab", type=int, default=2048, help="vocabulary size (default 2048)")
        p.add_argument("--seed", type=int, default=0)

    demo = commands.add_parser("demo", help="the main job: compare acceptance policies")
    synthetic_options(demo)
    demo.set_defaults(run=_demo)

    doctor = commands.add_parser("doctor", help="what the plugin would do here: vLLM, hooks, runner, backend, config")
    doctor.add_argument(
        "--additional-config", help='the JSON you pass to vllm serve, e.g. \'{"ears": {"policy": "ears"}}\''
    )
    doctor.set_defaults(run=_doctor)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    synthetic = bench.add_parser("synthetic", help="policies on synthetic distributions (seconds, no model)")
    synthetic_options(synthetic)
    synthetic.set_defaults(run=_bench_synthetic)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
