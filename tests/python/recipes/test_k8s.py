"""`tessera k8s`: the Kubeflow PyTorchJob (kubeflow.org/v1) and JobSet (jobset.x-k8s.io/v1alpha2) manifests of a
recipe, validated with `jsonschema` against JSON Schemas of the two CRDs.

No package on PyPI or Debian ships the CRD YAML (their OpenAPI v3 schemas) of the training-operator or of JobSet, so the
schemas here are built from the closest thing the registries have, the SDKs generated from those same OpenAPI specs:
- PyTorchJob: kubeflow-training 1.9.4's models (KubeflowOrgV1PyTorchJob and the `kubernetes` client's V1PodTemplateSpec
  it refers to): every model's `openapi_types` / `attribute_map` give the properties and their types, a setter that
  rejects None gives `required`;
- JobSet: kubeflow-trainer-api 2.3.0's pydantic models (JobsetV1alpha2JobSet, with the core/v1 types it embeds):
  pydantic's `model_json_schema(by_alias=True)`.
resource.Quantity is replaced by the CRDs' int-or-string. Both are made strict (`additionalProperties: false` on
every object), as the API server's structural-schema pruning would silently drop an unknown field. Not checked:
CEL/enum/format rules of the real CRDs (e.g. restartPolicy's allowed values, DNS-1123 names beyond what the renderer
does itself), defaulting and webhooks, and whether a cluster with the operators accepts and runs them (no cluster
here)."""

from __future__ import annotations

import functools
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tessera.errors import InvalidArgumentError
from tessera.recipes import k8s

REPO = Path(__file__).resolve().parents[3]
RECIPE = "recipes/llama3_1_8b_lora_sft.yaml"
EXAMPLE_ARGS = [RECIPE, "model.hf_dir=/checkpoints/models/Llama-3.1-8B-Instruct", "--image",
                "ghcr.io/example/tessera:latest", "--nodes", "2", "--nproc-per-node", "8"]
jsonschema = pytest.importorskip("jsonschema")


# resource.Quantity ("8", "80Gi"): int-or-string in the CRDs (x-kubernetes-int-or-string); the SDKs model it as a
# class ("Quantity", IoK8sApimachineryPkgApiResourceQuantity) whose generated schema says nothing useful.
QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string"}]}


def _strict(node):
    """Every object schema with properties gets additionalProperties: false (in place); returns `node`."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for v in node.values():
            _strict(v)
    elif isinstance(node, list):
        for v in node:
            _strict(v)
    return node


@functools.cache
def _pytorchjob_schema() -> dict:
    """JSON Schema of KubeflowOrgV1PyTorchJob from the SDK's generated models (see the module docstring)."""
    training_models = pytest.importorskip("kubeflow.training.models")
    core_models = pytest.importorskip("kubernetes.client.models")
    defs: dict[str, dict] = {}
    primitives = {"Quantity": QUANTITY, "str": {"type": "string"}, "int": {"type": "integer"},
                  "bool": {"type": "boolean"}, "float": {"type": "number"}, "object": {},
                  "datetime": {"type": "string"}, "date": {"type": "string"}}

    def ref(t: str) -> dict:
        if t in primitives:
            return primitives[t]
        if m := re.fullmatch(r"list\[(.+)\]", t):
            return {"type": "array", "items": ref(m.group(1))}
        if m := re.fullmatch(r"dict\(str, (.+)\)", t):
            return {"type": "object", "additionalProperties": ref(m.group(1))}
        if t not in defs:
            # the SDK names autoscaling/v2 types K8sIoApiAutoscalingV2X; the kubernetes client names them V2X
            cls = getattr(training_models, t, None) or getattr(core_models, re.sub(r"^K8sIoApi[A-Z][a-z]+", "", t))
            defs[t] = {}  # placeholder: models refer to themselves (JSONSchemaProps)
            required = [cls.attribute_map[a] for a in cls.openapi_types
                        if "must not be `None`" in inspect.getsource(getattr(cls, a).fset)]
            defs[t] = {"type": "object", "additionalProperties": False, "required": required,
                       "properties": {cls.attribute_map[a]: ref(at) for a, at in cls.openapi_types.items()}}
        return {"$ref": f"#/$defs/{t}"}

    root = ref("KubeflowOrgV1PyTorchJob")
    return {**root, "$defs": defs}


@functools.cache
def _jobset_schema() -> dict:
    models = pytest.importorskip("kubeflow_trainer_api.models")
    schema = models.JobsetV1alpha2JobSet.model_json_schema(by_alias=True)
    schema["$defs"]["IoK8sApimachineryPkgApiResourceQuantity"] = QUANTITY
    return _strict(schema)


SCHEMAS = {"pytorchjob": _pytorchjob_schema, "jobset": _jobset_schema}


def _errors(kind: str, manifest: dict) -> list[str]:
    """Each schema violation as "path: message"; for one under anyOf (pydantic's Optional), the innermost ones."""
    def leaves(errors):
        for e in errors:
            if e.context:
                yield from leaves(e.context)
            elif e.validator != "type" or e.validator_value != "null":  # the "or None" branch of an Optional
                yield f"{'/'.join(map(str, e.absolute_path))}: {e.message}"

    return list(leaves(jsonschema.Draft202012Validator(SCHEMAS[kind]()).iter_errors(manifest)))


