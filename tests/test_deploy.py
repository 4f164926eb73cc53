"""Deploy: the deployments on a real local Prefect server, and the container and cluster files.

The end-to-end test runs the operator's one-machine script
(``deploy/local/start.sh``) exactly as the guide says: a Prefect server on
SQLite, the process work pool and a worker, and ``prefect deploy`` of
``deploy/prefect.yaml``. It then starts the reprocess deployment with new
parameters and waits for the worker's flow run to complete on the tiny bundle.

No Docker engine or Kubernetes cluster is available to the tests, so the
compose file and the Kubernetes manifests are checked for what can go wrong
without one: they parse, and every image, volume, claim, secret and variable
they reference is one the Dockerfile, the files themselves or the guide
defines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from conftest import gray_scene
from PIL import Image

from diffcolor.archive.layout import OutputLayout
from diffcolor.common.items import ItemRequest
from diffcolor.pipeline import colorize_item

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROJECT_IMAGE = "diffcolor-archive"  # the image deploy/Dockerfile builds (tag documented in deploy/README.md)
PUBLIC_IMAGES = ("postgres", "minio/minio", "prefecthq/prefect")  # named in deploy/README.md
CAPTION = "a dog sitting on a wooden bench"
NEW_TARGET = "a brown dog sitting on a red wooden bench"
START_TIMEOUT = 300  # seconds for start.sh to report ready on a loaded 2-core machine
RUN_TIMEOUT = 420  # seconds for the reprocess flow run, worker pick-up included


def _yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _guide() -> str:
    return (DEPLOY / "README.md").read_text()


def _env_example() -> set[str]:
    """The variables deploy/.env.example sets or shows (``# NAME=default`` lines)."""
    return set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", (DEPLOY / ".env.example").read_text(), flags=re.MULTILINE))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- prefect.yaml, read as a file ----------------------------------------------------------


def test_prefect_yaml_has_a_nightly_schedule_with_a_timezone_and_a_reprocess_deployment():
    config = yaml.safe_load((DEPLOY / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    assert set(deployments) == {"nightly", "reprocess", "verify"}
    nightly, again = deployments["nightly"], deployments["reprocess"]
    [weekly] = deployments["verify"]["schedules"]  # the fixity audit: weekly, away from the nightly run
    assert weekly == {"cron": "0 6 * * 0", "timezone": "Europe/London", "active": True}
    assert deployments["verify"]["parameters"] == {"output": "{{ $DIFFCOLOR_OUTPUT }}", "repair": False}

    [schedule] = nightly["schedules"]
    assert schedule["cron"] == "0 22 * * *" and schedule["timezone"] == "Europe/London"
    assert nightly["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert set(nightly["parameters"]) == {"manifest", "output", "model", "options"}
    assert again["schedules"] == []
    # Both entrypoints exist in the checkout, and flow runs start in the project folder.
    for deployment in deployments.values():
        path, _, function = deployment["entrypoint"].partition(":")
        assert f"def {function}(" in (ROOT / path).read_text()
        assert deployment["work_pool"]["name"] == "diffcolor"
    [step] = config["pull"]
    assert step == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $DIFFCOLOR_PROJECT_DIR }}"}}
    # Every variable prefect.yaml reads is documented for the operator, and the
    # code's folder is set wherever a worker runs: by start.sh and by the image.
    text = "\n".join(line for line in (DEPLOY / "prefect.yaml").read_text().splitlines() if not line.lstrip().startswith("#"))
    used = set(re.findall(r"\{\{\s*\$(\w+)\s*\}\}", text))
    assert used - {"DIFFCOLOR_PROJECT_DIR"} <= _env_example() and all(f"`{name}`" in _guide() for name in used)
    assert 'export DIFFCOLOR_PROJECT_DIR="$ROOT"' in (DEPLOY / "local" / "start.sh").read_text()
    assert "DIFFCOLOR_PROJECT_DIR=/opt/diffcolor" in (DEPLOY / "Dockerfile").read_text()


# --- the deployments on a real local server ------------------------------------------------


@pytest.fixture
def colourised_item(models, smoke, tmp_path):
    """A collection output holding one colourised item (version 1, with its colour state)."""
    source = tmp_path / "images" / "bench.png"
    source.parent.mkdir()
    Image.fromarray(np.round(gray_scene(48, 64) * 255).astype(np.uint8)).save(source)
    output = tmp_path / "collection-out"
    request = ItemRequest(item_id="bench", source_uri=str(source), caption=CAPTION, seed=7)
    [record] = colorize_item(models, request, OutputLayout(str(output)).item_prefix("bench"), smoke, preset="smoke")
    assert record["version"] == 1 and record["status"] == "done"
    return output, "bench"


def _service_environment(tmp_path, port: int) -> dict[str, str]:
    """The environment start.sh gets: a private state folder, port and cache; no inherited Prefect settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update({
        "DIFFCOLOR_HOME": str(tmp_path / "service"),
        "DIFFCOLOR_ENV_FILE": str(tmp_path / "no.env"),  # never a developer's deploy/.env
        "DIFFCOLOR_PORT": str(port),
        "DIFFCOLOR_VENV": sys.prefix,
        "DIFFCOLOR_MANIFEST": str(tmp_path / "nightly.parquet"),
        "DIFFCOLOR_OUTPUT": str(tmp_path / "nightly-out"),  # the reprocess run below names another output
        "DIFFCOLOR_MODEL": "tiny",
        "DIFFCOLOR_PRESET": "smoke",
        "PREFECT_SERVER_UI_ENABLED": "false",  # nothing looks at it here; saves start-up time
        "HF_HUB_OFFLINE": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # pick the run up within 2 s, not the default 10
    })
    env["DIFFCOLOR_CACHE"] = os.environ["DIFFCOLOR_CACHE"]  # the session's tiny bundle (conftest)
    return env


def _wait_until_ready(process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if "ready:" in log.read_text():
            return
        if process.poll() is not None:
            pytest.fail(f"start.sh exited with {process.returncode}:\n{log.read_text()}")
        time.sleep(0.5)
    pytest.fail(f"start.sh not ready after {START_TIMEOUT} s:\n{log.read_text()}")


def _stop(process: subprocess.Popen, home: Path) -> None:
    """SIGTERM to start.sh, which stops its workers then its server; SIGKILL to whatever is left."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
    # Each service runs in a session of its own, named by its pid file; start.sh has its own too.
    groups = [int(path.read_text()) for path in (home / "run").glob("*.pid")] + [process.pid]
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    process.wait(timeout=10)


def _placement(output: Path, run_name: str) -> dict:
    """Where the one item of a run ran (its record's ``placement``: the worker's pid and device)."""
    from diffcolor.archive.results import read_results

    [row] = read_results(str(output / "runs" / run_name / "results.parquet")).to_pylist()
    return json.loads(row["record_json"])["placement"]


def _logs(home: Path) -> str:
    return "\n".join(f"--- {path.name}\n{path.read_text()[-4000:]}" for path in sorted((home / "logs").glob("*.log")))


@pytest.fixture
def local_service(cache_dir, tmp_path):
    """``deploy/local/start.sh --foreground`` on a free port with a private state folder.

    Started before the item fixture so that the server boots while the item is
    colourised; the test waits for its "ready" line. Stopped the way systemd
    stops it (SIGTERM to the script), then anything left is killed.
    """
    env = _service_environment(tmp_path, _free_port())
    home = Path(env["DIFFCOLOR_HOME"])
    log = tmp_path / "start.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(["bash", str(DEPLOY / "local" / "start.sh"), "--foreground"], env=env, cwd=tmp_path,
                                   stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process, env, log
    finally:
        _stop(process, home)


def test_deployments_register_on_a_local_server_and_a_reprocess_run_completes(local_service, colourised_item):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    process, env, log = local_service
    output, item_id = colourised_item
    home = Path(env["DIFFCOLOR_HOME"])

    # 1. Server, pool, deployments and worker, as the guide starts them.
    _wait_until_ready(process, log)
    api = f"http://127.0.0.1:{env['DIFFCOLOR_PORT']}/api"
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        # 2. The nightly deployment: cron and timezone, its parameters, one run at a time.
        nightly = client.read_deployment_by_name("colorize-collection/nightly")
        [schedule] = nightly.schedules
        assert schedule.active and schedule.schedule.cron == "0 22 * * *"
        assert schedule.schedule.timezone == "Europe/London"
        assert nightly.parameters == {"manifest": env["DIFFCOLOR_MANIFEST"], "output": env["DIFFCOLOR_OUTPUT"],
                                      "model": "tiny", "options": {"preset": "smoke"}}
        assert nightly.global_concurrency_limit.limit == 1
        assert nightly.concurrency_options.collision_strategy.value == "CANCEL_NEW"
        assert (nightly.work_pool_name, nightly.work_queue_name) == ("diffcolor", "nightly")

        # 2b. The weekly fixity audit of the same output.
        audit = client.read_deployment_by_name("verify-output/verify")
        [weekly] = audit.schedules
        assert weekly.active and weekly.schedule.cron == "0 6 * * 0"
        assert audit.parameters == {"output": env["DIFFCOLOR_OUTPUT"], "repair": False}

        # 3. The reprocess deployment, started with new parameters: another output, a new target.
        again = client.read_deployment_by_name("reprocess/reprocess")
        assert again.schedules == [] and again.work_queue_name == "reprocess"
        # The code's folder is the worker's, resolved when the run starts (not at registration).
        assert again.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                     {"directory": "{{ $DIFFCOLOR_PROJECT_DIR }}"}}]
        run = client.create_flow_run_from_deployment(again.id, parameters={
            "output": str(output),
            "targets": [{"item_id": item_id, "target_prompt": NEW_TARGET}],
            "options": {"device": "cpu", "retries": 0},
        })
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            run = client.read_flow_run(run.id)
            if run.state.is_final() or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert run.state.is_completed(), f"flow run ended {run.state!r}\n{_logs(home)}"

        # 3a. A second reprocess run (a fresh flow-run process) finds the model loaded in the warm-pool service:
        #     its item ran on the same worker process as the first run's.
        second = client.create_flow_run_from_deployment(again.id, parameters={
            "output": str(output), "targets": [{"item_id": item_id, "color_map": {"dog": "red"}}],
            "options": {"device": "cpu", "retries": 0}})
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (second := client.read_flow_run(second.id)).state.is_final() and time.monotonic() < deadline:
            time.sleep(1)
        assert second.state.is_completed(), f"flow run ended {second.state!r}\n{_logs(home)}"
        first_pid, second_pid = (_placement(output, name)["pid"] for name in (run.name, second.name))
        assert first_pid == second_pid and psutil.pid_exists(first_pid), _logs(home)
        assert "warm pools at" in (home / "logs" / "warm.log").read_text()

        # 3b. The fixity audit, started by hand on that output: every record holds.
        audit_run = client.create_flow_run_from_deployment(audit.id, parameters={"output": str(output)})
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            audit_run = client.read_flow_run(audit_run.id)
            if audit_run.state.is_final() or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert audit_run.state.is_completed(), f"verify run ended {audit_run.state!r}\n{_logs(home)}"

    # 4. The item got a new version per run, rendered from its colour state, the first with the new prompt.
    result = json.loads((output / "items" / item_id / "versions" / "v0002.json").read_text())
    assert result["version"] == 2 and result["status"] == "done"
    assert result["target_prompt"] == NEW_TARGET and result["finetune_steps_run"] == 0
    assert (output / "items" / item_id / "versions" / "v0001.json").exists()
    assert json.loads((output / "items" / item_id / "result.json").read_text())["version"] == 3
    assert len(list((output / "runs").iterdir())) == 2
    for run_folder in (output / "runs").iterdir():
        assert (run_folder / "report.html").exists() and (run_folder / "results.parquet").exists()


