"""cluster/: every file is checked offline, and a job goes through the real ``ray job submit``
CLI to a real ``ray start --head``.

What validates what:

- core Kubernetes kinds (the PersistentVolumeClaim) and every pod template inside the
  KubeRay resources: kubernetes-validate's bundled schemas, strict (unknown fields fail);
- RayCluster / RayJob / RayService specs: ``KUBERAY_SCHEMAS`` below, written from KubeRay's
  ray.io/v1 Go types for the fields these files use (unknown fields fail too);
- serveConfigV2: Ray Serve's ``ServeDeploySchema`` and the field names of
  ``serve.schemas.ProviderArgs`` (the args of ``serve.app:build_app``);
- cluster/aws.yaml: Ray's cluster-launcher schema and ``validate_config``;
- cluster/runtime_env.yaml: ``ray.runtime_env.RuntimeEnv``, and the zip Ray builds with it;
- cluster/Containerfile: hadolint, and its pins against pyproject.toml / scripts/install.sh.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
import zipfile
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from gt_ray.config import load_yaml
from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"
BIN = Path(sys.executable).parent  # the venv's bin: ray, hadolint, gt-ray
K8S_VERSION = "1.30"  # the oldest Kubernetes these manifests are meant for
SHARED = "/mnt/shared"  # where every pod and node mounts the shared storage
APP_DIR = "/app"  # where cluster/Containerfile puts the repo (RayJobs read /app/configs/...)
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


@pytest.fixture(autouse=True, scope="module")
def local_ray_env():
    """Ray reads some settings when it is first imported, and these tests import its
    schemas: set the local cluster's defaults first, as ``jobs.common.init_ray`` does."""
    from jobs.common import local_ray_env as defaults

    for key, value in defaults().items():
        os.environ.setdefault(key, value)


@cache
def manifests() -> dict[str, list[dict]]:
    """Every YAML document under cluster/, by file name."""
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
            for p in sorted(CLUSTER.glob("*.yaml"))}


def of_kind(kind: str) -> list[dict]:
    return [d for docs in manifests().values() for d in docs if isinstance(d, dict) and d.get("kind") == kind]


def cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) of every RayCluster, RayJob with its own cluster, and RayService."""
    out = [(f"RayCluster/{d['metadata']['name']}", d["spec"]) for d in of_kind("RayCluster")]
    out += [(f"RayJob/{d['metadata']['name']}", d["spec"]["rayClusterSpec"])
            for d in of_kind("RayJob") if "rayClusterSpec" in d["spec"]]
    out += [(f"RayService/{d['metadata']['name']}", d["spec"]["rayClusterConfig"]) for d in of_kind("RayService")]
    return out


def pod_templates() -> list[tuple[str, dict]]:
    out = []
    for where, spec in cluster_specs():
        out.append((f"{where} head", spec["headGroupSpec"]["template"]))
        out += [(f"{where} group {g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return out


# ----------------------------------------------------------------------------- every file parses

CLUSTER_FILES = sorted(p for p in CLUSTER.iterdir() if p.is_file())


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_every_cluster_file_parses_and_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name}: the first line is a comment"
    if path.name != "Containerfile.dockerignore":  # read by the Containerfile's build command
        assert f"cluster/{path.name}" in first, f"{path.name}: the first line is the command that uses it"
    if path.suffix == ".yaml":
        assert manifests()[path.name], f"{path.name} holds no YAML document"


# ----------------------------------------------------------------------------- Kubernetes schemas

def test_core_kinds_validate_against_the_kubernetes_schema():
    core = [d for docs in manifests().values() for d in docs if isinstance(d, dict) and "apiVersion" in d
            and not d["apiVersion"].startswith("ray.io/")]
    assert [d["kind"] for d in core] == ["PersistentVolumeClaim"]
    for doc in core:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_pod_template_validates_against_the_kubernetes_schema():
    templates = pod_templates()
    assert len(templates) >= 4
    for where, template in templates:
        try:
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                          "template": template}, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where}: {e.message} at {list(e.absolute_path)}")


_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_POD_TEMPLATE = {"type": "object", "required": ["spec"]}  # the Kubernetes schema checks the rest
_CLUSTER_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "authOptions": {"type": "object", "additionalProperties": False, "required": ["mode"],
                        "properties": {"mode": {"enum": ["token", "disabled"]}}},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
            "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
            "idleTimeoutSeconds": _INT32, "image": {"type": "string"}, "resources": {"type": "object"},
            "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}, "env": {"type": "array"}}},
        "headServiceAnnotations": _STR_MAP,
        "suspend": {"type": "boolean"},
        "headGroupSpec": {"type": "object", "additionalProperties": False, "required": ["rayStartParams", "template"],
                          "properties": {"serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                                         "enableIngress": {"type": "boolean"}, "rayStartParams": _STR_MAP,
                                         "template": _POD_TEMPLATE}},
        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False,
            "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
            "properties": {"groupName": {"type": "string", "pattern": DNS_LABEL}, "replicas": _INT32,
                           "minReplicas": _INT32, "maxReplicas": {**_INT32, "minimum": 1},
                           "numOfHosts": {**_INT32, "minimum": 1}, "idleTimeoutSeconds": _INT32,
                           "rayStartParams": _STR_MAP, "template": _POD_TEMPLATE}}},
    },
}
_RAY_JOB_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["entrypoint"],
    "oneOf": [{"required": ["clusterSelector"]}, {"required": ["rayClusterSpec"]}],
    "properties": {
        "entrypoint": {"type": "string", "minLength": 1}, "runtimeEnvYAML": {"type": "string"},
        "clusterSelector": _STR_MAP, "rayClusterSpec": _CLUSTER_SPEC,
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
        "activeDeadlineSeconds": {**_INT32, "minimum": 1}, "backoffLimit": _INT32,
        "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": _INT32,
        "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
        "entrypointResources": {"type": "string"}, "metadata": _STR_MAP, "jobId": {"type": "string"},
        "suspend": {"type": "boolean"}, "submitterPodTemplate": _POD_TEMPLATE,
    },
}
_RAY_SERVICE_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["serveConfigV2", "rayClusterConfig"],
    "properties": {"serveConfigV2": {"type": "string"}, "rayClusterConfig": _CLUSTER_SPEC},
}


def _kuberay(kind: str, spec: dict) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}, "spec": spec,
                           "metadata": {"type": "object", "additionalProperties": False, "required": ["name"],
                                        "properties": {"name": {"type": "string", "pattern": DNS_LABEL},
                                                       "labels": _STR_MAP}}}}


KUBERAY_SCHEMAS = {"RayCluster": _kuberay("RayCluster", _CLUSTER_SPEC), "RayJob": _kuberay("RayJob", _RAY_JOB_SPEC),
                   "RayService": _kuberay("RayService", _RAY_SERVICE_SPEC)}


def test_kuberay_resources_validate_against_the_spec_fields_they_use():
    kinds = sorted(d["kind"] for docs in manifests().values() for d in docs if d.get("apiVersion") == "ray.io/v1")
    assert kinds == ["RayCluster", "RayJob", "RayJob", "RayJob", "RayService"]
    for kind, schema in KUBERAY_SCHEMAS.items():
        for doc in of_kind(kind):
            jsonschema.validate(doc, schema)


def test_every_kuberay_cluster_requires_a_token():
    for where, spec in cluster_specs():
        assert spec.get("authOptions") == {"mode": "token"}, f"{where}: the dashboard runs any job its callers send"


@pytest.mark.parametrize("path, bad", [
    (["spec", "workerGroupSpecs", 0, "maxReplica"], 8),                  # a typo of maxReplicas
    (["spec", "headGroupSpec", "rayStartParams", "num-cpus"], 0),         # not a string
    (["spec", "workerGroupSpecs", 0, "groupName"], "GPU_group"),          # not a DNS label
])
def test_the_kuberay_schema_catches_mistakes(path, bad):
    doc = copy.deepcopy(of_kind("RayCluster")[0])
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = bad
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, KUBERAY_SCHEMAS["RayCluster"])


# ----------------------------------------------------------------------------- what Kubernetes does not check

def test_worker_groups_have_sane_autoscaling_bounds_and_gpu_requests():
    gpu_groups = 0
    for where, spec in cluster_specs():
        for g in spec["workerGroupSpecs"]:
            replicas = g.get("replicas", g["minReplicas"])
            assert g["minReplicas"] <= replicas <= g["maxReplicas"], f"{where} {g['groupName']}"
            for c in g["template"]["spec"]["containers"]:
                req, lim = c["resources"].get("requests", {}), c["resources"].get("limits", {})
                for value in [*req.values(), *lim.values()]:
                    assert QUANTITY.match(str(value)), f"{where}: {value!r} is not a Kubernetes quantity"
                if "nvidia.com/gpu" in lim:  # extended resources: requests must equal limits
                    gpu_groups += 1
                    assert req.get("nvidia.com/gpu") == lim["nvidia.com/gpu"], where
    assert gpu_groups >= 1, "the RayCluster needs a GPU worker group"
    corpus = load_yaml(ROOT / "configs/qwen2.5/gsm8k.yaml").corpus
    gpu = next(g for g in of_kind("RayCluster")[0]["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert corpus.use_gpu and corpus.num_workers <= gpu["maxReplicas"], "corpus workers must fit in the GPU group"


def test_one_image_and_the_shared_volume_everywhere():
    pvc = of_kind("PersistentVolumeClaim")[0]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    images = set()
    for where, template in pod_templates():
        spec = template["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in spec["volumes"] if "persistentVolumeClaim" in v}
        for c in spec["containers"]:
            images.add(c["image"])
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert claims.get(mounts.get(SHARED)) == pvc["metadata"]["name"], f"{where}: {SHARED} is not the shared PVC"
    images.add(manifests()["aws.yaml"][0]["docker"]["image"])
    assert len(images) == 1, f"one image in every cluster/ file, got {sorted(images)}"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert images.pop().endswith(f"/gt-ray:{version}"), "the image tag follows the package version"


def _config_of(argv: list[str]) -> Path:
    path = argv[argv.index("--config") + 1]
    assert path.startswith(f"{APP_DIR}/"), f"--config {path}: RayJobs read the configs the image holds under {APP_DIR}"
    return ROOT / path.removeprefix(f"{APP_DIR}/")


def test_rayjobs_run_existing_gt_ray_commands_on_real_scale_configs(capsys):
    import importlib

    from jobs.cli import COMMANDS

    cluster_name = of_kind("RayCluster")[0]["metadata"]["name"]
    seen = set()
    for job in of_kind("RayJob"):
        spec = job["spec"]
        assert spec.get("clusterSelector") == {"ray.io/cluster": cluster_name}
        argv = shlex.split(spec["entrypoint"])
        assert argv[0] == "gt-ray" and argv[1] in COMMANDS, spec["entrypoint"]
        with pytest.raises(SystemExit) as exit_:
            importlib.import_module(COMMANDS[argv[1]][0]).main(["--help"])
        assert exit_.value.code == 0
        choices = re.search(r"\{([a-z,]+)\}", capsys.readouterr().out).group(1).split(",")  # argparse's {a,b}
        assert argv[2] in choices, f"`gt-ray {argv[1]}` has no action {argv[2]}"
        config = _config_of(argv)
        assert config.parent == ROOT / "configs/qwen2.5", f"{config}: a real-scale config"  # checked below
        seen.add(" ".join(argv[1:3]))
    assert seen == {"corpus build", "translator tune", "translator train"}


def test_qwen_configs_keep_every_path_on_shared_storage():
    for path in sorted((ROOT / "configs/qwen2.5").glob("*.yaml")):
        cfg = load_yaml(path)
        assert cfg.pair.tiny.dtype == cfg.pair.llm.dtype == "bfloat16"
        assert cfg.corpus.use_gpu and cfg.translator.use_gpu
        paths = [cfg.work_dir, cfg.cache_dir, cfg.corpus_dir, cfg.pair.tiny.path, cfg.pair.llm.path,
                 *cfg.tasks.data_files.values()]
        assert [p for p in paths if not p.startswith(f"{SHARED}/")] == [], f"{path.name}: off the shared storage"


# ----------------------------------------------------------------------------- the Serve config

def test_rayservice_serve_config_matches_ray_serve_and_the_app(tmp_path):
    from ray.runtime_env import RuntimeEnv
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    from gt_ray.translator.checkpoint import CONFIG_FILENAME
    from jobs.prepare_pair import CARD_FILE
    from gt_ray.pipeline import translator_dir_from
    from serve.schemas import BatchSettings, ProviderArgs

    (service,) = of_kind("RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # types; it ignores unknown keys, so check names too:
    assert set(config) <= set(ServeDeploySchema.model_fields)
    assert set(config["http_options"]) <= set(HTTPOptionsSchema.model_fields)
    (app,) = config["applications"]
    assert set(app) <= set(ServeApplicationSchema.model_fields)
    assert app["import_path"] == "serve.app:build_app" and app["route_prefix"].startswith("/")
    RuntimeEnv(**app["runtime_env"])

    args = app["args"]
    required = {name for name, f in ProviderArgs.model_fields.items() if f.is_required()}
    assert required <= set(args) <= set(ProviderArgs.model_fields), "args must be ProviderArgs fields"
    # The values too: ProviderArgs wants the files to exist, so stand-ins replace the paths.
    (tmp_path / "translator").mkdir()
    for stand_in in ("translator/" + CONFIG_FILENAME, "card.json", "tokens.json"):
        (tmp_path / stand_in).write_text("{}")
    stand_ins = {"checkpoint": tmp_path / "translator", "card": tmp_path / "card.json",
                 "tokens": tmp_path / "tokens.json", "state_dir": tmp_path}
    provider = ProviderArgs.model_validate({**args, **{k: str(v) for k, v in stand_ins.items()}})
    (translator,) = [d for d in app["deployments"] if d["name"] == "Translator"]
    batch = BatchSettings.model_validate(translator["user_config"])
    assert batch.max_batch_size <= provider.max_ongoing_requests, "batches could never fill"
    work = Path(load_yaml(ROOT / "configs/qwen2.5/gsm8k.yaml").work_dir)
    assert args["card"] == str(work / CARD_FILE)
    assert args["checkpoint"] == str(translator_dir_from(work))
    assert args["state_dir"].startswith(f"{work}/")
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    secret_dirs = {m["mountPath"] for m in head["volumeMounts"] if m.get("readOnly")}
    assert str(Path(args["tokens"]).parent) in secret_dirs, "the tokens file comes from the mounted Secret"


def test_rayservice_matches_serve_config_yaml():
    """serveConfigV2 and serve/config.yaml (``serve run``) deploy the same app; only the
    paths and the cluster's sizing args differ."""
    path = ROOT / "serve/config.yaml"
    if not path.is_file():
        pytest.skip("serve/config.yaml is not written yet")
    local = {a["name"]: a for a in yaml.safe_load(path.read_text())["applications"]}
    for app in yaml.safe_load(of_kind("RayService")[0]["spec"]["serveConfigV2"])["applications"]:
        assert app["name"] in local, f"application {app['name']} is not in serve/config.yaml"
        mine, theirs = app, local[app["name"]]
        assert (mine["import_path"], mine.get("route_prefix")) == (theirs["import_path"], theirs.get("route_prefix"))
        assert set(theirs.get("args", {})) <= set(mine["args"])
        assert mine.get("deployments") == theirs.get("deployments")


