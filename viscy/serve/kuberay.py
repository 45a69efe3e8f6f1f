"""A KubeRay ``RayService`` manifest generated from a Ray Serve config such as ``configs/serve.yaml``.

The committed ``clusters/kuberay/rayservice.yaml`` is this module's output; regenerate it after changing the
serve config (a test compares the two)::

    python -m viscy.serve.kuberay configs/serve.yaml --image ghcr.io/your-org/viscy:0.1.0-cpu \\
        > clusters/kuberay/rayservice.yaml

``serveConfigV2`` is the Ray Serve config itself, validated by :class:`viscy.serve.config.ServeConfig` exactly as
``viscy serve --config`` validates it (a bad config is refused with the same message), with what a pod
needs changed and nothing else:

* ``http_options.host`` is ``0.0.0.0``: KubeRay's Serve service reaches the proxy through the pod's address.
* relative model paths are rebased onto the shared volume (``demo_output/model`` ->
  ``/mnt/shared/demo_output/model``); absolute paths (the shared volume, or a path baked into the image) stay.
* with no token configured, requests need the bearer token of ``$VISCY_SERVE_TOKEN``, which every Ray
  container reads from the Kubernetes Secret ``viscy-serve-token`` (key ``token``).

Ray's own token auth uses KubeRay's ``authOptions`` (mode ``token``, Secret ``viscy-ray-token``, key
``auth_token``). Every pod runs as the image's non-root user and every container, the autoscaler sidecar
KubeRay adds included, without privilege escalation or capabilities, under the runtime's seccomp profile
(:func:`pod_security_context`, :func:`container_security_context`). This module imports no Ray: it only
writes YAML.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from viscy import __version__
from viscy.config import ConfigError, load_config
from viscy.serve.config import RAY_SERVE_KEYS, SERVE_IMPORT_PATH, ServeConfig

RAY_VERSION = "2.60.0"  # the base image of clusters/docker/Dockerfile
IMAGE_REPOSITORY = "ghcr.io/your-org/viscy"  # build and push clusters/docker/Dockerfile yourself
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}-cpu"
CPU_SUFFIX, GPU_SUFFIX = "-cpu", "-cu128"
SHARED_PVC = "viscy-shared"  # clusters/kuberay/pvc.yaml (ReadWriteMany)
SHARED_MOUNT = "/mnt/shared"
RAY_TOKEN_SECRET = "viscy-ray-token"  # key auth_token: KubeRay authOptions.secretName
SERVE_TOKEN_SECRET = "viscy-serve-token"  # key token: the HTTP API's bearer token
SERVE_TOKEN_ENV = "VISCY_SERVE_TOKEN"
POD_HOST = "0.0.0.0"
OUTPUT = "clusters/kuberay/rayservice.yaml"
RAY_UID, RAY_GID = 1000, 100  # the user `ray` of the rayproject/ray base image, which the Dockerfile keeps


class _Literal(str):
    """A string written as a YAML block literal (``|``), so serveConfigV2 stays readable."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes :class:`_Literal` as a block literal and repeats shared values (no anchors)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(_Literal, lambda dumper, data: dumper.represent_scalar("tag:yaml.org,2002:str", data, "|"))


def gpu_image_for(image: str) -> str:
    """The CUDA variant of a ``-cpu`` image tag (``viscy:0.1.0-cpu`` -> ``viscy:0.1.0-cu128``); else ``image``."""
    return image[: -len(CPU_SUFFIX)] + GPU_SUFFIX if image.endswith(CPU_SUFFIX) else image


