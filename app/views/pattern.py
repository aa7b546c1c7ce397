"""One pattern: its label, scores, density, gallery with spatial maps, effects and neighbours."""

import streamlit as st

import appkit as ak
import plots
from sae_cxr import app_data as ad

run = ak.current_run()


def gallery(pid: int, kind: str, limit: int, boxes: str, cols: int = 5) -> None:
    tl = ak.tiles(run, pid, kind, limit, boxes)
    if not tl:
        st.info("No images of this kind for this pattern.")
        return
    grid = st.columns(cols)
    for i, t in enumerate(tl):
        with grid[i % cols]:
            st.image(t.image, caption=f"{t.split} · act {t.activation:.3g}")
            ak.page_link("image", t.record_id, id=t.record_id)


def body() -> None:
    if not ak.need(run, "patterns"):
        return
    table = ak.data("pattern_table", run)
    n = len(table)
    pid = ak.query_int("id", 0)
    if pid is None or not 0 <= pid < n:
        st.error(f"Pattern {pid} does not exist: this run has patterns 0 to {n - 1}.")
        pid = 0
    pid = int(st.sidebar.number_input("pattern id", 0, n - 1, value=pid, step=1, key=f"pat_id_{pid}"))
    st.query_params["id"] = str(pid)  # always sent: a link to this same page does not update the address bar
    row = table[table["pattern_id"] == pid].iloc[0]
    st.title(f"Pattern {pid}: {row['label']}")
    st.markdown(ak.category_badge(row["category"]) +
                (" &nbsp;⚠️ <b>label failed verification</b>" if row["flagged"] else ""), unsafe_allow_html=True)
    if row.get("description"):
        st.caption(row["description"])
    c = st.columns(6)
    c[0].metric("stability", f"{row['stability']:.2f}", help="share of ensemble members that found it")
    c[1].metric("members", int(row["n_members"]))
    c[2].metric("frequency", f"{row['frequency']:.1%}", help="share of images where it fires")
    c[3].metric("monosemanticity", ak.fmt(row["monosemanticity"]),
                delta=f"{row['monosemanticity'] - row['monosemanticity_random']:+.2f} vs random"
                if "monosemanticity_random" in row else None)
    c[4].metric("verification", ak.fmt(row["verification"], 2), help="balanced accuracy on held-out images")
    if "best_concept" in row and isinstance(row["best_concept"], str):
        c[5].markdown(f"**best planted concept**  \n`{row['best_concept']}`  \nAUROC {row['concept_auroc']:.3f}",
                      help="the phantom concept its activation detects best (ground truth)")

    left, right = st.columns(2)
    if ad.stage_done(run, "galleries"):
        ak.chart(plots.density(ak.data("pattern_density", run, pid)), where=left)
    ak.chart(plots.effect_bars(ad.pattern_effects(row)), where=right)

    if not ak.need(run, "galleries"):
        return
    try:
        hits = ak.search(run, "pattern", pid, 10)
    except FileNotFoundError as e:
        hits = None
        st.info(f"Similar patterns are unavailable: {e}")
    similar = [] if hits is None else [int(h) for h in hits["id"]]
    # one backbone batch for every image of the page that needs a map (not one per gallery)
    ak.warm(run, [(pid, "top", 20), (pid, "quantile", 20)] + [(h, "top", 1) for h in similar])

    boxes = st.segmented_control("ground-truth boxes", ["pattern", "all", "none"], default="pattern",
                                 key="pat_boxes",
                                 help="pattern: only the boxes of the concept the label names") or "pattern"
    st.subheader("Top activating images")
    st.caption("The pattern's spatial map (its encoder response to the patch tokens) is overlaid; "
               "ground-truth boxes where the data set has them. Click an image id to explain that image.")
    gallery(pid, "top", 20, boxes)
    st.subheader("Quantile samples: weak to strong firings")
    gallery(pid, "quantile", 20, boxes)
    more = st.segmented_control("more images", ["held-out top images", "images where it is silent"], key="pat_more",
                                help="held-out: the test splits' strongest images, used to verify the label")
    if more == "held-out top images":
        gallery(pid, "heldout_top", 10, boxes)
    elif more == "images where it is silent":
        gallery(pid, "negative", 8, "none", cols=8)
    enr = ak.data("pattern_enrichment", run, pid)
    if len(enr):
        st.subheader("Over-represented among its top images")
        st.dataframe(enr, hide_index=True, width="stretch",
                     column_config={"rate": st.column_config.NumberColumn(format="percent"),
                                    "base": st.column_config.NumberColumn(format="percent"),
                                    "lift": st.column_config.NumberColumn(format="%.1f×")})
    if hits is not None:
        st.subheader("Similar patterns")
        grid = st.columns(5)
        for i, h in enumerate(hits.itertuples()):
            with grid[i % 5]:
                first = ak.tiles(run, int(h.id), "top", 1, "none")
                if first:
                    st.image(first[0].image)
                ak.page_link("pattern", f"#{h.id} {h.label or ''} ({h.score:.2f})", id=int(h.id))


ak.guard(body)
