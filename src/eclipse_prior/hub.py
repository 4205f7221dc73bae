"""Publishing an exported prior on the Hugging Face hub: a complete model card, then create_repo + upload_folder.

``eclipse-prior export RUN --out DIR --push-to-hub REPO_ID`` writes the export as usual, then uploads the export's
weights and config with :func:`hub_model_card` as README.md (the hub reads license, base models, datasets and the
pipeline tag from the YAML header; the body says what data, objective and command made the prior, its metrics and
how to load it). The upload is staged in a temporary folder: DIR may hold the user's other files (a clone with
.git, the export's own record) and is neither uploaded whole nor changed. Network failures (offline, no token, no
permission) are one line naming the fix; the export folder stays on disk either way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from eclipse_prior.errors import EclipsePriorError

# The decoder each released CLIP belongs to (the paper's two unCLIP models), and the authors' prior for it.
DECODER_FOR_CLIP: dict[str, tuple[str, str]] = {
    "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k": (
        "kandinsky-community/kandinsky-2-2-decoder", "ECLIPSE-Community/ECLIPSE_KandinskyV22_Prior"),
    "openai/clip-vit-large-patch14": ("kakaobrain/karlo-v1-alpha", "ECLIPSE-Community/ECLIPSE_Karlo_Prior"),
}
_DECODER_FLAG = {"kandinsky-community/kandinsky-2-2-decoder": "kandinsky22", "kakaobrain/karlo-v1-alpha": "karlo"}
_HUB_DATASET = re.compile(r"(?:hf://datasets/|huggingface\.co/datasets/)([\w.-]+/[\w.-]+)")
LOSSES = {
    "eclipse": "E||z_x - g(eps, z_y)||^2 + lam * InfoNCE_{y->x}(cosine, tau) (the ECLIPSE objective)",
    "projection": "E||z_x - g(eps, z_y)||^2 (the Projection baseline: ECLIPSE with lam = 0)",
    "diffusion": "E||z_x - g(x_t, t, z_y)||^2 with x0 prediction, DDPM linear schedule, 1000 steps, 10% condition "
                 "dropout (the Diffusion-Baseline)",
}


class HubError(EclipsePriorError):
    """The hub could not be reached or refused the upload."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and name.count("/") == 1 and not Path(name).expanduser().exists() and not name.startswith(
        ("/", ".", "~"))


def evaluate_reports(run_dir: Path) -> list[dict[str, Any]]:
    """`eclipse-prior evaluate --json` reports kept in the run folder (any *.json with prior, split and metrics)."""
    reports = []
    for path in sorted(run_dir.glob("*.json")):
        data = _read_json(path)
        if {"prior", "split", "metrics"} <= set(data) and isinstance(data["metrics"], dict):
            reports.append({**data, "file": path.name})
    return reports


def _last_validation(run_dir: Path) -> dict[str, Any] | None:
    from eclipse_prior.training.trainer import iter_metrics

    rows = [r for r in iter_metrics(run_dir) if r.get("split") == "val"]
    return rows[-1] if rows else None


def _metric_rows(metrics: dict[str, Any]) -> list[str]:
    from eclipse_prior.evaluation.embedding_metrics import METRIC_DESCRIPTIONS

    def shown(v: float | None) -> str:
        return "n/a" if v is None else str(int(v)) if float(v).is_integer() else f"{v:.4f}"

    return [f"| {METRIC_DESCRIPTIONS.get(k, k).replace('|', chr(92) + '|')} | {shown(v)} |"
            for k, v in metrics.items() if k not in ("step", "split") and (v is None or isinstance(v, int | float))]


def _shown_path(spec: str) -> str:
    """A local path is shown by its last part only: a public card should not leak a home folder."""
    return spec if "://" in spec or _HUB_DATASET.search(spec) else Path(spec).name


def _shown_command(command: str) -> str:
    """The training command with each absolute or home-relative path cut to its last part."""
    import shlex

    try:
        words = shlex.split(command)
    except ValueError:
        return command
    return shlex.join(Path(w).name if w.startswith(("/", "~")) else w for w in words)


