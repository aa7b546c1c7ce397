"""Plotly figures of the dashboard; one colour per pattern category everywhere (viz.CATEGORY_COLORS)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from appkit import CATEGORY_COLORS
from sae_cxr.findings import FINDINGS

POS, NEG, TOTAL = "#2a9d8f", "#e63946", "#264653"
SPLIT_COLORS = {"val": "#8d99ae", "test": "#264653", "test_shifted": "#e76f51", "train": "#adb5bd"}


def _layout(fig: go.Figure, height: int = 320, **kw) -> go.Figure:
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=40, b=10), legend_title_text="", **kw)
    return fig


def auroc_bars(df: pd.DataFrame) -> go.Figure:
    """AUROC per finding and split with the bootstrap 95% interval as error bars."""
    fig = go.Figure()
    for split, d in df.groupby("split", sort=False):
        d = d.set_index("finding").reindex(list(FINDINGS)).reset_index()
        fig.add_bar(x=d["finding"], y=d["auroc"], name=split, marker_color=SPLIT_COLORS.get(split),
                    error_y=dict(type="data", symmetric=False, array=(d["auroc_high"] - d["auroc"]).clip(lower=0),
                                 arrayminus=(d["auroc"] - d["auroc_low"]).clip(lower=0)),
                    hovertemplate="%{x}<br>AUROC %{y:.3f}<extra>" + split + "</extra>")
    lo = float(np.nanmin(df["auroc_low"])) if len(df) else 0.5
    return _layout(fig, title="Classifier AUROC per finding (95% bootstrap CI)", barmode="group",
                   yaxis=dict(range=[max(0.0, min(lo, 0.9) - 0.05), 1.0], title="AUROC"))


def member_metric(df: pd.DataFrame, col: str, title: str) -> go.Figure:
    """One metric across ensemble members: a bar per member with the median as a line."""
    fig = go.Figure(go.Bar(x=df["member"], y=df[col], marker_color="#457b9d",
                           hovertemplate="member %{x}<br>" + col + " %{y:.4g}<extra></extra>"))
    med = float(np.nanmedian(df[col]))
    fig.add_hline(y=med, line_dash="dash", line_color="#e63946", annotation_text=f"median {med:.3g}")
    return _layout(fig, height=240, title=title, xaxis_title="member", showlegend=False)


def history_curve(df: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    if "fvu" in df:
        fig.add_scatter(x=df["step"], y=df["fvu"], name="FVU (median member)", line_color="#457b9d")
        if {"fvu_min", "fvu_max"} <= set(df.columns):
            fig.add_scatter(x=list(df["step"]) + list(df["step"])[::-1],
                            y=list(df["fvu_max"]) + list(df["fvu_min"])[::-1], fill="toself", name="member range",
                            line=dict(width=0), fillcolor="rgba(69,123,157,0.2)", hoverinfo="skip")
    if "dead" in df:
        fig.add_scatter(x=df["step"], y=df["dead"], name="dead share", yaxis="y2", line_color="#e76f51")
    return _layout(fig, height=280, title="Ensemble training", xaxis_title="step", yaxis=dict(title="FVU", type="log"),
                   yaxis2=dict(title="dead", overlaying="y", side="right", rangemode="tozero"),
                   legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"))


def category_bars(counts: pd.DataFrame) -> go.Figure:
    fig = go.Figure(go.Bar(x=counts["category"], y=counts["patterns"],
                           marker_color=[CATEGORY_COLORS.get(c, CATEGORY_COLORS["other"]) for c in counts["category"]],
                           text=counts["patterns"], textposition="outside"))
    return _layout(fig, height=280, title="Patterns by category", showlegend=False)


def prevalence_bars(prev: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for split in prev.columns:
        fig.add_bar(x=prev.index, y=prev[split], name=split, marker_color=SPLIT_COLORS.get(split))
    return _layout(fig, height=280, title="Label prevalence per split", barmode="group", yaxis_tickformat=".0%")


def pattern_scatter(table: pd.DataFrame) -> go.Figure:
    """Stability against monosemanticity, one dot per pattern, coloured by category, sized by frequency."""
    fig = px.scatter(table, x="stability", y="monosemanticity", color="category", size=table["frequency"].clip(lower=0.01),
                     size_max=14, hover_data={"pattern_id": True, "label": True, "frequency": ":.3f"},
                     color_discrete_map=CATEGORY_COLORS, opacity=0.75)
    return _layout(fig, height=360, title="Patterns: stability vs monosemanticity (size = frequency)")


def density(d: dict) -> go.Figure:
    fig = go.Figure(go.Bar(x=10 ** d["centers"], y=d["counts"], marker_color="#457b9d",
                           hovertemplate="activation ≈ %{x:.3g}<br>%{y} images<extra></extra>"))
    return _layout(fig, height=260, title=f"Activation density (silent on {d['silent_fraction']:.0%} of images)",
                   xaxis=dict(type="log", title="activation (log scale)"), yaxis_title="images", showlegend=False)


def effect_bars(effects: pd.DataFrame, title: str = "Logit effect per unit of activation") -> go.Figure:
    fig = go.Figure(go.Bar(x=effects["effect"], y=effects["finding"], orientation="h",
                           marker_color=[POS if v >= 0 else NEG for v in effects["effect"]],
                           hovertemplate="%{y}: %{x:+.3f}<extra></extra>"))
    fig.add_vline(x=0, line_color="#999")
    return _layout(fig, height=240, title=title, showlegend=False, yaxis=dict(autorange="reversed"))


def probability_bars(preds: pd.DataFrame, chosen: str | None = None) -> go.Figure:
    """The five findings' probabilities; ground truth (where known) as markers."""
    cols = ["#e9c46a" if f == chosen else "#457b9d" for f in preds["finding"]]
    fig = go.Figure(go.Bar(x=preds["probability"], y=preds["finding"], orientation="h", marker_color=cols,
                           text=[f"{p:.2f}" for p in preds["probability"]], textposition="outside",
                           name="probability", hovertemplate="%{y}: p = %{x:.3f}<extra></extra>"))
    truth = preds.dropna(subset=["label"])
    if len(truth):
        fig.add_scatter(x=truth["label"], y=truth["finding"], mode="markers", name="ground truth",
                        marker=dict(symbol="diamond", size=11, color="#e76f51", line=dict(width=1, color="#111")))
    fig.add_vline(x=0.5, line_dash="dot", line_color="#999")
    return _layout(fig, height=260, title="Predictions", xaxis=dict(range=[0, 1.25], title="probability"),
                   yaxis=dict(autorange="reversed"), legend=dict(orientation="h", y=-0.35))


