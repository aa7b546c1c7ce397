"""Every dashboard page rendered with streamlit's AppTest on the tiny run: no exception, no error
message, and the elements the page exists for (tables, charts, the waterfall, the explanation)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from sae_cxr.findings import FINDINGS  # noqa: E402
from tests.app.conftest import APP, SHORTCUT  # noqa: E402


def open_page(page: str | None, **params: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    if page:
        at.query_params["page"] = page
    for k, v in params.items():
        at.query_params[k] = str(v)
    return at.run()


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def charts(at: AppTest) -> list[dict]:
    """The plotly figures of the page, as their JSON specs."""
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def texts(at: AppTest) -> str:
    return "\n".join(str(e.value) for kind in ("markdown", "caption", "success", "warning", "info")
                     for e in getattr(at, kind))


def links(at: AppTest, page: str, here: bool = False) -> list[str]:
    """Query strings of the in-app links to `page` (`here`: the page being shown, whose links name no page)."""
    return [p.proto.query_string for p in at.get("page_link") if p.proto.page == ("" if here else page)]


def test_overview_shows_data_backbone_classifier_ensemble_and_patterns(tiny_run, use_run):
    use_run(tiny_run)
    at = open_page(None)
    assert_clean(at)
    assert at.title[0].value == "Run tiny"
    headers = [h.value for h in at.header]
    assert headers == ["Data set", "Backbone", "Classifier", "Transcoder ensemble", "Patterns", "Labels", "Attribution"]
    titles = [c["layout"]["title"]["text"] for c in charts(at)]
    assert any("AUROC" in t for t in titles)
    assert {"FVU per member (held-out)", "L0 per member", "Dead latents per member", "Patterns by category"} <= set(titles)
    auroc = next(c for c in charts(at) if "AUROC" in c["layout"]["title"]["text"])
    assert set(auroc["data"][0]["x"]) == set(FINDINGS)
    members = str(tiny_run.manifest()["config"]["transcoders"]["n_members"])
    assert any(m.label == "members" and m.value == members for m in at.metric)
    assert SHORTCUT in texts(at)
    assert len(at.dataframe) >= 1  # the stage table


def test_patterns_table_lists_and_filters_patterns(tiny_run, use_run):
    use_run(tiny_run)
    at = open_page("patterns")
    assert_clean(at)
    df = at.dataframe[0].value
    from sae_cxr.patterns import load_patterns

    n = len(load_patterns(tiny_run)[0])
    assert len(df) == n and {"label", "category", "stability", "verification", "effect:Edema"} <= set(df.columns)
    cats = at.multiselect(key="pt_cats")
    one = cats.options[0]
    cats.set_value([one]).run()
    assert_clean(at)
    filtered = at.dataframe[0].value
    assert 0 < len(filtered) < n and set(filtered["category"]) == {one}
    at.selectbox(key="pt_finding").set_value("Edema").run()
    eff = at.dataframe[0].value["effect:Edema"].abs().to_numpy()
    assert np.all(np.diff(eff) <= 1e-12)  # strongest effect on Edema first


def test_pattern_page_by_deep_link(tiny_run, use_run):
    use_run(tiny_run)
    at = open_page("pattern", id=2)
    assert_clean(at)
    assert at.title[0].value.startswith("Pattern 2: ")
    titles = [c["layout"]["title"]["text"] for c in charts(at)]
    assert any(t.startswith("Activation density") for t in titles) and "Logit effect per unit of activation" in titles
    effect = next(c for c in charts(at) if c["layout"]["title"]["text"].startswith("Logit effect"))
    assert list(effect["data"][0]["y"]) == list(FINDINGS)
    assert len(at.get("image")) >= 6  # the top-k gallery with maps, quantile samples, similar patterns
    assert links(at, "image")  # each gallery image opens in the image explorer
    assert [q for q in links(at, "pattern", here=True) if q != "id=2"]  # similar patterns
    assert {"Top activating images", "Similar patterns"} <= {s.value for s in at.subheader}


def test_pattern_page_unknown_id_says_so(tiny_run, use_run):
    use_run(tiny_run)
    at = open_page("pattern", id=100000)
    assert not at.exception
    assert "does not exist" in at.error[0].value
    assert at.title[0].value.startswith("Pattern 0: ")


def test_image_page_by_deep_link_shows_predictions_waterfall_and_explanations(tiny_run, use_run):
    use_run(tiny_run)
    from sae_cxr.attribution import load_predictions

    rid = str(load_predictions(tiny_run)[0]["record_id"].iloc[0])
    at = open_page("image", id=rid, finding="Edema")
    assert_clean(at)
    figs = charts(at)
    water = [c for c in figs if c["data"][0]["type"] == "waterfall"]
    assert len(water) == 1 and water[0]["layout"]["title"]["text"].startswith("Edema")
    w = water[0]["data"][0]
    assert w["measure"][-1] == "total" and any("error" in y for y in w["y"])
    assert abs(sum(w["x"][:-1]) - w["x"][-1]) < 1e-3  # the terms add up to the logit
    preds = next(c for c in figs if c["layout"]["title"]["text"] == "Predictions")
    assert list(preds["data"][0]["y"]) == list(FINDINGS)
    body = texts(at)
    assert "**For a clinician**" in body and "**For a lay reader**" in body and "Edema" in body
    assert at.subheader[0].value == "Explanation"
    assert links(at, "pattern")  # the top patterns link to their pages
    assert len(at.get("image")) >= 3  # the image, and heatmaps and thumbnails of the top patterns
    at.button_group[0].set_value("Cardiomegaly").run()  # another finding: the waterfall and the link follow
    assert_clean(at)
    water = [c for c in charts(at) if c["data"][0]["type"] == "waterfall"]
    assert water[0]["layout"]["title"]["text"].startswith("Cardiomegaly")
    assert at.query_params["finding"] == "Cardiomegaly"


def test_image_page_unknown_id_and_bad_finding_are_messages(tiny_run, use_run):
    use_run(tiny_run)
    at = open_page("image", id="no-such-image", finding="Pneumonia")
    assert not at.exception
    assert any("not in run tiny" in e.value for e in at.error)
    assert any("Pneumonia" in w.value for w in at.warning)
    assert [c for c in charts(at) if c["data"][0]["type"] == "waterfall"]  # falls back to a real image


def test_search_by_text_pattern_and_image(tiny_run, use_run):
    use_run(tiny_run)
    at = open_page("search")
    assert_clean(at)
    by_pattern = links(at, "pattern")
    assert by_pattern  # the by-pattern tab shows neighbours of pattern 0 at once
    at.text_input(key="search_q").set_value("pacemaker").run()
    assert_clean(at)
    assert len(links(at, "pattern")) > len(by_pattern)
    rid = _a_record(tiny_run)
    at.text_input(key="search_img").set_value(rid).run()
    assert_clean(at)
    assert links(at, "image") and all(q.startswith("id=") for q in links(at, "image"))
    at.text_input(key="search_img").set_value("nope").run()
    assert not at.exception and any("nope" in e.value for e in at.error)


def _a_record(run) -> str:
    from sae_cxr.ingest import read_records_table

    return str(read_records_table(run)["id"].iloc[0])


def test_audit_ranks_device_and_artifact_evidence_and_marks_the_planted_shortcut(tiny_run, use_run):
    use_run(tiny_run)
    at = open_page("audit")
    assert_clean(at)
    assert at.success and SHORTCUT in at.success[0].value and "strongest" in at.success[0].value
    figs = charts(at)
    assert any("Device/artifact evidence" in c["layout"]["title"]["text"] for c in figs)
    table = at.dataframe[0].value
    assert {"link", "net_share", "carried_share", "patterns"} <= set(table.columns)
    assert list(table["net_share"]) == sorted(table["net_share"], reverse=True)
    assert table["link"].iloc[0] == "★ pacemaker → Cardiomegaly"  # the planted shortcut comes first
    assert at.selectbox(key="audit_finding").value in FINDINGS
    at.toggle(key="audit_full").set_value(True).run()  # the batch report's full-decomposition view
    assert_clean(at)
    full = next(d.value for d in at.dataframe if "pattern_id" in d.value.columns and "swing" in d.value.columns)
    assert set(full["finding"]) <= set(FINDINGS) and len(full) > 0
    assert full["category"].isin(["device", "artifact"]).all() and "separation" in full.columns
    contrasts = next(d.value for d in at.dataframe if "contrast" in d.value.columns)  # the graded view
    assert contrasts["category"].isin(["device", "artifact"]).all()
    for _, t in contrasts.groupby("finding"):
        assert list(t["contrast"]) == sorted(t["contrast"], reverse=True) and list(t["rank"]) == list(range(1, len(t) + 1))
    labels = next(d.value for d in at.dataframe if "planted" in d.value.columns and "swing" in d.value.columns)
    cardio = labels[labels["finding"] == "Cardiomegaly"]
    assert list(cardio["swing"]) == sorted(cardio["swing"], reverse=True)
    assert cardio["planted"].iloc[0] and cardio["label"].iloc[0] == "pacemaker"  # the graded view finds it
    at.toggle(key="audit_full").set_value(False).run()
    at.selectbox(key="audit_split").set_value("all").run()  # every attributed split together
    assert_clean(at)
    assert "Over all attributed splits' stored decompositions" in texts(at)


def test_reports_page_opens_the_report_stage_output_in_place(tiny_run, partial_run, use_run):
    use_run(tiny_run)
    at = open_page("reports")
    assert_clean(at)
    assert "test" in at.selectbox(key="rep_name").options  # the report stage wrote reports/test/
    pages = at.selectbox(key="rep_page_test").options
    assert pages[0] == "index.html"
    frames = at.get("iframe")
    index = (tiny_run.path / "reports" / "test" / "index.html").read_text()
    assert len(frames) == 1 and frames[0].proto.srcdoc == index
    assert any("evidence.csv" in m.value for m in at.markdown)
    use_run(partial_run)
    at = open_page("reports")
    assert not at.exception and "No reports yet" in at.info[0].value


def test_pages_of_an_unfinished_run_say_which_stage_to_run(partial_run, use_run):
    use_run(partial_run)
    for page in ("overview", "patterns", "pattern", "image", "search", "audit", "reports"):
        at = open_page(page)
        assert not at.exception, (page, [e.value for e in at.exception])
        if page not in ("overview", "reports"):
            assert any("has not finished" in w.value and "sae-cxr" in w.value for w in at.warning), page


def test_no_run_anywhere_is_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_CXR_ARTIFACTS", str(tmp_path))
    monkeypatch.delenv("SAE_CXR_RUN", raising=False)
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert "No run found" in at.error[0].value


def test_sidebar_picks_another_run_by_query(tiny_run, partial_run, use_run):
    use_run(tiny_run)
    at = open_page("overview", run="partial")
    assert not at.exception
    assert at.title[0].value == "Run partial"
    assert set(at.sidebar.selectbox[0].options) >= {"tiny", "partial"}
