"""Search the run: patterns for a text, patterns like a pattern, images like an image (or an upload)."""

import streamlit as st

import appkit as ak
from sae_cxr import app_data as ad

run = ak.current_run()
st.title("Search")


def pattern_hits(hits) -> None:
    if hits.empty:
        st.info("Nothing found.")
        return
    ak.warm(run, [(int(h), "top", 1) for h in hits["id"]])
    grid = st.columns(4)
    for i, h in enumerate(hits.itertuples()):
        with grid[i % 4]:
            first = ak.tiles(run, int(h.id), "top", 1, "none")
            if first:
                st.image(first[0].image, width="stretch")
            st.markdown(f"{ak.category_badge(h.category)} score {h.score:.3f}", unsafe_allow_html=True)
            ak.page_link("pattern", f"#{h.id} {h.label or ''}", id=int(h.id))


def image_hits(hits) -> None:
    if hits.empty:
        st.info("Nothing found.")
        return
    grid = st.columns(6)
    for i, h in enumerate(hits.itertuples()):
        with grid[i % 6]:
            st.image(ak.thumb(run, str(h.id)), caption=f"{h.score:.3f}", width="stretch")
            ak.page_link("image", str(h.id), id=str(h.id))


def body() -> None:
    if not ak.need(run, "galleries"):
        return
    k = st.sidebar.slider("results", 4, 40, 12, 4, key="search_k")
    by_text, by_pattern, by_image = st.tabs(["by text", "by pattern", "by image"])
    with by_text:
        q = st.text_input("Describe what a pattern should respond to", value=st.query_params.get("q", ""),
                          placeholder="e.g. pacemaker, right pleural effusion, burned-in text", key="search_q")
        if q.strip():
            try:
                pattern_hits(ak.search(run, "text", q.strip(), k))
            except ValueError as e:
                st.error(f"{e}")
    with by_pattern:
        table = ak.data("pattern_table", run)
        pid = st.number_input("pattern id", 0, len(table) - 1, value=ak.query_int("pattern", 0) or 0, key="search_pid")
        st.caption(f"#{pid}: {table.iloc[int(pid)]['label']}")
        pattern_hits(ak.search(run, "pattern", int(pid), k))
    with by_image:
        src = st.radio("query image", ["from the run", "upload"], horizontal=True, key="search_src")
        if src == "from the run":
            rid = st.text_input("image id", value=st.query_params.get("image", ""), key="search_img",
                                placeholder="a record id of this run, e.g. from the Image explorer")
            if rid.strip():
                try:
                    st.image(ak.thumb(run, rid.strip(), 200), caption=f"query {rid.strip()}")
                    image_hits(ak.search(run, "image", rid.strip(), k))
                except KeyError as e:
                    st.error(f"{e.args[0] if e.args else e}")
        else:
            up = st.file_uploader(f"PNG, JPEG or DICOM, up to {ad.MAX_UPLOAD_MB} MB (kept in memory only)",
                                  max_upload_size=ad.MAX_UPLOAD_MB, key="search_upload")
            if up is not None:
                try:
                    a = ak.upload_analysis(run, up.getvalue(), up.name)
                except ad.UploadError as e:
                    st.error(f"{e}. Try a PNG, a JPEG or a DICOM image.")
                else:
                    st.image(ad.encode(ad.render_tile(a.image, None, (), 200)), caption=up.name)
                    image_hits(ak.models(run).similar_to_upload(a, k))


ak.guard(body)
