"""The RayService generator (``python -m viscy.serve.kuberay``) and the committed ``rayservice.yaml``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

from viscy.config import ConfigError, load_config
from viscy.serve import kuberay
from viscy.serve.config import ServeConfig

ROOT = Path(__file__).resolve().parents[2]
SERVE_YAML = "configs/serve.yaml"
COMMITTED = ROOT / kuberay.OUTPUT


@pytest.fixture(autouse=True)
def _at_repository_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the committed file was generated from the relative path configs/serve.yaml


def committed() -> dict:
    return yaml.safe_load(COMMITTED.read_text())


def image() -> str:
    return committed()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def test_committed_rayservice_is_what_the_generator_makes_now() -> None:
    """Hand edits of rayservice.yaml, or a serve.yaml changed without regenerating, fail here."""
    manifest = kuberay.rayservice_manifest(SERVE_YAML, image=image())
    assert committed()["spec"]["serveConfigV2"] == manifest["spec"]["serveConfigV2"]
    assert committed() == yaml.safe_load(kuberay.render(manifest, "x"))
    expected = kuberay.render(manifest, kuberay.command_line(SERVE_YAML, image()))
    assert COMMITTED.read_text() == expected, f"regenerate it: {kuberay.command_line(SERVE_YAML, image())}"


def test_main_prints_the_committed_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert kuberay.main([SERVE_YAML, "--image", image()]) == 0
    assert capsys.readouterr().out == COMMITTED.read_text()


def test_pod_settings_are_viscy_serves_but_host_paths_and_token() -> None:
    """The same ServeConfig as ``viscy serve --config configs/serve.yaml``, apart from what a pod needs."""
    local = load_config(ServeConfig, ROOT / SERVE_YAML)
    pod = ServeConfig.model_validate(yaml.safe_load(committed()["spec"]["serveConfigV2"]))
    assert pod.host == "0.0.0.0" and local.host == "127.0.0.1"
    shared = PurePosixPath(kuberay.SHARED_MOUNT)
    assert [PurePosixPath(p) for p in pod.models] == [p if p.is_absolute() else shared / p for p in local.models]
    assert local.auth_token_env is None and local.auth_token_file is None
    assert pod.auth_token_env == kuberay.SERVE_TOKEN_ENV
    rewritten = {"host": local.host, "models": local.models, "auth_token_env": local.auth_token_env}
    assert pod.model_copy(update=rewritten) == local


def test_every_ray_container_reads_the_serve_token_from_the_secret() -> None:
    cluster = committed()["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        secret = env[kuberay.SERVE_TOKEN_ENV]["valueFrom"]["secretKeyRef"]
        assert secret == {"name": kuberay.SERVE_TOKEN_SECRET, "key": "token"}
        assert "serve" in {p["name"] for p in container["ports"]}


def test_every_pod_and_container_of_any_generated_manifest_runs_restricted() -> None:
    """For any image, not only the committed file's: tests/clusters/test_cluster_files.py checks that one."""
    restricted = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    cluster = kuberay.rayservice_manifest(SERVE_YAML, image="reg/viscy:9.9.9-cpu")["spec"]["rayClusterConfig"]
    assert cluster["autoscalerOptions"] == {"securityContext": restricted}
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 100,
            "fsGroup": 100,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        assert [c["securityContext"] for c in pod["containers"]] == [restricted]
    first = kuberay.container_security_context()
    first["capabilities"]["drop"].append("x")
    assert kuberay.container_security_context() == restricted, "each call returns a fresh mapping"


def test_a_configured_token_and_absolute_paths_are_kept(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / SERVE_YAML).read_text())
    args = raw["applications"][0]["args"]
    args["models"] = ["/opt/models/a.onnx", "rel/b.onnx"]
    args["auth_token_env"] = "MY_TOKEN"
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(raw))
    serve = kuberay.pod_serve_config(path)
    out = serve["applications"][0]["args"]
    assert out["models"] == ["/opt/models/a.onnx", "/mnt/shared/rel/b.onnx"]
    assert out["auth_token_env"] == "MY_TOKEN"
    assert serve["http_options"] == {"host": "0.0.0.0", "port": 8000, "request_timeout_s": 300}


def test_gpu_image_follows_the_cpu_tag() -> None:
    assert kuberay.gpu_image_for("reg/viscy:1.2.3-cpu") == "reg/viscy:1.2.3-cu128"
    assert kuberay.gpu_image_for("reg/viscy:custom") == "reg/viscy:custom"
    manifest = kuberay.rayservice_manifest(SERVE_YAML, image="reg/viscy:1.2.3-cpu")
    groups = {g["groupName"]: g for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert groups["gpu"]["template"]["spec"]["containers"][0]["image"] == "reg/viscy:1.2.3-cu128"
    assert groups["cpu"]["template"]["spec"]["containers"][0]["image"] == "reg/viscy:1.2.3-cpu"


def test_a_bad_serve_config_is_refused_with_serveconfigs_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = yaml.safe_load((ROOT / SERVE_YAML).read_text())
    raw["applications"][0]["args"]["stainer"]["num_gpus"] = -1
    raw["applications"][0]["args"]["stainer"]["tile_size"] = 512
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as viscy_serve:
        load_config(ServeConfig, path)  # what `viscy serve --config bad.yaml` reports
    with pytest.raises(ConfigError) as generator:
        kuberay.rayservice_manifest(path)
    assert str(generator.value) == str(viscy_serve.value)
    assert "stainer.num_gpus" in str(generator.value) and "unknown key 'stainer.tile_size'" in str(generator.value)
    assert kuberay.main([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and str(viscy_serve.value) in captured.err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw["applications"][0].update(import_path="other:app"), "exactly one application"),
        (lambda raw: raw.update(port=9000), "keys beside Ray Serve's (port)"),
    ],
)
def test_configs_a_rayservice_cannot_carry_are_refused(tmp_path: Path, change, message: str) -> None:
    raw = yaml.safe_load((ROOT / SERVE_YAML).read_text())
    change(raw)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        kuberay.rayservice_manifest(path)


def test_a_plain_viscy_serve_config_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text("models: [demo_output/model]\n")
    load_config(ServeConfig, path)  # valid for viscy serve ...
    with pytest.raises(ConfigError, match="not a Ray Serve config"):
        kuberay.rayservice_manifest(path)  # ... but not a serveConfigV2


def test_the_generator_imports_no_ray() -> None:
    code = (
        "import sys, viscy.serve.kuberay\n"
        "ray = sorted(m for m in sys.modules if m.split('.')[0] == 'ray')\n"
        "sys.exit(f'imported {ray}' if ray else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