def waterfall(terms: pd.DataFrame, logit: float, finding: str) -> go.Figure:
    """The finding's logit as a waterfall: bias, the strongest patterns, the rest, unassigned, error.
    Pattern terms are labelled in their category's colour."""
    labels = []
    for t, cat in zip(terms["term"], terms["category"]):
        name = t if len(t) <= 38 else t[:36] + "…"
        c = CATEGORY_COLORS.get(cat) if isinstance(cat, str) else None
        labels.append(f"<span style='color:{c}'>■</span> {name}" if c else name)
    y = labels + [f"<b>logit {finding}</b>"]
    x = list(terms["value"]) + [logit]
    fig = go.Figure(go.Waterfall(
        orientation="h", y=y, x=x, measure=["relative"] * len(terms) + ["total"],
        text=[f"{v:+.2f}" for v in x], textposition="outside", cliponaxis=False,
        increasing=dict(marker=dict(color=POS)), decreasing=dict(marker=dict(color=NEG)),
        totals=dict(marker=dict(color=TOTAL)), connector=dict(line=dict(color="#bbb", width=1)),
        hovertemplate="%{y}<br>%{x:+.3f}<extra></extra>"))
    fig = _layout(fig, height=max(320, 26 * len(y) + 80), title=f"{finding}: the logit, term by term",
                  yaxis=dict(autorange="reversed"), xaxis_title="logit contribution", showlegend=False)
    fig.update_layout(margin=dict(r=60))  # room for the value labels outside the bars
    return fig


def audit_links(links: pd.DataFrame, top: int = 12) -> go.Figure:
    d = links.head(top).iloc[::-1]
    names = [("★ " if p else "") + f"{n} → {f}" for n, f, p in zip(d["name"], d["finding"], d["planted"])]
    fig = go.Figure(go.Bar(x=d["net_share"], y=names, orientation="h",
                           marker_color=[CATEGORY_COLORS.get(c, CATEGORY_COLORS["other"]) for c in d["category"]],
                           customdata=np.stack([d["carried_share"], d["images"]], axis=1),
                           hovertemplate="%{y}<br>net push %{x:.2%} of the finding's evidence<br>"
                                         "carried either way %{customdata[0]:.2%}<br>on %{customdata[1]} images"
                                         "<extra></extra>"))
    fig.add_vline(x=0, line_color="#999")
    return _layout(fig, height=max(260, 28 * len(d) + 80),
                   title="Device/artifact evidence pushing a finding (net share of its evidence)",
                   xaxis=dict(tickformat=".1%"), showlegend=False)


def audit_findings(findings: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    fig.add_bar(x=findings["finding"], y=findings["device_share"], name="device (either way)",
                marker_color=CATEGORY_COLORS["device"])
    fig.add_bar(x=findings["finding"], y=findings["artifact_share"], name="artifact (either way)",
                marker_color=CATEGORY_COLORS["artifact"])
    fig.add_scatter(x=findings["finding"], y=findings["shortcut_share"], name="net push towards the finding",
                    mode="markers", marker=dict(symbol="diamond", size=13, color="#111"))
    return _layout(fig, height=300, barmode="stack", title="Share of each finding's evidence carried by device "
                   "and artifact patterns", yaxis_tickformat=".0%")
