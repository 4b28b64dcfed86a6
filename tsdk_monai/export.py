"""Share a trained student: a self-contained, versioned bundle as the model zoo lays it out, and ONNX export.

:func:`export_bundle` turns a student of a ``tsdk run`` folder into ``OUT/<name>/`` and ``OUT/<name>_v<version>.zip``
(the zip holds the folder, which is what ``python -m monai.bundle download --url`` unpacks)::

    configs/      the tsdk_student bundle's configs with the trained student, classes and size baked in
    models/       model.pt (plain state dict, weights_only) and model.ts (TorchScript, MONAI's ckpt_export)
    docs/         README.md: the model card (intended use, data, results, limitations, how to run, data licence)
    large_files.yml, LICENSE

TorchScript export of a bundle's network is MONAI's ``ckpt_export``; ONNX is :func:`export_onnx`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["export_onnx", "export_bundle", "STUDENT_BUNDLE"]

STUDENT_BUNDLE = "tsdk_student"


def export_onnx(network: torch.nn.Module, path: str | os.PathLike, image_size: int = 256, in_channels: int = 1,
                opset_version: int = 18) -> Path:
    """Export ``network`` ((B, in_channels, S, S) -> logits) to ONNX with a dynamic batch axis; input ``image``,
    output ``pred``. Needs the ``onnx`` and ``onnxscript`` packages (``pip install tsdk-monai[export]``).
    The file is written to a temporary name first and renamed, so a failed export leaves nothing behind."""
    from tsdk_monai.utils import replacing

    path = Path(path)
    was_training = network.training
    network.eval()
    dummy = torch.rand(2, in_channels, image_size, image_size)
    try:
        with replacing(path, suffix=".onnx") as tmp, torch.no_grad():
            torch.onnx.export(
                network, (dummy,), tmp, input_names=["image"], output_names=["pred"], opset_version=opset_version,
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}}, dynamo=True, external_data=False,
            )
    finally:
        network.train(was_training)
    return path


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=4) + "\n")


def _run_record(workdir: Path, method: str, n_labeled: int | None, seed: int) -> dict[str, Any]:
    """What the run folder knows of one trained student: its files, schedule, data and test metrics."""
    from tsdk_monai.layout import RunDirs, RunLayout
    from tsdk_monai.transforms import read_postprocess_choice
    from tsdk_monai.utils import TSDKInputError, read_json

    layout = RunLayout(workdir)
    manifest = read_json(layout.manifest, "not found; is this a folder made by `tsdk run`?", "not valid JSON")
    if method not in manifest["methods"] or method == "teacher":
        students = [m for m in manifest["methods"] if m != "teacher"]
        raise TSDKInputError(f"{layout.manifest}: no student trained by method {method!r} (students: {students})")
    n = int(n_labeled) if n_labeled is not None else max(manifest["n_labeled"])
    run = manifest["runs"].get(layout.key(seed, n))
    if run is None:
        raise TSDKInputError(f"{layout.manifest}: no run with seed {seed} and {n} labels (runs: {sorted(manifest['runs'])})")
    dirs = RunDirs.of(run)
    model, metrics = dirs.model(method), dirs.metrics(method)
    for f in (model, metrics):
        if not f.is_file():
            raise TSDKInputError(f"{f}: not found; run `tsdk run` to finish the {method} stages of this run first")
    datalist = read_json(Path(run["datalist"]), "datalist file not found", "not a valid JSON datalist")
    labels = {str(k): v for k, v in sorted(datalist.get("labels", {}).items(), key=lambda kv: int(kv[0]))}
    return {"manifest": manifest, "run": run, "model": model, "metrics": read_json(metrics, "not found", "not JSON"),
            "datalist": datalist, "labels": labels, "n_labeled": n, "seed": seed, "method": method,
            "postprocess": read_postprocess_choice(model.parent / "postprocess.json")}  # chosen on validation


def _bake_configs(configs: Path, rec: dict[str, Any]) -> None:
    """The trained student's name, classes, size, geometry and post-processing into the copied configs (no hand
    edits on the user's side)."""
    sizes = rec["manifest"]["sizes"]
    baked = {"student": sizes["student"], "num_classes": len(rec["labels"]) or int(rec["manifest"]["num_classes"]),
             "image_size": int(sizes["student_size"]), "keep_aspect": bool(sizes.get("keep_aspect", False))}
    for name, extra in (("inference.json", {"postprocess": rec["postprocess"]}), ("train.json", {"resume": False})):
        cfg = json.loads((configs / name).read_text())
        cfg.update(baked, **extra)  # train.json: a MONAI Label training fine-tunes model.pt, it does not resume
        _write_json(configs / name, cfg)


