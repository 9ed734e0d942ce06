"""`python -m raytrain_app.ckpt show|export` on a checkpoint folder on S3 (the local S3 server); in local folders:
tests/unit/test_ckpt.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raytrain_app.checkpoint.format import save_checkpoint_dir
from raytrain_app.ckpt import main
from raytrain_app.storage.location import parse_location
from raytrain_app.storage.publish import publish_file
from tests.conftest import make_bucket, s3_uri
from tests.helpers import outputs, trained_state


def test_show_and_export_on_s3(tmp_path: Path, s3_endpoint: str, capsys: pytest.CaptureFixture) -> None:
    local = tmp_path / "checkpoint_step=000012"
    save_checkpoint_dir(str(local), trained_state())
    bucket = make_bucket(s3_endpoint, "inspect")
    folder = parse_location(s3_uri(bucket, "runs/run-x/checkpoint_step=000012", s3_endpoint))
    for name in ("state.pt", "meta.json", "manifest.json"):
        publish_file(str(local / name), folder.join(name))
    assert main(["show", folder.uri]) == 0
    out = capsys.readouterr().out
    assert "global step 12" in out and "Manifest: whole" in out
    target = parse_location(s3_uri(bucket, "exports/model.safetensors", s3_endpoint))
    assert main(["export", folder.uri, "--format", "safetensors", target.uri]) == 0
    from safetensors.torch import load

    assert torch.equal(outputs(load(target.read_bytes())), outputs(trained_state()["model_state_dict"]))
