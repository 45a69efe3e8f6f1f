"""Static checks of the cluster definitions in ``clusters/`` and their pages in ``docs/clusters/``.

Nothing here starts a cluster: every YAML parses, every file, config, image tag and import path the files
name exists, the Dockerfile is pinned and non-root, and the KubeRay and launcher definitions keep token
auth, shared storage and GPU autoscaling.
"""

from __future__ import annotations

import ast
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from viscy.config import SERVE_IMPORT_PATH, TrainConfig, describe_schema

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
DOCS = ROOT / "docs" / "clusters"
DOCKERFILE = CLUSTERS / "docker" / "Dockerfile"
YAMLS = sorted(CLUSTERS.rglob("*.yaml"))
TEXT_FILES = sorted(p for p in CLUSTERS.rglob("*") if p.is_file()) + sorted(DOCS.glob("*.md"))
SHARED = "/mnt/shared"
RAY_TOKEN_SECRET = "viscy-ray-token"
TRAIN_KEYS = {key for key, _, _ in describe_schema(TrainConfig)}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: str) -> dict[str, Any]:
    (doc,) = _docs(CLUSTERS / path)
    return doc


def _dockerfile() -> tuple[dict[str, str], list[tuple[str, str]]]:
    """ARG defaults and the (instruction, arguments) lines of the Dockerfile, continuations joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    instructions = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]
    args: dict[str, str] = {}
    for kind, rest in instructions:
        if kind == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args.setdefault(name.strip(), value.strip().strip('"'))
    return args, instructions


def documented_images() -> set[str]:
    """The image tags the Dockerfile documents (``# image: ...``)."""
    return set(re.findall(r"^# image: (\S+)$", DOCKERFILE.read_text(), flags=re.M))


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def ray_version() -> str:
    """The lower bound of the ``ray`` dependency (the version the project is tested with)."""
    (dep,) = [d for d in pyproject()["project"]["dependencies"] if d.startswith("ray[")]
    return re.search(r">=\s*([\d.]+)", dep).group(1)


# --------------------------------------------------------------------------------------------- layout
def test_one_folder_per_target() -> None:
    assert sorted(p.name for p in CLUSTERS.iterdir() if p.is_dir()) == ["docker", "kuberay", "launcher", "slurm"]
    assert not [p for p in CLUSTERS.iterdir() if p.is_file()], "files belong in a target's folder"
    for page in ("README.md", "docker.md", "kuberay.md", "launcher.md", "slurm.md"):
        assert (DOCS / page).is_file(), page


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_repository_file_exists(path: Path) -> None:
    """Paths under clusters/, configs/ and docs/, and configs under ``/src`` or ``--working-dir configs``."""
    text = path.read_text()
    named = set(re.findall(r"(?<![\w/.-])((?:clusters|configs|docs)/[\w./-]*\w)", text))
    named |= {"configs/" + m for m in re.findall(r"/src/configs/([\w.-]+\.ya?ml)", text)}
    for command in re.findall(r"--working-dir configs\b.*?--config (\S+)", text.replace("\\\n", " ")):
        named.add(f"configs/{command}")
    for link in re.findall(r"\]\(([\w./-]+\.md)\)", text):
        named.add(str((path.parent / link).resolve().relative_to(ROOT)))
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, f"{path.relative_to(ROOT)} names files that do not exist: {missing}"


# ----------------------------------------------------------------------------------------- Dockerfile
def test_dockerfile_is_pinned_non_root_and_installs_the_repository() -> None:
    args, instructions = _dockerfile()
    froms = [rest for kind, rest in instructions if kind == "FROM"]
    assert len(froms) == 1
    assert args["RAY_VERSION"] == ray_version(), "the image's Ray must be the project's"
    variants = re.search(r"^# VARIANT: (.*)$", DOCKERFILE.read_text(), flags=re.M).group(1)
    assert "cpu" in variants and "cu128" in variants
    for variant in ("cpu", "cu128"):
        image = froms[0]
        for name, value in {**args, "VARIANT": variant}.items():
            image = image.replace("${" + name + "}", value).replace("$" + name, value)
        repo, _, tag = image.partition(":")
        assert repo == "rayproject/ray" and "$" not in tag, image
        assert "latest" not in tag and re.match(r"^\d+\.\d+\.\d+-py311-(cpu|cu\d+)$", tag), image
    users = [rest.split(":")[0] for kind, rest in instructions if kind == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert any(kind == "COPY" and rest.split()[-2:] == [".", "/src"] for kind, rest in instructions)
    pip = " ".join(rest for kind, rest in instructions if kind == "RUN" and "pip install" in rest)
    assert '"/src"' in pip or " /src" in pip, "the package must be installed from the repository copy"
    assert "ray[data,train,tune,serve]==${RAY_VERSION}" in pip


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "runs", "demo_output"} <= ignored


def test_documented_image_tags_are_the_package_version_and_both_variants() -> None:
    version = pyproject()["project"]["version"]
    images = documented_images()
    assert {i.rsplit(":", 1)[1] for i in images} == {f"{version}-cpu", f"{version}-cu128"}
    assert len({i.rsplit(":", 1)[0] for i in images}) == 1
    text = DOCKERFILE.read_text()
    for image in images:
        variant = image.rsplit("-", 1)[1]
        flag = "" if variant == "cpu" else f"--build-arg VARIANT={variant} "
        assert f"docker build -f clusters/docker/Dockerfile {flag}-t {image} ." in text


# ------------------------------------------------------------------------------------------- KubeRay
def cluster_specs() -> dict[str, dict[str, Any]]:
    """Every Ray cluster spec of the KubeRay manifests, by file."""
    return {
        "raycluster.yaml": _one("kuberay/raycluster.yaml")["spec"],
        "rayjob.yaml": _one("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"],
        "rayservice.yaml": _one("kuberay/rayservice.yaml")["spec"]["rayClusterConfig"],
    }


def _pods(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, group["template"]["spec"]) for name, group in groups]