def _metadata(configs: Path, rec: dict[str, Any], version: str, name: str) -> dict[str, Any]:
    from tsdk_monai import __version__
    from tsdk_monai.report import METHOD_LABELS

    meta = json.loads((configs / "metadata.json").read_text())
    m, sizes, labels = rec["metrics"], rec["manifest"]["sizes"], rec["labels"]
    source = rec["datalist"].get("name") or Path(rec["manifest"]["datalist"]).parent.name
    meta.update(
        version=version,
        changelog={version: f"exported by tsdk export from {rec['method']} (seed {rec['seed']}, {rec['n_labeled']} "
                            f"labels) with tsdk-monai {__version__} (bundle {meta['version']})", **meta["changelog"]},
        name=f"TS-KD student ({METHOD_LABELS.get(rec['method'], rec['method'])}) for {source}",
        data_source=f"{source}: {rec['n_labeled']} labelled training images "
                    f"({len(rec['datalist'].get('unlabeled', []))} unlabelled, "
                    f"{len(rec['datalist'].get('validation', []))} validation and {len(rec['datalist'].get('test', []))} "
                    "test images; the test split was used for eval_metrics only)",
        eval_metrics={"mean_dice": round(m["mean"]["test_mean_dice"], 4),
                      **({"hd95_pixels": round(m["mean"]["test_hd95"], 2)} if m["mean"].get("test_hd95") else {}),
                      **{f"dice_{k}": round(v, 4) for k, v in m.get("per_class_mean", {}).get("test_mean_dice", {}).items()}},
        tsdk={"method": rec["method"], "student": sizes["student"], "image_size": sizes["student_size"],
              "teacher": "LiteMedSAM + LoRA (tsdk_teacher)" if rec["method"].startswith("tskd") else None,
              "n_labeled": rec["n_labeled"], "seed": rec["seed"],
              "labelled_images": [Path(c["image"]).name for c in rec["datalist"].get("training", [])],
              "schedule": {k: v for k, v in sizes.items() if k != "extra"},
              "postprocess": rec["postprocess"]},
    )
    meta["required_packages_version"]["tsdk-monai"] = __version__
    out = meta["network_data_format"]["outputs"]["pred"]
    out["num_channels"] = len(labels)
    out["channel_def"] = labels
    # vit_tiny takes multiples of 16; unet_small's four poolings need a 2x2 bottleneck (instance norm): 32
    shape = ["16*n", "16*n"] if sizes["student"] == "vit_tiny" else ["32*n", "32*n"]
    for io in ("inputs", "outputs"):
        for item in meta["network_data_format"][io].values():
            item["spatial_shape"] = shape
    return meta


def _model_card(rec: dict[str, Any], meta: dict[str, Any], name: str, data_licence: str) -> str:
    from tsdk_monai.transforms import POSTPROCESS_CHOICES

    m, per_class = rec["metrics"]["mean"], rec["metrics"].get("per_class_mean", {})
    rows = [f"| all classes (mean) | {m['test_mean_dice']:.3f} | "
            f"{m['test_hd95']:.1f} |" if m.get("test_hd95") is not None else f"| mean | {m['test_mean_dice']:.3f} | n/a |"]
    for cls, dice in per_class.get("test_mean_dice", {}).items():
        hd = per_class.get("test_hd95", {}).get(cls)
        rows.append(f"| {cls} | {dice:.3f} | {'n/a' if hd is None else f'{hd:.1f}'} |")
    t = meta["tsdk"]
    return "\n".join([
        f"# {meta['name']}", "",
        f"`{name}` v{meta['version']}: a {t['student']} student ({meta['description'].split('(')[0].strip()}) trained by "
        f"tsdk-monai's `{t['method']}` method on {t['n_labeled']} labelled images.", "",
        "## Intended use", "", meta["intended_use"], "",
        "## Data", "", f"{meta['data_source']}. Classes: "
        + ", ".join(f"{k} = {v}" for k, v in meta["network_data_format"]["outputs"]["pred"]["channel_def"].items())
        + f". Labelled images: {', '.join(t['labelled_images'][:20])}{' ...' if len(t['labelled_images']) > 20 else ''}.",
        "", f"Data licence: {data_licence}.", "",
        "## Results (held-out test split)", "", "| class | Dice | HD95 (px) |", "|---|---:|---:|", *rows, "",
        f"Measured by the bundle's `evaluate.json` at the images' own size (seed {t['seed']}); HD95 in pixels, a class "
        "missed or invented in an image scored as the image diagonal. Post-processing (chosen on the validation split, "
        f"`postprocess` in `inference.json`): {POSTPROCESS_CHOICES[t['postprocess']]}.", "",
        "## Limitations", "",
        f"- Trained at {t['image_size']} px on one data set with few labels: expect lower accuracy on other scanners, "
        "protocols and populations; check it on your data before any use.",
        "- Single-seed figures; another seed of the same schedule may differ by a few Dice points on small structures.",
        "- 2D only (3D volumes are segmented slice by slice).", "",
        "## How to run", "", "```bash",
        f"python -m monai.bundle run --bundle_root {name} --config_file {name}/configs/inference.json \\",
        f"    --meta_file {name}/configs/metadata.json --input_dir IMAGES --output_dir SEGS", "```", "",
        f"MONAI Label: place `{name}/` in a monaibundle app's `model/` folder and start the server with "
        f"`--conf models {name}`; it infers with `configs/inference.json` and trains with `configs/train.json` "
        "(from `models/model.pt`).", "",
        "## Licence", "", "Code and configs: Apache-2.0 (LICENSE). Weights: Apache-2.0, trained on the data above "
        f"({data_licence}).", "",
    ])


