"""The ``viscy`` command: one verb per pipeline stage, each configured by the typed schema.

``viscy VERB [--config FILE] [--section.key VALUE ...]``. Verbs import their stage lazily so that
``viscy --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, NoReturn

from viscy.config import ConfigError, describe_schema, load_config, parse_overrides
from viscy.ray_utils import settle_background_start, start_ray_in_background


@dataclass(frozen=True)
class Verb:
    """A CLI verb: its one-line help, its config schema and the function that runs it."""

    name: str
    summary: str
    schema: str  # "module:Class" of the pydantic config
    entry: str  # "module:function" taking the validated config (viscy.api for the pipeline stages)
    details: str = ""
    # Leave without the interpreter's teardown (after every atexit handler): torch, Lightning and Ray loaded.
    skip_teardown: bool = False
    # Start Ray in the background once the config is valid, while the stage's own checks run (train: the
    # model/data check, which imports torch and the model's libraries).
    start_ray_early: bool = False


VERBS: list[Verb] = [
    Verb(
        "demo",
        "Run the embedded default job on a synthetic plate (local Ray).",
        "viscy.demo:DemoConfig",
        "viscy.demo:run_demo",
        "Synthesises a plate, computes normalisation statistics with Ray and prints a summary.",
    ),
    Verb(
        "synth",
        "Write a synthetic HCS OME-Zarr plate with phase, fluorescence and ground-truth labels.",
        "viscy.data.config:SynthConfig",
        "viscy.api:synth",
        "Cells are a tessellation with membranes on their borders and ellipsoidal nuclei; phase is the\n"
        "blurred optical path length with noise, an illumination gradient and defocus away from focus.",
    ),
    Verb(
        "preprocess",
        "Compute normalisation statistics (and foreground masks) into the plate's zattrs with Ray.",
        "viscy.data.config:PreprocessConfig",
        "viscy.api:preprocess",
        "One Ray task per FOV (local Ray, or the cluster at RAY_ADDRESS). Writes VisCy's layout:\n"
        "plate and FOV .zattrs['normalization'][channel] = {dataset_statistics, fov_statistics, ...}.",
    ),
    Verb(
        "info",
        "Summarise a plate: positions, channels, shapes and stored statistics.",
        "viscy.data.plate:InfoConfig",
        "viscy.data.plate:run_info",
    ),
    Verb(
        "train",
        "Train a model with Ray Train (local Ray or RAY_ADDRESS).",
        "viscy.train.config:TrainConfig",
        "viscy.api:train",
        "TorchTrainer with Lightning DDP in each worker (gloo on CPU, NCCL on GPU), fed by a Ray Data patch\n"
        "source (train/val split by FOV). Results go to trainer.storage_path/trainer.run_name: Ray checkpoints,\n"
        "figures/, tensorboard/ or wandb/, viscy_config.yaml, viscy_train.log and best_model.pt: the best weights\n"
        "with their model card (architecture, channels, normalisation), all that export and predict need.\n"
        "Resume an interrupted run: viscy train --config x.yaml --trainer.run_name NAME --trainer.resume true\n"
        "Examples: configs/demo.yaml (CPU, minutes), configs/vscyto2d_finetune.yaml, configs/vscyto3d.yaml.",
        skip_teardown=True,
        start_ray_early=True,
    ),
    Verb(
        "tune",
        "Search hyper-parameters: Ray Tune + Optuna (TPE) + ASHA over real `viscy train` runs.",
        "viscy.tune.config:TuneConfig",
        "viscy.api:tune",
        "The YAML is a training config plus a `search` section: space (dotted training keys with loguniform,\n"
        "uniform, int, choice or fixed), metric (val_loss or val_pearson_<target>...), num_samples,\n"
        "max_concurrent_trials, seed, points_to_evaluate, scheduler (asha: grace_period, reduction_factor).\n"
        "Writes storage_path/experiment/: leaderboard.csv, figures/*.png, best_config.yaml (viscy train takes it\n"
        "unchanged), best_model.pt and each trial's training run under runs/. An interrupted sweep continues\n"
        "when rerun with the same search.experiment (or --resume true); finished trials are not re-run.\n"
        "Example: viscy tune --config configs/tune_demo.yaml",
        skip_teardown=True,
    ),
    Verb(
        "export",
        "Export a model (preset or checkpoint) to ONNX, or to a bioimage.io package, with a parity check.",
        "viscy.models.config:ExportConfig",
        "viscy.api:export",
        "Dynamo exporter, opset >= 18, input 'input' (B, C, Z, Y, X) with dynamic batch, Y and X; the file's\n"
        "metadata_props carry the model card: channels, depths, YX multiple, normalisation (read_card).\n"
        "--format bioimageio writes a bioimage.io package (spec 0.5) from a trained best_model.pt and its\n"
        "training plate, and writes it only once bioimageio.core's model test passes.",
    ),
    Verb(
        "predict",
        "Predict whole plates with a checkpoint or ONNX model on Ray Data; resumable.",
        "viscy.predict.config:PredictConfig",
        "viscy.api:predict",
        "An actor pool (one model per actor) reads, predicts tile by tile (overlap + Gaussian blending, Z\n"
        "sliding windows, optional TTA) and writes '<target>_prediction' channels into a new store (output)\n"
        "or the input plate (output: null). With --segment.method, segmentation actors of their own segment\n"
        "the predictions in the same pass: NGFF label images and a per-object table (viscy_objects.csv).\n"
        "FOVs are marked complete last; a rerun resumes the same job.",
    ),
    Verb(
        "serve",
        "Serve ONNX virtual staining and segmentation over HTTP on Ray Serve (local Ray or RAY_ADDRESS).",
        "viscy.serve.config:ServeConfig",
        "viscy.serve.run:serve_forever",
        "Quick start: viscy serve --models demo_output/model  (an .onnx file or a directory of them).\n"
        "--config configs/serve.yaml reads a Ray Serve config (the same file works with `serve deploy`).\n"
        "Endpoints: POST /v1/stain, /v1/segment, /v1/stain-and-segment; GET /v1/models, /healthz, / (page),\n"
        "/docs (OpenAPI). Binds 127.0.0.1:8000 unless --host/--port say otherwise. Ctrl-C stops it.",
    ),
    Verb(
        "infer",
        "Send an image to a running `viscy serve` and write the stains (and masks) to a new file.",
        "viscy.serve.config:InferConfig",
        "viscy.serve.client:run_infer",
        "Example: viscy infer --url http://127.0.0.1:8000 --image phase.tif --output stained.tif\n"
        "         viscy infer --image phase.npy --segment true --output both.npz\n"
        "A bearer token is read from $VISCY_SERVE_TOKEN (--token_env names another variable).",
    ),
    Verb(
        "evaluate",
        "Score predictions: regression metrics and segmentation metrics (Cellpose or classical).",
        "viscy.evaluate.config:EvaluateConfig",
        "viscy.api:evaluate",
        "One Ray task per FOV and time point compares <target> with <target><prediction_suffix>: Pearson,\n"
        "SSIM, MS-SSIM, PSNR, MAE, MSE, NRMSE and, with a segmentation section, AP@[0.5:0.95], F1@0.5,\n"
        "Dice and Jaccard. Writes metrics.csv/.parquet, summary.json and PNG figures to output_dir.",
    ),
]


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _verb_help(verb: Verb) -> str:
    schema = _load(verb.schema)
    rows = describe_schema(schema)
    width = max(len(k) for k, _, _ in rows) + 2
    body = []
    for key, default, desc in rows:
        line = f"  --{key:<{width}} {desc}"
        if default not in ("REQUIRED", "(section)"):
            line += f" [default: {default}]"
        elif default == "REQUIRED":
            line += " [required]"
        body.append(textwrap.fill(line, 110, subsequent_indent=" " * (width + 5)))
    return (
        f"usage: viscy {verb.name} [--config FILE] [--key VALUE ...]\n\n{verb.summary}\n"
        + (f"\n{verb.details}\n" if verb.details else "")
        + "\noptions:\n  -h, --help"
        + " " * (width - 4)
        + "  show this help and exit\n"
        + f"  --verbose{' ' * (width - 5)} also print Ray, Ray Data and Lightning internals (always in the log file)\n"
        + f"  --config FILE{' ' * (width - 9)} YAML file with the keys below (overrides win)\n"
        + "\nconfig keys (nested keys use dots; lists take several values, e.g. --data.yx_patch_size 256 256):\n"
        + "\n".join(body)
    )


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (verbs only; each verb parses its own keys)."""
    parser = argparse.ArgumentParser(
        prog="viscy",
        description="Virtual staining on Ray: synthesise, preprocess, train, tune, export, predict, "
        "evaluate and serve models that predict fluorescence from label-free microscopy.",
        epilog="Run 'viscy VERB --help' for the keys of one verb.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", title="verbs")
    for verb in VERBS:
        sub.add_parser(verb.name, help=verb.summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``viscy`` console script."""
    console_script = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    verbs = {v.name: v for v in VERBS}
    name, rest = argv[0], argv[1:]
    if name not in verbs:
        parser.error(f"unknown verb {name!r}; choose from: {', '.join(verbs)}")
    verb = verbs[name]
    if "-h" in rest or "--help" in rest:
        print(_verb_help(verb))
        return 0
    is_verbose = "--verbose" in rest
    rest = [a for a in rest if a != "--verbose"]
    config_path = None
    if "--config" in rest:
        i = rest.index("--config")
        if i + 1 >= len(rest):
            print("error: --config needs a FILE", file=sys.stderr)
            return 2
        config_path = rest[i + 1]
        rest = rest[:i] + rest[i + 2 :]
    from viscy.console import start_log

    start_log(name, is_verbose)
    try:
        config = load_config(_load(verb.schema), config_path, parse_overrides(rest))
    except ConfigError as exc:
        print(f"viscy {name}: {exc}", file=sys.stderr)
        code = 2
    else:
        if verb.start_ray_early:  # key and value errors are named before Ray starts
            start_ray_in_background()
        code = _run_verb(verb, config)
    if verb.start_ray_early:
        _settle_ray_start(name)
    if console_script and verb.skip_teardown:
        _exit_without_teardown(code)
    return code


def _run_verb(verb: Verb, config: Any) -> int:
    """Run a verb on its validated config; errors are printed in one line and logged in full."""
    import logging

    from viscy.console import failure_message, log_path
    from viscy.errors import ViscyError

    log, name = logging.getLogger("viscy"), verb.name
    try:
        _load(verb.entry)(config)
    except ConfigError as exc:  # found by a stage's own check (e.g. the model does not fit the data): as at load
        log.exception("viscy %s: invalid configuration", name)
        print(f"viscy {name}: {exc}", file=sys.stderr)
        return 2
    except ViscyError as exc:
        log.exception("viscy %s failed", name)
        print(f"viscy {name}: error: {exc}\n  (details: {log_path()})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        log.warning("viscy %s interrupted", name)
        print(f"viscy {name}: interrupted (details: {log_path()})", file=sys.stderr)
        return 130
    except Exception as exc:
        log.exception("viscy %s failed", name)
        print(f"viscy {name}: error: {failure_message(exc)}\n  (traceback: {log_path()})", file=sys.stderr)
        return 1
    return 0


def _settle_ray_start(name: str) -> None:
    """Wait for a background Ray start the verb ended before using, so the exit handlers can shut it down."""
    import logging

    error = settle_background_start()
    if error is not None:
        logging.getLogger("viscy").warning("viscy %s: Ray's start failed too: %s", name, error)


def _exit_without_teardown(code: int) -> NoReturn:
    """Exit as ``sys.exit`` would, running every ``atexit`` handler (Ray's shutdown, the log's flush, temporary
    folders), but skip the interpreter's module teardown, which writes nothing and, with torch, Lightning and
    Ray loaded, takes about 2 s on 2 cores."""
    import atexit

    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None:
        raise SystemExit(code)
    run_exit_handlers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