# --- container and cluster files (no Docker engine or cluster here) ------------------------


def _documented_tag() -> str:
    """The project image tag of the guide's build command (every one of them)."""
    tags = set(re.findall(r"docker build -f deploy/Dockerfile -t diffcolor-archive:(\S+) \.", _guide()))
    assert len(tags) == 1, f"the guide documents build tags {tags}"
    return tags.pop()


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


def _dockerfile_arg(name: str) -> str:
    [value] = [args.split("=", 1)[1] for op, args in _dockerfile_instructions() if op == "ARG" and args.startswith(name + "=")]
    return value


def _compose_resolve(text: str) -> str:
    """``${VAR:-default}`` to its default; any other ``${VAR...}`` to ``<VAR>`` (no value known here)."""
    text = re.sub(r"\$\{(\w+):?-([^}]*)\}", lambda m: m.group(2), text)
    return re.sub(r"\$\{(\w+)[^}]*\}", lambda m: f"<{m.group(1)}>", text)


def _check_image(image: str, tag: str, where: str) -> None:
    repository, _, image_tag = image.rpartition(":")
    if repository == PROJECT_IMAGE:
        assert image_tag == tag, f"{where}: {image} is not the documented {PROJECT_IMAGE}:{tag}"
        return
    assert repository in PUBLIC_IMAGES, f"{where}: {image} is neither the project image nor a public one the guide names"
    assert image_tag and image_tag != "latest", f"{where}: {image} is not pinned to a release"
    assert image in _guide(), f"{where}: {image} is not named in deploy/README.md"


