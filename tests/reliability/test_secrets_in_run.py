"""A planted API key used by the LMM labeler never reaches the run directory or the logs."""

from __future__ import annotations

import json
import logging
import shutil

from sae_cxr.labeling.llm_client import LLMConfig
from sae_cxr.pipeline import config_from_run, run_stage
from sae_cxr.run import RunDir
from tests.labeling.loopback import ChatServer, Reply, completion

KEY = "sk-planted-3f9c1e7a5b2d4c6e8f0a1b2c3d4e5f60"
LABEL = json.dumps({"label": "pacemaker generator", "description": "Bright box over the left upper chest.",
                    "category": "device", "confidence": 0.8})


def test_planted_key_is_sent_but_never_stored_or_logged(tiny_pipeline_run, tmp_path, monkeypatch, caplog):
    run = RunDir(shutil.copytree(tiny_pipeline_run.path, tmp_path / "run"))
    monkeypatch.setenv("SAE_CXR_PLANTED_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    with ChatServer(lambda req: Reply(body=completion(LABEL)), max_requests=400, max_seconds=120) as server:
        cfg = config_from_run(run)
        cfg.label.labelers = ("lmm", "evidence")  # the LMM's names become THE labels
        cfg.label.verify = "text"
        cfg.label.lmm = LLMConfig(base_url=server.base_url, model="tiny-test", api_key_env="SAE_CXR_PLANTED_KEY",
                                  max_retries=0)
        for stage in ("label", "explain", "report", "eval"):
            run_stage(run, stage, cfg, force=stage == "label")
        sent = [r.headers.get("authorization", "") for r in server.requests]  # lower-cased by the loopback
    assert sent and all(h == f"Bearer {KEY}" for h in sent)  # the key was really used
    labels = [json.loads(line) for line in run.sub("labels.jsonl").read_text().splitlines()]
    assert any(lab["label"] == "pacemaker generator" for lab in labels)
    leaks = [str(p.relative_to(run.path)) for p in run.path.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert leaks == []
    assert "SAE_CXR_PLANTED_KEY" in run.sub("manifest.json").read_text()  # the variable's NAME is recorded
    assert KEY not in caplog.text
