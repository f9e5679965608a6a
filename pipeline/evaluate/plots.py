"""Figures shared by the evaluations (matplotlib, headless)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def log_edges(values: Sequence[float]) -> np.ndarray:
    """Cell edges around log-spaced centres (for pcolormesh on a log axis)."""
    v = np.log(np.asarray(values, dtype=float))
    if len(v) == 1:
        return np.exp(np.array([v[0] - 0.5, v[0] + 0.5]))
    mids = (v[1:] + v[:-1]) / 2
    return np.exp(np.concatenate([[v[0] - (mids[0] - v[0])], mids, [v[-1] + (v[-1] - mids[-1])]]))


def passkey_heatmaps(panels: Dict[str, dict], out, train_length: Optional[int] = None) -> None:
    """One heatmap per panel (title -> passkey result): context length (log) x depth, accuracy colour, each
    cell labelled with its accuracy; the training length, when given, as a dashed line."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, res) in zip(axes[0], panels.items()):
        lengths, depths = res["lengths"], res["depths"]
        acc = np.array([[res["accuracy"][str(L)][str(d)] for L in lengths] for d in depths])
        d_edges = np.linspace(0, 1, len(depths) + 1) if len(depths) > 1 else np.array([0, 1])
        l_edges = log_edges(lengths)
        mesh = ax.pcolormesh(l_edges, d_edges, acc, vmin=0, vmax=1, cmap="RdYlGn")
        for i, d_mid in enumerate((d_edges[:-1] + d_edges[1:]) / 2):
            for j, L in enumerate(lengths):
                ax.text(L, d_mid, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=7)
        trained = [j for j, L in enumerate(lengths) if L <= train_length] if train_length else []
        if trained:      # between the last length within training and the first past it, off the labels
            edge = l_edges[trained[-1] + 1]
            ax.axvline(edge, color="black", ls="--", lw=1.2)
            ax.annotate(f"trained at {train_length:,}", (edge, d_edges[-1]), fontsize=7, rotation=90, va="top",
                        ha="right", xytext=(-2, -2), textcoords="offset points")
        ax.set_xscale("log")
        ax.minorticks_off()                      # only the evaluated lengths are labelled
        ax.set_xticks(lengths, [f"{L:,}" for L in lengths], rotation=45, fontsize=7)
        ax.set_yticks((d_edges[:-1] + d_edges[1:]) / 2, [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{title}: mean accuracy {res['mean_accuracy']:.2f}")
        fig.colorbar(mesh, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def curves(series: Dict[str, tuple], out, xlabel: str, ylabel: str, logx=True, logy=False, marks: List = ()) -> None:
    """Line plot: label -> (x, y). `marks`: (x, label) vertical markers."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for label, (x, y) in series.items():
        ax.plot(x, y, marker=".", label=label)
    for x, label in marks:
        ax.axvline(x, color="grey", ls=":", lw=1)
        ax.annotate(label, (x, ax.get_ylim()[1]), fontsize=7, rotation=90, va="top")
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1 or any(series):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
