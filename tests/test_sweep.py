import json

from sae_cxr.sweep import World, headline, run_sweep, sweep_markdown
from tests.helpers import tiny_config


def test_reduced_sweep_on_two_tiny_worlds(tmp_path):
    worlds = (World("device", seed=3, size=64, shortcut="pacemaker:Cardiomegaly:0.9"),
              World("text", seed=4, size=80, prevalence_scale=0.8, shortcut="burned_in_text:Consolidation:0.9"))

    def shrink(cfg):
        tiny = tiny_config(tmp_path / "x", n=cfg.data.phantom.n)
        for section in ("classifier", "transcoders", "patterns", "attribution", "explain", "report"):
            setattr(cfg, section, getattr(tiny, section))
        return cfg

    rows = run_sweep(tmp_path / "sweep", worlds, n=300, configure=shrink)
    assert set(rows) == {"device", "text"}
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    for name, r in rows.items():
        m = json.loads((tmp_path / "sweep" / name / "eval" / "metrics.json").read_text())
        assert m["world"]["seed"] == {"device": 3, "text": 4}[name]
        assert m["shortcut"]["planted"]["nuisance"] == {"device": "pacemaker", "text": "burned_in_text"}[name]
        rec, total = (int(v) for v in r["concept_recovery"].split()[0].split("/"))
        assert total == 18 and 0 <= rec <= 18
        for key in ("labeler_named", "labeler_category", "pointing_pattern_gradcam", "deletion_area_top"):
            assert r[key] is None or 0.0 <= r[key] <= 2.0, (name, key, r[key])
        assert 0 <= r["fvu"] < 1.5 and 0 <= r["dead"] <= 1
        assert r["shortcut_rank"] is None or r["shortcut_rank"] >= 1
        assert r == {**headline(m), "seconds": r["seconds"]}
    md = (tmp_path / "sweep" / "sweep.md").read_text()
    assert md == sweep_markdown(rows, worlds) and "| text | 4 | 80 | x0.8 |" in md