def export_bundle(workdir: str | os.PathLike, out: str | os.PathLike, method: str = "tskd", n_labeled: int | None = None,
                  seed: int = 0, version: str = "1.0.0", name: str | None = None, onnx: bool = False,
                  data_licence: str = "see the data source", url: str | None = None) -> Path:
    """Write the zoo-ready bundle of a trained student of the ``tsdk run`` folder ``workdir`` into ``out``.

    Args:
        workdir: a folder made by ``tsdk run``.
        out: the output folder; ``out/<name>/`` and ``out/<name>_v<version>.zip`` are (re)written.
        method: the student's method (``tskd``, ``scratch``, ...).
        n_labeled, seed: which run (default: the most labels, seed 0).
        version: the bundle's version (``metadata.json`` and the zip's name).
        name: the bundle's name (default ``tsdk_<method>_<student>``).
        onnx: also write ``models/model.onnx`` (needs ``tsdk-monai[export]``).
        data_licence: the training data's licence, for the model card.
        url: where ``models/model.pt`` will be downloadable from (``large_files.yml``); omitted when None.

    Returns:
        The bundle folder. Everything is built in a temporary folder beside it and renamed into place.
    """
    import yaml
    from monai.bundle import ckpt_export

    from tsdk_monai.driver.stages import BUNDLES_DIR
    from tsdk_monai.networks import build_student
    from tsdk_monai.utils import (
        atomic_copy, file_sha256, load_state_dict_strict, read_state_dict, save_state_dict,
    )

    rec = _run_record(Path(workdir), method, n_labeled, seed)
    sizes = rec["manifest"]["sizes"]
    name = name or f"tsdk_{method}_{sizes['student']}"
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
    try:
        bundle = build / name
        shutil.copytree(BUNDLES_DIR / STUDENT_BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "eval", "docs"))
        _bake_configs(bundle / "configs", rec)
        meta = _metadata(bundle / "configs", rec, version, name)
        _write_json(bundle / "configs" / "metadata.json", meta)
        net = build_student(sizes["student"], in_channels=1, num_classes=len(rec["labels"]), img_size=sizes["student_size"])
        load_state_dict_strict(net, read_state_dict(rec["model"], "student weights"), rec["model"], "the student")
        save_state_dict(net, bundle / "models" / "model.pt")
        shape = [1, 1, int(sizes["student_size"]), int(sizes["student_size"])]
        ckpt_export(net_id="network_def", filepath=str(bundle / "models" / "model.ts"),
                    ckpt_file=str(bundle / "models" / "model.pt"), meta_file=str(bundle / "configs" / "metadata.json"),
                    config_file=str(bundle / "configs" / "inference.json"), use_trace=True, input_shape=shape,
                    bundle_root=str(bundle))
        if onnx:
            export_onnx(net, bundle / "models" / "model.onnx", image_size=int(sizes["student_size"]))
        files = sorted(p for p in (bundle / "models").iterdir() if p.is_file())
        large = {"large_files": [{"path": f"models/{p.name}", **({"url": f"{url.rstrip('/')}/{p.name}"} if url else {}),
                                  "hash_val": file_sha256(p), "hash_type": "sha256"} for p in files]}
        (bundle / "large_files.yml").write_text(yaml.safe_dump(large, sort_keys=False))
        (bundle / "docs").mkdir()
        (bundle / "docs" / "README.md").write_text(_model_card(rec, meta, name, data_licence))
        archive = shutil.make_archive(str(build / f"{name}_v{version}"), "zip", root_dir=build, base_dir=name)
        final = out / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(bundle, final)
        atomic_copy(archive, out / Path(archive).name)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return final
