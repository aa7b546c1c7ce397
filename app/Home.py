"""The sae-cxr dashboard: `streamlit run app/Home.py -- --run artifacts/demo`.

This entry point is the frame around every page: the sidebar run picker and the router.
Deep links: `?page=pattern&id=12`, `?page=image&id=ID&finding=Edema` (any page key of
appkit.PAGES; `?run=NAME` picks another run of the artifacts folder).
"""

from __future__ import annotations

import sys
from pathlib import Path

import logging

import streamlit as st

from sae_cxr.serving import install_secret_filter

sys.path.insert(0, str(Path(__file__).resolve().parent))  # appkit and plots live next to this file

import appkit  # noqa: E402

st.set_page_config(page_title="sae-cxr", page_icon=":material/radiology:", layout="wide")
for _logger in (logging.getLogger(), logging.getLogger("streamlit"), logging.getLogger("sae_cxr")):
    install_secret_filter(_logger)  # API keys (an LMM endpoint's) never reach the server's log

st.session_state["_run"] = appkit.select_run()
run = st.session_state["_run"]
if run is not None:
    st.sidebar.caption(f"`{run.path}`")

target = st.query_params.get("page")
if target is not None and target not in appkit.PAGES:
    st.warning(f"?page={target!r} is not a page; pages: {', '.join(appkit.PAGES)}.")
    target = None
here = Path(__file__).resolve().parent
pages = []
for page_key, (title, icon) in appkit.PAGES.items():
    page = st.Page(here / "views" / f"{page_key}.py", title=title, icon=icon, url_path=page_key,
                   default=(page_key == (target or "overview")))
    appkit.PAGE_OBJECTS[page_key] = page
    pages.append(page)

nav = st.navigation(pages)
if run is None:
    st.stop()
nav.run()
