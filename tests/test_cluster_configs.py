"""Every cluster config parses, and the command each one runs is a real jobs.score command line."""
import importlib.util
import json
import re
import shlex
import subprocess
from pathlib import Path

import yaml

from jobs import curate, score
from ma_agiqa import list_models
from ma_agiqa.checkpoint import is_trained

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def check_score_command(command: str):
    argv = shlex.split(command)
    i = argv.index("-m")
    assert argv[i + 1] == "jobs.score" and importlib.util.find_spec("jobs.score") is not None
    args = score.parse_args(argv[i + 2 :])  # exits (fails the test) on an unknown flag
    check_model(args)
    return args


def check_model(args):
    """A model with trained heads (a checkpoint URI, or a registered model that ships them); only a smoke run
    says --allow-untrained."""
    if args.model.startswith("s3://"):
        assert args.model.endswith("/") and not args.allow_untrained
    elif not args.allow_untrained:
        assert args.model in list_models() and is_trained(args.model)


def test_raycluster_has_a_cpu_head_and_gpu_workers():
    spec = yaml.safe_load((CLUSTER / "raycluster.yaml").read_text())
    assert spec["kind"] == "RayCluster" and spec["apiVersion"] == "ray.io/v1"
    assert spec["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (worker,) = spec["spec"]["workerGroupSpecs"]
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1 and int(limits["cpu"]) >= 8


def test_rayjob_runs_the_scoring_job():
    spec = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert spec["kind"] == "RayJob"
    args = check_score_command(spec["spec"]["entrypoint"])
    assert args.manifest.startswith("s3://") and args.output.startswith("s3://")
    runtime_env = yaml.safe_load(spec["spec"]["runtimeEnvYAML"])
    assert "working_dir" in runtime_env
    assert spec["spec"]["shutdownAfterJobFinishes"] is True


def test_aws_launcher_yaml_is_valid_for_ray():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    assert any("pip install" in c for c in config["setup_commands"])


def test_the_image_installs_what_the_shipped_model_needs():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert 'pip install --no-cache-dir -e ".[offline]"' in dockerfile
    assert is_trained("ma-agiqa-offline")
    for name in ("ma-agiqa-paper", "ma-agiqa-small", "ma-agiqa-qwen2-vl", "tiny-random"):
        assert not is_trained(name)


def test_runtime_env_ships_the_repository():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert not any(k.startswith("AWS_SECRET") for k in env.get("env_vars", {}))


def test_sample_submit_script_is_valid_bash_and_runs_the_job():
    script = (CLUSTER / "score-sample.sh").read_text()
    subprocess.run(["bash", "-n", str(CLUSTER / "score-sample.sh")], check=True)
    command = script.split("-- \\\n", 1)[1].replace("\\\n", " ")
    command = command.replace('"${OUTPUT:-/tmp/ma-agiqa-sample-scores}"', "/tmp/out")
    args = check_score_command(command)
    assert (REPO / args.manifest).is_file()
    assert args.model == "tiny-random" and args.allow_untrained  # a smoke run, and it says so


def test_curate_cronjob_submits_a_real_curate_command_to_the_raycluster():
    spec = yaml.safe_load((CLUSTER / "curate-cronjob.yaml").read_text())
    assert spec["kind"] == "CronJob" and spec["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = spec["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    submit, command = container["args"][0].split(" -- ", 1)
    cluster = yaml.safe_load((CLUSTER / "raycluster.yaml").read_text())["metadata"]["name"]
    assert f"--address http://{cluster}-head-svc:8265" in submit and "--submission-id" in submit
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "jobs.curate"] and importlib.util.find_spec("jobs.curate") is not None
    args = curate.parse_args(argv[3:])  # exits (fails the test) on an unknown flag
    check_model(args)
    assert args.model.startswith("s3://") and args.per == "prompt" and args.scores.startswith("s3://")


def test_the_cluster_readme_documents_every_file_and_its_commands_run():
    """The README's table names exactly the files in cluster/; every repository path it names exists; the
    Dockerfile copies what exists; the crontab line is a real jobs.curate command with a trained model."""
    readme = (CLUSTER / "README.md").read_text()
    table = set(re.findall(r"^\| `([^`]+)` \|", readme, re.M))
    assert table == {p.name for p in CLUSTER.iterdir()} - {"README.md"}
    named = set(re.findall(r"\b((?:cluster|tests|benchmarks|jobs|ma_agiqa|samples)/[\w./-]*\w)", readme))
    assert named and [p for p in sorted(named) if not (REPO / p).exists()] == []
    copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert copied and [p for c in copied for p in c.split() if not (REPO / p).exists()] == []
    (cron,) = [line for line in readme.splitlines() if line.startswith("0 2 * * *")]
    argv = shlex.split(cron.split(" -- ", 1)[1])
    assert argv[:3] == ["python", "-m", "jobs.curate"]
    check_model(curate.parse_args(argv[3:]))