def test_compose_references_only_the_project_image_public_images_declared_volumes_and_documented_variables():
    text = (DEPLOY / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    services, volumes = compose["services"], compose["volumes"]
    tag = _documented_tag()

    # 1. Every variable is documented in the guide and in .env.example.
    variables = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    assert variables, "compose.yaml is wired by environment variables"
    assert not variables - _env_example(), "variables missing from deploy/.env.example"
    assert not [name for name in variables if f"`{name}`" not in _guide()], "variables missing from deploy/README.md"

    # 2. Images: the project image (built from deploy/Dockerfile) or a named, pinned public image.
    assert {"postgres", "prefect-server", "minio", "worker"} <= set(services)
    for name, service in services.items():
        image = _compose_resolve(service["image"])
        _check_image(image, tag, f"compose service {name}")
        if image.startswith(PROJECT_IMAGE + ":"):
            assert service["build"]["dockerfile"] == "deploy/Dockerfile"
            assert (DEPLOY / service["build"]["context"]).resolve() == ROOT
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
    # The server runs the Prefect the image installs.
    server_tag = _compose_resolve(services["prefect-server"]["image"]).rpartition(":")[2]
    assert server_tag.startswith(_dockerfile_arg("PREFECT_VERSION") + "-")

    # 3. Named volumes are declared (and every declared one is used); bind mounts come from variables.
    used = set()
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source, target = _compose_resolve(mount).split(":")[:2]
            if source.startswith(("/", ".", "<")):
                assert mount.startswith("${"), f"{name}: host path {source} should come from a variable"
            else:
                assert source in volumes, f"{name} mounts undeclared volume {source}"
                used.add(source)
    assert used == set(volumes)

    # 4. The GPU worker: the project image, every GPU, the models volume where the image expects it.
    worker = services["worker"]
    [gpus] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia" and "gpu" in gpus["capabilities"]
    assert "models:/models" in worker["volumes"] and ("VOLUME", '["/models"]') in _dockerfile_instructions()
    # The Prefect worker, beside the warm-pool service that keeps the reprocess runs' models loaded.
    assert worker["command"][:4] == ["python", "-m", "flows.warm", "with"]
    command = worker["command"][worker["command"].index("--") + 1:]
    assert command[:5] == ["prefect", "worker", "start", "--pool", "diffcolor"]


def _pod_specs(document: dict) -> list[tuple[str, dict]]:
    name = f"{document['kind']}/{document['metadata']['name']}"
    if document["kind"] in ("Deployment", "Job"):
        return [(name, document["spec"]["template"]["spec"])]
    if document["kind"] == "RayCluster":
        spec = document["spec"]
        return [(f"{name} head", spec["headGroupSpec"]["template"]["spec"])] + [
            (f"{name} {group['groupName']}", group["template"]["spec"]) for group in spec["workerGroupSpecs"]]
    return []


def test_kubernetes_manifests_parse_and_reference_declared_volumes_claims_configs_and_documented_secrets():
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    files = sorted(path.name for path in (DEPLOY / "k8s").glob("*.yaml") if path.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files
    documents = [doc for name in files for doc in _yaml_documents(DEPLOY / "k8s" / name)]
    declared = {kind: {d["metadata"]["name"] for d in documents if d["kind"] == kind}
                for kind in ("ConfigMap", "PersistentVolumeClaim")}
    tag = _documented_tag()
    [image_override] = kustomization["images"]
    assert image_override["name"] == PROJECT_IMAGE and image_override["newTag"] == tag

    for document in documents:
        for where, pod in _pod_specs(document):
            volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
            for volume in volumes.values():
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in declared["PersistentVolumeClaim"], where
            for container in pod["containers"]:
                _check_image(container["image"], tag, where)
                for mount in container.get("volumeMounts", []):
                    assert mount["name"] in volumes, f"{where} mounts undeclared volume {mount['name']}"
                for source in container.get("envFrom", []):
                    if "configMapRef" in source:
                        assert source["configMapRef"]["name"] in declared["ConfigMap"], where
                    if "secretRef" in source:  # created by the operator, as the guide says
                        assert f"create secret generic {source['secretRef']['name']}" in _guide(), where

    # The KubeRay cluster: the image's Ray version, a GPU worker group with the models volume.
    [ray] = [d for d in documents if d["kind"] == "RayCluster"]
    assert ray["apiVersion"] == "ray.io/v1" and ray["spec"]["rayVersion"] == _dockerfile_arg("RAY_VERSION")
    groups = ray["spec"]["workerGroupSpecs"]
    assert groups and all(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
                          for g in groups)
    assert all(any(m["mountPath"] == "/models" for m in g["template"]["spec"]["containers"][0]["volumeMounts"])
               for g in groups)
    # How a flow run reaches it: RAY_ADDRESS names KubeRay's head Service and the head's client port.
    [worker] = [d for d in documents if d["kind"] == "Deployment"]
    [container] = worker["spec"]["template"]["spec"]["containers"]
    address = {e["name"]: e["value"] for e in container["env"]}["RAY_ADDRESS"]
    head_ports = {p["containerPort"] for p in ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert address == f"ray://{ray['metadata']['name']}-head-svc:10001" and 10001 in head_ports
    assert container["args"][:4] == ["python", "-m", "flows.warm", "with"]
    command = container["args"][container["args"].index("--") + 1:]
    assert command[:5] == ["prefect", "worker", "start", "--pool", "diffcolor"]

    # kustomize (built into kubectl) renders the whole set, offline, when kubectl is installed.
    if shutil.which("kubectl"):
        rendered = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=60)
        assert rendered.returncode == 0, rendered.stderr


def test_dockerfile_installs_the_project_and_bakes_in_no_weights():
    instructions = _dockerfile_instructions()
    copied = " ".join(args for op, args in instructions if op in ("COPY", "ADD"))
    for needed in ("pyproject.toml", "diffcolor", "flows", "deploy/prefect.yaml", "deploy/register.sh"):
        assert needed in copied, f"the image lacks {needed}"
    installs = [i for i, (op, args) in enumerate(instructions) if op == "RUN" and re.search(r"pip install -e \"?\.\[s3\]", args)]
    last_copy = max(i for i, (op, _) in enumerate(instructions) if op == "COPY")
    assert installs and installs[0] > last_copy, "the project is installed after its files are copied"
    workdir = [args for op, args in instructions if op == "WORKDIR"][-1]
    assert f"DIFFCOLOR_PROJECT_DIR={workdir}" in " ".join(args for op, args in instructions if op == "ENV")
    assert ("VOLUME", '["/models"]') in instructions

    # No weights: none copied in, none downloaded or generated at build time, none in the build context.
    assert not re.search(r"\.(safetensors|bin|ckpt|pt|pth|onnx)\b|models|huggingface|\.cache", copied)
    runs = " ".join(args for op, args in instructions if op == "RUN")
    for fetch in ("huggingface-cli", "hf download", "snapshot_download", "from_pretrained", "tiny-bundle",
                  "write_tiny_bundle", "git lfs", "wget http", "curl "):
        assert fetch not in runs, f"the image build runs {fetch!r}"
    ignored = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert ignored[0] == "*", "the build context starts empty and lists what the image needs"
    assert {"**/*.safetensors", "**/*.ckpt", "**/*.bin", "**/.env"} <= set(ignored)


def test_shell_scripts_parse():
    for script in [DEPLOY / "register.sh", *sorted((DEPLOY / "local").glob("*.sh"))]:
        checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, f"{script.name}: {checked.stderr}"