def hub_model_card(run_dir: str | Path, export_dir: str | Path, repo_id: str, license: str = "apache-2.0",
                   datasets: list[str] | None = None) -> str:
    """README.md for the hub: YAML metadata (license, base_model, datasets, pipeline_tag, tags) plus a body with
    the training data, config and loss, validation and `evaluate` metrics, and how to load the prior."""
    run_dir, export_dir = Path(run_dir), Path(export_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    run = _read_json(run_dir / "run.json")
    store = run.get("store", {})
    manifest = _read_json(Path(store["path"]) / "manifest.json") if store.get("path") else {}
    source = manifest.get("source") or {}
    clip_id = store.get("clip_id") or (manifest.get("clip") or {}).get("id")
    decoder, authors_prior = DECODER_FOR_CLIP.get(clip_id or "", (None, None))
    prior_class = _read_json(export_dir / "config.json").get("_class_name") or run.get("prior_class", "?")
    objective = cfg.get("objective", "?")
    hub_datasets = list(dict.fromkeys([*(datasets or []), *_HUB_DATASET.findall(str(source.get("spec", "")))]))
    meta: dict[str, Any] = {
        "license": license,
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": ["eclipse-prior", "unclip", "text-to-image-prior", f"objective-{objective}"],
    }
    base = [m for m in (decoder, clip_id) if _is_hub_id(m)]
    if base:
        meta["base_model"] = base
    if hub_datasets:
        meta["datasets"] = hub_datasets
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {repo_id.split('/')[-1]}", "",
             f"A text-to-image prior ({prior_class}, {objective} objective): CLIP text embedding -> CLIP image "
             "embedding, to be decoded by an unCLIP decoder. Trained with eclipse-prior "
             "(ECLIPSE, CVPR 2024, arXiv 2312.04655) from precomputed CLIP embeddings.", "",
             "## Base models", "",
             f"- CLIP (text and image embeddings): `{clip_id or 'unknown'}`",
             f"- decoder: `{decoder}`" if decoder else
             "- decoder: the unCLIP decoder trained on this CLIP's image embeddings (not one of the paper's two)",
             "", "## Training data", "", "| field | value |", "|---|---|",
             f"| source | {source.get('kind', '?')}: `{_shown_path(str(source.get('spec', '?')))}` |",
             f"| rows (train / val) | {store.get('train_rows', '?')} / {store.get('val_rows', '?')} |",
             f"| CLIP | `{clip_id}` (revision {(manifest.get('clip') or {}).get('revision', '?')}) |",
             f"| per-token text states | {store.get('has_text_states', '?')} (length {store.get('text_seq_len')}) |",
             f"| embeddings | {'L2-normalised' if store.get('normalized') else 'raw (what decoders expect)'}, "
             f"{manifest.get('dtype', '?')} |",
             "", "## Training", "", f"Loss: {LOSSES.get(objective, objective)}.", "",
             "| field | value |", "|---|---|",
             *[f"| {k} | {v} |" for k, v in cfg.items() if k not in ("data", "out")],
             f"| parameters | {run.get('parameters', '?')} |",
             f"| global batch | {run.get('global_batch', '?')} (processes: {run.get('world_size', '?')}) |",
             "", "Command:", "", "```", _shown_command(str(run.get("command", "unknown"))), "```", "", "## Metrics", ""]
    val = _last_validation(run_dir)
    if val is not None:
        lines += [f"Last validation during training (step {val['step']}, EMA weights, the store's val split):", "",
                  "| metric | value |", "|---|---|", *_metric_rows(val), ""]
    for report in evaluate_reports(run_dir):
        lines += [f"`eclipse-prior evaluate` on `{_shown_path(str(report.get('data', '?')))}` "
                  f"[{report['split']}] ({report['file']}):", "", "| metric | value |", "|---|---|",
                  *_metric_rows(report["metrics"]), ""]
    if val is None and not evaluate_reports(run_dir):
        lines += ["No metrics recorded (no validation ran and no `evaluate --json` report is in the run folder).", ""]
    flag = _DECODER_FLAG.get(decoder or "", "DECODER_FOLDER")
    lines += ["## How to use", "", "With eclipse-prior:", "", "```python", "from eclipse_prior import load_prior", "",
              f'prior = load_prior("{repo_id}")', "```", "", "```bash",
              f"eclipse-prior generate --prior {repo_id} --decoder {flag} --prompt \"a photo of a red apple\"",
              "```", ""]
    if prior_class == "PriorTransformer" and authors_prior:  # the released ECLIPSE format
        lines += ["With the authors' pipeline ([eclipse-inference](https://github.com/eclipse-t2i/eclipse-inference)), "
                  f"in place of `{authors_prior}`:", "", "```python",
                  "from src.priors.prior_transformer import PriorTransformer", "",
                  f'prior = PriorTransformer.from_pretrained("{repo_id}")']
        if flag == "karlo":
            lines += ["from src.pipelines.pipeline_unclip import UnCLIPPipeline",
                      'pipe = UnCLIPPipeline.from_pretrained("kakaobrain/karlo-v1-alpha", prior=prior)']
        else:
            lines += ["from src.pipelines.pipeline_kandinsky_prior import KandinskyPriorPipeline",
                      "from diffusers import DiffusionPipeline",
                      'pipe_prior = KandinskyPriorPipeline.from_pretrained("kandinsky-community/kandinsky-2-2-prior", '
                      "prior=prior)",
                      'pipe = DiffusionPipeline.from_pretrained("kandinsky-community/kandinsky-2-2-decoder")',
                      'image_embeds, negative_image_embeds = pipe_prior("a photo of a red apple").to_tuple()',
                      "image = pipe(image_embeds=image_embeds, negative_image_embeds=negative_image_embeds).images[0]"]
        lines += ["```", ""]
    elif prior_class == "PriorTransformer":
        lines += ["The weights are in the released ECLIPSE layout (`PriorTransformer` without the time embedding), "
                  "so the authors' `PriorTransformer.from_pretrained` loads them too; their pipelines are written "
                  "for Kandinsky v2.2 and Karlo, not for this CLIP.", ""]
    elif prior_class == "EclipsePrior":
        lines += ["This ECLIPSE prior reads the pooled text embedding only (`--pooled-only`), so it is saved as "
                  "`EclipsePrior`, not in the released format: the authors' pipelines always pass per-token text "
                  "states, which it has no input for. Run it with eclipse-prior.", ""]
    else:
        lines += [f"A {prior_class} is this library's format (a diffusion prior, sampled with 25 steps and "
                  "guidance 4): the authors' pipelines (one-pass ECLIPSE priors) do not run it.", ""]
    return "\n".join(lines)


