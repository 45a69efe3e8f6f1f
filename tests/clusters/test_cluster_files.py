"""Static checks of the cluster definitions in ``clusters/`` and their pages in ``docs/clusters/``.

Nothing here starts a cluster: every YAML parses, every file, config, image tag and import path the files
name exists, the Dockerfile is pinned and non-root and its build context is an allow-list, the KubeRay
manifests follow KubeRay's own CRD schemas and run every container restricted, and the KubeRay and
launcher definitions keep token auth, shared storage and GPU autoscaling.
"""

from __future__ import annotations

import ast
import copy
import functools
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from docker.utils.build import exclude_paths

from viscy.config import describe_schema
from viscy.serve import kuberay
from viscy.serve.config import SERVE_IMPORT_PATH
from viscy.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
DOCS = ROOT / "docs" / "clusters"
DOCKERFILE = CLUSTERS / "docker" / "Dockerfile"
CRDS = Path(__file__).parent / "kuberay-crds-v1.7.0"  # KubeRay's published CRDs, as its README says
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


def _copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY of the build context (no ``--from``), flags dropped."""
    out = []
    for kind, rest in _dockerfile()[1]:
        words = shlex.split(rest)
        if kind == "COPY" and not any(w.startswith("--from") for w in words):
            paths = [w for w in words if not w.startswith("--")]
            out.append((paths[:-1], paths[-1]))
    return out


def _image_user() -> tuple[int, int]:
    """The numeric uid and gid of the Dockerfile's last USER."""
    users = [rest for kind, rest in _dockerfile()[1] if kind == "USER"]
    uid, _, gid = users[-1].partition(":")
    return int(uid), int(gid)