def test_kuberay_kinds() -> None:
    assert _one("kuberay/raycluster.yaml")["kind"] == "RayCluster"
    job = _one("kuberay/rayjob.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    assert _one("kuberay/rayservice.yaml")["kind"] == "RayService"
    pvc = _one("kuberay/pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    names = [_one(f"kuberay/{f}")["metadata"]["name"] for f in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml")]
    assert len(set(names)) == 3, "their head services (NAME-head-svc) must not collide"


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"])
def test_kuberay_cluster_spec(name: str) -> None:
    spec = cluster_specs()[name]
    images = documented_images()
    assert spec["rayVersion"] == ray_version()
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token", "secretName": RAY_TOKEN_SECRET}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu_groups, "a GPU worker group"
    for group in gpu_groups:
        assert group["minReplicas"] < group["maxReplicas"], "the GPU group autoscales"
        assert group["template"]["spec"]["containers"][0]["image"].endswith("-cu128")
    claim = _one("kuberay/pvc.yaml")["metadata"]["name"]
    for group, pod in _pods(spec):
        (container,) = pod["containers"]
        assert container["image"] in images, f"{group}: {container['image']} is not a tag of clusters/docker"
        shared = {v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim}
        mounts = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in shared}
        assert mounts == {SHARED}, f"{group} must mount the RWX volume at {SHARED}"
        assert pod["securityContext"]["runAsNonRoot"] is True
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"].endswith("-cpu")


def test_rayjob_trains_a_shipped_config_onto_the_shared_volume() -> None:
    job = _one("kuberay/rayjob.yaml")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["viscy", "train", "--config"]
    config = argv[3]
    assert config.startswith("/src/configs/") and (ROOT / config.removeprefix("/src/")).is_file()
    overrides = dict(zip(argv[4::2], argv[5::2], strict=True))
    assert {k.removeprefix("--") for k in overrides} <= TRAIN_KEYS
    assert overrides["--trainer.storage_path"].startswith(SHARED + "/")
    assert overrides["--data.data_path"].startswith(SHARED + "/")
    assert overrides["--trainer.check_resources"] == "false", "GPU workers start at 0: let the job wait for them"
    env = yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]
    assert env["WANDB_DIR"].startswith(SHARED + "/")


