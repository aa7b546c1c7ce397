"""Reports: the run's batch reports (reports/<split>/, written by the report stage), opened in place."""

import datetime as dt

import streamlit as st

import appkit as ak
from sae_cxr import app_data as ad

run = ak.current_run()
st.title("Reports")
INLINE_LIMIT = 30 * 2 ** 20
DOWNLOAD_LIMIT = 200 * 2 ** 20


def body() -> None:
    reports = ad.list_reports(run)  # not cached: a report written while the app runs shows up at once
    if not reports:
        st.info(f"No reports yet in `{run.path / 'reports'}`. The report stage writes one per split "
                f"(`sae-cxr report --run {run.path}`); this page lists them as soon as they exist.")
        return
    names = [r.name for r in reports]
    c = st.columns([1, 3])
    name = c[0].selectbox("report", names, key="rep_name",
                          format_func=lambda n: "reports/" if n == "." else f"{n}")
    rep = next(r for r in reports if r.name == name)
    if rep.pages:
        page = c[1].selectbox(f"page ({len(rep.pages)})", rep.pages, key=f"rep_page_{name}",
                              format_func=lambda p: p.rsplit("/", 1)[-1])
        data = ad.read_report(run, page)
        st.caption(f"`{page}` · written {dt.datetime.fromtimestamp(rep.mtime):%Y-%m-%d %H:%M} · "
                   f"{len(data) / 2 ** 20:.1f} MB · links between pages open here through the page picker; "
                   "download a page to browse it on its own")
        st.download_button("download this page", data, file_name=page.rsplit("/", 1)[-1], mime="text/html",
                           key="rep_dl")
        if len(data) > INLINE_LIMIT:
            st.warning(f"This page is {len(data) / 2 ** 20:.0f} MB, too large to open in place; download it.")
        else:
            height = st.slider("height", 400, 2400, 900, 100, key="rep_height")
            st.iframe(data.decode("utf-8", errors="replace"), height=height)
    else:
        st.info("This report has no HTML page; its files are below.")
    if rep.files or rep.documents:
        st.subheader("Tables and documents")
        if rep.documents:
            st.caption(f"json/: {rep.documents:,} per-image documents (decompositions and explanations, for programs).")
        for i, f in enumerate(rep.files):
            cols = st.columns([4, 1, 1])
            cols[0].write(f"`{f['name']}`")
            cols[1].write(f"{f['bytes'] / 1024:,.0f} kB")
            if f["bytes"] <= DOWNLOAD_LIMIT:
                cols[2].download_button("download", ad.read_report(run, f["path"]), file_name=f["name"],
                                        key=f"rep_file_{name}_{i}")


ak.guard(body)
