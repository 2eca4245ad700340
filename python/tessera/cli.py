"""The `tessera` command line.

    tessera run RECIPE.yaml [key=value ...]     train: fine-tune or pretrain as the recipe says (recipes/*.yaml);
                                                overrides are dotted keys, e.g. training.steps=20 output_dir=runs/x
    tessera run --nproc N --max-restarts K ...  the same under torch's elastic launcher: a failed group restarts
                                                and resumes from its last good checkpoint (tessera.exitcodes)
    tessera config [RECIPE.yaml] [key=value ...] print the resolved config (YAML)
    tessera fetch NAME [--cache-dir DIR]        download and convert a pretrained model; prints its directory
    tessera fetch --list                        the models fetch knows
    tessera generate MODEL --prompt TEXT [...]   continue a prompt with a model (HF dir or checkpoint)
    tessera plot OUTPUT_DIR [--out DIR]         PNG plots of a run's metrics.jsonl; prints their paths
    tessera doctor [--device cpu|cuda] [--nproc N] [--quick] [...]   health checks of the ranks (tessera.doctor)
    tessera k8s RECIPE.yaml [key=value ...] --kind pytorchjob|jobset --image IMG --nodes N --nproc-per-node G [-o FILE]
                                                a Kubeflow PyTorchJob or JobSet manifest (tessera.recipes.k8s)
    tessera --version                           tessera's version, and torch's it runs with
"""

from __future__ import annotations

import argparse
import sys

from tessera.errors import InvalidArgumentError, TesseraError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tessera", description="tessera: sharded training for PyTorch")
    parser.add_argument("--version", action="version", version=version_string())
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "train from a recipe (recipes/*.yaml) with key=value overrides"),
                            ("config", "print the resolved config of a recipe")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("args", nargs="*", help="[RECIPE.yaml] followed by key=value overrides")
        if name == "run":
            p.add_argument("--nproc", type=int, help="ranks to start under torch's elastic launcher (default: "
                           "parallelism.world_size)")
            p.add_argument("--max-restarts", type=int, help="restart the group up to this many times after a rank "
                           "dies or fails in a way a restart can help (exit status 75, or a signal); each restart "
                           "resumes from the newest valid checkpoint")
            # Set by run_elastic for the ranks it starts: where each records why it failed (tessera.exitcodes).
            p.add_argument("--cause-dir", help=argparse.SUPPRESS)
    p = sub.add_parser("fetch", help="download and convert a pretrained model; prints its directory (last line)")
    p.add_argument("name", nargs="?", help="model name (see --list)")
    p.add_argument("--list", action="store_true", help="list the models fetch knows")
    p.add_argument("--cache-dir", help="cache root (default: $TESSERA_CACHE_DIR, else ~/.cache/tessera); the model "
                   "goes to CACHE_DIR/models/NAME")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    _add_generate_parser(sub)
    p = sub.add_parser("plot", help="PNG plots (loss, throughput, lr) of a run's metrics.jsonl; prints their paths")
    p.add_argument("output_dir", help="the run's output directory (holds metrics.jsonl)")
    p.add_argument("--out", help="where the PNGs go (default: OUTPUT_DIR/plots)")
    _add_doctor_parser(sub)
    _add_k8s_parser(sub)
    ns = parser.parse_args(argv)
    if ns.command == "doctor":
        return _doctor(ns)
    if ns.command == "k8s":
        return _k8s(ns)
    if ns.command == "plot":
        return _plot(ns)
    if ns.command == "fetch":
        return _fetch(parser, ns)
    if ns.command == "generate":
        return _generate(ns)
    recipe = ns.args[0] if ns.args and "=" not in ns.args[0] else None
    overrides = ns.args[1:] if recipe else ns.args
    from tessera.recipes.config import load_config

    try:
        cfg = load_config(recipe, overrides)
        if ns.command == "config":
            from tessera.recipes.config import dump

            print(dump(cfg), end="")
            return 0
        from tessera.recipes import launch

        if ns.nproc is not None or ns.max_restarts is not None:
            if (ns.nproc is not None and ns.nproc <= 0) or (ns.max_restarts or 0) < 0:
                raise InvalidArgumentError(f"--nproc must be > 0 and --max-restarts >= 0, got {ns.nproc} and "
                                           f"{ns.max_restarts}")
            return launch.run_elastic(cfg, ns.args, nproc=ns.nproc, max_restarts=ns.max_restarts or 0)
        return launch.run(cfg, cause_dir=ns.cause_dir)
    except TesseraError as e:
        from tessera import exitcodes

        print(f"tessera: error: {e}", file=sys.stderr)
        return exitcodes.for_exception(e)
    return 0


def version_string() -> str:
    """What `tessera --version` prints: "tessera X (torch Y, Python Z)"."""
    import platform

    import torch

    import tessera

    return f"tessera {tessera.__version__} (torch {torch.__version__}, Python {platform.python_version()})"