# ----------------------------------------------------------------------------- the cluster launcher

def test_aws_launcher_config_passes_rays_validation():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    (config,) = manifests()["aws.yaml"]
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # with the AWS defaults filled in
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(SHARED in cmd for cmd in config["initialization_commands"])
    assert f"--volume {SHARED}:{SHARED}" in config["docker"]["run_options"]


# ----------------------------------------------------------------------------- runtime env and upload

def runtime_env() -> dict:
    (env,) = manifests()["runtime_env.yaml"]
    return env


def package(directory: Path, out: Path) -> dict[str, int]:
    """The files and sizes of the zip ``ray job submit --runtime-env cluster/runtime_env.yaml
    --working-dir DIRECTORY`` uploads (Ray's own packaging, as its CLI calls it)."""
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    excludes = get_runtime_env_default_excludes() + runtime_env()["excludes"]
    create_package(str(directory), out, include_gitignore=True, excludes=excludes)
    with zipfile.ZipFile(out) as z:
        return {i.filename: i.file_size for i in z.infolist() if not i.is_dir()}


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    env = runtime_env()
    assert "working_dir" not in env, "--working-dir . on the command line: a path here would be relative to the caller"
    RuntimeEnv(**env)


def test_upload_leaves_out_environments_artifacts_and_data(tmp_path):
    tree = tmp_path / "repo"
    keep = ["gt_ray/__init__.py", "jobs/cli.py", "serve/app.py", "configs/qwen2.5/gsm8k.yaml",
            "cluster/runtime_env.yaml", "pyproject.toml", ".gitignore"]
    drop = [".venv/lib/site.py", "venv/bin/python", ".git/HEAD", "gt_ray/__pycache__/config.cpython-311.pyc",
            "runs/tiny/corpus/shard-00000.parquet", "runs/tiny/translator/model.safetensors", "results/table.json",
            "benchmarks/results/decode.json", "work/ray_results/corpus/checkpoint.json", "checkpoints/best.pt",
            "corpus/manifest.json", "data/gsm8k/public.jsonl", "models/Qwen2.5-1.5B-Instruct/config.json",
            "export/adapter_model.safetensors", "gt_ray.egg-info/PKG-INFO", ".pytest_cache/v/cache/lastfailed",
            "build/lib/gt_ray/__init__.py", "dist/gt_ray-0.1.0.whl", "weights.bin", "model.ckpt"]
    for rel in keep + drop:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("x")
    shutil.copy(ROOT / ".gitignore", tree / ".gitignore")
    assert sorted(package(tree, tmp_path / "pkg.zip")) == sorted(keep)


