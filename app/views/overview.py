"""Overview: the data set, the backbone, the classifier, the ensemble's health, the patterns."""

import streamlit as st

import appkit as ak
import plots
from sae_cxr import app_data as ad

run = ak.current_run()
st.title(f"Run {run.path.name}")


def body() -> None:
    stages = ak.data("stage_table", run)
    done = int((stages["status"] == "done").sum())
    with st.expander(f"Pipeline: {done} of {len(stages)} stages done", expanded=done < len(stages)):
        st.dataframe(stages, hide_index=True, width="stretch",
                     column_config={"seconds": st.column_config.NumberColumn(format="%.1f")})
    if not ak.need(run, "data"):
        return
    ds = ak.data("dataset_summary", run)
    st.header("Data set")
    c = st.columns([1, 1, 3])
    c[0].metric("source", ds["source"])
    c[1].metric("images", f"{ds['records']:,}")
    c[2].markdown("**splits** " + " · ".join(f"{k}: {v:,}" for k, v in ds["splits"].items())
                  + (f"\n\n**planted shortcut** `{ds['shortcut']}` (nuisance:finding:rate; broken in test_shifted)"
                     if ds.get("shortcut") else ""))
    if len(ds["prevalence"]):
        ak.chart(plots.prevalence_bars(ds["prevalence"]))

    if ak.need(run, "extract"):
        st.header("Backbone")
        bb = ak.data("backbone_summary", run)
        c = st.columns([2, 1, 1, 1])
        c[0].metric("backbone", bb["name"] or bb["spec"])
        c[1].metric("embedding", f"{bb['embed_dim']}-d")
        c[2].metric("input size", f"{bb['image_size']} px")
        c[3].metric("patch grid", "×".join(map(str, bb["grid"])) if bb["grid"] else "none")
        st.caption(f"spec `{bb['spec']}` · weights sha256 `{bb['weights_sha256']}…` · classifier input "
                   f"{bb['input_dim']}-d ({bb['mode']}) · text tower: {'yes' if bb['has_text'] else 'no'} · "
                   f"patch tokens kept for: {bb['patches']}")

    if ak.need(run, "train-classifier"):
        st.header("Classifier")
        ak.chart(plots.auroc_bars(ak.data("classifier_metrics", run)))

    if ak.need(run, "train-transcoders"):
        st.header("Transcoder ensemble")
        cfg = ak.data("ensemble_config", run)
        health = ak.data("ensemble_health", run)
        c = st.columns(5)
        c[0].metric("members", cfg.get("n_members"))
        c[1].metric("latents / member", cfg.get("n_latents"))
        c[2].metric("k", str(cfg.get("k")))
        c[3].metric("median FVU", f"{health['fvu'].median():.4f}")
        if "loss_recovered" in health:
            c[4].metric("median loss recovered", f"{health['loss_recovered'].median():.3f}")
        cols = st.columns(3)
        for col, (name, title) in zip(cols, [("fvu", "FVU per member (held-out)"), ("l0", "L0 per member"),
                                             ("dead_fraction", "Dead latents per member")]):
            if name in health:
                ak.chart(plots.member_metric(health, name, title), where=col)
        hist = ak.data("training_history", run)
        if len(hist):
            ak.chart(plots.history_curve(hist))

    if ak.need(run, "patterns"):
        st.header("Patterns")
        summ = ak.data("patterns_summary", run)
        table = ak.data("pattern_table", run)
        c = st.columns(4)
        c[0].metric("patterns", len(table))
        c[1].metric("latents in patterns", f"{summ.get('latents_in_patterns', 0):,} / {summ.get('latents', 0):,}")
        c[2].metric("match threshold", f"{summ.get('threshold', float('nan')):.3f} ({summ.get('threshold_method')})")
        c[3].metric("median stability", f"{table['stability'].median():.2f}")
        left, right = st.columns(2)
        ak.chart(plots.category_bars(ad.category_counts(table)), where=left)
        ak.chart(plots.pattern_scatter(table), where=right)
        rec = ak.data("concept_recovery", run)
        if len(rec):
            with st.expander(f"Planted concepts recovered: {summ['concept_recovery']['recovered']} of "
                             f"{summ['concept_recovery']['concepts']} at AUROC ≥ {summ['concept_recovery']['threshold']}"):
                st.dataframe(rec, hide_index=True)
        png = ak.data("run_png", run, "patterns/threshold.png")
        if png:
            with st.expander("How the patterns were matched across members"):
                st.image(png)

    if ad.stage_done(run, "label"):
        st.header("Labels")
        table = ak.data("pattern_table", run)
        verified = table["verification"].notna()
        c = st.columns(3)
        c[0].metric("labelled patterns", f"{int((table['category'] != 'unlabelled').sum()):,} / {len(table):,}")
        c[1].metric("verified", f"{int(verified.sum()):,}", help="labels scored on held-out images")
        c[2].metric("failed verification", f"{int(table['flagged'].sum()):,}")
        ev = ak.data("labels_eval", run)
        if len(ev):
            st.caption("Labelers against the planted concepts (patterns whose best concept is known):")
            st.dataframe(ev, hide_index=True, column_config={
                "named_correctly": st.column_config.NumberColumn("named correctly", format="percent"),
                "category_correct": st.column_config.NumberColumn("category correct", format="percent")})

    if ak.need(run, "attribute"):
        st.header("Attribution")
        s = ak.data("attribution_summary", run)
        f = s.get("faithfulness", {})
        c = st.columns(4)
        c[0].metric("predictions decomposed", f"{s.get('predictions', 0):,}")
        c[1].metric("completeness error", f"{s.get('completeness_error', float('nan')):.2g}")
        c[2].metric("patterns / prediction (median)", s.get("patterns_per_prediction", {}).get("median"))
        if "sufficiency@5" in f:
            c[3].metric("sufficiency@5 (lower = top 5 carry it)", f"{f['sufficiency@5']:.2f}")
        png = ak.data("run_png", run, "attributions/deletion.png")
        if png:
            with st.expander("Deletion curves (faithfulness)"):
                st.image(png)


ak.guard(body)