def dockerignore_patterns() -> list[str]:
    """The patterns of .dockerignore, read as the Docker CLI reads them (blank and comment lines dropped)."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def build_context(root: Path) -> set[str]:
    """The files ``docker build -f clusters/docker/Dockerfile ROOT`` sends, by docker-py's .dockerignore matcher.

    docker-py's matcher follows Docker's rules: the last matching pattern wins, ``!`` re-includes, ``**`` spans
    folders, a pattern matching a folder matches everything in it, and (as the classic builder, stricter than
    BuildKit) a left-out folder is only walked into for a ``!`` pattern that names it literally.
    """
    dockerfile = DOCKERFILE.relative_to(ROOT).as_posix()
    paths = exclude_paths(str(root), dockerignore_patterns(), dockerfile=dockerfile)  # the paths it keeps
    return {Path(p).as_posix() for p in paths if (root / p).is_file()}


def image_files(context: set[str]) -> dict[str, str]:
    """Where the COPY lines put the files of the build context: {path in the context: path in the image}."""
    placed = {}
    for sources, dest in _copies():
        for source in (s.rstrip("/") for s in sources):
            if source in context:  # a file
                placed[source] = dest + Path(source).name if dest.endswith("/") else dest
            for path in (p for p in context if p.startswith(source + "/")):  # a folder's files
                placed[path] = f"{dest.rstrip('/')}/{Path(path).relative_to(source).as_posix()}"
    return placed


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
    assert _image_user() == (kuberay.RAY_UID, kuberay.RAY_GID), "the KubeRay pods run as the image's user"
    copies = _copies()
    assert copies and all(dest.startswith("/src") for _, dest in copies)
    sources = [s for srcs, _ in copies for s in srcs]
    assert not [s for s in sources if s in (".", "./", "*") or "*" in s], "COPY named paths, not the context"
    assert {"pyproject.toml", "viscy", "configs"} <= set(sources)
    pip = " ".join(rest for kind, rest in instructions if kind == "RUN" and "pip install" in rest)
    assert '"/src"' in pip or " /src" in pip, "the package must be installed from the repository copy"
    assert "ray[data,train,tune,serve]==${RAY_VERSION}" in pip


# The build context: an allow-list, computed with Docker's matching rules (docker-py, not a re-implementation).
LEAKS = [
    "token",
    ".env",
    ".env.local",
    "secrets/x",
    "server.pem",
    "id_rsa",
    ".ray/auth_token",
    ".netrc",
    ".git/config",
    ".venv/bin/python",
    "venv/lib/site.py",
    "demo_output/model/model.onnx",
    "runs/run/checkpoints/last.ckpt",
    "wandb/offline-run/files/config.yaml",
    "plate.zarr/.zattrs",
    "viscy.egg-info/PKG-INFO",
    "build/lib/viscy/__init__.py",
    "notes.py",
    "tests/conftest.py",
    "docs/clusters/kuberay.md",
    "clusters/kuberay/raycluster.yaml",
    "viscy/__pycache__/cli.cpython-311.pyc",
    "viscy/serve/__pycache__/app.cpython-311.pyc",
    "viscy/serve/.env",
    "viscy/serve/.token",
    "viscy/serve/cert.pem",
    "viscy/serve/tls.key",
    "viscy/models/weights.pt",
    "configs/model.onnx",
    "configs/token",
    "configs/.env",
    "configs/secrets/cluster.yaml",
]
NEEDED = [
    "pyproject.toml",
    "README.md",
    "viscy/__init__.py",
    "viscy/serve/app.py",
    "viscy/serve/page.html",
    "configs/serve.yaml",
]


def test_dockerignore_is_an_allow_list_that_drops_secrets_and_local_state(tmp_path: Path) -> None:
    assert dockerignore_patterns()[0] == "*", "everything out first; then only what the image needs back in"
    for name in LEAKS + NEEDED:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    context = build_context(tmp_path)
    leaked = sorted(set(LEAKS) & context)
    assert not leaked, f"these would be sent to the image build: {leaked}"
    assert set(NEEDED) <= context


def _package_files() -> set[str]:
    """What `pip install /src` needs of this repository: pyproject, its readme, the modules and package data."""
    project = pyproject()
    files = {"pyproject.toml", project["project"]["readme"]}
    files |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "viscy").rglob("*.py") if "__pycache__" not in p.parts}
    for package, patterns in project["tool"]["setuptools"]["package-data"].items():
        folder = ROOT / package.replace(".", "/")
        files |= {p.relative_to(ROOT).as_posix() for pattern in patterns for p in folder.glob(pattern)}
    return files


def test_the_build_context_is_what_the_dockerfile_copies_and_all_the_package_needs() -> None:
    context = build_context(ROOT)
    missing = sorted(_package_files() - context)
    assert not missing, f".dockerignore leaves out what `pip install /src` needs: {missing}"
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.yaml")}
    assert shipped <= context, "the configs the RayJob runs (/src/configs)"
    placed = image_files(context)
    for source in (s.rstrip("/") for srcs, _ in _copies() for s in srcs):
        assert source in placed or any(p.startswith(source + "/") for p in placed), f"COPY {source}: not sent"
    control = {".dockerignore", DOCKERFILE.relative_to(ROOT).as_posix()}  # sent to the builder, never copied
    stray = sorted(context - control - set(placed))
    assert not stray, f"sent to the build but copied by no COPY: {stray}"
    assert not [p for p in context if "__pycache__" in p or p.endswith(".pyc")]


def test_pip_builds_the_package_from_the_build_context_alone(tmp_path: Path) -> None:
    """What `pip install /src` does in the image, on exactly the files the COPY lines put in /src."""
    src = tmp_path / "src"
    for path, in_image in image_files(build_context(ROOT)).items():
        target = src / Path(in_image).relative_to("/src")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / path, target)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    result = subprocess.run(
        [*command, "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("viscy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p for p in _package_files() if p.startswith("viscy/")}
    assert expected and expected <= names, sorted(expected - names)


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


# The restrictive settings: every pod and every container of every KubeRay manifest, those KubeRay adds included.
MANIFESTS = ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"]
POD_TEMPLATES = {"raycluster.yaml": 2, "rayjob.yaml": 3, "rayservice.yaml": 3}  # head, worker groups, submitter
RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
# The volume types the Pod Security Standard "restricted" allows (no hostPath).
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim"}
RESTRICTED_VOLUMES |= {"projected", "secret"}


def pod_specs(node: Any, where: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every pod spec (a mapping with ``containers``) anywhere in a manifest, with its path."""
    found = []
    if isinstance(node, dict):
        if "containers" in node:
            found.append((where, node))
        for key, value in node.items():
            found += pod_specs(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += pod_specs(value, f"{where}[{i}]")
    return found


def restricted_container_problems(where: str, context: dict[str, Any] | None) -> list[str]:
    """What a container securityContext lacks of RESTRICTED, or grants beyond it."""
    context = context or {}
    problems = [f"{where}: {key} is not {value}" for key, value in RESTRICTED.items() if context.get(key) != value]
    if context.get("privileged") or context.get("capabilities", {}).get("add"):
        problems.append(f"{where}: privileged or added capabilities")
    if context.get("runAsUser") == 0 or context.get("runAsNonRoot") is False:
        problems.append(f"{where}: runs as root")
    return problems


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_kuberay_pod_and_container_runs_restricted(name: str) -> None:
    """Non-root as the image's user, no privilege escalation, no capabilities, seccomp RuntimeDefault.

    These are the container settings of the Pod Security Standard "restricted"; KubeRay copies the Ray
    container's securityContext onto the wait-gcs-ready init container it adds to workers, and gives its
    autoscaler sidecar (head pod) and the RayJob's submitter pod only what autoscalerOptions and
    submitterPodTemplate name, so those must name it too.
    """
    doc = _one(f"kuberay/{name}")
    uid, gid = _image_user()
    pods = pod_specs(doc)
    assert len(pods) == POD_TEMPLATES[name], [w for w, _ in pods]
    expected = {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid, "seccompProfile": {"type": "RuntimeDefault"}}
    problems = []
    for where, pod in pods:
        context = pod.get("securityContext", {})
        problems += [f"{where}: pod {k}: {context.get(k)}, not {v}" for k, v in expected.items() if context.get(k) != v]
        if pod.get("volumes") and context.get("fsGroup") != gid:
            problems.append(f"{where}: fsGroup is not the image's group {gid}")
        problems += [f"{where}: {k}" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
        for volume in pod.get("volumes", []):
            if not set(volume) - {"name"} <= RESTRICTED_VOLUMES:
                problems.append(f"{where}: volume {volume['name']} is not of a restricted type")
        for kind in ("initContainers", "containers"):
            for container in pod.get(kind, []):
                at = f"{where}.{kind}[{container['name']}]"
                problems += restricted_container_problems(at, container.get("securityContext"))
                problems += [f"{at}: hostPort" for port in container.get("ports", []) if "hostPort" in port]
    for key in ("spec", "spec.rayClusterSpec", "spec.rayClusterConfig"):
        cluster = functools.reduce(lambda node, k: node.get(k, {}), key.split("."), doc)
        if cluster.get("enableInTreeAutoscaling"):
            context = cluster.get("autoscalerOptions", {}).get("securityContext")
            problems += restricted_container_problems(f"{key}.autoscalerOptions", context)
    assert not problems, "\n".join(problems)


def test_the_rayjob_submitter_is_restricted_and_runs_the_head_image() -> None:
    job = _one("kuberay/rayjob.yaml")["spec"]
    assert job.get("submissionMode", "K8sJobMode") == "K8sJobMode", "the mode that makes a submitter pod"
    submitter = job["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never", "a Job's pod template must not restart Always"
    (container,) = submitter["containers"]
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert container["image"] == head["image"], "KubeRay's own submitter runs the head's image"
    assert not container.get("command"), "KubeRay fills in `ray job submit` (and the token) only without one"


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """A validator of KubeRay's v1 ``kind`` schema that also refuses unknown fields (as ``kubectl apply`` does)."""
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def strict(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                if not node.get("x-kubernetes-preserve-unknown-fields"):
                    node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema)
    return jsonschema.Draft4Validator(schema)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Where ``doc`` breaks its kind's CRD schema, one line per error."""
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in errors)


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifests_follow_kuberays_crd_schema(name: str) -> None:
    """Every field where KubeRay v1.7.0 reads it: a misplaced securityContext key fails here, not on the cluster."""
    doc = _one(f"kuberay/{name}")
    assert doc["apiVersion"] == "ray.io/v1"
    errors = crd_errors(doc)
    assert not errors, "\n".join(errors)


def test_the_crd_check_refuses_misplaced_or_mistyped_settings() -> None:
    doc = _one("kuberay/raycluster.yaml")
    head = doc["spec"]["headGroupSpec"]["template"]["spec"]
    head["securityContext"]["allowPrivilegeEscalation"] = False  # a container-only field, at pod level
    head["containers"][0]["securityContext"]["capabilities"] = {"drop": "ALL"}  # a string, not a list
    doc["spec"]["autoscalerOptions"]["securityContex"] = {}
    errors = "\n".join(crd_errors(doc))
    assert "allowPrivilegeEscalation" in errors
    assert "capabilities.drop: 'ALL' is not of type 'array'" in errors
    assert "securityContex'" in errors


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
    words = shlex.split(" ".join(docker["run_options"] + docker.get("head_run_options", [])))
    words += shlex.split(" ".join(docker.get("worker_run_options", [])))
    flags = [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]
    assert "--security-opt no-new-privileges" in flags, "the image's sudo must not gain root"
    assert "--cap-drop ALL" in flags
    granted = [w for w in words if w in ("--privileged", "--cap-add") or "unconfined" in w or w.startswith("--user")]
    assert not granted, f"nothing may give back what the image's user lacks: {granted}"
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
