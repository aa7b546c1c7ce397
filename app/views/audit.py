"""Audit: how much of each finding's evidence device and artifact patterns carry (shortcuts)."""

import streamlit as st

import appkit as ak
import plots

run = ak.current_run()
st.title("Shortcut audit")


def body() -> None:
    if not ak.need(run, "attribute", "label"):
        return
    splits = sorted(ak.data("stored_predictions", run)["split"].unique())
    default = "test" if "test" in splits else splits[0]
    split = st.sidebar.selectbox("split", [*splits, "all"], index=splits.index(default), key="audit_split")
    audit = ak.data("nuisance_audit", run, split)
    scope = "all attributed splits'" if split == "all" else f"the {split} split's"
    st.caption(f"Over {scope} stored decompositions ({int(audit.findings['predictions'].max())} images). "
               "Net push: the signed sum of the contributions of all patterns with one device/artifact name, as a "
               "share of all the evidence (sum of |contributions|) for the finding; patterns that push both ways "
               "cancel, a shortcut pushes one way.")
    if audit.planted:
        if audit.planted_rank == 1:
            st.success(f"The planted shortcut **{audit.planted}** is the strongest device/artifact link.")
        elif audit.planted_rank:
            st.warning(f"The planted shortcut **{audit.planted}** ranks {audit.planted_rank} among the links.")
        else:
            st.warning(f"The planted shortcut **{audit.planted}** does not appear: no pattern named after it "
                       "carries evidence for its finding.")
    if audit.links.empty:
        st.info("No device or artifact pattern carries evidence in this split.")
        return
    ak.chart(plots.audit_links(audit.links))
    show = audit.links.head(15).copy()
    show["link"] = [("★ " if p else "") + f"{n} → {f}" for n, f, p in zip(show["name"], show["finding"], show["planted"])]
    st.dataframe(show[["link", "category", "net_share", "carried_share", "images", "patterns"]], hide_index=True,
                 width="stretch", key="audit_links", column_config={
                     "net_share": st.column_config.NumberColumn("net push", format="percent"),
                     "carried_share": st.column_config.NumberColumn("carried either way", format="percent"),
                     "images": st.column_config.NumberColumn("images where active"),
                     "patterns": st.column_config.ListColumn("patterns")})
    ak.chart(plots.audit_findings(audit.findings))

    if st.toggle("Full-decomposition audit, as in the batch report (every image of the split, patterns ranked "
                 "by swing; takes a few seconds the first time)", key="audit_full"):
        contrasts = ak.data("label_contrasts", run, split)
        st.caption("Detector contrast (what the planted-shortcut grade ranks by): among a finding's NEGATIVE images, "
                   "how far its logit moves when a device/artifact label's most stable pattern detects the nuisance, "
                   "with the other findings and nuisances held fixed (one least-squares fit). It catches a shortcut "
                   "that the finding's own patterns absorbed: 'carried by' shows which patterns carry the move.")
        st.dataframe(contrasts, hide_index=True, width="stretch", key="audit_label_contrasts", column_config={
            "contrast": st.column_config.NumberColumn("contrast (logit)", format="%+.3f"),
            "se": st.column_config.NumberColumn("se", format="%.3f"),
            "z": st.column_config.NumberColumn("z", format="%.1f"),
            "n_with": st.column_config.NumberColumn("negatives with it"),
            "n_without": st.column_config.NumberColumn("without"),
            "planted": st.column_config.CheckboxColumn("holds the planted shortcut")})
        full, labels = ak.data("full_audit", run, split)
        st.caption("Labels: the patterns that share a label, summed image by image (an image-wide artifact is "
                   "often split over many patterns). Swing: the spread of the summed term over images. "
                   "Separation: its mean on the finding's positives minus "
                   "negatives, the margin it supplies; a term that swings but is cancelled elsewhere has none.")
        st.dataframe(labels, hide_index=True, width="stretch", key="audit_full_labels", column_config={
            "swing": st.column_config.NumberColumn("swing (logit)", format="%.3f"),
            "separation": st.column_config.NumberColumn("separation (logit)", format="%+.3f"),
            "share": st.column_config.NumberColumn("share of evidence", format="percent"),
            "planted": st.column_config.CheckboxColumn("holds the planted shortcut")})
        ranks = full.dropna(subset=["planted_rank"])
        if audit.planted and len(ranks):
            st.caption(f"Planted shortcut's patterns: first at rank {int(ranks['planted_rank'].iloc[0])} of "
                       f"{ranks['finding'].iloc[0]}'s device/artifact patterns by swing.")
        st.dataframe(full, hide_index=True, width="stretch", column_config={
            "nuisance_share": st.column_config.NumberColumn("finding's device/artifact share", format="percent"),
            "swing": st.column_config.NumberColumn("swing (std of its term)", format="%.3f"),
            "separation": st.column_config.NumberColumn("separation", format="%+.3f"),
            "mean": st.column_config.NumberColumn("mean term", format="%+.3f"),
            "share": st.column_config.NumberColumn("share of evidence", format="percent"),
            "planted_rank": st.column_config.NumberColumn("planted rank", format="%d")})

    st.header("Inspect a finding")
    order = audit.findings["finding"].tolist()
    finding = st.selectbox("finding", order, index=0, key="audit_finding")
    pats = audit.patterns[audit.patterns["finding"] == finding].head(12)
    st.subheader(f"Device and artifact patterns pushing {finding}")
    ak.warm(run, [(int(p), "top", 1) for p in pats["pattern_id"]])
    grid = st.columns(6)
    for i, r in enumerate(pats.itertuples()):
        with grid[i % 6]:
            first = ak.tiles(run, int(r.pattern_id), "top", 1, "pattern")
            if first:
                st.image(first[0].image)
            st.markdown(f"{ak.category_badge(r.category)} net {r.net_share:+.2%}", unsafe_allow_html=True)
            ak.page_link("pattern", f"#{r.pattern_id} {r.name}", id=int(r.pattern_id))
    top_names = audit.links[(audit.links["finding"] == finding) & (audit.links["net_share"] > 0)]["name"].head(1).tolist()
    st.subheader(f"Images where {' / '.join(top_names) or 'device and artifact'} patterns push {finding} hardest")
    ex = ak.data("audit_examples", run, finding, split, tuple(top_names), 12)
    grid = st.columns(6)
    for i, r in enumerate(ex.itertuples()):
        with grid[i % 6]:
            st.image(ak.heat_image(run, ak.record_analysis(run, r.record_id), int(r.top_pattern), 200), width="stretch",
                     caption=f"+{r.push:.2f} logit · p={r.probability:.2f} · label {ak.fmt(r.label)}")
            ak.page_link("image", r.record_id, id=r.record_id, finding=finding)


ak.guard(body)