def pod_serve_config(
    serve_config_path: str | Path,
    shared_root: str = SHARED_MOUNT,
    token_env: str | None = SERVE_TOKEN_ENV,
) -> dict[str, Any]:
    """The Ray Serve config of ``serve_config_path`` as it must run inside a KubeRay pod.

    Parameters
    ----------
    serve_config_path
        A Ray Serve config holding one application with ``import_path: viscy.serve.app:build_app``.
    shared_root
        Mount point of the shared volume; relative model paths are rebased onto it.
    token_env
        Environment variable holding the HTTP bearer token when the config names no token source
        (None: leave the API open inside the cluster).

    Raises
    ------
    ConfigError
        If ``viscy serve --config`` would refuse the file (same message), or it holds keys beside Ray
        Serve's own, which serveConfigV2 cannot carry.
    """
    path = Path(serve_config_path)
    config = load_config(ServeConfig, path)  # exactly what `viscy serve --config` does
    raw = yaml.safe_load(path.read_text())
    if "applications" not in raw:
        raise ConfigError(
            f"{path} is a viscy serve config, not a Ray Serve config: write it in Ray Serve's layout "
            f"(applications[].import_path: {SERVE_IMPORT_PATH}, settings under args), as configs/serve.yaml"
        )
    extra = sorted(set(raw) - set(RAY_SERVE_KEYS))
    if extra:
        raise ConfigError(
            f"{path} has keys beside Ray Serve's ({', '.join(extra)}); serveConfigV2 can only hold "
            f"{', '.join(RAY_SERVE_KEYS)}: move them under the application's args"
        )
    out = copy.deepcopy(raw)
    out["http_options"] = {**(out.get("http_options") or {}), "host": POD_HOST}
    app = next(a for a in out["applications"] if isinstance(a, dict) and a.get("import_path") == SERVE_IMPORT_PATH)
    args = app.setdefault("args", {}) or {}
    app["args"] = args
    root = PurePosixPath(shared_root)
    args["models"] = [str(p if p.is_absolute() else root / p.as_posix()) for p in config.models]
    if token_env and config.auth_token_env is None and config.auth_token_file is None:
        args["auth_token_env"] = token_env
    ServeConfig.model_validate(copy.deepcopy(out))  # the pod's config must validate too
    return out


def container_security_context() -> dict[str, Any]:
    """The ``securityContext`` of every container: no privilege escalation, no capabilities, seccomp RuntimeDefault.

    The image's passwordless ``sudo`` (Ray's base image) cannot gain root under ``allowPrivilegeEscalation:
    false``; Ray needs no capability, as it runs unprivileged and binds no port below 1024.
    """
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    """The pod ``securityContext``: the image's user ``ray`` (uid 1000, gid 100), never root, seccomp RuntimeDefault.

    ``fsGroup`` gives that group the volumes whose driver applies it (``emptyDir`` such as ``/dev/shm``; NFS-like
    RWX volumes usually not); the pod-level seccomp profile also covers containers that set none of their own.
    """
    return {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "runAsGroup": RAY_GID,
        "fsGroup": RAY_GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container(
    name: str, image: str, resources: dict[str, str], ports: dict[str, int], env: list[dict[str, Any]]
) -> dict[str, Any]:
    """A Ray container: requests = limits, the shared volume at SHARED_MOUNT and a memory-backed /dev/shm."""
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": env,
        "ports": [{"name": n, "containerPort": p} for n, p in ports.items()],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "securityContext": container_security_context(),
        "volumeMounts": [{"name": "shared", "mountPath": SHARED_MOUNT}, {"name": "dshm", "mountPath": "/dev/shm"}],
    }


