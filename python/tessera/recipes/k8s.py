"""Kubernetes manifests for a recipe (`tessera k8s RECIPE --kind pytorchjob|jobset ...`): each pod runs
`torchrun ... -m tessera run RECIPE` (one pod per node, `nproc_per_node` ranks in it), with output_dir (and so
checkpoint.dir) on a PersistentVolumeClaim that every pod mounts, so a restarted group resumes from the newest valid
checkpoint there (tessera.exitcodes: a restart helps after 75 or a signal, not after 2 or 3).

Two levels of restart, as with Slurm's retry loop and requeue (recipes/launch/slurm/README.md):
- in place: torchrun's elastic agents restart the whole group up to `max_restarts` times (c10d rendezvous);
- the workload: Kubeflow's PyTorchJob (kubeflow.org/v1, training-operator) with `elasticPolicy.maxRestarts` and
  `restartPolicy: OnFailure` restarts failed pods; a JobSet (jobset.x-k8s.io/v1alpha2) with
  `failurePolicy.maxRestarts` recreates all its Jobs when one fails.

The field names follow the CRDs' OpenAPI schemas; tests/python/recipes/test_k8s.py validates the rendered manifests
against schemas built from the Kubeflow SDKs' generated models (see that file for what is and is not checked)."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

import yaml

from tessera.errors import InvalidArgumentError

KINDS = ("pytorchjob", "jobset")
MOUNT = "/checkpoints"  # where the PVC is mounted in every pod
RDZV_PORT = 29500  # torchrun's default c10d rendezvous port (JobSet: on pod 0)


def job_name(recipe: str) -> str:
    """A DNS-1123 label from the recipe's file name (llama3_1_8b_lora_sft.yaml -> llama3-1-8b-lora-sft), at most 40
    characters so that JobSet's pod names (<name>-<job>-<i>-<j>-<hash>) stay within 63."""
    name = re.sub(r"[^a-z0-9]+", "-", PurePosixPath(recipe).stem.lower()).strip("-")[:40].strip("-")
    if not name:
        raise InvalidArgumentError(f"recipe {recipe!r}: cannot make a Kubernetes name from its file name")
    return name


def _command(recipe: str, overrides: list[str], *, nodes: int, nproc_per_node: int, max_restarts: int,
             name: str, rdzv: list[str]) -> list[str]:
    return ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={nproc_per_node}", f"--max-restarts={max_restarts}",
            *rdzv, "-m", "tessera", "run", recipe, f"output_dir={MOUNT}/{name}",
            f"parallelism.world_size={nodes * nproc_per_node}", *overrides]


def _pod_spec(command: list[str], *, image: str, container: str, gpus: int, pvc: str, restart_policy: str,
              env: list[dict] | None = None) -> dict:
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}  # a Quantity: a string
    c = {"name": container, "image": image, "command": command,
         "volumeMounts": [{"name": "checkpoints", "mountPath": MOUNT}, {"name": "dshm", "mountPath": "/dev/shm"}]}
    if env:
        c["env"] = env
    if resources:
        c["resources"] = resources
    return {"restartPolicy": restart_policy, "containers": [c],
            "volumes": [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": pvc}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory"}}]}  # NCCL and loaders need a large /dev/shm


def render(recipe: str, overrides: list[str] | tuple[str, ...] = (), *, kind: str, image: str, nodes: int,
           nproc_per_node: int, max_restarts: int = 3, pvc: str = "tessera-checkpoints",
           gpus_per_node: int | None = None, name: str | None = None) -> dict:
    """The manifest (a dict, dumped as YAML by `to_yaml`) that runs `tessera run RECIPE OVERRIDES` on `nodes` pods of
    `nproc_per_node` ranks each (and `gpus_per_node` GPUs, default `nproc_per_node`; 0: none requested). The recipe
    path is the one inside the image; the recipe is loaded here, with the overrides, so a bad one fails now."""
    from tessera.recipes.config import load_config

    if kind not in KINDS:
        raise InvalidArgumentError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if nodes <= 0 or nproc_per_node <= 0 or max_restarts < 0:
        raise InvalidArgumentError(f"nodes and nproc-per-node must be > 0 and max-restarts >= 0, got {nodes}, "
                                   f"{nproc_per_node} and {max_restarts}")
    if not image:
        raise InvalidArgumentError("an image is needed (--image): one with tessera installed and the recipe in it")
    load_config(recipe, list(overrides))
    name = name or job_name(recipe)
    gpus = nproc_per_node if gpus_per_node is None else gpus_per_node
    overrides = list(overrides)
    if kind == "pytorchjob":
        # The training operator runs every pod as a Worker and sets torchrun's PET_* variables (rendezvous endpoint
        # on worker 0, c10d backend) from elasticPolicy; the flags given here are the same values, spelled out.
        cmd = _command(recipe, overrides, nodes=nodes, nproc_per_node=nproc_per_node, max_restarts=max_restarts,
                       name=name, rdzv=["--rdzv-backend=c10d"])
        pod = _pod_spec(cmd, image=image, container="pytorch", gpus=gpus, pvc=pvc, restart_policy="OnFailure")
        return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name},
                "spec": {"elasticPolicy": {"rdzvBackend": "c10d", "minReplicas": nodes, "maxReplicas": nodes,
                                           "maxRestarts": max_restarts},
                         "nprocPerNode": str(nproc_per_node),
                         "runPolicy": {"backoffLimit": max_restarts, "cleanPodPolicy": "None"},
                         "pytorchReplicaSpecs": {"Worker": {"replicas": nodes, "restartPolicy": "OnFailure",
                                                            "template": {"spec": pod}}}}}
    # JobSet: one indexed Job of `nodes` pods; pod 0 (DNS name <name>-node-0-0.<name>, JobSet's headless service)
    # hosts the rendezvous. A failed pod fails its Job (backoffLimit 0) and the JobSet recreates all Jobs.
    endpoint = f"{name}-node-0-0.{name}:{RDZV_PORT}"
    cmd = _command(recipe, overrides, nodes=nodes, nproc_per_node=nproc_per_node, max_restarts=max_restarts,
                   name=name, rdzv=["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={name}"])
    pod = _pod_spec(cmd, image=image, container="tessera", gpus=gpus, pvc=pvc, restart_policy="Never")
    job = {"parallelism": nodes, "completions": nodes, "completionMode": "Indexed", "backoffLimit": 0,
           "template": {"spec": pod}}
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": {"name": name},
            "spec": {"failurePolicy": {"maxRestarts": max_restarts},
                     "network": {"enableDNSHostnames": True, "subdomain": name},
                     "replicatedJobs": [{"name": "node", "replicas": 1, "template": {"spec": job}}]}}


def to_yaml(manifest: dict, header: str = "") -> str:
    """The manifest as YAML (keys in the order rendered), after `header` lines as comments."""
    lines = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return lines + yaml.safe_dump(manifest, sort_keys=False, width=120)
