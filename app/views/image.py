"""Image explorer: one image (from the run or uploaded), its five predictions, the exact
decomposition of a finding down to the error term, the patterns behind it, and the explanation."""

import streamlit as st

import appkit as ak
import plots
from sae_cxr import app_data as ad
from sae_cxr.findings import FINDINGS

run = ak.current_run()
st.title("Image explorer")


def pick_run_image() -> str | None:
    records = ak.data("records_table", run)
    wanted = st.query_params.get("id")
    if wanted and wanted not in set(records["id"]):
        st.error(f"Image {wanted!r} is not in run {run.path.name}; pick one below.")
        wanted = None
    c = st.columns([2, 2, 3])
    splits = ["all", *sorted(records["split"].unique())]
    split = c[0].selectbox("split", splits, index=splits.index("test") if "test" in splits else 0, key="img_split")
    pos = c[1].selectbox("positive for", ["(any)", *FINDINGS], key="img_pos")
    r = records if split == "all" else records[records["split"] == split]
    if pos != "(any)":
        r = r[r[pos] == 1]
    ids = r["id"].tolist()
    if wanted and wanted not in ids:
        ids = [wanted, *ids]
    if not ids:
        c[2].info("No image matches these filters.")
        return None
    chosen = c[2].selectbox(f"image ({len(ids)} match)", ids, index=ids.index(wanted) if wanted else 0,
                            key=f"img_id_{wanted}")
    st.query_params["id"] = chosen  # always sent, so the address bar is a deep link to what is shown
    return chosen


def analysis_from_upload() -> ad.ImageAnalysis | None:
    bb = ak.data("backbone_summary", run)
    up = st.file_uploader(f"PNG, JPEG or DICOM, up to {ad.MAX_UPLOAD_MB} MB (kept in memory, never stored)",
                          max_upload_size=ad.MAX_UPLOAD_MB, key="img_upload")
    report = ""
    if bb["mode"] == "multimodal":
        report = st.text_area("Report text (this run's classifier reads image + report)", key="img_report",
                              placeholder="e.g. Moderate right pleural effusion. Pacemaker in place.")
    if up is None:
        st.info("Upload an image to explain it with this run's backbone, classifier and transcoders.")
        return None
    try:
        a = ak.upload_analysis(run, up.getvalue(), up.name, report)
    except ad.UploadError as e:
        st.error(f"{e}. Try another file: a PNG, a JPEG or a DICOM chest radiograph.")
        return None
    for note in a.notes:
        st.warning(note)
    return a


def show(a: ad.ImageAnalysis) -> None:
    m = ak.models(run)
    preds = m.predictions(a)
    default = ak.query_finding(str(preds.loc[preds["probability"].idxmax(), "finding"]))
    finding = st.segmented_control("finding to explain", list(FINDINGS), default=default,
                                   key=f"img_finding_{a.record_id}_{default}") or default
    if not a.uploaded:
        st.query_params["finding"] = finding
    decomp = ak.decomposition(run, a, finding)

    left, right = st.columns([2, 3])
    with left:
        boxes = a.boxes if st.toggle("ground-truth boxes", value=bool(a.boxes), disabled=not a.boxes,
                                     key="img_boxes") else ()
        st.image(ad.encode(ad.render_tile(a.image, None, boxes, 420)),
                 caption=(f"{a.record_id} · {a.split}" if a.split else a.record_id))
        if a.report:
            st.caption(f"Report: {a.report}")
        ak.chart(plots.probability_bars(preds, finding))
    with right:
        terms = ad.waterfall_terms(decomp, names={p: m.pattern_name(p) for p in
                                                  [e.pattern_id for e in decomp.patterns[:20]]})
        ak.chart(plots.waterfall(terms, decomp.logit, finding), key="waterfall")
        st.caption(f"Exact: the terms add up to the logit {decomp.logit:+.3f} (p = {decomp.probability:.3f}). "
                   f"{decomp.n_active_patterns} patterns are active; the {len(decomp.patterns)} reported ones "
                   f"cover {decomp.coverage:.0%} of their evidence.")

    st.subheader("Explanation")
    ex = m.explanations(decomp)
    c = st.columns(2)
    for col, aud, title in ((c[0], "clinician", "For a clinician"), (c[1], "lay", "For a lay reader")):
        with col.container(border=True):
            st.markdown(f"**{title}**")
            st.write(ex[aud].text)
            if ex[aud].caveats:
                st.caption("caveats: " + ", ".join(ex[aud].caveats))

    st.subheader("The patterns behind it")
    n = st.slider("patterns shown", 3, 15, 6, key="img_n")
    top = sorted(decomp.patterns, key=lambda p: -abs(p.contribution))[:n]
    ak.warm(run, [(p.pattern_id, "top", 1) for p in top])
    for p in top:
        cols = st.columns([1, 1, 3])
        cols[0].image(ak.heat_image(run, a, p.pattern_id), caption="where it fires here")
        first = ak.tiles(run, p.pattern_id, "top", 1, "pattern")
        if first:
            cols[1].image(first[0].image, caption="its strongest image")
        with cols[2]:
            name = p.label or m.pattern_name(p.pattern_id)
            st.markdown(f"**#{p.pattern_id} {name}** {ak.category_badge(p.category)}"
                        + (" ⚠️ unverified name" if p.flagged else ""), unsafe_allow_html=True)
            arrow = "towards" if p.contribution > 0 else "against"
            st.write(f"{p.contribution:+.3f} logit ({p.share:.0%} of the evidence) {arrow} {finding}; "
                     f"activation {p.activation:.3g}" + (f"; peaks in the {p.location}" if p.location else ""))
            ak.page_link("pattern", f"open pattern {p.pattern_id}", icon=":material/arrow_forward:", id=p.pattern_id)


def body() -> None:
    if not ak.need(run, "extract", "train-classifier", "train-transcoders", "patterns"):
        return
    source = st.radio("image", ["from the run", "upload"], horizontal=True, key="img_source",
                      index=0, label_visibility="collapsed")
    if source == "upload":
        a = analysis_from_upload()
    else:
        rid = pick_run_image()
        a = ak.record_analysis(run, rid) if rid else None
    if a is not None:
        show(a)


ak.guard(body)