def _manifest(kind: str, **kw) -> dict:
    return k8s.render(str(REPO / RECIPE), ["model.hf_dir=/m"], kind=kind, image="img:1", nodes=kw.get("nodes", 2),
                      nproc_per_node=kw.get("nproc_per_node", 4), max_restarts=kw.get("max_restarts", 5))


@pytest.mark.parametrize("kind", ["pytorchjob", "jobset"])
def test_rendered_manifest_matches_the_crd_schema(kind):
    m = _manifest(kind)
    assert _errors(kind, m) == []
    # Planted faults the validator must catch: an unknown (misspelled) field, a wrong type, a missing required field.
    pod = (m["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"] if kind == "pytorchjob"
           else m["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"])
    pod["containers"][0]["volumeMount"] = pod["containers"][0].pop("volumeMounts")
    assert any("volumeMount" in e for e in _errors(kind, m))
    m = _manifest(kind)
    if kind == "pytorchjob":
        m["spec"]["elasticPolicy"]["maxRestarts"] = "5"
    else:
        m["spec"]["failurePolicy"]["maxRestarts"] = "5"
    assert any("maxRestarts" in e for e in _errors(kind, m))
    m = _manifest(kind)
    pod = (m["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"] if kind == "pytorchjob"
           else m["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"])
    del pod["containers"][0]["name"]
    assert any("'name' is a required property" in e for e in _errors(kind, m))


@pytest.mark.parametrize("kind", ["pytorchjob", "jobset"])
def test_pods_run_the_recipe_under_torchrun_with_restarts_and_a_checkpoint_pvc(kind):
    m = _manifest(kind, nodes=3, nproc_per_node=4, max_restarts=5)
    if kind == "pytorchjob":
        assert m["spec"]["elasticPolicy"]["maxRestarts"] == 5 and m["spec"]["elasticPolicy"]["maxReplicas"] == 3
        worker = m["spec"]["pytorchReplicaSpecs"]["Worker"]
        assert (worker["replicas"], worker["restartPolicy"]) == (3, "OnFailure")
        pod = worker["template"]["spec"]
        assert pod["containers"][0]["name"] == "pytorch"  # the training operator looks for this container name
    else:
        assert m["spec"]["failurePolicy"]["maxRestarts"] == 5
        job = m["spec"]["replicatedJobs"][0]["template"]["spec"]
        assert (job["parallelism"], job["completions"], job["completionMode"]) == (3, 3, "Indexed")
        pod = job["template"]["spec"]
        name = m["metadata"]["name"]
        assert f"--rdzv-endpoint={name}-node-0-0.{name}:29500" in pod["containers"][0]["command"]
    c = pod["containers"][0]
    cmd = c["command"]
    assert cmd[0] == "torchrun" and "--max-restarts=5" in cmd and "--nnodes=3" in cmd and "--nproc-per-node=4" in cmd
    run = cmd[cmd.index("tessera") + 1:]
    assert run[:2] == ["run", str(REPO / RECIPE)]
    # The tessera arguments load as a config: 12 ranks, output (and checkpoints) under the PVC's mount.
    from tessera.recipes.config import load_config

    cfg = load_config(run[1], run[2:])
    assert cfg.parallelism.world_size == 12 and cfg.model.hf_dir == "/m"
    mounts = {v["name"]: v["mountPath"] for v in c["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    assert cfg.output_dir.startswith(mounts["checkpoints"] + "/") and claims == {"checkpoints": "tessera-checkpoints"}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"


def test_bad_input_is_rejected_with_the_reason(tmp_path):
    with pytest.raises(InvalidArgumentError, match="training.stepz"):
        k8s.render(str(REPO / RECIPE), ["training.stepz=3"], kind="jobset", image="i", nodes=1, nproc_per_node=1)
    with pytest.raises(InvalidArgumentError, match="--kind must be one of pytorchjob, jobset, got 'mpijob'"):
        k8s.render(str(REPO / RECIPE), [], kind="mpijob", image="i", nodes=1, nproc_per_node=1)
    with pytest.raises(InvalidArgumentError, match="nodes and nproc-per-node must be > 0"):
        k8s.render(str(REPO / RECIPE), [], kind="jobset", image="i", nodes=0, nproc_per_node=1)
    assert k8s.job_name("recipes/Llama3.1_8B lora.yaml") == "llama3-1-8b-lora"


@pytest.mark.parametrize("kind", ["pytorchjob", "jobset"])
def test_committed_examples_are_what_the_cli_renders(kind, tmp_path):
    out = tmp_path / "m.yaml"
    res = subprocess.run([sys.executable, "-m", "tessera", "k8s", *EXAMPLE_ARGS, "--kind", kind, "-o", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    committed = REPO / "recipes" / "launch" / "k8s" / f"llama3_1_8b_lora_sft.{kind}.yaml"
    assert out.read_text() == committed.read_text(), f"{committed} is stale: render it again with tessera k8s"
    assert _errors(kind, yaml.safe_load(committed.read_text())) == []