def test_serve_import_path_exists() -> None:
    serve = yaml.safe_load(_one("kuberay/rayservice.yaml")["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == SERVE_IMPORT_PATH
    module, _, attr = SERVE_IMPORT_PATH.partition(":")
    source = ROOT / (module.replace(".", "/") + ".py")
    tree = ast.parse(source.read_text())  # static: importing the app would import Ray Serve
    assert attr in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


# ------------------------------------------------------------------------------------------ launcher
@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher(name: str) -> None:
    config = _one(f"launcher/{name}")
    images = documented_images()
    docker = config["docker"]
    assert docker["image"] in images and docker["image"].endswith("-cpu")
    assert docker["worker_image"] in images and docker["worker_image"].endswith("-cu128")
    options = " ".join(docker["run_options"])
    assert "--env RAY_AUTH_MODE=token" in options
    assert f":{SHARED}" in options, "the shared file system is bound into every container"
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = [t for n, t in types.items() if n != config["head_node_type"]]
    assert any(t["min_workers"] < t["max_workers"] <= config["max_workers"] for t in workers)
    gpu_types = ("g4dn.", "g5.", "g6.", "p3.", "p4d.", "p5.", "a2-", "a3-", "g2-")  # AWS / GCP GPU families
    machines = [t["node_config"].get("InstanceType") or t["node_config"].get("machineType") for t in workers]
    assert any(m.startswith(gpu_types) for m in machines), f"a GPU worker type, not only {machines}"
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in start


# ------------------------------------------------------------------------------------------------ docs
def test_docs_name_the_files_and_commands() -> None:
    index = (DOCS / "README.md").read_text()
    for page in ("docker.md", "kuberay.md", "launcher.md", "slurm.md"):
        assert f"]({page})" in index
    kuberay = (DOCS / "kuberay.md").read_text()
    header = (CLUSTERS / "kuberay" / "rayservice.yaml").read_text().splitlines()[1].removeprefix("#").strip()
    assert header in kuberay, "the regenerate command of the RayService, as the file states it"
    for name in ("raycluster.yaml", "rayservice.yaml"):
        service = f"svc/{_one(f'kuberay/{name}')['metadata']['name']}-head-svc 8265:8265"
        assert f"kubectl port-forward {service}" in kuberay
    assert "kubectl port-forward svc/viscy-serve-svc 8000:8000" in kuberay
    launcher = (DOCS / "launcher.md").read_text()
    for name in ("aws", "gcp"):
        assert f"ray up clusters/launcher/{name}.yaml" in launcher
    assert "ray dashboard clusters/launcher/aws.yaml" in launcher
    assert "sbatch clusters/slurm/ray-cluster.sbatch configs/" in (DOCS / "slurm.md").read_text()
    for page in ("kuberay.md", "launcher.md"):
        text = (DOCS / page).read_text()
        assert "export RAY_AUTH_MODE=token" in text and "ray job submit --address http://127.0.0.1:8265" in text
    docker = (DOCS / "docker.md").read_text()
    for image in documented_images():
        assert f"docker push {image}" in docker


def test_viscy_train_overrides_in_docs_and_files_are_known_keys() -> None:
    for path in TEXT_FILES:
        text = path.read_text().replace("\\\n", " ")
        for command in re.findall(r"viscy train (--config .*)", text):
            keys = re.findall(r"--([a-z_]+\.[a-z_.]+)", command)
            unknown = [k for k in keys if k not in TRAIN_KEYS]
            assert not unknown, f"{path.relative_to(ROOT)}: unknown viscy train keys {unknown}"
