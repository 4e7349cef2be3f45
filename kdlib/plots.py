"""Figures for the report: matplotlib, exported as PNG (200 dpi) and PDF with stable names."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .analysis import read_metrics


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save(fig, folder, name: str) -> list[Path]:
    """Write ``name``.png (200 dpi) and ``name``.pdf into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = [folder / f"{name}.png", folder / f"{name}.pdf"]
    fig.savefig(out[0], dpi=200, bbox_inches="tight")
    fig.savefig(out[1], bbox_inches="tight")
    _plt().close(fig)
    return out


def val_curves(results_dir, runs: pd.DataFrame, title: str = ""):
    """Validation perplexity against training tokens, one line per run (log scale)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for _, run in runs.iterrows():
        m = read_metrics(Path(results_dir) / run["run"])
        if "val_ppl" not in m:
            continue
        m = m.dropna(subset=["val_ppl"])
        ax.plot(m["tokens"] / 1e6, m["val_ppl"], label=f"{run['exp']} (s{run['seed']})", lw=1.2,
                ls="--" if run["exp"] in ("ce", "kl") else "-")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.set_title(title or "Validation perplexity during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, frameon=False)
    return fig


def test_ppl_bars(table: pd.DataFrame, title: str = ""):
    """Test perplexity per experiment with 95% CI whiskers where there are several seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ci = table["test_ci95"]
    err = None if ci.isna().all() else ci.fillna(0)  # a single seed has no interval: no whiskers
    colors = ["0.6" if e in ("ce", "kl") else "C0" for e in table.index]
    ax.bar(range(len(table)), table["test_ppl"], yerr=err, color=colors, capsize=3)
    ax.set_xticks(range(len(table)), table.index, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("test perplexity")
    lo = table["test_ppl"].min()
    ax.set_ylim(lo * 0.9, table["test_ppl"].max() * 1.05)
    ax.set_title(title or "Test perplexity by experiment (grey: baselines)")
    ax.grid(axis="y", alpha=0.3)
    return fig