def _fetch(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    from tessera.models.fetch import available, describe, fetch

    if ns.list:
        for name in available():
            print(f"{name}  {describe(name)}")
        return 0
    if ns.name is None:
        parser.error("fetch: give a model NAME or --list")
    try:
        path = fetch(ns.name, cache_dir=ns.cache_dir, progress=not ns.quiet)
    except TesseraError as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return 2
    print(path)  # the last line of stdout, for dir=$(tessera fetch NAME)
    return 0


def _plot(ns: argparse.Namespace) -> int:
    from tessera.metrics import plot_run

    try:
        paths = plot_run(ns.output_dir, out_dir=ns.out)
    except TesseraError as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


# ---- tessera doctor --------------------------------------------------------------------------------------------

def _add_doctor_parser(sub) -> None:
    p = sub.add_parser("doctor", help="health checks before a run: GEMM, memory, collectives, checkpoint dir, GPU")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--nproc", type=int, help="ranks to start (default: 2 on CPU, every GPU on CUDA)")
    p.add_argument("--checkpoint-dir", help="directory whose write + fsync bandwidth to test (default: a temp dir)")
    p.add_argument("--json", dest="json_path", help="write the report (every figure, units, flags) here")
    p.add_argument("--margin", type=float, default=0.25, help="flag a rank this fraction below the median")
    p.add_argument("--quick", action="store_true", help="small buffers and sizes (seconds)")


def _doctor(ns) -> int:
    """Exit status 0: all checks passed; 1: a check failed or a rank is flagged; 2: bad arguments."""
    from tessera.doctor import DoctorOptions, run_doctor

    try:
        return run_doctor(DoctorOptions(device=ns.device, nproc=ns.nproc, checkpoint_dir=ns.checkpoint_dir,
                                        json_path=ns.json_path, margin=ns.margin, quick=ns.quick))
    except TesseraError as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return 2


# ---- tessera k8s -----------------------------------------------------------------------------------------------

def _add_k8s_parser(sub) -> None:
    p = sub.add_parser("k8s", help="a Kubernetes manifest (Kubeflow PyTorchJob or JobSet) that runs a recipe")
    p.add_argument("args", nargs="+", help="RECIPE.yaml (its path inside the image) followed by key=value overrides")
    p.add_argument("--kind", choices=("pytorchjob", "jobset"), required=True)
    p.add_argument("--image", required=True, help="container image with tessera installed")
    p.add_argument("--nodes", type=int, required=True, help="pods, one per node")
    p.add_argument("--nproc-per-node", type=int, required=True, help="ranks per pod (one per GPU)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs each pod requests (default: --nproc-per-node; 0: none)")
    p.add_argument("--max-restarts", type=int, default=3, help="group restarts by torchrun, and restarts of the "
                   "workload (PyTorchJob backoffLimit, JobSet failurePolicy.maxRestarts)")
    p.add_argument("--pvc", default="tessera-checkpoints", help="PersistentVolumeClaim for output_dir and checkpoints")
    p.add_argument("--name", help="the job's name (default: from the recipe's file name)")
    p.add_argument("-o", "--output", help="write the manifest here (default: stdout)")


def _k8s(ns) -> int:
    """Exit status 0, or 2 for a bad recipe or arguments."""
    from tessera.recipes import k8s

    recipe, overrides = ns.args[0], ns.args[1:]
    try:
        manifest = k8s.render(recipe, overrides, kind=ns.kind, image=ns.image, nodes=ns.nodes,
                              nproc_per_node=ns.nproc_per_node, max_restarts=ns.max_restarts, pvc=ns.pvc,
                              gpus_per_node=ns.gpus_per_node, name=ns.name)
    except TesseraError as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return 2
    text = k8s.to_yaml(manifest, "rendered by: tessera k8s " + " ".join(
        [*ns.args, "--kind", ns.kind, "--image", ns.image, "--nodes", str(ns.nodes), "--nproc-per-node",
         str(ns.nproc_per_node), "--max-restarts", str(ns.max_restarts)]))
    if ns.output:
        with open(ns.output, "w") as f:
            f.write(text)
    else:
        print(text, end="")
    return 0


# ---- tessera generate ------------------------------------------------------------------------------------------

def _add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a model (greedy or sampled, KV cache)")
    p.add_argument("model", help="a Hugging Face model directory, or a tessera checkpoint (root or step-* dir)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="a directory with the tokenizer (default: MODEL; needed for a checkpoint)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")


def _generate(ns) -> int:
    """Prints the continuation on stdout, then prefill time and decode speed on stderr."""
    import torch

    from tessera.models.generate import eos_token_ids, generate, load_model

    try:
        device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, model_dir = load_model(ns.model, dtype=getattr(torch, ns.dtype), device=device)
        tok_dir = ns.tokenizer or model_dir
        if tok_dir is None:
            raise InvalidArgumentError(f"{ns.model} is a checkpoint, which has no tokenizer: give --tokenizer DIR "
                                       "(the HF directory the model came from)")
        tokenizer = _load_tokenizer(tok_dir)
        stats: dict = {}
        text = generate(model, tokenizer, ns.prompt, chat=ns.chat, max_new_tokens=ns.max_new_tokens,
                        temperature=ns.temperature, top_p=ns.top_p, seed=ns.seed,
                        eos_token_id=eos_token_ids(tokenizer, tok_dir, model_dir) or None, stats=stats)
    except TesseraError as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"tessera generate: prompt {stats['prompt_tokens']} tokens, prefill {stats['prefill_s'] * 1e3:.1f} ms; "
          f"{stats['new_tokens']} new tokens, decode {stats['decode_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    return 0


def _load_tokenizer(tok_dir: str):
    """transformers.AutoTokenizer of `tok_dir`; InvalidArgumentError naming the directory if it has none."""
    from pathlib import Path

    import transformers

    d = Path(tok_dir)
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise InvalidArgumentError(f"{d}: no tokenizer (expected tokenizer.json or tokenizer_config.json); give "
                                   "--tokenizer DIR")
    try:
        return transformers.AutoTokenizer.from_pretrained(d)
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"{d}: the tokenizer could not be loaded: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