def test_upload_of_this_checkout_is_small(tmp_path):
    files = package(ROOT, tmp_path / "pkg.zip")
    assert {"pyproject.toml", "jobs/cli.py", "gt_ray/config.py", "configs/qwen2.5/gsm8k.yaml"} <= set(files)
    assert not [f for f in files if f.split("/")[0] in (".venv", ".git", "runs")]
    size = (tmp_path / "pkg.zip").stat().st_size
    assert size < 5 * 2**20, f"the working dir zips to {size / 2**20:.1f} MiB: an artifact is not excluded"


# ----------------------------------------------------------------------------- the image recipe

def _containerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", (CLUSTER / "Containerfile").read_text(), re.M))


def test_containerfile_passes_hadolint():
    out = subprocess.run([str(BIN / "hadolint"), "--no-color", "--failure-threshold", "warning",
                          str(CLUSTER / "Containerfile")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_containerfile_installs_the_pinned_ray_and_a_cuda_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    args = _containerfile_args()
    ray_pin = next(Requirement(r) for r in project["project"]["optional-dependencies"]["ray"] if r.startswith("ray"))
    ray_version = re.match(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+-gpu$", args["RAY_IMAGE"]).group(1)
    assert ray_pin.specifier.contains(ray_version), f"{args['RAY_IMAGE']} is not {ray_pin}"
    for kind in ("RayCluster", "RayService"):
        for doc in of_kind(kind):
            assert (doc["spec"].get("rayVersion") or doc["spec"]["rayClusterConfig"]["rayVersion"]) == ray_version
    cpu_pin = re.search(r'"torch==([^"]+)"', (ROOT / "scripts/install.sh").read_text()).group(1)
    assert args["TORCH_VERSION"] == cpu_pin, "the image runs the torch release the CPU path tests"
    code = [line for line in (CLUSTER / "Containerfile").read_text().splitlines() if not line.startswith("#")]
    assert not [line for line in code if "whl/cpu" in line or "+cpu" in line], "a CPU-only torch in the image"
    assert any('pip install --no-cache-dir ".[ray]"' in line for line in code)
    assert project["project"]["scripts"]["gt-ray"] == "jobs.cli:main"


def test_containerfile_context_holds_what_it_copies():
    text = (CLUSTER / "Containerfile").read_text()
    sources = {src.rstrip("/") for src in re.findall(r"^COPY (?:--\S+ )*(\S+) ", text, re.M)}
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {p.rstrip("*") for p in find["include"]}
    assert packages | {"pyproject.toml", "configs"} <= sources
    ignore = (CLUSTER / "Containerfile.dockerignore").read_text().splitlines()
    allowed = ignore[ignore.index("*") + 1:]  # everything is left out, then these come back
    assert {f"!{src}" for src in sources} <= set(allowed)


# ----------------------------------------------------------------------------- a real head, the real CLI

JOB_SCRIPT = '''\
"""Runs on the cluster: gt_ray builds the tiny model of a config and draws a task example."""
import dataclasses
import json
import sys
import tempfile

from gt_ray import tasks
from gt_ray.config import load_yaml
from gt_ray.models import load_with_lora, prepare_model

cfg = load_yaml(sys.argv[1])
# The layout needs no training: one pretraining step, to go through the library's build path.
spec = dataclasses.replace(cfg.pair.tiny, pretrain=dataclasses.replace(cfg.pair.tiny.pretrain, steps=1, warmup_steps=0,
                                                                       batch_size=2))
with tempfile.TemporaryDirectory() as cache:
    lm = load_with_lora(prepare_model(spec, cache, cfg.tasks.names), cfg.pair.lora, cfg.pair.lora.init_seed_tiny)
example = tasks.generate_dataset(tasks.DatasetSpec("public", 3, {"caesar": 1.0}, 1, 7))[0]
print("GT_RAY_RESULT", json.dumps({"fingerprint": lm.layout.fingerprint, "shape": list(lm.layout.shape),
                                   "prompt": example.prompt, "answer": example.answer}))
'''
UPLOAD_PROBE = ("import json, os, shutil, gt_ray; print('GT_RAY_UPLOAD', json.dumps({'gt_ray': gt_ray.__file__, "
                "'cwd': sorted(os.listdir('.')), 'gt_ray_cmd': shutil.which('gt-ray'), "
                "'hf_offline': os.environ.get('HF_HUB_OFFLINE')}))")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _result(stdout: str, tag: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith(tag + " ")]
    assert lines, f"no {tag} line in the job's output:\n{stdout[-3000:]}"
    return json.loads(lines[-1].split(" ", 1)[1])


def _stop_head(head: subprocess.Popen, temp: str) -> list[int]:
    """Stop the head this test started, and only it; return the pids still alive after 15 s.

    ``ray stop --force`` would kill every Ray process on the machine, other people's
    clusters included. So: SIGKILL the process group of ``ray start --block`` (its own
    session), then any process still running from this head's temp dir, by pid.
    """
    import psutil

    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=30)
    deadline = time.time() + 15
    while True:
        left = [p for p in psutil.process_iter(["cmdline"]) if temp in " ".join(p.info["cmdline"] or [])]
        if not left or time.time() > deadline:
            return [p.pid for p in left]
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.5)


@pytest.mark.ray
def test_ray_job_submit_to_a_real_head(tmp_path, monkeypatch, capsys):
    import runpy

    config = ROOT / "configs/ci.yaml"
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "script.py").write_text(JOB_SCRIPT)
    monkeypatch.setattr(sys, "argv", ["script.py", str(config)])
    runpy.run_path(str(job_dir / "script.py"), run_name="__main__")
    expected = _result(capsys.readouterr().out, "GT_RAY_RESULT")

    gcs, dashboard, agent, agent_grpc, client, node_manager, object_manager, metrics, runtime_env_agent = _free_ports(9)
    temp = tempfile.mkdtemp(prefix="gtrc-", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")  # jobs run `python` and `gt-ray` from this venv
    ray = str(BIN / "ray")
    address = f"http://127.0.0.1:{dashboard}"
    t0 = time.time()
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--ray-client-server-port={client}", f"--node-manager-port={node_manager}",
         f"--object-manager-port={object_manager}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env_agent}", "--object-store-memory=100000000", f"--temp-dir={temp}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:  # the job server answers once the dashboard is up
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except OSError:
                assert head.poll() is None and time.time() - t0 < 90, (tmp_path / "head.log").read_text()[-3000:]
                time.sleep(0.5)

        out = subprocess.run([ray, "job", "submit", "--address", address, "--working-dir", str(job_dir), "--",
                              "python", "script.py", str(config)],
                             env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert _result(out.stdout, "GT_RAY_RESULT") == expected

        # The repo as `ray job submit --runtime-env cluster/runtime_env.yaml --working-dir .` uploads it.
        out = subprocess.run([ray, "job", "submit", "--address", address, "--runtime-env", "cluster/runtime_env.yaml",
                              "--working-dir", ".", "--", "python", "-c", UPLOAD_PROBE],
                             env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        probe = _result(out.stdout, "GT_RAY_UPLOAD")
        assert "_ray_pkg_" in probe["gt_ray"], "the uploaded code comes first on the job's PYTHONPATH"
        assert {"gt_ray", "jobs", "serve", "configs", "cluster", "pyproject.toml"} <= set(probe["cwd"])
        assert not {".venv", ".git", "runs"} & set(probe["cwd"])
        assert probe["gt_ray_cmd"] and probe["hf_offline"] == "1"
    finally:
        left = _stop_head(head, temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
    assert not left, f"processes of the test's head still running: {left}"
