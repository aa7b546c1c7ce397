"""Reports: the run's batch reports (reports/), opened in place."""

import datetime as dt

import streamlit as st
import streamlit.components.v1 as components

import appkit as ak
from sae_cxr import app_data as ad

run = ak.current_run()
st.title("Reports")
INLINE_LIMIT = 30 * 2 ** 20


def body() -> None:
    reports = ad.list_reports(run)  # not cached: a report written while the app runs shows up at once
    if not reports:
        st.info(f"No reports yet in `{run.path / 'reports'}`. Batch reports are written there by the report "
                f"stage (`sae-cxr report --run {run.path}`); this page lists them as soon as they exist.")
        return
    html = [r for r in reports if r["html"]]
    other = [r for r in reports if not r["html"]]
    if html:
        names = [r["name"] for r in html]
        chosen = st.selectbox("report", names, key="rep_name",
                              format_func=lambda n: f"{n}  ({next(r for r in html if r['name'] == n)['bytes'] / 1024:.0f} kB)")
        r = next(r for r in html if r["name"] == chosen)
        st.caption(f"`{r['path']}` · written {dt.datetime.fromtimestamp(r['mtime']):%Y-%m-%d %H:%M}")
        data = ad.read_report(run, r["path"])
        st.download_button("download", data, file_name=r["path"].rsplit("/", 1)[-1], mime="text/html", key="rep_dl")
        if len(data) > INLINE_LIMIT:
            st.warning(f"This report is {len(data) / 2 ** 20:.0f} MB, too large to open in place; download it.")
        else:
            height = st.slider("height", 400, 2400, 900, 100, key="rep_height")
            components.html(data.decode("utf-8", errors="replace"), height=height, scrolling=True)
    else:
        st.info("No HTML report yet; the other report files are below.")
    if other:
        st.subheader("Other report files")
        for i, r in enumerate(other):
            c = st.columns([4, 1, 1])
            c[0].write(f"`{r['name']}`")
            c[1].write(f"{r['bytes'] / 1024:.0f} kB")
            c[2].download_button("download", ad.read_report(run, r["path"]), file_name=r["name"].rsplit("/", 1)[-1],
                                 key=f"rep_other_{i}")


ak.guard(body)