def _client() -> Any:
    from huggingface_hub import HfApi

    return HfApi()


def _one_line(err: Exception) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return f"{type(err).__name__}: {text}"


def push_folder(folder: str | Path, repo_id: str, private: bool = False,
                commit_message: str = "Upload prior with eclipse-prior", shown: str | Path | None = None) -> str:
    """Create the model repo (kept if it exists) and upload the folder; returns the repo URL.

    ``shown`` is the folder named in error messages (the export, when ``folder`` is a staging copy of it).
    """
    shown = folder if shown is None else shown
    from eclipse_prior.encoders._hf import looks_like_hub_id, offline_default

    if not looks_like_hub_id(repo_id):
        raise HubError(f"--push-to-hub {repo_id!r} is not a hub repo id (owner/name)")
    if offline_default():
        raise HubError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; the export is in {shown}, push it later "
                       "with `hf upload` or unset HF_HUB_OFFLINE")
    api = _client()
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=commit_message)
    except Exception as err:  # huggingface_hub/httpx raise many types: offline, 401, 403, 404, timeouts
        hint = "log in with `hf auth login` or set HF_TOKEN" if "401" in str(err) or "token" in str(err).lower() \
            else "check the network, your token's write access and the repo id"
        raise HubError(f"cannot push {shown} to {repo_id} ({_one_line(err)}); {hint}; the export stays in "
                       f"{shown}") from err
    return str(url)


def add_push_arguments(parser: Any) -> None:
    """`export`'s hub flags."""
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="after exporting, upload the folder to this hub "
                        "model repo (created if missing) with a complete model card")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    parser.add_argument("--license", default="apache-2.0", help="license in the model card (default apache-2.0)")
    parser.add_argument("--dataset", action="append", default=[], metavar="HUB_ID",
                        help="hub dataset id for the card's metadata (repeatable; hf:// sources are found itself)")


def stage_upload(run_dir: str | Path, export_dir: str | Path, repo_id: str, folder: str | Path,
                 license: str = "apache-2.0", datasets: list[str] | None = None) -> Path:
    """``folder`` <- the export's weights and config (hard links where possible) + the hub model card."""
    import os
    import shutil

    from eclipse_prior.export import EXPORT_FILES

    folder = Path(folder)
    for name in EXPORT_FILES:
        if name == "README.md":
            continue
        try:
            os.link(Path(export_dir) / name, folder / name)
        except OSError:  # another file system, or links not allowed: copy
            shutil.copy2(Path(export_dir) / name, folder / name)
    (folder / "README.md").write_text(hub_model_card(run_dir, export_dir, repo_id, license, datasets))
    return folder


def publish(run_dir: str | Path, export_dir: str | Path, repo_id: str, private: bool = False,
            license: str = "apache-2.0", datasets: list[str] | None = None) -> str:
    """Push an export (weights, config, the hub model card) to REPO_ID; returns the repo URL."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="eclipse-prior-push-") as tmp:
        stage_upload(run_dir, export_dir, repo_id, tmp, license, datasets)
        return push_folder(tmp, repo_id, private, shown=export_dir)


def card_metadata(card: str) -> dict[str, Any]:
    """The YAML header of a model card (what the hub indexes)."""
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    return yaml.safe_load(match.group(1)) if match else {}


__all__ = ["HubError", "add_push_arguments", "card_metadata", "evaluate_reports", "hub_model_card", "publish",
           "push_folder", "stage_upload"]
