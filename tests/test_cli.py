from __future__ import annotations

import pandas as pd

from sae_cxr.cli import main


def test_phantom_command_writes_images_table_and_preview(tmp_path, capsys):
    out = tmp_path / "world"
    rc = main(["phantom", "--n", "12", "--out", str(out), "--size", "64", "--workers", "1",
               "--shortcut", "pacemaker:Cardiomegaly:0.9", "--preview", str(tmp_path / "sheet.png")])
    assert rc == 0
    df = pd.read_csv(out / "metadata.csv")
    assert len(df) == 12 and (out / "images" / f"{df.id[0]}.png").exists()
    assert (tmp_path / "sheet.png").stat().st_size > 1000
    assert "images/s" in capsys.readouterr().out


def test_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    rc = main(["phantom", "--n", "4", "--out", str(tmp_path), "--shortcut", "pacemaker"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("sae-cxr phantom: error:") and "nuisance:finding:rate" in err
