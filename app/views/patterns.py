"""Patterns: a filterable, sortable table of every pattern; select a row to open its page."""

import streamlit as st

import appkit as ak
from sae_cxr.findings import FINDINGS

run = ak.current_run()
st.title("Patterns")


def body() -> None:
    if not ak.need(run, "patterns"):
        return
    table = ak.data("pattern_table", run)
    cats = sorted(table["category"].dropna().unique())
    c = st.columns([3, 2, 2, 2, 2])
    chosen = c[0].multiselect("category", cats, default=cats, key="pt_cats")
    text = c[1].text_input("label contains", key="pt_text")
    min_stab = c[2].slider("min stability", 0.0, 1.0, 0.0, 0.05, key="pt_stab")
    finding = c[3].selectbox("effect on", ["(any)", *FINDINGS], key="pt_finding")
    flagged = c[4].selectbox("verification", ["all", "verified", "flagged", "unverified"], key="pt_flag")
    t = table[table["category"].isin(chosen) & (table["stability"] >= min_stab)]
    if text:
        t = t[t["label"].str.contains(text, case=False, regex=False)]
    if flagged == "verified":
        t = t[t["verification"].notna() & ~t["flagged"]]
    elif flagged == "flagged":
        t = t[t["flagged"]]
    elif flagged == "unverified":
        t = t[t["verification"].isna()]
    if finding != "(any)":
        t = t.reindex(t[f"effect:{finding}"].abs().sort_values(ascending=False).index)
    st.caption(f"{len(t)} of {len(table)} patterns. Click a column header to sort; select a row to open the pattern.")
    cols = ["pattern_id", "label", "category", "stability", "frequency", "monosemanticity", "verification",
            "flagged", *[f"effect:{f}" for f in FINDINGS]]
    extra = [c for c in ("best_concept", "concept_auroc") if c in t.columns]
    cfg = {"pattern_id": st.column_config.NumberColumn("id", format="%d"),
           "stability": st.column_config.ProgressColumn("stability", min_value=0.0, max_value=1.0, format="%.2f"),
           "frequency": st.column_config.NumberColumn(format="%.3f"),
           "monosemanticity": st.column_config.NumberColumn(format="%.3f"),
           "verification": st.column_config.NumberColumn("verification", format="%.2f",
                                                         help="balanced accuracy of the label on held-out images"),
           **{f"effect:{f}": st.column_config.NumberColumn(f"→ {f}", format="%+.2f",
                                                           help=f"logit change of {f} per unit of activation")
              for f in FINDINGS},
           "concept_auroc": st.column_config.NumberColumn("concept AUROC", format="%.3f",
                                                          help="AUROC of the pattern for its best planted concept")}
    event = st.dataframe(t[cols + extra], hide_index=True, width="stretch", height=560, column_config=cfg,
                         on_select="rerun", selection_mode="single-row", key="pt_table")
    rows = event.selection.rows if event is not None and hasattr(event, "selection") else []
    if rows:
        ak.go("pattern", id=int(t.iloc[rows[0]]["pattern_id"]))
    pid = st.number_input("or open pattern id", min_value=0, max_value=int(table["pattern_id"].max()), step=1,
                          value=int(t.iloc[0]["pattern_id"]) if len(t) else 0, key="pt_open")
    ak.page_link("pattern", f"Open pattern {pid}", icon=":material/arrow_forward:", id=int(pid))


ak.guard(body)