def _pod(container: dict[str, Any], gpu: bool = False) -> dict[str, Any]:
    """A pod template running ``container`` with :func:`pod_security_context`."""
    spec: dict[str, Any] = {
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": [
            {"name": "shared", "persistentVolumeClaim": {"claimName": SHARED_PVC}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if gpu:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def rayservice_manifest(
    serve_config_path: str | Path,
    name: str = "viscy",
    image: str = DEFAULT_IMAGE,
    gpu_image: str | None = None,
    shared_root: str = SHARED_MOUNT,
    token_env: str | None = SERVE_TOKEN_ENV,
) -> dict[str, Any]:
    """A ``ray.io/v1`` RayService serving ``serve_config_path`` on an autoscaling cluster.

    Parameters
    ----------
    serve_config_path
        The Ray Serve config (e.g. ``configs/serve.yaml``); see :func:`pod_serve_config`.
    name
        RayService name; KubeRay's Services are ``NAME-head-svc`` (dashboard 8265) and ``NAME-serve-svc`` (8000).
    image
        Image of the head and the CPU workers (clusters/docker/Dockerfile, CPU variant).
    gpu_image
        Image of the GPU workers; default: the ``-cu128`` tag of a ``-cpu`` ``image``.
    shared_root, token_env
        As in :func:`pod_serve_config`.

    Returns
    -------
    dict
        The manifest; ``spec.serveConfigV2`` is the pod's Ray Serve config as YAML text.
    """
    serve = pod_serve_config(serve_config_path, shared_root, token_env)
    port = int((serve.get("http_options") or {}).get("port", 8000))
    secret = {"secretKeyRef": {"name": SERVE_TOKEN_SECRET, "key": "token"}}
    env = [{"name": token_env, "valueFrom": secret}] if token_env else []
    ray_ports = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": port}
    head = _container("ray-head", image, {"cpu": "4", "memory": "16Gi"}, ray_ports, env)
    cpu = _container("ray-worker", image, {"cpu": "8", "memory": "32Gi"}, {"serve": port}, env)
    gpu = _container(
        "ray-worker",
        gpu_image or gpu_image_for(image),
        {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "1"},
        {"serve": port},
        env,
    )
    cluster = {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "authOptions": {"mode": "token", "secretName": RAY_TOKEN_SECRET},
        # KubeRay gives the autoscaler sidecar of the head pod no securityContext unless this names one.
        "autoscalerOptions": {"securityContext": container_security_context()},
        "headGroupSpec": {
            # num-cpus 0: replicas run on workers; the head keeps the GCS, dashboard and Serve controller.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod(head),
        },
        "workerGroupSpecs": [
            {
                "groupName": "cpu",
                "replicas": 1,
                "minReplicas": 1,
                "maxReplicas": 4,
                "rayStartParams": {},
                "template": _pod(cpu),
            },
            {
                "groupName": "gpu",
                "replicas": 0,
                "minReplicas": 0,
                "maxReplicas": 4,
                "rayStartParams": {},
                "template": _pod(gpu, gpu=True),
            },
        ],
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name},
        "spec": {
            "serveConfigV2": _Literal(yaml.safe_dump(serve, sort_keys=False, width=120)),
            "rayClusterConfig": cluster,
        },
    }


def render(manifest: dict[str, Any], command: str) -> str:
    """The manifest as YAML text, headed by the command that regenerates it."""
    header = (
        "# GENERATED by viscy.serve.kuberay: do not edit; change the serve config and regenerate with\n"
        f"#   {command}\n"
        f"# Needs the Secrets {RAY_TOKEN_SECRET} (auth_token) and {SERVE_TOKEN_SECRET} (token) and the PVC "
        f"{SHARED_PVC}:\n"
        "# see docs/clusters/kuberay.md. serveConfigV2 is the serve config with http_options.host 0.0.0.0,\n"
        f"# model paths on the shared volume ({SHARED_MOUNT}) and the bearer token from ${SERVE_TOKEN_ENV}.\n"
    )
    return header + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=120)


def command_line(serve_config_path: str, image: str, gpu_image: str | None = None, name: str = "viscy") -> str:
    """The shell command that writes the committed manifest."""
    parts = ["python -m viscy.serve.kuberay", serve_config_path, "--image", image]
    if gpu_image:
        parts += ["--gpu-image", gpu_image]
    if name != "viscy":
        parts += ["--name", name]
    return " ".join(parts) + f" > {OUTPUT}"


def main(argv: list[str] | None = None) -> int:
    """``python -m viscy.serve.kuberay SERVE_CONFIG --image IMAGE``: print the RayService manifest."""
    parser = argparse.ArgumentParser(
        prog="python -m viscy.serve.kuberay",
        description="Print a KubeRay RayService manifest whose serveConfigV2 is the given Ray Serve config.",
    )
    parser.add_argument("serve_config", help="Ray Serve config, e.g. configs/serve.yaml")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"head and CPU-worker image [{DEFAULT_IMAGE}]")
    parser.add_argument("--gpu-image", default=None, help="GPU-worker image [the -cu128 tag of a -cpu --image]")
    parser.add_argument("--name", default="viscy", help="RayService name [viscy]")
    args = parser.parse_args(argv)
    try:
        manifest = rayservice_manifest(args.serve_config, name=args.name, image=args.image, gpu_image=args.gpu_image)
    except ConfigError as exc:
        print(f"viscy.serve.kuberay: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render(manifest, command_line(args.serve_config, args.image, args.gpu_image, args.name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
