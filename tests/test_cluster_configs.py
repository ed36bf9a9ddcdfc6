"""Checks of cluster_configs/, offline: no network, no cloud account, no cluster.

Every YAML there parses (multi-document); the `ray up` configs pass the checks
`ray up` itself runs before it calls a cloud API (Ray's JSON schema, then its
defaults merge and validation); the security settings hold everywhere (token
authentication on, dashboards on 127.0.0.1 with one guarded exception, pinned
images); the runtime environment packages the code a job needs and none of the
local clutter; the README documents the safe path.

    .venv/bin/python -m pytest tests/test_cluster_configs.py -q
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cluster_configs"
NFS_LAUNCHERS = ["aws-gpu.yaml", "gcp-gpu.yaml"]
# The same clusters with their outputs in S3 / Cloud Storage instead of NFS.
OBJECT_LAUNCHERS = ["aws-gpu-s3.yaml", "gcp-gpu-gcs.yaml"]
LAUNCHERS = NFS_LAUNCHERS + OBJECT_LAUNCHERS
KUBERAY = {"kuberay-raycluster.yaml": "RayCluster", "kuberay-rayjob.yaml": "RayJob",
           "kuberay-raycluster-object-storage.yaml": "RayCluster"}
KUBERAY_NFS = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"]
KUBERAY_OBJECT = "kuberay-raycluster-object-storage.yaml"
RUNTIME_ENV = CONFIGS / "runtime_env.yaml"
RUNTIME_ENV_OBJECT = CONFIGS / "runtime_env_object_storage.yaml"
# Cloud credentials never belong in these files: every node has its own identity.
CLOUD_SECRETS = re.compile(r"AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|"
                           r"GOOGLE_APPLICATION_CREDENTIALS|private_key_id")
README = CONFIGS / "README.md"

SHARED = "/mnt/shared"
TOKEN_SECRET = "actclust-ray-token"
GPU = "nvidia.com/gpu"
# rayproject/ray:<x.y.z>-py<NN>-cu<NNN>: a release, a Python and a CUDA version.
PINNED_TAG = re.compile(r"^(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d{2,3})-cu(?P<cu>\d{3})$")
AUTH_DISABLED = re.compile(r"RAY_AUTH_MODE[\"']?\s*[=:]\s*[\"']?disabled", re.IGNORECASE)


def load_docs(name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((CONFIGS / name).read_text()) if d is not None]
    assert docs, f"{name} holds no YAML document"
    return docs


def launcher(name: str) -> dict:
    (cfg,) = load_docs(name)
    return cfg


def kuberay_resource(name: str) -> dict:
    kind = KUBERAY[name]
    found = [d for d in load_docs(name) if d.get("kind") == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


def cluster_spec(name: str) -> dict:
    doc = kuberay_resource(name)
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def pod_specs(spec: dict) -> list[tuple[str, dict]]:
    """(group, pod template) for the head and every worker group."""
    groups = [("head", spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    return [(name, group["template"]) for name, group in groups]


def containers(spec: dict) -> list[tuple[str, dict]]:
    return [(group, c) for group, template in pod_specs(spec)
            for c in template["spec"]["containers"]]


def env_of(entries: list[dict] | None) -> dict[str, dict]:
    return {e["name"]: e for e in entries or []}


def strings_in(value) -> list[str]:
    """Every string (keys and values) in a parsed YAML document."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*strings_in(k), *strings_in(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return [value] if isinstance(value, str) else []


def all_commands(cfg: dict) -> list[str]:
    """Every shell command of a launcher config, node-type specific ones included."""
    keys = ["initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"]
    cmds = [c for k in keys for c in cfg.get(k) or []]
    for node in cfg["available_node_types"].values():
        cmds += [c for k in ("initialization_commands", "worker_setup_commands")
                 for c in node.get(k) or []]
    return cmds


def image_tag(image: str) -> tuple[str, re.Match | None]:
    repo, _, tag = image.rpartition(":")
    return repo, PINNED_TAG.match(tag)


