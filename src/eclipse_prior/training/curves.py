"""RUN/curves.png: the training curves of a run (loss terms, learning rate, validation metrics) in one figure.

Written at the end of `train` from RUN/metrics.jsonl, so a run folder shows how it trained without TensorBoard;
``plot_training_curves(run_dir)`` redraws it for any run (also a resumed or interrupted one).
"""

from __future__ import annotations

from pathlib import Path

# log fields that are not curves worth a panel
_SKIP = {"step", "split", "samples_per_s", "num_samples"}


def plot_training_curves(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Draw the loss terms (log scale), the LR and each validation metric against the step; None if no rows."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    from eclipse_prior.training.trainer import iter_metrics

    run_dir = Path(run_dir)
    rows = list(iter_metrics(run_dir))
    train_rows = [r for r in rows if "split" not in r]
    val_rows = [r for r in rows if r.get("split") == "val"]
    if not train_rows and not val_rows:
        return None
    losses = [k for k in dict.fromkeys(k for r in train_rows for k in r) if k not in _SKIP and k != "lr"]
    metrics = [k for k in dict.fromkeys(k for r in val_rows for k in r) if k not in _SKIP]
    panels = [("loss terms", losses, train_rows, True)] if losses else []
    if any("lr" in r for r in train_rows):
        panels.append(("learning rate", ["lr"], train_rows, False))
    panels += [(f"val {m}", [m], val_rows, False) for m in metrics]
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, (title, keys, source, log_scale) in zip(axes.flat, panels, strict=False):
        for key in keys:
            points = [(r["step"], r[key]) for r in source if isinstance(r.get(key), int | float)]
            if points:
                ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None, label=key)
        if log_scale and all(r.get(k, 1) is None or r.get(k, 1) > 0 for r in source for k in keys):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(run_dir.name, fontsize=10)
    fig.tight_layout()
    path = Path(out) if out is not None else run_dir / "curves.png"
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path
