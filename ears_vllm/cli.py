"""The ``ears-vllm`` command: demo, doctor, models, bench, sweep, gpu-check (docs/cli.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _bench_synthetic(args: argparse.Namespace) -> int:
    from ears_vllm.bench.synthetic import markdown_table, run_synthetic

    rows = run_synthetic(batch=args.batch, num_speculative_tokens=args.k, vocab=args.vocab, seed=args.seed)
    print(markdown_table(rows))
    return 0


def _resolve_models(args: argparse.Namespace) -> tuple[str, str | None]:
    if args.target:
        if args.draft is None and getattr(args, "method", "draft_model") == "draft_model":
            raise SystemExit("--draft is required with --target (or use --method ngram)")
        return args.target, args.draft
    from ears_vllm.models import fetch_pair

    target, draft = fetch_pair()
    return str(target), str(draft)


def _bench_e2e(args: argparse.Namespace) -> int:
    from ears_vllm.bench.e2e import E2EConfig, markdown_table, parse_policies, run_e2e

    target, draft = _resolve_models(args)
    config = E2EConfig(
        target=target,
        draft=draft if args.method == "draft_model" else None,
        out_dir=Path(args.out),
        datasets=[(name, args.dataset_path, args.num_prompts) for name in args.datasets.split(",")],
        policies=parse_policies(args.policies),
        temperatures=[float(t) for t in args.temperatures.split(",")],
        method=args.method,
        draft_sampling=args.draft_sampling,
        k=args.k,
        max_tokens=args.max_tokens,
        max_model_len=-1 if args.max_model_len is None else args.max_model_len,
        seed=args.seed,
        shard_size=args.shard_size,
    )
    rows = run_e2e(config)
    print(markdown_table(rows))
    print(f"\nresults, summary.md and plots in {config.out_dir}/")
    return 0


def _bench_acceptance(args: argparse.Namespace) -> int:
    from ears_vllm.bench.acceptance import markdown_table, reference_texts, run_acceptance, run_outputs
    from ears_vllm.bench.e2e import parse_policies
    from ears_vllm.policies import get_policy

    policies = parse_policies(args.policies)
    learnt = [name for name, settings in policies.items() if get_policy(settings["policy"]).learnt]
    if learnt:
        raise SystemExit(
            f"--policies: {learnt} learn their thresholds during a run, so no closed form predicts "
            "them; measure them with `ears-vllm bench e2e`"
        )
    target, draft = _resolve_models(args)
    sampling = tuple(args.draft_sampling.split(","))
    if args.from_run:
        runs = [json.loads(Path(path).read_text()) for path in args.from_run]
        found = sorted({result["temperature"] for run in runs for result in run["results"]})
        temperatures = [float(t) for t in args.temperatures.split(",")] if args.temperatures else found
        rows = []
        for temperature in temperatures:  # each temperature is checked on the texts sampled at it
            pairs = run_outputs(args.from_run, temperature)
            rows += run_acceptance(
                target, draft, pairs, policies, [temperature], k=args.k, draft_sampling=sampling, chat=True
            )
    else:
        pairs = [
            p for name in args.datasets.split(",") for p in reference_texts(name, args.dataset_path, args.num_prompts)
        ]
        temperatures = [float(t) for t in (args.temperatures or "0.6,0.9,1.0").split(",")]
        rows = run_acceptance(target, draft, pairs, policies, temperatures, k=args.k, draft_sampling=sampling)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "acceptance.json").write_text(json.dumps(rows, indent=1))
    table = markdown_table(rows, args.k)
    (out / "acceptance.md").write_text(table + "\n")
    print(table)
    from ears_vllm.bench.plots import plot_pareto

    groups = {
        f"T={t:g}, {s} drafts": [r for r in rows if (r["temperature"], r["draft_sampling"]) == (t, s)]
        for t, s in sorted({(r["temperature"], r["draft_sampling"]) for r in rows})
    }
    # FLy has no closed-form added TV: its relaxed acceptances per verified position stand in, as its own plot.
    for key, label, name in (
        ("added_tv_per_position", "exact added TV per position", "pareto_added_tv.png"),
        ("relaxed_per_verified_position", "relaxed acceptances per verified position", "pareto_relaxed.png"),
        (  # the second deviation axis: sees where the moved mass goes (issue 29)
            "relaxed_surprisal_per_verified_position",
            "relaxed drafts' -log p (nats) per verified position",
            "pareto_relaxed_surprisal.png",
        ),
    ):
        plot_pareto(
            groups,
            key,
            "expected_acceptance_length",
            label,
            f"expected mean acceptance length (k={args.k})",
            out / name,
        )
    return 0


# The field's lossy verifiers side by side (issue 15): standard, EARS, typical, vLLM's FLy (its defaults and a looser
# one), SGLang's thresholds (two settings), TensorRT-LLM's relaxed top-k (its recommended 10 / 0.6 and a tighter one);
# issue 29: FLy with its entropy gate open (the first axis's optimum shape, docs/frontier-rule.md), MARS (its default
# 0.9 and a tighter 0.95), the frontier rule at FLy's windows 3 and 2 with the frontier_scale that meets FLy's rates
# (3 and 10) and at window 2 with EARS's own scale (tolerance 0.5).
FIELD_GRID = (
    "standard,ears:0.1,ears:0.3,typical,fly,fly:fly_window_size=2:fly_entropy_threshold=0.15,"
    "sglang:accept_threshold_acc=0.5,sglang:accept_threshold_single=0.3:accept_threshold_acc=0.8,"
    "relaxed_topk:relaxed_topk=10:relaxed_delta=0.6,relaxed_topk:relaxed_topk=3:relaxed_delta=0.3,"
    "fly:fly_entropy_threshold=0,mars,mars:mars_threshold=0.95,"
    "frontier:1:frontier_window=3:frontier_scale=3:min_ratio=0,frontier:0.5:frontier_window=2,"
    "frontier:1:frontier_window=2:frontier_scale=10:min_ratio=0,frontier:1:frontier_window=1:frontier_scale=10:min_ratio=0"
)


# `demo` is `bench e2e` with these defaults, parsed by the same options (build_parser): a preset cannot drift
# from the command it presets.
DEMO_PRESET = {
    "datasets": "gsm8k",
    "temperatures": "0.9",
    "policies": "standard,ears:0.1,ears:0.3",
    "method": "draft_model",
    "draft_sampling": "greedy",
    "k": 4,
    "num_prompts": 4,
    "max_tokens": 96,
    "out": "results/demo",
}


def _demo(args: argparse.Namespace) -> int:
    pair = (
        f"{args.target} verifying drafts of {args.draft}"
        if args.target
        else "Qwen2.5-Coder-1.5B-Instruct verifying drafts of Qwen2.5-Coder-0.5B-Instruct (float32)"
    )
    print(
        f"ears-vllm demo: real speculative decoding with vLLM, {pair}, k={args.k}, policies {args.policies}, "
        f"T={args.temperatures}, on {args.num_prompts} {args.datasets} problems.\n"
        "First run: fetches and converts the pair (~5 min). Each policy then starts its own engine.\n"
        f"Outputs stop at {args.max_tokens} tokens, so GSM8K accuracy here is not meaningful (see the 'finished'\n"
        "column); for quality use `ears-vllm bench e2e --max-tokens 512 --num-prompts 100`.\n"
    )
    return _bench_e2e(args)


def _bench_speed(args: argparse.Namespace) -> int:
    from ears_vllm.bench.e2e import parse_policies
    from ears_vllm.bench.speed import SpeedConfig, markdown_table, run_speed

    target, draft = _resolve_models(args)
    config = SpeedConfig(
        target=target,
        draft=draft,
        out_dir=Path(args.out),
        dataset=(args.dataset, args.dataset_path, args.num_prompts),
        policies=parse_policies(args.policies),
        temperature=args.temperature,
        rounds=args.rounds,
        k=args.k,
        max_tokens=args.max_tokens,
        draft_sampling=args.draft_sampling,
    )
    print(markdown_table(run_speed(config)))
    print(f"\nspeed.json, speed.md, speed.png and every run in {args.out}/")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from ears_vllm.bench.e2e import markdown_table
    from ears_vllm.bench.sweep import load_grid, run_sweep

    config, resources = load_grid(args.grid)
    rows = run_sweep(config, resources, ray_address=args.ray_address)
    print(markdown_table(rows))
    print(f"\nresults, summary.md and plots in {config.out_dir}/")
    return 0


def _models_fetch(args: argparse.Namespace) -> int:
    from ears_vllm.models import fetch_pair

    target, draft = fetch_pair()
    print(f"target: {target}\ndraft:  {draft}")
    return 0


def _bench_kernel(args: argparse.Namespace) -> int:
    import itertools

    import torch

    from ears_vllm.bench.kernel import Shape, markdown_table, run_kernel_bench

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.allow_cpu:
        raise SystemExit("bench kernel times GPU kernels and needs CUDA (--allow-cpu runs it anyway, untimed)")
    ints = [[int(x) for x in getattr(args, a).split(",")] for a in ("batches", "ks", "vocabs")]
    shapes = [Shape(*combo) for combo in itertools.product(*ints, args.dtypes.split(","))]
    from ears_vllm.bench.e2e import parse_policies

    rows = run_kernel_bench(Path(args.out), shapes, device=device, cpu_policies=parse_policies(args.cpu_policies))
    print(markdown_table(rows, {}))
    print(f"\nCSV, table, plot and environment in {args.out}/")
    return 0


def _bench_load(args: argparse.Namespace) -> int:
    from ears_vllm.bench.e2e import parse_policies
    from ears_vllm.bench.load import LoadConfig, markdown_table, run_load

    out = Path(args.out)
    target, draft = args.target, args.draft
    if target is None:
        from ears_vllm.tiny_models import build_tiny_pair

        target, draft = build_tiny_pair(out / "tiny-models")
    elif draft is None:
        raise SystemExit("--draft is required with --target")
    config = LoadConfig(
        str(target),
        str(draft),
        out,
        parse_policies(args.policies),
        num_requests=args.num_requests,
        concurrency=args.concurrency,
        seed=args.seed,
        duration_s=args.duration * 60 if args.duration else None,
        rss_interval_s=args.rss_interval,
    )
    rows = run_load(config)
    print(markdown_table(rows))
    print(f"\nper-request results in {out}/<policy>/requests.json, server memory in {out}/rss.png")
    problems = any(r["problems"] for r in rows)
    if args.faults:
        from ears_vllm.bench.faults import fault_table, run_faults

        faults = run_faults(config)
        print(fault_table(faults))
        problems = problems or any(f["problems"] for f in faults)
    return 1 if problems else 0


def _gpu_check_bundle(args: argparse.Namespace) -> int:
    from ears_vllm.bench.gpu_check import make_bundle

    if args.vllm_dir is None:
        import vllm

        args.vllm_dir = Path(vllm.__file__).parent
    manifest = make_bundle(Path(args.vllm_dir), Path(args.out))
    print(f"bundled {len(manifest['sha256'])} vLLM {manifest['vllm_version']} sources into {args.out}/")
    return 0


def _gpu_check_run(args: argparse.Namespace) -> int:
    from ears_vllm.bench.gpu_check import markdown, run

    report = run(Path(args.bundle), Path(args.out), args.device)
    print(markdown(report))
    return 0 if report["passed"] else 1


def _doctor(args: argparse.Namespace) -> int:
    from ears_vllm.doctor import diagnose, exit_code

    additional = json.loads(args.additional_config) if args.additional_config else None
    speculative = json.loads(args.speculative_config) if args.speculative_config else None
    rows = diagnose(additional, speculative)
    width = max(len(label) for label, _ in rows)
    for label, finding in rows:
        print(f"{label:<{width}}  {finding}")
    return exit_code(rows)


def build_parser() -> argparse.ArgumentParser:
    from ears_vllm.bench.kernel import BATCHES, CPU_POLICIES, DTYPES, KS, VOCABS

    parser = argparse.ArgumentParser(prog="ears-vllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target", help="target model id or directory (default: the offline Qwen2.5-Coder 1.5B)")
        p.add_argument("--draft", help="draft model id or directory (default: the offline Qwen2.5-Coder 0.5B)")
        p.add_argument("--out", default="results/e2e", help="output directory (runs are resumed from it)")
        p.add_argument("--num-prompts", type=int, default=4, help="prompts per dataset")
        p.add_argument("--max-tokens", type=int, default=96)

    def grid_options(p: argparse.ArgumentParser, datasets: str, policies: str, temperatures: str) -> None:
        model_options(p)
        p.add_argument("--datasets", default="gsm8k", help=f"comma list of {datasets}")
        p.add_argument("--dataset-path", help="path of the dataset file (default: the copy shipped in the package)")
        p.add_argument(
            "--policies",
            default=policies,
            help="comma list of name[:value][:key=value...]; "
            "e.g. standard,ears:0.1,typical,fly:fly_window_size=2,sglang:accept_threshold_acc=0.5",
        )
        p.add_argument("--temperatures", default=temperatures, help=f"comma list (default {temperatures})")
        p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")

    def e2e_options(p: argparse.ArgumentParser) -> None:
        grid_options(p, "gsm8k, mt_bench, humaneval", "standard,ears:0.1,ears:0.3", "0.9")
        p.add_argument("--method", default="draft_model", choices=["draft_model", "ngram"])
        p.add_argument(
            "--draft-sampling",
            default="greedy",
            choices=["greedy", "probabilistic"],
            help="vLLM's draft_sample_method for draft_model (default greedy, as in vLLM)",
        )
        p.add_argument("--seed", type=int, default=0)
        p.add_argument(
            "--shard-size", type=int, help="prompts per engine run; a stopped run keeps its finished shards (resume)"
        )
        p.add_argument("--max-model-len", type=int, help="the engine's context length (default: the model's own)")

    demo = commands.add_parser(
        "demo",
        help="the main job: standard vs EARS on the offline Qwen pair (`bench e2e` with the demo's defaults)",
        description="`ears-vllm bench e2e` with the demo's defaults: "
        + ", ".join(f"{key}={value}" for key, value in DEMO_PRESET.items()),
    )
    e2e_options(demo)
    demo.set_defaults(run=_demo, **DEMO_PRESET)

    doctor = commands.add_parser("doctor", help="what the plugin would do here: vLLM, hooks, runner, backend, config")
    doctor.add_argument(
        "--additional-config", help='the JSON you pass to vllm serve, e.g. \'{"ears": {"policy": "ears"}}\''
    )
    doctor.add_argument(
        "--speculative-config",
        help="the JSON you pass to vllm serve (its rejection_sample_method decides whether ears-vllm verifies)",
    )
    doctor.set_defaults(run=_doctor)

    gpu_help = "the GPU checks in one command: kernel and MRV2 parity at real shapes, bench kernel (make gpu-check)"
    gpu = commands.add_parser("gpu-check", help=gpu_help).add_subparsers(dest="gpu", required=True)
    bundle = gpu.add_parser(
        "bundle", help="copy vLLM's MRV2 verification sources (0.33 or later) for a machine without vLLM"
    )
    bundle.add_argument("--vllm-dir", help="an installed vLLM package, 0.33 or later (default: the importable vllm)")
    bundle.add_argument("--out", default=".gpu-bundle")
    bundle.set_defaults(run=_gpu_check_bundle)
    gpu_run = gpu.add_parser("run", help="run the checks (needs no vLLM: the bundle brings its sources)")
    gpu_run.add_argument("--bundle", default=".gpu-bundle")
    gpu_run.add_argument("--out", default="docs/results/gpu")
    gpu_run.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: the same checks under Triton's interpreter, small shapes, no timing",
    )
    gpu_run.set_defaults(run=_gpu_check_run)

    models = commands.add_parser("models", help="offline models").add_subparsers(dest="models", required=True)
    models.add_parser("fetch", help="fetch + verify + convert the Qwen2.5-Coder pair").set_defaults(run=_models_fetch)

    sweep = commands.add_parser("sweep", help="an e2e benchmark grid over a Ray cluster (local by default)")
    sweep.add_argument("grid", help="grid YAML, e.g. configs/sweep-gsm8k-creative.yaml")
    sweep.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    sweep.set_defaults(run=_sweep)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    synthetic = bench.add_parser("synthetic", help="policies on synthetic distributions (seconds, no model)")
    synthetic.add_argument("--batch", type=int, default=512, help="requests per step (default 512)")
    synthetic.add_argument("--k", type=int, default=4, help="draft tokens per request (default 4)")
    synthetic.add_argument("--vocab", type=int, default=2048, help="vocabulary size (default 2048)")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.set_defaults(run=_bench_synthetic)

    e2e = bench.add_parser("e2e", help="real vLLM speculative decoding, policies side by side")
    e2e_options(e2e)
    e2e.set_defaults(run=_bench_e2e)

    speed = bench.add_parser("speed", help="output tok/s per policy, engines interleaved (A B A B ...) over rounds")
    model_options(speed)
    speed.add_argument("--dataset", default="gsm8k", help="gsm8k, mt_bench or humaneval")
    speed.add_argument("--dataset-path", help="path of the dataset file (default: the copy shipped in the package)")
    speed.add_argument("--policies", default="standard,ears:0.3", help="as bench e2e's; the first is the baseline")
    speed.add_argument("--temperature", type=float, default=0.9)
    speed.add_argument("--rounds", type=int, default=3, help="engines per policy, interleaved")
    speed.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    speed.add_argument("--draft-sampling", default="greedy", choices=["greedy", "probabilistic"])
    speed.set_defaults(run=_bench_speed, out="results/speed", num_prompts=16)

    acceptance = bench.add_parser("acceptance", help="expected acceptance of every policy, teacher-forced (fast)")
    all_policies = FIELD_GRID
    grid_options(
        acceptance, "gsm8k, humaneval (reference texts)", all_policies, "0.6,0.9,1.0; with --from-run, the runs'"
    )
    acceptance.add_argument(
        "--draft-sampling",
        default="greedy,probabilistic",
        help="comma list: greedy (vLLM's default draft_sample_method: the draft's argmax, one-hot "
        "q) and/or probabilistic (q = the draft's distribution)",
    )
    acceptance.add_argument(
        "--from-run",
        nargs="+",
        metavar="RUN_JSON",
        help="teacher-force the texts of finished `bench e2e` runs (standard policy) instead: "
        "checks the prediction on the engine's own samples",
    )
    acceptance.set_defaults(run=_bench_acceptance, out="results/acceptance", num_prompts=20, temperatures=None)

    kernel = bench.add_parser("kernel", help="the verification step's time per implementation (GPU)")
    kernel.add_argument("--batches", default=",".join(map(str, BATCHES)))
    kernel.add_argument("--ks", default=",".join(map(str, KS)))
    kernel.add_argument("--vocabs", default=",".join(map(str, VOCABS)))
    kernel.add_argument("--dtypes", default=",".join(DTYPES))
    kernel.add_argument("--out", default="results/kernel")
    kernel.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run without CUDA: times the CPU step beside vLLM's own V1 step (no kernel timing)",
    )
    kernel.add_argument(
        "--cpu-policies",
        default=CPU_POLICIES,
        help="the policies whose CPU step is timed without CUDA (as bench e2e's --policies)",
    )
    kernel.set_defaults(run=_bench_kernel)

    load = bench.add_parser("load", help="a bounded load run on a real vllm serve: errors, losses, reproducibility")
    load.add_argument("--target", help="target model (default: tiny random models built offline, for speed)")
    load.add_argument("--draft", help="draft model (with --target)")
    load.add_argument("--num-requests", type=int, default=500)
    load.add_argument("--concurrency", type=int, default=32)
    load.add_argument("--policies", default="standard,ears:0.3", help="comma list; one server each")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument(
        "--duration",
        type=float,
        help="a soak: minutes to keep sending the mix (a new seed each round), server memory sampled throughout",
    )
    load.add_argument("--rss-interval", type=float, default=5.0, help="seconds between server memory samples")
    load.add_argument(
        "--faults",
        action="store_true",
        help="then faults under load, per policy: an unwritable stats path, SIGTERM mid-load (faults.json, faults.md)",
    )
    load.add_argument("--out", default="results/load")
    load.set_defaults(run=_bench_load)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