@pytest.fixture(scope="module")
def launcher_image() -> str:
    images = {launcher(n)["docker"]["image"] for n in LAUNCHERS}
    assert len(images) == 1, f"the launcher configs disagree on the image: {images}"
    return images.pop()


# --- every file ---------------------------------------------------------------


def test_the_expected_files_are_there():
    names = {p.name for p in CONFIGS.iterdir() if p.is_file()}
    assert {*LAUNCHERS, *KUBERAY, RUNTIME_ENV.name, RUNTIME_ENV_OBJECT.name, README.name} <= names


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.y*ml")))
def test_every_yaml_parses(name):
    for doc in load_docs(name):
        assert isinstance(doc, dict), f"{name}: a document is not a mapping"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.y*ml")))
def test_token_auth_is_never_disabled(name):
    text = (CONFIGS / name).read_text()
    assert not AUTH_DISABLED.search(text), f"{name} turns Ray token authentication off"
    assert "--include-dashboard=true" not in text.replace(" ", "")


# --- `ray up` configs ---------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_has_the_required_keys(name):
    cfg = launcher(name)
    assert cfg["cluster_name"]
    assert cfg["provider"]["type"] in {"aws", "gcp"}
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["max_workers"] > 0
    assert cfg["idle_timeout_minutes"] > 0
    for key in ("auth", "docker", "file_mounts", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert cfg.get(key), f"{name}: {key} is missing or empty"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_passes_rays_own_schema(name):
    """The JSON schema that ships with Ray, then the same prepare/validate steps
    `ray up` runs (defaults merge, docker and node-type checks) before it calls
    the cloud provider."""
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    cfg = launcher(name)
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_the_schema_check_has_teeth():
    """A misspelt field fails the same check, so a pass above means something."""
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = launcher(LAUNCHERS[0])
    worker = next(n for n in cfg["available_node_types"] if n != cfg["head_node_type"])
    cfg["available_node_types"][worker]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, schema)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_gpu_workers_scale_from_zero(name):
    cfg = launcher(name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head should be a CPU node"
    assert head["resources"].get("CPU") == 0, "the head should take no actors"
    gpu_types = {n: t for n, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_types, f"{name}: no GPU worker type (GCP needs resources stated)"
    for n, t in gpu_types.items():
        assert t.get("min_workers", 0) == 0, f"{n} must scale from zero"
        assert 0 < t["max_workers"] <= cfg["max_workers"]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_image_is_pinned(name):
    import ray

    docker = launcher(name)["docker"]
    for key in ("head_image", "worker_image"):
        assert docker.get(key, docker["image"]) == docker["image"]
    repo, tag = image_tag(docker["image"])
    assert repo == "rayproject/ray"
    assert tag, f"{docker['image']}: not pinned to <ray version>-py<NN>-cu<NNN>"
    assert tag["ray"] == ray.__version__, "client and cluster must run the same Ray"
    assert tag["py"] == "311"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_dashboard_stays_on_localhost(name):
    cfg = launcher(name)
    assert "0.0.0.0" not in (CONFIGS / name).read_text()
    heads = [c for c in all_commands(cfg) if re.search(r"\bray start\b", c) and "--head" in c]
    assert heads, f"{name}: no `ray start --head` command"
    for cmd in heads:
        assert ("--dashboard-host=127.0.0.1" in cmd
                or "--include-dashboard=false" in cmd), cmd
    for cmd in all_commands(cfg):
        for host in re.findall(r"--dashboard-host[= ](\S+)", cmd):
            assert host == "127.0.0.1", cmd


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_runs_ray_with_token_auth(name):
    cfg = launcher(name)
    run_options = " ".join(cfg["docker"].get("run_options", []))
    assert re.search(r"(--env|-e)\s+RAY_AUTH_MODE=token\b", run_options)
    starts = [c for c in all_commands(cfg) if re.search(r"\bray start\b", c)]
    assert len(starts) >= 2, "head and worker start commands"
    for cmd in starts:
        before = cmd[: cmd.index("ray start")]
        assert re.search(r"\bRAY_AUTH_MODE=token\b", before), cmd
    # The token the client holds goes to every node.
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


@pytest.mark.parametrize("name", NFS_LAUNCHERS)
def test_launcher_mounts_shared_storage_on_every_node(name):
    """The presets write to /mnt/shared from every node; worker types that
    bring their own initialization_commands replace the global list, so they
    must mount it themselves."""
    cfg = launcher(name)
    assert f"-v {SHARED}:{SHARED}" in cfg["docker"]["run_options"]
    head_init = cfg["initialization_commands"]
    assert any(re.search(rf"mount .*{SHARED}", c) for c in head_init)
    for n, t in cfg["available_node_types"].items():
        init = t.get("initialization_commands", head_init)
        assert any(re.search(rf"mount .*{SHARED}", c) for c in init), n


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_syncs_the_repo_without_local_clutter(name):
    cfg = launcher(name)
    assert "." in cfg["file_mounts"].values(), "the repository is not synced"
    assert {".venv", ".git", "runs"} <= set(cfg["rsync_exclude"])
    assert any("/home/ray/actclust[gpu]" in c for c in cfg["setup_commands"])


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_commands_are_valid_shell(name):
    for cmd in all_commands(launcher(name)):
        done = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert done.returncode == 0, f"{cmd}\n{done.stderr}"


# --- KubeRay ------------------------------------------------------------------


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_kind_and_api_version(name):
    doc = kuberay_resource(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["metadata"]["name"]


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_gpu_group_autoscales_from_zero(name):
    spec = cluster_spec(name)
    assert spec["enableInTreeAutoscaling"] is True
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        limits = [c.get("resources", {}).get("limits", {})
                  for c in group["template"]["spec"]["containers"]]
        if any(GPU in lim for lim in limits):
            gpu_groups.append(group)
            for c in group["template"]["spec"]["containers"]:
                res = c["resources"]
                assert int(res["limits"][GPU]) == 1, c["name"]
                assert int(res.get("requests", {}).get(GPU, 1)) == 1, c["name"]
    assert gpu_groups, f"{name}: no worker group with {GPU} limits"
    for group in gpu_groups:
        assert group["minReplicas"] == 0
        assert group["maxReplicas"] > 0
        assert 0 <= group.get("replicas", 0) <= group["maxReplicas"]
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert GPU not in head_limits.get("limits", {})
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_images_match_the_launchers(name, launcher_image):
    spec = cluster_spec(name)
    for group, c in containers(spec):
        assert c["image"] == launcher_image, f"{name}/{group}/{c['name']}"
    assert spec["rayVersion"] == image_tag(launcher_image)[1]["ray"]
    assert "image" not in spec.get("autoscalerOptions", {}), "autoscaler image drifts"


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", KUBERAY_OBJECT])
def test_raycluster_uses_token_from_the_secret(name):
    spec = cluster_spec(name)
    env_lists = [("autoscaler", spec["autoscalerOptions"].get("env"))]
    env_lists += [(f"{g}/{c['name']}", c.get("env")) for g, c in containers(spec)]
    for where, entries in env_lists:
        env = env_of(entries)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
        token = env.get("RAY_AUTH_TOKEN", {})
        assert "value" not in token, f"{where}: a literal token in the manifest"
        ref = token.get("valueFrom", {}).get("secretKeyRef", {})
        assert ref.get("name") == TOKEN_SECRET and ref.get("key") == "auth_token", where


def test_rayjob_uses_token_from_the_secret():
    spec = cluster_spec("kuberay-rayjob.yaml")
    assert spec["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}
    for group, c in containers(spec):
        env = env_of(c.get("env"))
        assert "RAY_AUTH_TOKEN" not in env or "value" not in env["RAY_AUTH_TOKEN"], group
        assert env.get("RAY_AUTH_MODE", {}).get("value", "token") == "token", group


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", KUBERAY_OBJECT])
def test_raycluster_dashboard_stays_on_localhost(name):
    head = cluster_spec(name)["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    assert "0.0.0.0" not in (CONFIGS / name).read_text()


def test_rayjob_dashboard_exception_is_guarded():
    """The operator must reach this cluster's job API through the head Service,
    so its dashboard cannot be on loopback. Then: token auth, a ClusterIP
    Service, no Ingress, HTTPMode (no submitter pod), and a NetworkPolicy that
    admits port 8265 from the operator only."""
    name = "kuberay-rayjob.yaml"
    job = kuberay_resource(name)
    spec = job["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]
    if head["rayStartParams"].get("dashboard-host") == "127.0.0.1":
        return
    assert (CONFIGS / name).read_text().count("0.0.0.0") == 1, "only the head's dashboard"
    assert job["spec"]["submissionMode"] == "HTTPMode"
    assert spec["authOptions"]["mode"] == "token"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)

    head_labels = head["template"]["metadata"]["labels"]
    job_labels = [g["template"]["metadata"]["labels"] for g in [head, *spec["workerGroupSpecs"]]]
    policies = [d for d in load_docs(name) if d.get("kind") == "NetworkPolicy"]
    guarding = [p for p in policies
                if p["spec"]["podSelector"]["matchLabels"].items() <= head_labels.items()
                and "Ingress" in p["spec"]["policyTypes"]]
    assert guarding, "no NetworkPolicy selects the RayJob's head pod"
    for rule in guarding[0]["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        for peer in rule["from"]:
            selector = peer.get("podSelector", {}).get("matchLabels", {})
            if ports == {8265}:
                assert selector == {"app.kubernetes.io/name": "kuberay-operator"}
            else:  # unrestricted ports: this job's own pods, same namespace only
                assert "namespaceSelector" not in peer and "ipBlock" not in peer
                assert selector and all(selector.items() <= lab.items() for lab in job_labels)


def test_rayjob_runs_the_paper_pipeline():
    job = kuberay_resource("kuberay-rayjob.yaml")["spec"]
    assert job["entrypoint"] == (
        "python jobs/pipeline.py --config jobs/presets/paper_mistral7b.yaml")
    assert job["shutdownAfterJobFinishes"] is True
    for path in job["entrypoint"].split()[1::2]:
        assert (ROOT / path).is_file(), f"the entrypoint names a missing file: {path}"


def test_rayjob_runtime_env_matches_runtime_env_yaml():
    from ray.runtime_env import RuntimeEnv

    job = kuberay_resource("kuberay-rayjob.yaml")["spec"]
    env = yaml.safe_load(job["runtimeEnvYAML"])
    RuntimeEnv(**env)  # Ray's own validation of every field
    assert env["working_dir"].startswith(f"local://{SHARED}/"), (
        "the RayJob runs code that is already on the shared volume")
    reference = yaml.safe_load(RUNTIME_ENV.read_text())
    assert env["pip"] == reference["pip"]
    assert env["env_vars"] == reference["env_vars"]


@pytest.mark.parametrize("name", KUBERAY_NFS)
def test_kuberay_pods_mount_shared_storage(name):
    for group, template in pod_specs(cluster_spec(name)):
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for c in template["spec"]["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert SHARED in mounts, f"{name}/{group}/{c['name']}"
            claim = volumes[mounts[SHARED]].get("persistentVolumeClaim", {})
            assert claim.get("claimName") == "actclust-shared"


# --- object storage instead of a shared file system ---------------------------


@pytest.mark.parametrize("name", [*OBJECT_LAUNCHERS, KUBERAY_OBJECT,
                                  RUNTIME_ENV_OBJECT.name])
def test_object_storage_configs_need_no_shared_volume_and_hold_no_cloud_secret(name):
    text = (CONFIGS / name).read_text()
    values = [v for doc in load_docs(name) for v in strings_in(doc)]
    assert not [v for v in values if SHARED in v], f"{name} still depends on the shared mount"
    assert not CLOUD_SECRETS.search(text), f"{name} names a cloud credential"


@pytest.mark.parametrize("name", OBJECT_LAUNCHERS)
def test_object_storage_launcher_gives_every_node_an_identity(name):
    """Each node reaches the bucket as itself: an IAM instance profile on AWS, an
    attached service account with the cloud-platform scope on GCP."""
    cfg = launcher(name)
    assert "-v" not in " ".join(cfg["docker"]["run_options"]).split()
    for node_type, node in cfg["available_node_types"].items():
        node_config = node["node_config"]
        if cfg["provider"]["type"] == "aws":
            arn = node_config["IamInstanceProfile"]["Arn"]
            assert re.fullmatch(r"arn:aws:iam::\w+:instance-profile/[\w+=,.@-]+", arn), arn
        else:
            (account,) = node_config["serviceAccounts"]
            assert account["email"].endswith(".iam.gserviceaccount.com"), node_type
            assert "https://www.googleapis.com/auth/cloud-platform" in account["scopes"]
    workers = [n for n in cfg["available_node_types"] if n != cfg["head_node_type"]]
    assert workers


def test_object_storage_launchers_match_their_nfs_twins():
    """Apart from storage and identity, the S3/GCS clusters are the NFS ones."""
    for nfs, obj in zip(NFS_LAUNCHERS, OBJECT_LAUNCHERS):
        a, b = launcher(nfs), launcher(obj)
        for key in ("max_workers", "idle_timeout_minutes", "docker", "provider",
                    "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
            if key == "docker":
                keep = [o for o in a[key]["run_options"] if SHARED not in o]
                assert b[key]["run_options"] == keep, obj
                continue
            assert a[key] == b[key], f"{obj}: {key} differs from {nfs}"
        for node_type in a["available_node_types"]:
            na, nb = a["available_node_types"][node_type], b["available_node_types"][node_type]
            assert na["resources"] == nb["resources"], node_type
            same = {k: v for k, v in nb["node_config"].items()
                    if k not in ("IamInstanceProfile", "serviceAccounts")}
            assert same == na["node_config"], node_type


def test_kuberay_object_storage_pods_run_as_the_annotated_service_account():
    docs = load_docs(KUBERAY_OBJECT)
    (account,) = [d for d in docs if d.get("kind") == "ServiceAccount"]
    annotations = account["metadata"]["annotations"]
    assert re.fullmatch(r"arn:aws:iam::\w+:role/[\w+=,.@-]+",
                        annotations["eks.amazonaws.com/role-arn"])
    assert annotations["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")
    spec = cluster_spec(KUBERAY_OBJECT)
    for group, template in pod_specs(spec):
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"], group
        for volume in template["spec"].get("volumes", []):
            assert "persistentVolumeClaim" not in volume, f"{group}: {volume['name']}"
    assert cluster_spec("kuberay-raycluster.yaml")["workerGroupSpecs"][0]["maxReplicas"] == \
        spec["workerGroupSpecs"][0]["maxReplicas"]
    assert kuberay_resource(KUBERAY_OBJECT)["metadata"]["name"] != \
        kuberay_resource("kuberay-raycluster.yaml")["metadata"]["name"]


def test_object_storage_runtime_env_is_runtime_env_without_the_shared_cache():
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    env = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV_OBJECT), working_dir=".")
    RuntimeEnv(**env)
    nfs = yaml.safe_load(RUNTIME_ENV.read_text())
    obj = yaml.safe_load(RUNTIME_ENV_OBJECT.read_text())
    assert obj["pip"] == nfs["pip"] and obj["excludes"] == nfs["excludes"]
    assert obj["working_dir"] == nfs["working_dir"]
    assert obj["env_vars"] == {k: v for k, v in nfs["env_vars"].items() if k != "HF_HOME"}


def test_object_storage_preset_is_the_paper_preset_on_a_bucket():
    from actclust.io import storage

    paper = yaml.safe_load((ROOT / "jobs/presets/paper_mistral7b.yaml").read_text())
    on_s3 = yaml.safe_load((ROOT / "jobs/presets/paper_mistral7b_s3.yaml").read_text())
    assert storage.scheme(on_s3["out"]) == "s3"
    assert {k: v for k, v in on_s3.items() if k != "out"} == \
        {k: v for k, v in paper.items() if k != "out"}


def test_paper_preset_writes_to_the_shared_mount():
    preset = yaml.safe_load((ROOT / "jobs/presets/paper_mistral7b.yaml").read_text())
    assert str(preset["out"]).startswith(f"{SHARED}/")
    assert not preset.get("trust_remote_code", False)


# --- runtime_env.yaml ---------------------------------------------------------


def test_runtime_env_parses_as_ray_job_submit_reads_it():
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    env = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV), working_dir=".")
    RuntimeEnv(**env)
    assert yaml.safe_load(RUNTIME_ENV.read_text())["working_dir"] == "."
    assert {".venv", ".git", "runs"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert env["env_vars"]["HF_HOME"].startswith(f"{SHARED}/")
    secretish = [k for k in env["env_vars"] if re.search(r"(TOKEN|SECRET|PASSWORD|_KEY)$", k)]
    assert not secretish, f"secrets do not belong in a runtime environment: {secretish}"


def test_runtime_env_pip_matches_pyproject():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["gpu"]

    def by_name(reqs):
        parsed = [Requirement(r) for r in reqs]
        return {canonicalize_name(r.name): str(r.specifier) for r in parsed}

    expected = {n: s for n, s in by_name(wanted).items() if n != "ray"}
    pip = yaml.safe_load(RUNTIME_ENV.read_text())["pip"]["packages"]
    assert by_name(pip) == expected


def test_runtime_env_uploads_the_code_and_not_the_clutter(tmp_path, monkeypatch):
    """Build the very package `ray job submit --working-dir .` would upload."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    monkeypatch.chdir(ROOT)
    env = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV), working_dir=".")
    seen = {}

    def capture(working_dir, excludes, is_file=False):
        seen.update(working_dir=working_dir, excludes=excludes)

    upload_working_dir_if_needed(env, include_gitignore=True, upload_fn=capture)
    target = tmp_path / "working_dir.zip"
    create_package(seen["working_dir"], target, include_gitignore=True,
                   excludes=seen["excludes"])
    names = zipfile.ZipFile(target).namelist()
    for needed in ("actclust/__init__.py", "jobs/pipeline.py",
                   "jobs/presets/paper_mistral7b.yaml", "pyproject.toml"):
        assert needed in names, needed
    for name in names:
        assert not re.match(r"(\.venv|\.git|runs)/", name), name
        assert "__pycache__/" not in name, name
    assert target.stat().st_size < GCS_STORAGE_MAX_SIZE // 2


# --- README -------------------------------------------------------------------


def test_readme_documents_the_safe_path():
    text = README.read_text()
    for needed in (
        "ray up cluster_configs/aws-gpu.yaml",
        "ray up cluster_configs/gcp-gpu.yaml",
        "ray dashboard cluster_configs/aws-gpu.yaml",
        "RAY_AUTH_MODE=token",
        "~/.ray/auth_token",
        "ray job submit --address http://127.0.0.1:8265 --working-dir .",
        "--runtime-env cluster_configs/runtime_env.yaml",
        "python jobs/pipeline.py --config jobs/presets/paper_mistral7b.yaml",
        "ray job logs",
        "ray job status",
        "ray down cluster_configs/aws-gpu.yaml",
        "kubectl port-forward",
        "trust_remote_code",
        "--dashboard-host=127.0.0.1",
    ):
        assert needed in text, needed
    assert re.search(r"ssh\b[^\n`]*-L 8265:localhost:8265", text), "the SSH tunnel"
    assert re.search(r"EFS", text) and re.search(r"Filestore", text) and "NFS" in text


def test_readme_documents_object_storage():
    text = README.read_text()
    for needed in ("ray up cluster_configs/aws-gpu-s3.yaml",
                   "ray up cluster_configs/gcp-gpu-gcs.yaml",
                   "kubectl apply -f cluster_configs/kuberay-raycluster-object-storage.yaml",
                   "--runtime-env cluster_configs/runtime_env_object_storage.yaml",
                   "IRSA", "Workload Identity", "instance profile", "AWS_ENDPOINT_URL",
                   "s3://", "gs://"):
        assert needed in text, needed


def test_readme_paths_exist():
    text = README.read_text()
    paths = set(re.findall(r"\b(?:cluster_configs|jobs)/[\w./-]+\.(?:yaml|py|md)\b", text))
    assert paths
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert not missing, f"README names files that do not exist: {missing}"
